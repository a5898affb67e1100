"""Run a curation config: read -> stages -> mix and pack, in streaming passes, published atomically.

Passes: stages run batch by batch in config order. A stage that must see its whole
input first (``needs_fit``) splits the run: everything before it is written to a
spill file (jsonl in the scratch folder), the stage fits on one pass over the spill,
and the next pass streams the spill through it and the stages after it. So memory
stays at one batch plus what each stage keeps (URL table, LSH band, line counts of
one bucket, token counts), and the disk holds at most two spills at a time.

Everything - shards, report, scratch - is built in ``<output>.tmp-<pid>`` and renamed
to ``<output>`` at the end (``recipe.data.shards.atomic_dir``): an interrupted run
leaves no ``<output>``, and its leftover temp folder is removed by the next run. The
same config and input give the same shards (hash-based choices, ordered workers), under
either executor (``executor: local`` or ``ray``: ``recipe.data.curate.executors``, which
runs each segment of stages between two fits).

When no document survives, the run logs the drop counts of every stage (one line
each, with the reasons), writes the report (with the dropped samples and the
quarantine file) to ``<output>.failed/report/`` - not to ``<output>``, which is never
published without shards - and then fails with one line naming that folder. A later
successful run removes ``<output>.failed``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from recipe.data.curate.executors import Executor, ExecutorSpec, make_executor
from recipe.data.curate.fate import FATE_FILE, FateLog
from recipe.data.curate.pack import NothingSurvived, Pack
from recipe.data.curate.progress import Progress
from recipe.data.curate.reader import Quarantined, Skipped, list_sources
from recipe.data.curate.record import Doc
from recipe.data.curate.report import AuditSink, write_reports
from recipe.data.curate.stage import Context, Stage, StageStats, build_stage
from recipe.data.curate.tasks import (Recorder, TaskStore, apply_change, batched, restored_sample, run_fingerprint,
                                      take, tasks_dir)
from recipe.data.errors import DataError
from recipe.data.shards import atomic_dir, check_free
from recipe.errors import ConfigError

__all__ = ["CurateConfig", "curate", "failed_dir", "load_config", "prepare_demo_inputs"]


@dataclass
class CurateConfig:
    """A curation run (the YAML keys). ``stages`` is a list of ``{name|class_path, args}``."""

    input: list[str]
    output: str
    stages: list[Any] = field(default_factory=list)
    text_field: str = "text"
    workers: int | None = None
    batch_documents: int = 256
    max_document_chars: int = 1_000_000
    samples_per_reason: int = 20
    fate_log: bool = True  # <output>/report/fates.parquet: one row per input document (recipe.data.curate.fate)
    # local (this process) or ray / {name: ray, address: ...} (recipe.data.curate.executors)
    executor: Any = "local"
    demo: dict[str, Any] | None = None

    def build_stages(self, where: str = "config") -> list[Stage]:
        stages = [build_stage(spec, f"{where}: stages[{i}]") for i, spec in enumerate(self.stages)]
        for s in stages[:-1]:
            if isinstance(s, Pack):
                raise ConfigError(f"{where}: pack must be the last stage")
        if not stages or not isinstance(stages[-1], Pack):
            stages.append(Pack())
        seen: dict[str, int] = {}
        for s in stages:  # a stage used twice gets a distinct label in the report (quality#2)
            seen[s.name] = seen.get(s.name, 0) + 1
            s.label = s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}"
            s.stats.name = s.label
        return stages


def load_config(path: str | os.PathLike, **overrides: Any) -> CurateConfig:
    """Read a YAML config; ``overrides`` (e.g. ``output=...``) replace keys that are not None."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"curation config {p} not found; see configs/data/demo.yaml for an example") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with input, output and stages")
    executor = overrides.pop("executor", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if executor is not None:  # `--executor ray` keeps the config's address
        data["executor"] = {**data["executor"], "name": executor} if isinstance(data.get("executor"), dict) \
            else executor
    known = {f.name for f in fields(CurateConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    for key in ("input", "output"):
        if not data.get(key):
            raise ConfigError(f"{p}: missing {key!r}; give the raw documents (input) and the data directory (output)")
    if isinstance(data["input"], (str, os.PathLike)):
        data["input"] = [data["input"]]
    if not isinstance(data.get("stages", []), list):
        raise ConfigError(f"{p}: stages must be a list of {{name: ..., args: {{...}}}}")
    cfg = CurateConfig(**data)
    ExecutorSpec.parse(cfg.executor, str(p))
    cfg.build_stages(str(p))  # validate every stage now, before any data is read
    return cfg


# ---------------------------------------------------------------------------------------- demo inputs


def prepare_demo_inputs(demo: dict[str, Any], log: Callable[[str], None]) -> None:
    """Build the demo's raw inputs in ``demo['dir']`` unless present: the demo corpus (code,
    prose, math), a synthetic crawl with planted problems, and the quality classifier's
    training files (prose as positives, generated spam/boilerplate as negatives)."""
    from recipe.data.curate.synthetic import low_quality_texts, write_web_corpus
    from recipe.data.demo import build_demo_corpus

    root = Path(demo.get("dir", "data/curate-demo"))
    raw, cls = root / "raw", root / "classifier"
    if not (raw / "demo.jsonl").is_file():
        log(f"building the demo corpus in {raw}")
        build_demo_corpus(raw, log=log, **demo.get("corpus", {}))
    if not (raw / "web.jsonl").is_file():
        write_web_corpus(raw / "web.jsonl", seed=int(demo.get("seed", 0)))
    if not (cls / "positives.jsonl").is_file() or not (cls / "negatives.jsonl").is_file():
        cls.mkdir(parents=True, exist_ok=True)
        positives = []
        with open(raw / "demo.jsonl", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("domain") == "prose":
                    positives.append(rec["text"])
        if not positives:
            raise DataError(f"{raw / 'demo.jsonl'} has no prose to train the quality classifier on; "
                            f"rebuild it with network access (`recipe data demo` fetches the prose once)")  # fmt: skip
        negatives = low_quality_texts(len(positives), seed=int(demo.get("seed", 0)) + 1)
        for name, texts in (("positives", positives), ("negatives", negatives)):
            tmp = cls / f"{name}.jsonl.tmp-{os.getpid()}"
            tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
            os.replace(tmp, cls / f"{name}.jsonl")


# ---------------------------------------------------------------------------------------- running


def _remove_stale(out: Path, log: Callable[[str], None]) -> None:
    """Remove ``<out>.tmp-<pid>`` folders left by runs whose process is gone (killed, crashed)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f"{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        log(f"removed {p}, left by an interrupted run")


def _spill_docs(path: Path) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Doc.from_json(line)


class _Run:
    def __init__(self, cfg: CurateConfig, stages: list[Stage], root: Path, log, progress: bool,
                 executor: Executor, store: TaskStore) -> None:  # fmt: skip
        self.cfg, self.stages, self.root, self.log, self.progress = cfg, stages, root, log, progress
        self.executor, self.store = executor, store
        self.work = root / "work"
        self.work.mkdir()
        self.sink = AuditSink(root / "report", cfg.samples_per_reason)
        self.fates = FateLog(root / "report" / FATE_FILE) if cfg.fate_log else None
        self.read = StageStats("read", "reader")
        self.passes = 0  # the stage segments streamed so far
        self.spills = 0
        self.skipped_examples: list[str] = []

    def records(self) -> Iterator[Doc]:
        """Input documents; bad records are counted and quarantined on the way."""
        for rec in self.executor.records(self.cfg.input, self.cfg.text_field, self.cfg.max_document_chars):
            if isinstance(rec, Skipped):
                # Not a document (a WARC request, an image, a redirect): counted by reason, with a few examples.
                key = f"skipped:{rec.reason}"
                self.read.counters[key] = self.read.counters.get(key, 0) + 1
                if len(self.skipped_examples) < 5:
                    detail = f" ({rec.detail})" if rec.detail else ""
                    self.skipped_examples.append(f"{rec.source}: {rec.reason}{detail}")
                    self.read.notes["skipped_examples"] = self.skipped_examples
                continue
            self.read.documents_in += 1
            if isinstance(rec, Quarantined):
                self.read.bytes_in += rec.nbytes
                entry = self.read.dropped.setdefault(rec.reason, {"documents": 0, "bytes": 0})
                entry["documents"] += 1
                entry["bytes"] += rec.nbytes
                self.sink.quarantine(rec)
                if self.fates is not None:
                    self.fates.quarantined(rec)
                continue
            n = rec.nbytes
            self.read.bytes_in += n
            self.read.documents_out += 1
            self.read.bytes_out += n
            yield rec

    def stream(self, source: Iterator[list[Doc]], stages: list[Stage], desc: str, total: int | None,
               fit: Stage | None = None) -> Iterator[list[Doc]]:  # fmt: skip
        """One pass: the blocks an interrupted run finished are restored, the rest run on the executor and
        are stored as they finish (``tasks.py``)."""
        self.passes += 1
        pass_no, source = self.passes, iter(source)
        finished = self.store.finished(pass_no)
        blocked = [s.label for s in stages if s.needs_fit and not s.process_anywhere and type(s).skip is Stage.skip]
        if finished and blocked:
            self.log(f"pass {pass_no} runs again from its start: stage {blocked[0]} cannot skip restored documents")
            finished = 0
        restored_docs = yield from self._restore(pass_no, take(source, finished), stages, desc)
        recorder = Recorder(stages)
        self.sink.tap = recorder.sample
        if self.fates is not None:
            self.fates.tap = recorder.row
        index = finished
        try:
            # A fit from parts would see only the blocks run now: after a restore, the runner fits from the spill.
            left = None if total is None else total - restored_docs
            for survivors in self.executor.stream(source, stages, desc, left, fit if not finished else None):
                self.store.save(pass_no, index, recorder.block(survivors))
                index += 1
                yield survivors
        finally:
            self.sink.tap = None
            if self.fates is not None:
                self.fates.tap = None
        self.store.pass_done(pass_no, index)

    def _restore(self, pass_no: int, batches: Iterator[list[Doc]], stages: list[Stage],
                 desc: str) -> Generator[list[Doc], None, int]:  # fmt: skip
        """Hand on the stored survivors of these input batches, replaying what their blocks logged and
        counted; return how many input documents they held."""
        by_label = {s.label: s for s in stages}
        positional = [s for s in stages if s.needs_fit and not s.process_anywhere]
        bar: Progress | None = None
        documents = 0
        for index, batch in enumerate(batches):
            bar = bar or Progress(f"{desc} (restoring)", None, self.progress)
            bar.update(len(batch))
            documents += len(batch)
            for stage in positional:
                stage.skip([d for d in batch if stage.applies(d)])
            record = self.store.load(pass_no, index)
            for label, change in record.stats.items():
                apply_change(by_label[label].stats, change)
            if self.fates is not None:
                self.fates.restore_rows(record.rows)
            for sample in record.samples:
                self.sink.sample(*restored_sample(sample))
            yield record.survivors
        if bar is not None:
            bar.close()
        return documents

    def run(self) -> None:
        *filters, pack = self.stages
        size = self.cfg.batch_documents
        t0 = time.perf_counter()
        source: Iterator[list[Doc]] = batched(self.records(), size)
        total: int | None = None
        spill: Path | None = None
        pending: list[Stage] = []
        passes = 1
        for stage in filters:
            if not stage.needs_fit:
                pending.append(stage)
                continue
            # Materialize everything so far, so the stage can read its input twice.
            self.spills += 1
            new = self.work / f"spill-{self.spills}.jsonl"
            names = ", ".join(["read"] * (spill is None) + [s.label for s in pending]) or "copy"
            count = 0
            with open(new, "w", encoding="utf-8") as f:
                for batch in self.stream(source, pending, f"pass {passes}: {names}", total, fit=stage):
                    f.writelines(d.to_json() + "\n" for d in batch)
                    count += len(batch)
            if spill is not None:
                spill.unlink()
            spill, total, passes = new, count, passes + 1
            if not self.executor.fitted(stage):  # else the executor fitted it from the survivors on the way
                bar = Progress(f"pass {passes}: {stage.label} (fit)", total, self.progress)
                stage.run_fit(self._counted(_spill_docs(spill), bar))
                bar.close()
                passes += 1
            source, pending = batched(_spill_docs(spill), size), [stage]
        names = ", ".join(["read"] * (spill is None) + [s.label for s in pending] + [pack.label])
        for batch in self.stream(source, pending, f"pass {passes}: {names}", total):
            pack.run_batch(batch)
        for stage in self.stages:
            stage.finish()
        self.stream_seconds = time.perf_counter() - t0

    @staticmethod
    def _counted(docs: Iterator[Doc], bar: Progress) -> Iterator[Doc]:
        for doc in docs:
            bar.update(1)
            yield doc


def _check_accounting(stats: list[StageStats]) -> None:
    """Every document that entered a stage left it or was dropped with a counted reason."""
    previous_out = None
    for s in stats:
        if s.documents_in != s.documents_out + s.documents_dropped:
            raise RuntimeError(f"curation accounting bug in stage {s.name}: {s.documents_in} in, "
                               f"{s.documents_out} out, {s.documents_dropped} dropped")  # fmt: skip
        if previous_out is not None and s.documents_in != previous_out:
            raise RuntimeError(f"curation accounting bug: stage {s.name} got {s.documents_in} documents, "
                               f"the stage before it passed {previous_out}")  # fmt: skip
        previous_out = s.documents_out


def curate(cfg: CurateConfig, overwrite: bool = False, log: Callable[[str], None] | None = None,
           progress: bool | None = None, config_path: str | None = None,
           resume: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run ``cfg``; return the report (also written to ``<output>/report/``). The blocks that an
    interrupted run of the same config and input finished are restored, not run again, unless
    ``resume`` is False (``tasks.py``)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    stages = cfg.build_stages(config_path or "config")
    if cfg.demo is not None:
        prepare_demo_inputs(cfg.demo, log)
    for path in cfg.input:
        list_sources(path)  # a missing input fails now, not after the setup of every stage
    out = Path(cfg.output)
    _remove_stale(out, log)
    workers = cfg.workers if cfg.workers is not None else min(os.cpu_count() or 1, 8)
    executor = make_executor(ExecutorSpec.parse(cfg.executor, config_path or "config"), max(1, workers))
    failed = failed_dir(out)
    check_free(out, overwrite, "output")  # before a task store is touched
    store = TaskStore(tasks_dir(out), run_fingerprint(cfg), log, resume)
    with atomic_dir(out, overwrite=overwrite, what="output") as root:
        run = _Run(cfg, stages, root, log, progress, executor, store)
        ctx = Context(work_dir=run.work, workers=max(1, workers), log=log, sample=run.sink.sample, progress=progress,
                      fate=None if run.fates is None else run.fates.document)  # fmt: skip
        nothing: NothingSurvived | None = None
        try:
            for stage in stages:
                stage.setup(ctx)
            executor.start(ctx, run.fates)
            run.run()
            stats = [run.read] + [s.stats for s in stages[:-1]]
            _check_accounting(stats)
            base = {
                "config": config_path, "input": [str(p) for p in cfg.input], "output": str(out),
                "stages": [s.to_dict() for s in stats],
            }  # fmt: skip
            try:
                summary = stages[-1].write(root, base)
            except NothingSurvived as e:
                nothing = e
                empty = {"documents": 0, "tokens": 0}
                summary = {"mix": {}, "shards": {"train": dict(empty), "val": dict(empty)}, "error": str(e)}
        finally:
            executor.close()
            run.sink.close()
            fates = run.fates.close() if run.fates is not None else None
        stats.append(stages[-1].stats)
        _check_accounting(stats)
        dropped = sum(s.documents_dropped for s in stats)
        if fates is not None and fates["rows"] != run.read.documents_in:
            raise RuntimeError(f"curation accounting bug: the fate log has {fates['rows']} rows for "
                               f"{run.read.documents_in} documents read")  # fmt: skip
        report = {
            **base,
            "stages": [s.to_dict() for s in stats],
            "documents_read": run.read.documents_in,
            "documents_quarantined": run.read.documents_dropped,
            "documents_dropped": dropped - run.read.documents_dropped,
            "documents_written": stages[-1].stats.documents_out,
            **summary,
            **({"fate_log": fates} if fates is not None else {}),
            "workers": ctx.workers,
            "executor": executor.describe(),
            "tasks": store.describe(),
            "wall_time_s": round(time.perf_counter() - t0, 3),
        }  # fmt: skip
        assert report["documents_read"] == dropped + report["documents_written"]
        write_reports(root / "report", report)
        shutil.rmtree(run.work)
        if nothing is not None:
            for line in _drop_lines(report):
                log(line)
            shutil.rmtree(failed, ignore_errors=True)
            failed.mkdir(parents=True)
            os.replace(root / "report", failed / "report")
            store.remove()  # the run ended; nothing to resume
            raise DataError(f"no document survived curation; see the drop counts per stage above and the report "
                            f"in {failed / 'report'}; loosen the filters or check the input") from None  # fmt: skip
    store.remove()  # published: nothing left to resume
    shutil.rmtree(failed, ignore_errors=True)  # a failed earlier run's report no longer applies
    log(_summary_line(report))
    return report


def failed_dir(out: str | os.PathLike) -> Path:
    """Where a run in which no document survived leaves its report: ``<output>.failed``."""
    out = Path(out)
    return out.with_name(f"{out.name}.failed")


def _drop_lines(report: dict[str, Any]) -> list[str]:
    """One line per stage: documents in, out and dropped, with the count of every reason."""
    lines = []
    for s in report["stages"]:
        reasons = ", ".join(f"{r} {d['documents']:,}" for r, d in s["dropped"].items())
        lines.append(f"  {s['name']}: {s['documents_in']:,} in, {s['documents_out']:,} out, "
                     f"{s['documents_dropped']:,} dropped" + (f" ({reasons})" if reasons else ""))  # fmt: skip
    return lines


def _summary_line(report: dict[str, Any]) -> str:
    parts = [f"{s['name']} -{s['documents_dropped']:,}" for s in report["stages"] if s["documents_dropped"]]
    shards = report["shards"]
    return (f"curated {report['documents_read']:,} documents -> {report['documents_written']:,} "
            f"(train {shards['train']['tokens']:,} tokens, val {shards['val']['tokens']:,}); drops: "
            f"{', '.join(parts) or 'none'}; report: {report['output']}/report/report.md "
            f"({report['wall_time_s']:.1f} s)")  # fmt: skip
