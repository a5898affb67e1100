"""Restart by task: a killed curation run resumes without redoing its finished blocks.

A run's work is cut into tasks: pass ``K`` (a segment of stages between two global fits,
see ``pipeline.py``) over input block ``i`` (one batch of ``batch_documents``). When a
block of a pass is done, the store writes what the block produced - the surviving
documents, the fate-log rows and audit samples of its drops, and the change in each
stage's counters - to ``<output>.tasks/pass-K/block-i.json.gz`` under a temporary name and
renames it into place: the rename is the block's completion marker. When a pass has run
to its end, ``pass-K/done.json`` marks the stage boundary.

A rerun with the same config and input finds the store and, for each pass, restores the
blocks that are done in one run from the start (the stream is ordered, so finished
blocks are a prefix): it still reads the input (the reader's own quarantine rows and
counts come from there), replays each restored block's rows, samples and counters, and
hands the stored survivors on, so the report, ``fates.parquet`` and the shards are those
of an uninterrupted run. A fitted stage that keeps positions in the stream (the second
pass of ``url_dedup``, ``near_dedup``, ``line_dedup``) is told which documents went by
(``Stage.skip``); a custom stage that needs positions but has no ``skip`` gets its pass
run again from the start. The fits themselves run again over the rebuilt spill.

The output is still published atomically (``atomic_dir``): nothing appears at
``<output>`` before the whole run has finished. The store is removed after a published
run; a store left by another config or input is discarded with one line, and
``--fresh`` (``resume=False``) ignores it. Which executor ran a block does not matter:
a run killed under ``executor: local`` resumes under ``ray`` and the other way round.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from recipe.data.curate.reader import list_sources
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, StageStats
from recipe.data.errors import DataError
from recipe.files import atomic_write_bytes

__all__ = ["BlockRecord", "TaskStore", "batched", "run_fingerprint", "take", "tasks_dir"]

T = TypeVar("T")

FORMAT = 1
# What may change between a run and its resumption without changing any decision.
_FREE_KEYS = ("executor", "workers", "demo")


def tasks_dir(out: str | os.PathLike) -> Path:
    """Where a run keeps its finished tasks until it publishes: ``<output>.tasks``."""
    out = Path(out)
    return out.with_name(f"{out.name}.tasks")


def _input_identity(root: str) -> list[list[Any]]:
    """(location, size, modification) of every input file under ``root``: a changed input is another run."""
    out: list[list[Any]] = []
    for item in list_sources(root):
        if item.fs is None:
            paths = [Path(item.location)]
            if paths[0].is_dir():  # a saved dataset: every file in it
                paths = sorted(p for p in paths[0].rglob("*") if p.is_file())
            for p in paths:
                st = p.stat()
                out.append([str(p), st.st_size, st.st_mtime_ns])
        else:
            info = item.fs.info(item.location)
            stamp = next((str(info[k]) for k in ("mtime", "LastModified", "last_modified", "ETag", "etag")
                          if k in info), None)  # fmt: skip
            out.append([item.location, info.get("size"), stamp])
    return out


def run_fingerprint(cfg: Any) -> str:
    """A hash of what decides the run's output: the config (less the executor and worker count) and the
    input files' sizes and modification times."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _FREE_KEYS}
    inputs = [_input_identity(str(root)) for root in cfg.input]
    blob = json.dumps({"format": FORMAT, "config": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class BlockRecord:
    """What one block of one pass produced."""

    survivors: list[Doc]
    rows: list[list[Any]] = field(default_factory=list)  # fate-log rows of its stages, in order
    samples: list[list[Any]] = field(default_factory=list)  # [stage label, doc json, reason, detail]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage label -> counter changes

    def to_json(self) -> dict[str, Any]:
        return {"survivors": [d.to_json() for d in self.survivors], "rows": self.rows, "samples": self.samples,
                "stats": self.stats}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockRecord:
        return cls([Doc.from_json(s) for s in data["survivors"]], data["rows"], data["samples"], data["stats"])


def stats_change(now: StageStats, before: dict[str, Any]) -> dict[str, Any]:
    """``now`` less the snapshot ``before`` (``snapshot``): what one block added to a stage's counters."""
    change: dict[str, Any] = {
        k: getattr(now, k) - before[k] for k in ("documents_in", "bytes_in", "documents_out", "bytes_out", "seconds")
    }
    change["dropped"] = {}
    for reason, d in now.dropped.items():
        old = before["dropped"].get(reason, {"documents": 0, "bytes": 0})
        if d["documents"] != old["documents"]:
            change["dropped"][reason] = {"documents": d["documents"] - old["documents"],
                                         "bytes": d["bytes"] - old["bytes"]}  # fmt: skip
    change["counters"] = {k: n - before["counters"].get(k, 0) for k, n in now.counters.items()
                          if n != before["counters"].get(k, 0)}  # fmt: skip
    change["notes"] = {k: v for k, v in now.notes.items() if before["notes"].get(k) != v}
    return change


def snapshot(stats: StageStats) -> dict[str, Any]:
    return {"documents_in": stats.documents_in, "bytes_in": stats.bytes_in, "documents_out": stats.documents_out,
            "bytes_out": stats.bytes_out, "seconds": stats.seconds,
            "dropped": {r: dict(d) for r, d in stats.dropped.items()}, "counters": dict(stats.counters),
            "notes": json.loads(json.dumps(stats.notes, default=str))}  # fmt: skip


def apply_change(stats: StageStats, change: dict[str, Any]) -> None:
    """Add a stored block's counter changes to a stage's stats."""
    part = StageStats(stats.name, stats.kind, change["documents_in"], change["bytes_in"], change["documents_out"],
                      change["bytes_out"], change["dropped"], change["counters"], change["notes"],
                      change["seconds"])  # fmt: skip
    stats.add(part)


class TaskStore:
    """The finished tasks of one run (see the module docstring)."""

    def __init__(self, root: Path, fingerprint: str, log: Callable[[str], None], resume: bool = True) -> None:
        self.root, self.fingerprint, self.log = root, fingerprint, log
        self.restored_blocks = 0
        self.stored_blocks = 0
        manifest = root / "run.json"
        if root.exists():
            found = None
            try:
                found = json.loads(manifest.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                pass
            if not resume:
                log(f"ignoring the finished tasks in {root} (a fresh run was asked for)")
                shutil.rmtree(root)
            elif found != fingerprint:
                log(f"discarding the finished tasks in {root}: they belong to another config or input")
                shutil.rmtree(root)
            else:
                blocks = sum(1 for _ in root.glob("pass-*/block-*.json.gz"))
                log(f"resuming: {blocks:,} finished blocks in {root} are restored, not run again")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, json.dumps({"fingerprint": fingerprint, "format": FORMAT}).encode())

    def _block(self, pass_no: int, index: int) -> Path:
        return self.root / f"pass-{pass_no}" / f"block-{index:07d}.json.gz"

    def finished(self, pass_no: int) -> int:
        """How many blocks of ``pass_no`` are done, counted from the first (a gap ends the count)."""
        n = 0
        while self._block(pass_no, n).is_file():
            n += 1
        return n

    def load(self, pass_no: int, index: int) -> BlockRecord:
        path = self._block(pass_no, index)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                record = BlockRecord.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"finished task {path} is unreadable ({type(e).__name__}: {e}); remove {self.root} "
                            f"or pass --fresh to run from the start") from None  # fmt: skip
        self.restored_blocks += 1
        return record

    def save(self, pass_no: int, index: int, record: BlockRecord) -> None:
        path = self._block(pass_no, index)
        path.parent.mkdir(exist_ok=True)
        data = json.dumps(record.to_json(), ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        atomic_write_bytes(path, gzip.compress(data, compresslevel=1))
        self.stored_blocks += 1

    def pass_done(self, pass_no: int, blocks: int) -> None:
        """The stage boundary: every block of ``pass_no`` is done."""
        atomic_write_bytes(self.root / f"pass-{pass_no}" / "done.json", json.dumps({"blocks": blocks}).encode())

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.root), "blocks_restored": self.restored_blocks, "blocks_run": self.stored_blocks}


