"""``executor: ray`` gives the same curation as ``executor: local``: shards, report, audit files, fate log.

The demo config's stages (``configs/data/demo.yaml``) over the synthetic crawl with planted
problems and a few standard-library modules, run once per executor; one in-process Ray
(2 CPUs) serves the module. Small batches make many Ray blocks, so the order in which
their decisions come back is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from stdlib_corpus import stdlib_corpus

from recipe.data.cli import main as data_main
from recipe.data.curate.executors import ExecutorSpec
from recipe.data.curate.pipeline import curate, load_config
from recipe.data.curate.synthetic import low_quality_texts, reference_texts, write_web_corpus
from recipe.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray")
    write_web_corpus(d / "raw" / "web.jsonl", seed=0)
    write_web_corpus(d / "raw" / "web2.jsonl", seed=1)  # more documents, and URLs that collide with the first crawl
    stdlib_corpus(d / "raw" / "code", modules=("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py"))
    positives = [t for t in reference_texts() if len(t.split()) >= 100][:60]
    for name, texts in (("positives", positives), ("negatives", low_quality_texts(60, seed=5))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return d


def run(d: Path, executor: str, fate_log: bool = True) -> tuple[Path, dict]:
    out = d / f"out-{executor}-{fate_log}"
    cfg = load_config(DEMO, input=[str(d / "raw")], output=str(out), workers=2, executor=executor)
    cfg.demo, cfg.fate_log = None, fate_log
    cfg.batch_documents = 16  # many blocks: their decisions must come back in input order
    stages = {s["name"]: s for s in cfg.stages}
    train = {"positives": str(d / "positives.jsonl"), "negatives": str(d / "negatives.jsonl")}
    stages["quality"]["args"].update(model=str(d / f"quality-{executor}-{fate_log}.npz"), train=train)  # its own
    stages["pack"]["args"]["total_tokens"] = 40_000
    return out, curate(cfg, log=lambda s: None, progress=False)


@pytest.fixture(scope="module")
def both(inputs, ray_session):
    return run(inputs, "local"), run(inputs, "ray")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_are_byte_identical(both):
    (local, _), (remote, _) = both
    for split in ("train", "val"):
        a, b = files(local / split), files(remote / split)
        assert sorted(a) == sorted(b) and len(a) > 1
        for name in a:
            if name != "index.json":  # it embeds the report, whose output path and timings differ
                assert a[name] == b[name], f"{split}/{name}"
        ia, ib = json.loads(a["index.json"]), json.loads(b["index.json"])
        assert ia["shards"] == ib["shards"] and ia["num_tokens"] == ib["num_tokens"] > 0


def test_report_is_identical(both):
    (_, local), (_, remote) = both

    def strip(report):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in report["stages"]]

    assert strip(local) == strip(remote)
    for key in ("documents_read", "documents_dropped", "documents_quarantined", "documents_written", "mix",
                "shards", "fate_log"):  # fmt: skip
        assert local[key] == remote[key], key
    assert local["documents_dropped"] > 100 and local["documents_quarantined"] > 0  # the run did drop things
    assert local["executor"] == {"name": "local"}
    ray_run = remote["executor"]
    assert ray_run["name"] == "ray" and ray_run["cpus"] == 2 and ray_run["remote_batches"] > 20
    assert ray_run["remote_reads"] == 7  # every input file: two crawls and five modules
    # line_dedup's second pass too: the input is one bucket, so it follows no position.
    assert ray_run["remote_stages"] == ["clean", "blocklist", "domains", "line_dedup", "repetition", "basic_filter",
                                        "dirty_words", "token_kl", "quality", "pii"]  # fmt: skip
    # Summed up from the tasks' parts; near_dedup's from tasks that run no stage (url_dedup's pass is
    # positional, on the driver) and only compute the signatures of its survivors.
    assert ray_run["remote_fits"] == ["url_dedup", "near_dedup", "line_dedup", "token_kl"]


def test_fate_log_and_audit_files_are_identical(both):
    (local, _), (remote, _) = both
    a = pq.read_table(local / "report" / "fates.parquet").to_pylist()
    b = pq.read_table(remote / "report" / "fates.parquet").to_pylist()
    assert len(a) > 300 and a == b  # the same rows in the same order
    # Drops on the driver (the dedups, pack) and in Ray tasks (the filters, token_kl's second pass).
    assert {r["stage"] for r in a if r["decision"] == "dropped"} >= {"blocklist", "url_dedup", "near_dedup",
                                                                       "repetition", "token_kl", "quality", "pack"}
    drops_a, drops_b = files(local / "report" / "dropped"), files(remote / "report" / "dropped")
    assert drops_a == drops_b and len(drops_a) > 5
    assert files(local / "report")["quarantine.jsonl"] == files(remote / "report")["quarantine.jsonl"]


def test_without_fate_log(inputs, both):
    (local, local_report), _ = both
    remote, report = run(inputs, "ray", fate_log=False)
    assert not (remote / "report" / "fates.parquet").exists() and "fate_log" not in report
    assert files(local / "train").keys() == files(remote / "train").keys()
    assert {k: v for k, v in files(local / "train").items() if k != "index.json"} == \
        {k: v for k, v in files(remote / "train").items() if k != "index.json"}
    assert files(local / "report" / "dropped") == files(remote / "report" / "dropped")
    assert [s["dropped"] for s in local_report["stages"]] == [s["dropped"] for s in report["stages"]]


def test_executor_setting_and_cli_override(tmp_path, monkeypatch):
    assert load_config(DEMO).executor == "local"
    assert load_config(DEMO, executor="ray").executor == "ray"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DEMO.read_text() + "executor: {name: local, address: auto}\n")
    with pytest.raises(ConfigError, match="needs name: ray"):
        load_config(cfg)
    assert ExecutorSpec.parse(load_config(cfg, executor="ray").executor) == ExecutorSpec("ray", "auto")
    cfg.write_text(DEMO.read_text() + "executor: spark\n")
    with pytest.raises(ConfigError, match="unknown executor 'spark'; choose one of local, ray"):
        load_config(cfg)
    with pytest.raises(SystemExit):  # argparse rejects any other name
        data_main(["curate", "--config", str(DEMO), "--executor", "spark"])
    seen = []
    monkeypatch.setattr("recipe.data.curate.pipeline.curate", lambda cfg, **kw: seen.append(cfg.executor))
    assert data_main(["curate", "--config", str(DEMO), "--executor", "ray"]) == 0
    assert data_main(["curate", "--config", str(DEMO)]) == 0
    assert seen == ["ray", "local"]


def test_no_cluster_at_the_address_is_a_one_line_error(tmp_path, monkeypatch):
    from recipe.data.curate.executors import RayExecutor
    from recipe.data.curate.stage import Context
    from recipe.data.errors import DataError

    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(DataError, match=r"no Ray cluster at address 'auto' \(Could not find any running Ray "
                                        r"instance\.\); start one with `ray start --head`"):  # fmt: skip
        RayExecutor(2, "auto").start(Context(work_dir=tmp_path), None)


def test_fits_in_parts_equal_the_whole_fit():
    """URL table and token counts folded from runs of documents, as Ray tasks send them, equal one fit."""
    import numpy as np

    from recipe.data.curate.kl_filter import TokenKL
    from recipe.data.curate.record import Doc
    from recipe.data.curate.url_dedup import UrlDedup

    dates = ["2024-01-02", None, "2024-01-02", "2024-03-01", "garbage", "2024-03-01", 20240101, ""]
    docs = [Doc(f"text {i} " * (i + 3), f"f:{i}", url=f"https://x.org/{i % 3}", date=dates[i % len(dates)],
                bucket=("general", "math")[i % 2]) for i in range(40)]  # fmt: skip
    docs[5].url = None
    whole, parted = UrlDedup(), UrlDedup()
    whole.fit(iter(docs))
    parted.fit_merge([parted.fit_part(docs[i : i + 7]) for i in range(0, len(docs), 7)])
    assert parted.best == whole.best and len(whole.best) == 3
    assert parted.stats.counters == whole.stats.counters and whole.stats.counters["date_unparsed"] > 0
    assert parted.stats.notes == whole.stats.notes
    # Ties across parts: per URL the first document with the newest date stays (3, not 27, for /0).
    assert sorted(pos for _, pos, _ in whole.best.values()) == [3, 11, 13]
    kl_whole, kl_parted = TokenKL(bins=64), TokenKL(bins=64)
    kl_whole.fit(iter(docs))
    kl_parted.fit_merge([kl_parted.fit_part(docs[i : i + 9]) for i in range(0, len(docs), 9)])
    assert kl_whole.counts.keys() == kl_parted.counts.keys() == {"general", "math"}
    assert all(np.array_equal(kl_whole.counts[k], kl_parted.counts[k]) for k in kl_whole.counts)
    assert kl_parted.stats.notes == kl_whole.stats.notes
