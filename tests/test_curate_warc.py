"""Web archives in: WARC / .warc.gz files, local or behind an fsspec URL, through the whole curation.

The pages are real HTML that the standard library generates offline: pydoc's HTML
documentation of a few modules, a ``difflib.HtmlDiff`` side-by-side diff and a
``calendar.HTMLCalendar`` year page. The archive is written with warcio, as a crawler
writes one: a ``warcinfo`` record, then a ``request`` and a ``response`` per page.
"""

from __future__ import annotations

import calendar
import difflib
import importlib
import inspect
import io
import json
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from recipe.data.cli import main as data_main
from recipe.data.curate.pipeline import CurateConfig, curate, load_config
from recipe.data.curate.reader import Quarantined, Skipped, read_records
from recipe.data.curate.record import Doc, doc_id
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet

MODULES = ("textwrap", "json", "difflib", "fnmatch", "colorsys")
OLD_DATE, NEW_DATE = "2023-05-01T08:00:00Z", "2024-03-01T10:30:00Z"


def pages() -> dict[str, tuple[str, bytes]]:
    """URL -> (content type, body) of the real pages."""
    import pydoc

    out = {}
    for name in MODULES:
        doc = pydoc.HTMLDoc()
        html = doc.page(f"Python: module {name}", doc.docmodule(importlib.import_module(name)))
        out[f"https://docs.example.org/library/{name}.html"] = ("text/html; charset=utf-8", html.encode())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    old = (stdlib / "fnmatch.py").read_text(encoding="utf-8").splitlines()
    new = [line.replace("pattern", "pat") for line in old]
    diff = difflib.HtmlDiff(wrapcolumn=80).make_file(old, new, "fnmatch.py", "fnmatch.py (renamed)")
    out["https://diffs.example.org/fnmatch"] = ("text/html; charset=utf-8", diff.encode())
    year = calendar.HTMLCalendar().formatyearpage(2024, encoding="utf-8")
    out["https://calendar.example.org/2024"] = ("text/html", year)
    out["https://docs.example.org/json.txt"] = ("text/plain; charset=utf-8", inspect.getdoc(json).encode())
    return out


def write_warc(f, gzip: bool = True) -> dict[str, str]:
    """Write the crawl into ``f``; return {url: date} of the responses that must become documents."""
    writer = WARCWriter(f, gzip=gzip)
    writer.write_record(writer.create_warcinfo_record("crawl.warc.gz", {"software": "test crawler"}))
    expected = {}

    def fetch(url: str, status: str, ctype: str, body: bytes, date: str) -> None:
        req = StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
        writer.write_record(writer.create_warc_record(url, "request", http_headers=req,
                                                      warc_headers_dict={"WARC-Date": date}))  # fmt: skip
        http = StatusAndHeaders(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))],
                                protocol="HTTP/1.1")  # fmt: skip
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http,
                                                      warc_headers_dict={"WARC-Date": date}))  # fmt: skip

    for i, (url, (ctype, body)) in enumerate(pages().items()):
        date = f"2024-02-{10 + i:02d}T12:00:00Z"
        fetch(url, "200 OK", ctype, body, date)
        expected[url] = date
    # textwrap's page is crawled twice more, once before and once after the first crawl: the newest
    # copy is kept, the two others are URL duplicates.
    again = "https://docs.example.org/library/textwrap.html"
    fetch(again, "200 OK", *pages()[again], OLD_DATE)
    fetch(again, "200 OK", *pages()[again], NEW_DATE)
    expected[again] = NEW_DATE
    # Not documents: an image, a missing page, a redirect.
    png, day = b"\x89PNG\r\n\x1a\n" + bytes(64), "2024-02-01T00:00:00Z"
    fetch("https://docs.example.org/logo.png", "200 OK", "image/png", png, day)
    fetch("https://docs.example.org/gone.html", "404 Not Found", "text/html", b"<html>gone</html>", day)
    fetch("https://docs.example.org/old", "301 Moved Permanently", "text/html", b"", day)
    return expected


N_RESPONSES = len(MODULES) + 3 + 2 + 3  # pages, the two re-crawls, the three non-documents
FIRST_TEXTWRAP_DATE = "2024-02-10T12:00:00Z"
EXPECTED_SKIPS = {"skipped:warc_warcinfo": 1, "skipped:warc_request": N_RESPONSES, "skipped:content_type_not_text": 1,
                  "skipped:http_status_4xx": 1, "skipped:http_status_3xx": 1}  # fmt: skip


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("crawl")
    with open(d / "part-00000.warc.gz", "wb") as f:
        expected = write_warc(f)
    return d / "part-00000.warc.gz", expected


