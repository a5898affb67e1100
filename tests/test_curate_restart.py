"""Restart by task: a curation run that dies part-way resumes from its finished blocks and publishes
the same output as an uninterrupted run (``recipe/data/curate/tasks.py``).

The demo config's stages over the synthetic crawl and a few standard-library modules, in small
blocks, with two test stages before ``pii`` (in the last pass, so every earlier pass has finished
when the crash comes): ``crash_once`` dies once, ``count_documents`` logs every batch it processes
after that (so a block cut short by the crash is not counted).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import curate_faults
import pyarrow.parquet as pq
import pytest
from curate_faults import InjectedCrash
from stdlib_corpus import stdlib_corpus

from recipe.data.cli import main as data_main
from recipe.data.curate.pipeline import curate, load_config
from recipe.data.curate.synthetic import low_quality_texts, reference_texts, write_web_corpus
from recipe.data.curate.tasks import tasks_dir
from recipe.data.errors import DataError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"
BATCH = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("restart")
    write_web_corpus(d / "raw" / "web.jsonl", seed=0)
    stdlib_corpus(d / "raw" / "code", modules=("textwrap.py", "fnmatch.py", "bisect.py"))
    positives = [t for t in reference_texts() if len(t.split()) >= 100][:60]
    for name, texts in (("positives", positives), ("negatives", low_quality_texts(60, seed=5))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return d


def config(d: Path, name: str, crash_after: int = 10**9, executor: str = "local", kill: bool = False,
           before: str = "pii"):  # fmt: skip
    cfg = load_config(DEMO, input=[str(d / "raw")], output=str(d / name), workers=1, executor=executor)
    cfg.demo, cfg.batch_documents = None, BATCH
    stages = {s["name"]: s for s in cfg.stages}
    train = {"positives": str(d / "positives.jsonl"), "negatives": str(d / "negatives.jsonl")}
    stages["quality"]["args"].update(model=str(d / f"quality-{name}.npz"), train=train)
    stages["pack"]["args"]["total_tokens"] = 40_000
    at = [s["name"] for s in cfg.stages].index(before)
    cfg.stages[at:at] = [
        {"class_path": "curate_faults.CrashOnce",
         "args": {"marker": str(d / f"{name}.crashed"), "after": crash_after, "kill": kill}},
        {"class_path": "curate_faults.CountDocuments", "args": {"log": str(d / f"{name}.count")}},
    ]  # fmt: skip
    return cfg


def counted(d: Path, name: str) -> list[int]:
    path = d / f"{name}.count"
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_output(a: Path, b: Path, report_a: dict, report_b: dict) -> None:
    for split in ("train", "val"):
        fa, fb = files(a / split), files(b / split)
        assert sorted(fa) == sorted(fb) and len(fa) > 1
        assert {k: v for k, v in fa.items() if k != "index.json"} == {k: v for k, v in fb.items() if k != "index.json"}
    assert pq.read_table(a / "report" / "fates.parquet").to_pylist() == \
        pq.read_table(b / "report" / "fates.parquet").to_pylist()  # same rows, same order
    assert files(a / "report" / "dropped") == files(b / "report" / "dropped")
    assert files(a / "report")["quarantine.jsonl"] == files(b / "report")["quarantine.jsonl"]

    def strip(report):
        # The quality model is trained by the first run of a config and loaded by its rerun.
        def notes(v):
            return {n: x for n, x in v.items() if n not in ("trained", "model")}

        return [{k: (notes(v) if k == "notes" else v) for k, v in s.items() if k != "seconds"}
                for s in report["stages"] if s["class"] not in ("CrashOnce", "CountDocuments")]  # fmt: skip

    assert strip(report_a) == strip(report_b)
    for key in ("documents_read", "documents_dropped", "documents_quarantined", "documents_written", "mix",
                "fate_log"):  # fmt: skip
        assert report_a[key] == report_b[key], key


@pytest.fixture(scope="module")
def reference(inputs):
    report = curate(config(inputs, "reference"), log=lambda s: None, progress=False)
    assert report["tasks"]["blocks_restored"] == 0 and not tasks_dir(inputs / "reference").exists()
    assert report["documents_dropped"] > 100 and report["documents_quarantined"] > 0
    return inputs / "reference", report


def test_killed_run_resumes_from_its_finished_blocks(inputs, reference):
    ref, ref_report = reference
    total = sum(counted(inputs, "reference"))
    assert len(counted(inputs, "reference")) > 10  # many blocks reach the last pass
    lines: list[str] = []
    with pytest.raises(InjectedCrash):
        curate(config(inputs, "killed", crash_after=total // 2), log=lines.append, progress=False)
    out = inputs / "killed"
    assert not out.exists()  # nothing published
    store = tasks_dir(out)
    before_crash = counted(inputs, "killed")
    finished_last_pass = len(list(max(store.glob("pass-*"), key=lambda p: int(p.name[5:])).glob("block-*.json.gz")))
    assert 0 < finished_last_pass and sum(before_crash) < total
    (store / "pass-1" / "block-9999999.json.gz.tmp-12345").write_bytes(b"half a block")  # a write cut short

    lines.clear()
    report = curate(config(inputs, "killed", crash_after=total // 2), log=lines.append, progress=False)
    assert any(line.startswith("resuming:") for line in lines)
    assert report["tasks"]["blocks_restored"] > finished_last_pass  # every earlier pass, and part of the last
    # The finished blocks were not processed again: the two runs together processed each document once.
    assert sum(counted(inputs, "killed")) == total and sum(before_crash) > 0
    assert not store.exists()  # published: the store is gone
    same_output(ref, out, ref_report, report)


def test_crash_in_a_positional_pass_resumes_mid_pass(inputs, reference):
    """The crash comes in near_dedup's second pass, which follows the input's order: the resumed run
    skips the restored blocks' documents in it (``NearDedup.skip``) and names the same kept copies."""
    ref, ref_report = reference
    with pytest.raises(InjectedCrash):
        curate(config(inputs, "positional", crash_after=80, before="domains"), log=lambda s: None, progress=False)
    first = sum(counted(inputs, "positional"))
    report = curate(config(inputs, "positional", crash_after=80, before="domains"), log=lambda s: None,
                    progress=False)  # fmt: skip
    assert 0 < first < sum(counted(inputs, "positional")) and report["tasks"]["blocks_restored"] > 0
    near = next(s for s in report["stages"] if s["name"] == "near_dedup")
    assert sum(counted(inputs, "positional")) == near["documents_out"]  # each survivor counted once
    rows = pq.read_table(inputs / "positional" / "report" / "fates.parquet").to_pylist()
    assert sum(r["reason"] == "near_duplicate" and r["duplicate_of"] is not None for r in rows) > 5
    same_output(ref, inputs / "positional", ref_report, report)


