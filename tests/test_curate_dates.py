"""Curation input: dates are read in documented formats only, and a run in which nothing
survives still prints its drop counts and writes its report."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from recipe.data.cli import main as data_main
from recipe.data.curate.pipeline import CurateConfig, curate, failed_dir
from recipe.data.curate.url_dedup import parse_date, read_date
from recipe.data.errors import DataError

TEXT = "The river runs past the old mill and the town square, where the market is held on Saturdays. "


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run(corpus: Path, out: Path, stages: list, log=lambda s: None) -> dict:
    cfg = CurateConfig(input=[str(corpus)], output=str(out), workers=1, batch_documents=4,
                       stages=[*stages, {"name": "pack", "args": {"weights": None, "val_documents": 0}}])  # fmt: skip
    return curate(cfg, log=log, progress=False)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2024-01-01", utc(2024, 1, 1)),
        ("2024-01-01T10:00:00", utc(2024, 1, 1, 10)),  # no zone: UTC
        ("2024-01-01T10:00:00Z", utc(2024, 1, 1, 10)),
        ("2024-01-01 12:00:00+02:00", utc(2024, 1, 1, 10)),
        ("20240101T100000Z", utc(2024, 1, 1, 10)),
        ("2024/01/01", utc(2024, 1, 1)),
        ("Mon, 01 Jan 2024 10:00:00 +0000", utc(2024, 1, 1, 10)),  # RFC 2822
        ("Mon, 01 Jan 2024 12:00:00 +0200", utc(2024, 1, 1, 10)),
        ("1 Jan 2024 10:00 GMT", utc(2024, 1, 1, 10)),
        (20240101, utc(2024, 1, 1)),  # compact ISO YYYYMMDD, not 1970-08-23 in seconds
        ("20240101", utc(2024, 1, 1)),
        (20240101.0, utc(2024, 1, 1)),
        (1704103200, utc(2024, 1, 1, 10)),  # Unix seconds in 1990..2100
        ("1704103200", utc(2024, 1, 1, 10)),
        (1704103200.5, utc(2024, 1, 1, 10) + 0.5),
    ],
)
def test_accepted_date_formats(value, expected):
    assert read_date(value) == (expected, None)
    assert parse_date(value) == expected


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "missing"), ("  ", "missing"),
        ("last tuesday", "unknown_format"), ("01/02/2024", "unknown_format"), ("nan", "unknown_format"),
        (True, "unknown_format"), ("Tue, 32 Jan 2024 10:00:00 +0000", "unknown_format"),
        (1704103200000, "number_out_of_range"),  # milliseconds
        (600_000_000, "number_out_of_range"),  # 1989
        (4102444800, "number_out_of_range"),  # 2100-01-01
        (-5, "number_out_of_range"),
        (20241341, "not_a_calendar_date"),
    ],
)  # fmt: skip
def test_unaccepted_dates_say_why(value, reason):
    assert read_date(value) == (None, reason)


def test_compact_date_keeps_the_newest_url_version_and_unparsed_dates_are_counted(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        # Read as seconds, 20240101 would be 1970-08-23 and the 2023 version would win.
        {"text": TEXT + "old", "url": "https://a.org/p", "date": "2023-06-01"},
        {"text": TEXT + "new", "url": "https://a.org/p", "date": 20240101},
        {"text": TEXT + "rfc old", "url": "https://a.org/q", "date": "Fri, 01 Dec 2023 10:00:00 +0000"},
        {"text": TEXT + "rfc new", "url": "https://a.org/q", "date": 1704103200},
        # Unparsed dates: kept undated, so a dated version of the same URL wins over them.
        {"text": TEXT + "undated", "url": "https://a.org/r", "date": "last tuesday"},
        {"text": TEXT + "dated", "url": "https://a.org/r", "date": "2020-01-01"},
        {"text": TEXT + "millis", "url": "https://a.org/s", "date": 1704103200000},
        {"text": TEXT + "no date", "url": "https://a.org/t"},
    ])  # fmt: skip
    report = run(corpus, tmp_path / "out", [{"name": "url_dedup"}])
    stage = next(s for s in report["stages"] if s["name"] == "url_dedup")
    assert stage["dropped"] == {"url_duplicate": {"documents": 3, "bytes": stage["dropped"]["url_duplicate"]["bytes"]}}
    dropped = [json.loads(x) for x in (tmp_path / "out/report/dropped/url_dedup.url_duplicate.jsonl").read_text()
               .splitlines()]  # fmt: skip
    assert [d["source"] for d in dropped] == ["c.jsonl:1", "c.jsonl:3", "c.jsonl:5"]
    assert dropped[0]["detail"] == "a version dated 2024-01-01 is kept"
    assert {k: v for k, v in stage["counters"].items() if k.startswith("date_")} == {
        "date_missing": 1, "date_unparsed": 2, "date_unparsed:number_out_of_range": 1,
        "date_unparsed:unknown_format": 1}  # fmt: skip
    assert stage["notes"]["date_unparsed_examples"] == ["c.jsonl:5: 'last tuesday' (unknown_format)",
                                                        "c.jsonl:7: '1704103200000' (number_out_of_range)"]
    assert report["documents_written"] == 5  # unparsed and missing dates keep their documents
    assert "date_unparsed:unknown_format 1" in (tmp_path / "out/report/report.md").read_text()


def test_all_dropped_prints_the_counts_and_writes_the_report(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"text": TEXT, "url": "https://www.blocked.example/1"},
        {"text": TEXT + "2", "url": "https://sub.blocked.example/2"},
        '{"text": "unterminated',
        {"text": "  "},
    ])  # fmt: skip
    out, lines = tmp_path / "out", []
    with pytest.raises(DataError) as e:
        run(corpus, out, [{"name": "clean"}, {"name": "blocklist"}, {"name": "url_dedup"}], log=lines.append)
    report_dir = failed_dir(out) / "report"
    assert str(e.value) == (f"no document survived curation; see the drop counts per stage above and the report in "
                            f"{report_dir}; loosen the filters or check the input")  # fmt: skip
    assert "\n" not in str(e.value)
    assert lines == [
        "  read: 4 in, 2 out, 2 dropped (empty 1, malformed_json 1)",
        "  clean: 2 in, 2 out, 0 dropped",
        "  blocklist: 2 in, 0 out, 2 dropped (blocked_domain 2)",
        "  url_dedup: 0 in, 0 out, 0 dropped",
        "  pack: 0 in, 0 out, 0 dropped",
    ]
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # nothing that looks like shards
    report = json.loads((report_dir / "report.json").read_text())
    assert report["documents_read"] == 4 and report["documents_written"] == 0
    assert report["documents_quarantined"] == 2 and report["documents_dropped"] == 2
    assert report["error"].startswith("no document survived curation")
    assert "Failed: no document survived" in (report_dir / "report.md").read_text()
    assert (report_dir / "report.html").is_file()
    assert len((report_dir / "dropped" / "blocklist.blocked_domain.jsonl").read_text().splitlines()) == 2
    assert len((report_dir / "quarantine.jsonl").read_text().splitlines()) == 2
    # The CLI: the counts, then the one-line error, exit status 2.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"input: {corpus}\noutput: {out}\nworkers: 1\nstages: [blocklist]\n")
    capsys.readouterr()
    assert data_main(["curate", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"  blocklist: 2 in, 0 out, 2 dropped \(blocked_domain 2\)", err[-3])
    assert err[-1].startswith("error: no document survived curation;")
    # A later run that writes shards removes the failed run's report.
    write_jsonl(corpus, [{"text": TEXT, "url": "https://a.org/1"}])
    assert run(corpus, out, [{"name": "blocklist"}])["documents_written"] == 1
    assert not failed_dir(out).exists()