def test_reader_keeps_html_and_text_responses_with_url_and_date(crawl):
    path, expected = crawl
    records = list(read_records(path))
    docs = [r for r in records if isinstance(r, Doc)]
    skipped = [r for r in records if isinstance(r, Skipped)]
    assert not [r for r in records if isinstance(r, Quarantined)]
    assert len(docs) == len(pages()) + 2
    assert {d.url: d.date for d in docs} == expected  # the newest copy of textwrap's page is the last one
    assert [d.date for d in docs if d.url.endswith("textwrap.html")] == [FIRST_TEXTWRAP_DATE, OLD_DATE, NEW_DATE]
    by_url = {d.url: d for d in docs}
    # Markup is gone, the words stay: pydoc's page of textwrap documents TextWrapper and its methods.
    page = by_url["https://docs.example.org/library/textwrap.html"].text
    assert "TextWrapper" in page and "fill(" in page and "<td" not in page and "<a href" not in page
    assert "December" in by_url["https://calendar.example.org/2024"].text
    assert by_url["https://docs.example.org/json.txt"].text == inspect.getdoc(json)
    # Sources are the file and the byte offset of the record: distinct, and in file order.
    offsets = [int(d.source.rsplit(":", 1)[1]) for d in docs]
    assert all(d.source.startswith("part-00000.warc.gz:") for d in docs) and offsets == sorted(set(offsets))
    reasons = {}
    for s in skipped:
        reasons[f"skipped:{s.reason}"] = reasons.get(f"skipped:{s.reason}", 0) + 1
    assert reasons == EXPECTED_SKIPS


def test_uncompressed_warc_reads_the_same(crawl, tmp_path):
    path, _ = crawl
    with open(tmp_path / "plain.warc", "wb") as f:
        write_warc(f, gzip=False)
    plain = [(d.url, d.date, d.text) for d in read_records(tmp_path / "plain.warc") if isinstance(d, Doc)]
    gz = [(d.url, d.date, d.text) for d in read_records(path) if isinstance(d, Doc)]
    assert plain == gz


def test_truncated_warc_fails_with_one_line(crawl, tmp_path):
    path, _ = crawl
    data = path.read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.warc\.gz: truncated at the record at byte \d+ .*re-download it") as e:
        list(read_records(tmp_path / "cut.warc.gz"))
    assert "\n" not in str(e.value)
    (tmp_path / "notes.warc").write_text("These are notes, not a web archive.\n" * 5)
    with pytest.raises(DataError, match=r"notes\.warc: unreadable WARC \(OSError: .*\); re-download it or remove it"):
        list(read_records(tmp_path / "notes.warc"))


def test_http_content_encoding_is_decoded(tmp_path):
    import gzip

    html = pages()["https://calendar.example.org/2024"][1]
    with open(tmp_path / "enc.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for coding, body in (("gzip", gzip.compress(html)), ("compress", html)):
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), ("Content-Encoding", coding)],
                                    protocol="HTTP/1.1")  # fmt: skip
            writer.write_record(writer.create_warc_record(f"https://calendar.example.org/{coding}", "response",
                                                          payload=io.BytesIO(body), http_headers=http))  # fmt: skip
    doc, bad = list(read_records(tmp_path / "enc.warc.gz"))
    assert isinstance(doc, Doc) and "December" in doc.text
    assert isinstance(bad, Quarantined) and bad.reason == "bad_content_encoding"
    assert bad.detail == "unsupported Content-Encoding 'compress'"


def write_config(path: Path, input_: str, out: Path) -> Path:
    path.write_text(
        f"input: [{input_!r}]\noutput: {str(out)!r}\nworkers: 1\nstages:\n"
        "  - clean\n  - url_dedup\n  - near_dedup\n  - domains\n"
        "  - name: pack\n    args: {weights: null, val_documents: 1}\n",
        encoding="utf-8",
    )
    return path