class Recorder:
    """Cuts what a pass logs into blocks: the rows and samples written, and the stage counters' changes,
    between one block's survivors and the next (the executors hand on one list per input block, after
    everything that block logged)."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.rows: list[list[Any]] = []
        self.samples: list[list[Any]] = []
        self._before = {s.label: snapshot(s.stats) for s in stages}

    def row(self, row: tuple) -> None:
        if row[5] != "read":  # the reader's quarantine rows come again from reading the input
            self.rows.append(list(row))

    def sample(self, label: str, doc: Doc) -> None:
        self.samples.append([label, doc.to_json(), doc.drop_reason, doc.drop_detail])

    def block(self, survivors: list[Doc]) -> BlockRecord:
        stats = {}
        for s in self.stages:
            stats[s.label] = stats_change(s.stats, self._before[s.label])
            self._before[s.label] = snapshot(s.stats)
        record = BlockRecord(survivors, self.rows, self.samples, stats)
        self.rows, self.samples = [], []
        return record


def restored_sample(sample: list[Any]) -> tuple[str, Doc]:
    """A stored audit sample as (stage label, dropped document)."""
    label, doc_json, reason, detail = sample
    doc = Doc.from_json(doc_json)
    doc.drop_reason, doc.drop_detail = reason, detail
    return label, doc


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter): the blocks of a pass, a reading task's chunks."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def take(source: Iterator[list[Doc]], n: int) -> Iterator[list[Doc]]:
    """The next ``n`` batches of ``source`` (fewer if it ends)."""
    for _ in range(n):
        batch = next(source, None)
        if batch is None:
            return
        yield batch