def test_store_of_another_config_is_discarded_and_fresh_ignores_it(inputs, reference):
    ref, ref_report = reference
    with pytest.raises(InjectedCrash):
        curate(config(inputs, "changed", crash_after=40), log=lambda s: None, progress=False)
    store = tasks_dir(inputs / "changed")
    assert any(store.glob("pass-1/block-*.json.gz"))
    cfg = config(inputs, "changed")
    cfg.samples_per_reason = 19  # another config: nothing of the old run may be reused
    lines: list[str] = []
    report = curate(cfg, log=lines.append, progress=False)
    assert any("belong to another config or input" in line for line in lines)
    assert report["tasks"]["blocks_restored"] == 0

    with pytest.raises(InjectedCrash):
        curate(config(inputs, "fresh", crash_after=40), log=lambda s: None, progress=False)
    first = sum(counted(inputs, "fresh"))
    (inputs / "fresh.crashed").unlink()  # it crashes at the same document again
    assert first > 0
    with pytest.raises(InjectedCrash):
        data_main(["curate", "--config", str(write_config(inputs, "fresh", crash_after=40)), "--fresh",
                   "--no-progress"])  # fmt: skip
    assert sum(counted(inputs, "fresh")) == 2 * first  # --fresh ran the last pass from its start again
    report = curate(config(inputs, "fresh", crash_after=40), log=lambda s: None, progress=False)
    assert report["tasks"]["blocks_restored"] > 0
    same_output(ref, inputs / "fresh", ref_report, report)


def write_config(d: Path, name: str, **kw) -> Path:
    import dataclasses

    import yaml

    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config(d, name, **kw))), encoding="utf-8")
    return path


def test_unreadable_finished_block_is_a_one_line_error(inputs):
    with pytest.raises(InjectedCrash):
        curate(config(inputs, "corrupt", crash_after=40), log=lambda s: None, progress=False)
    block = tasks_dir(inputs / "corrupt") / "pass-1" / "block-0000000.json.gz"
    block.write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(DataError, match=r"block-0000000.json.gz is unreadable .* pass --fresh"):
        curate(config(inputs, "corrupt", crash_after=40), log=lambda s: None, progress=False)


def test_run_killed_under_ray_resumes_under_local(inputs, reference):
    import ray
    import ray.cloudpickle

    ref, ref_report = reference
    total = sum(counted(inputs, "reference"))
    ray.cloudpickle.register_pickle_by_value(curate_faults)  # the Ray workers cannot import the tests folder
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        with pytest.raises(Exception, match="injected crash"):
            curate(config(inputs, "ray", crash_after=total // 4, executor="ray"), log=lambda s: None,
                   progress=False)  # fmt: skip
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(curate_faults)
    assert any(tasks_dir(inputs / "ray").glob("pass-*/block-*.json.gz"))
    report = curate(config(inputs, "ray", crash_after=total // 4), log=lambda s: None, progress=False)
    assert report["tasks"]["blocks_restored"] > 0
    same_output(ref, inputs / "ray", ref_report, report)


def test_sigkilled_cli_run_resumes(inputs, reference):
    """A real kill: the process dies mid-pass (no exception handler runs), leaving its temporary output
    folder and its store; the same command then removes the folder, resumes and publishes."""
    import os
    import subprocess
    import sys

    ref, ref_report = reference
    config_file = write_config(inputs, "sigkill", crash_after=40, kill=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "recipe.cli", "data", "curate", "--config", str(config_file), "--no-progress"]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(inputs.glob("sigkill.tmp-*")) and any(tasks_dir(inputs / "sigkill").glob("pass-*/block-*"))
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: " in resumed.stderr and "left by an interrupted run" in resumed.stderr
    assert not list(inputs.glob("sigkill.tmp-*")) and not tasks_dir(inputs / "sigkill").exists()
    report = json.loads((inputs / "sigkill" / "report" / "report.json").read_text())
    assert report["tasks"]["blocks_restored"] > 0
    same_output(ref, inputs / "sigkill", ref_report, report)