def test_warc_gz_through_the_whole_curation(crawl, tmp_path):
    path, expected = crawl
    cfg = write_config(tmp_path / "warc.yaml", str(path.parent), tmp_path / "out")
    assert data_main(["curate", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report" / "report.json").read_text())
    read = report["stages"][0]
    assert {k: v for k, v in read["counters"].items() if k.startswith("skipped:")} == EXPECTED_SKIPS
    assert report["documents_read"] == len(expected) + 2 and report["documents_quarantined"] == 0
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages["url_dedup"]["dropped"]) == ["url_duplicate"]
    assert stages["url_dedup"]["dropped"]["url_duplicate"]["documents"] == 2
    written = ShardSet(out / "train").num_documents + ShardSet(out / "val").num_documents
    assert written == report["documents_written"] == len(expected)
    # URL and date flow from the WARC headers to the fate log, and the older copy names the newer one.
    fates = pq.read_table(out / "report" / "fates.parquet").to_pylist()
    kept = {r["url"]: r["date"] for r in fates if r["decision"] in ("kept", "modified")}
    assert kept == expected
    dups = [r for r in fates if r["reason"] == "url_duplicate"]
    assert sorted(r["date"] for r in dups) == [OLD_DATE, FIRST_TEXTWRAP_DATE]
    assert {r["url"] for r in dups} == {"https://docs.example.org/library/textwrap.html"}
    by_id = {r["doc_id"]: r for r in fates}
    for dup in dups:
        newest = by_id[dup["duplicate_of"]]
        assert newest["date"] == NEW_DATE and newest["decision"] in ("kept", "modified")


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(crawl, tmp_path, scheme):
    import fsspec

    path, expected = crawl
    if scheme == "file":
        url = path.parent.as_uri()
    else:
        url = "memory://curate-warc-test/crawl"
        with fsspec.open(f"{url}/2024/part-00000.warc.gz", "wb") as f:
            f.write(path.read_bytes())
        with fsspec.open(f"{url}/notes.jsonl", "w") as f:
            note = {"text": inspect.getdoc(difflib), "url": "https://docs.example.org/difflib-notes"}
            f.write(json.dumps(note) + "\n")
    report = curate(CurateConfig(input=[url], output=str(tmp_path / "out"), workers=1,
                                 stages=["clean", "url_dedup", {"name": "pack", "args": {"weights": None}}]),
                    log=lambda s: None, progress=False)  # fmt: skip
    extra = 1 if scheme == "memory" else 0
    assert report["documents_read"] == len(expected) + 2 + extra
    assert report["documents_written"] == len(expected) + extra
    fates = pq.read_table(tmp_path / "out" / "report" / "fates.parquet").to_pylist()
    sources = {r["source"] for r in fates}
    prefix = "2024/part-00000.warc.gz:" if scheme == "memory" else "part-00000.warc.gz:"
    assert sum(s.startswith(prefix) for s in sources) == len(expected) + 2
    assert ("notes.jsonl:1" in sources) == (scheme == "memory")
    assert all(r["doc_id"] == doc_id(r["source"]) for r in fates)
    if scheme == "memory":
        fsspec.filesystem("memory").rm("/curate-warc-test", recursive=True)


def test_missing_url_input_fails_with_one_line(tmp_path):
    with pytest.raises(DataError, match=r"input memory://nowhere/crawl does not exist; check the URL"):
        list(read_records("memory://nowhere/crawl"))


def test_url_folder_is_read_in_the_order_of_a_local_one(tmp_path):
    import fsspec

    from recipe.data.curate.reader import list_sources

    names = ["a.jsonl", "a/b.jsonl", "a/c/d.warc.gz", "b.txt", ".hidden/e.jsonl", "notes.csv"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
        with fsspec.open(f"memory://curate-order-test/{name}", "w") as f:
            f.write("x")
    try:
        local = [s.label for s in list_sources(tmp_path)]
        assert local == ["a/b.jsonl", "a/c/d.warc.gz", "a.jsonl", "b.txt"]
        assert [s.label for s in list_sources("memory://curate-order-test")] == local
        assert [s.label for s in list_sources(tmp_path.as_uri())] == local
    finally:
        fsspec.filesystem("memory").rm("/curate-order-test", recursive=True)


def test_warc_read_by_ray_tasks_gives_the_local_curation(crawl, tmp_path):
    """Under ``executor: ray`` each input file is read (HTML extracted) by a Ray task: the output is the
    local run's, and a broken archive still stops with its one-line error."""
    import ray

    path, _ = crawl
    local_cfg = write_config(tmp_path / "local.yaml", str(path.parent), tmp_path / "local")
    assert data_main(["curate", "--config", str(local_cfg), "--no-progress"]) == 0
    (tmp_path / "more").mkdir()
    data = path.read_bytes()
    (tmp_path / "more" / "cut.warc.gz").write_bytes(data[: len(data) // 2])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = load_config(write_config(tmp_path / "ray.yaml", str(path.parent), tmp_path / "ray"), executor="ray")
        report = curate(cfg, log=lambda s: None, progress=False)
        assert report["executor"]["remote_reads"] == 1
        cut = load_config(write_config(tmp_path / "cut.yaml", str(tmp_path / "more"), tmp_path / "cut"),
                          executor="ray")  # fmt: skip
        with pytest.raises(DataError, match=r"cut\.warc\.gz: truncated at the record at byte \d+ .*re-download it"):
            curate(cut, log=lambda s: None, progress=False)
    finally:
        ray.shutdown()
    for name in ("train", "val"):
        a, b = tmp_path / "local" / name, tmp_path / "ray" / name
        assert {p.name: p.read_bytes() for p in a.glob("*.npy")} == {p.name: p.read_bytes() for p in b.glob("*.npy")}
    assert pq.read_table(tmp_path / "local" / "report" / "fates.parquet").to_pylist() == \
        pq.read_table(tmp_path / "ray" / "report" / "fates.parquet").to_pylist()
