"""Every document's fate: ``report/fates.parquet`` accounts for every input document, once.

Run on the demo's own pipeline (``configs/data/demo.yaml``'s stages) over the synthetic
crawl with planted problems and a few standard-library modules, and on the planted
corpus of ``test_curate.py``, where the stage and reason of every drop are known.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from stdlib_corpus import stdlib_corpus
from test_curate import config, model_path, planted_corpus, refs  # noqa: F401 (model_path, refs: fixtures)

from recipe.data.curate.fate import FateLog
from recipe.data.curate.pipeline import curate, load_config
from recipe.data.curate.reader import Quarantined
from recipe.data.curate.record import Doc, doc_id
from recipe.data.curate.synthetic import low_quality_texts, reference_texts, write_web_corpus
from recipe.data.curate.url_dedup import normalize_url

DEMO = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"
DUPLICATES = ("url_duplicate", "exact_duplicate", "near_duplicate")


def read_fates(out: Path) -> list[dict]:
    return pq.read_table(out / "report" / "fates.parquet").to_pylist()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config's stages over the crawl and code; a small token budget so the mix down-samples."""
    d = tmp_path_factory.mktemp("demo")
    write_web_corpus(d / "raw" / "web.jsonl", seed=0)
    stdlib_corpus(d / "raw" / "code", modules=("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py"))
    positives = [t for t in reference_texts() if len(t.split()) >= 100][:60]
    for name, texts in (("positives", positives), ("negatives", low_quality_texts(60, seed=5))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cfg = load_config(DEMO, input=[str(d / "raw")], output=str(d / "out"), workers=1)
    cfg.demo = None
    stages = {s["name"]: s for s in cfg.stages}
    train = {"positives": str(d / "positives.jsonl"), "negatives": str(d / "negatives.jsonl")}
    stages["quality"]["args"].update(model=str(d / "quality.npz"), train=train)
    stages["pack"]["args"]["total_tokens"] = 40_000
    report = curate(cfg, log=lambda s: None, progress=False)
    return d / "out", report


def test_every_document_has_one_row(demo_run):
    out, report = demo_run
    fates = read_fates(out)
    decisions = Counter(r["decision"] for r in fates)
    assert set(decisions) <= {"kept", "modified", "dropped", "quarantined"}
    assert len(fates) == report["documents_read"] == sum(decisions.values())
    assert decisions["kept"] + decisions["modified"] == report["documents_written"]
    assert decisions["dropped"] == report["documents_dropped"]
    assert decisions["quarantined"] == report["documents_quarantined"] > 0
    ids = [r["doc_id"] for r in fates]
    assert len(set(ids)) == len(ids) and all(r["doc_id"] == doc_id(r["source"]) for r in fates)
    assert report["fate_log"] == {"file": "fates.parquet", "rows": len(fates), "decisions": {
        k: decisions[k] for k in ("kept", "modified", "dropped", "quarantined")}}  # fmt: skip
    assert "every document's fate: `report/fates.parquet`" in (out / "report" / "report.md").read_text()


def test_drop_reasons_match_the_report(demo_run):
    out, report = demo_run
    fates = read_fates(out)
    logged = Counter((r["stage"], r["reason"]) for r in fates if r["decision"] in ("dropped", "quarantined"))
    counted = {(s["name"], reason): d["documents"] for s in report["stages"] for reason, d in s["dropped"].items()}
    assert logged == counted
    # The mix's down-sampling is there too: documents that pack did not write.
    mix = sum(m["documents"] - m["documents_kept"] for m in report["mix"].values())
    assert logged[("pack", "mix_downsample")] == mix > 0
    # A text change is logged as such: clean's own count of the documents it changed.
    clean = {s["name"]: s for s in report["stages"]}["clean"]["counters"]["documents_changed"]
    assert sum("clean" in (r["modified_by"] or "").split(",") for r in fates) == clean
    assert all(r["decision"] == ("modified" if r["modified_by"] else "kept")
               for r in fates if r["decision"] in ("kept", "modified"))  # fmt: skip
    assert all(r["bucket"] for r in fates if r["decision"] in ("kept", "modified"))


def test_duplicates_name_the_kept_document(demo_run):
    out, _ = demo_run
    fates = read_fates(out)
    by_id = {r["doc_id"]: r for r in fates}
    dups = [r for r in fates if r["reason"] in DUPLICATES]
    assert {r["reason"] for r in dups} == set(DUPLICATES)
    for r in dups:
        kept = by_id[r["duplicate_of"]]
        assert kept["doc_id"] != r["doc_id"] and kept["reason"] not in DUPLICATES
        if r["reason"] == "url_duplicate":
            assert normalize_url(kept["url"]) == normalize_url(r["url"])
    assert all(r["duplicate_of"] is None for r in fates if r["reason"] not in DUPLICATES)


def test_planted_drops_are_logged_with_their_stage_reason_and_original(refs, model_path, tmp_path):  # noqa: F811
    expect, kept = planted_corpus(tmp_path / "corpus.jsonl", refs)
    curate(config(tmp_path / "corpus.jsonl", tmp_path / "out", model_path), log=lambda s: None, progress=False)
    fates = {r["source"]: r for r in read_fates(tmp_path / "out")}
    assert {s: (r["stage"], r["reason"]) for s, r in fates.items() if r["decision"] in ("dropped", "quarantined")} \
        == expect  # fmt: skip
    assert sum(r["decision"] in ("kept", "modified") for r in fates.values()) == kept
    # The older crawl and the undated spelling variant of https://site.org/page name the dated newest copy.
    newest = next(r for r in fates.values() if r["url"] == "https://site.org/page" and r["date"].startswith("2024-06"))
    assert newest["decision"] in ("kept", "modified")
    url_dups = [r for r in fates.values() if r["reason"] == "url_duplicate"]
    assert len(url_dups) == 2 and {r["duplicate_of"] for r in url_dups} == {newest["doc_id"]}
    # The exact and the near copy were planted right after their original.
    for reason in ("exact_duplicate", "near_duplicate"):
        (dup,) = [r for r in fates.values() if r["reason"] == reason]
        line = int(dup["source"].rsplit(":", 1)[1])
        assert dup["duplicate_of"] == doc_id(f"corpus.jsonl:{line - 1}")


def test_fate_log_can_be_turned_off(refs, model_path, tmp_path):  # noqa: F811
    planted_corpus(tmp_path / "corpus.jsonl", refs)
    cfg = config(tmp_path / "corpus.jsonl", tmp_path / "out", model_path)
    cfg.fate_log = False
    report = curate(cfg, log=lambda s: None, progress=False)
    assert "fate_log" not in report and not (tmp_path / "out" / "report" / "fates.parquet").exists()
    assert "fates.parquet" not in (tmp_path / "out" / "report" / "report.md").read_text()


def test_rows_are_written_in_row_groups(tmp_path):
    log = FateLog(tmp_path / "fates.parquet", batch_rows=3)
    docs = [Doc(f"text {i}", f"f.jsonl:{i}", url=f"https://x.org/{i}", bucket="general") for i in range(7)]
    for i, doc in enumerate(docs):
        if i % 2:
            doc.drop_reason, doc.drop_detail = "low_quality", "score 0.1 < 0.5"
            log.document("quality", doc, "dropped")
        else:
            doc.edited_by = ["clean"] if i == 2 else []
            log.document("pack", doc, "kept")
    log.quarantined(Quarantined("f.jsonl:8", "malformed_json", "Expecting value at column 1", "{", 2))
    assert log.close() == {"file": "fates.parquet", "rows": 8,
                           "decisions": {"kept": 3, "modified": 1, "dropped": 3, "quarantined": 1}}  # fmt: skip
    f = pq.ParquetFile(tmp_path / "fates.parquet")
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 8
    rows = f.read().to_pylist()
    assert [r["decision"] for r in rows] == ["kept", "dropped", "modified", "dropped", "kept", "dropped", "kept",
                                              "quarantined"]  # fmt: skip
    assert rows[1]["reason"] == "low_quality" and rows[1]["detail"] == "score 0.1 < 0.5"
    assert rows[2]["modified_by"] == "clean" and rows[0]["reason"] == "written" and rows[0]["detail"] is None
    assert rows[7] == {"doc_id": doc_id("f.jsonl:8"), "source": "f.jsonl:8", "url": None, "date": None,
                       "bucket": None, "stage": "read", "decision": "quarantined", "reason": "malformed_json",
                       "detail": "Expecting value at column 1", "duplicate_of": None, "modified_by": None}  # fmt: skip
