"""The stage contract, per-stage accounting, and building stages from a config list.

A stage does one job on batches of ``Doc``: it rewrites text, tags documents, or
drops some with ``self.drop(doc, reason)``. Every drop goes through ``drop`` so it is
counted (documents and bytes per reason) and sampled for the audit files; the runner
checks ``documents in == documents out + dropped`` for each stage. A drop that is a
duplicate names the document it duplicates (``duplicate_of``: that document's id), for
the fate log; a stage that rewrites ``doc.text`` is noted in ``doc.edited_by``.

A stage that needs a look at its whole input first (the URL table, the MinHash
clusters, the corpus token distribution, the line counts per bucket) sets
``needs_fit``; the runner then writes its input to a spill file, calls ``fit`` on one
pass over it and ``process`` on a second. ``buckets`` / ``skip_buckets`` restrict a
stage to some domain buckets (e.g. no Gopher repetition rules on code); other
documents pass through untouched and uncounted by the stage's own logic.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from recipe.data.curate.record import Doc
from recipe.errors import ConfigError

__all__ = ["Context", "Stage", "StageStats", "build_stage", "register", "registered"]

_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available by its short ``name`` in configs."""
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Stage]]:
    _load_builtin()
    return dict(_REGISTRY)


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    for mod in ("clean", "url_dedup", "line_dedup", "near_dedup", "heuristics", "kl_filter", "safety", "quality",
                "domains", "pack"):  # fmt: skip
        importlib.import_module(f"recipe.data.curate.{mod}")


@dataclass
class StageStats:
    """What one stage saw, kept and dropped (documents and UTF-8 bytes)."""

    name: str
    kind: str
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def documents_dropped(self) -> int:
        return sum(d["documents"] for d in self.dropped.values())

    def add(self, part: StageStats) -> None:
        """Add the counts of a part of this stage's input (a Ray task's, a restored block's)."""
        self.documents_in += part.documents_in
        self.bytes_in += part.bytes_in
        self.documents_out += part.documents_out
        self.bytes_out += part.bytes_out
        for reason, d in part.dropped.items():
            entry = self.dropped.setdefault(reason, {"documents": 0, "bytes": 0})
            entry["documents"] += d["documents"]
            entry["bytes"] += d["bytes"]
        for counter, n in part.counters.items():
            self.counters[counter] = self.counters.get(counter, 0) + n
        self.notes.update(part.notes)
        self.seconds += part.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "class": self.kind, "documents_in": self.documents_in, "bytes_in": self.bytes_in,
            "documents_out": self.documents_out, "bytes_out": self.bytes_out,
            "documents_dropped": self.documents_dropped, "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())), "notes": self.notes, "seconds": round(self.seconds, 3),
        }  # fmt: skip


@dataclass
class Context:
    """What the runner gives every stage: a scratch folder, worker count, sample sink, logger."""

    work_dir: Path
    workers: int = 1
    log: Callable[[str], None] = print
    sample: Callable[[str, Doc], None] = lambda stage, doc: None
    progress: bool = False
    # The fate log: (stage label, document, decision, duplicate_of); None when it is off.
    fate: Callable[[str, Doc, str, str | None], None] | None = None
    # An ordered map whose calls may run in parallel, for a global stage's independent tasks (one
    # LSH band, one bucket): the builtin here; ``executor: ray`` sets one that runs each call as a Ray task.
    map: Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]] = map


class Stage:
    """Base of every curation stage. Subclasses set ``name`` and override ``process``."""

    name: ClassVar[str] = "stage"
    needs_fit: ClassVar[bool] = False
    # After its fit, ``process`` depends on no position in the stream (only on what the fit
    # learned), so an executor may run the second pass on any worker (``executor: ray``). A
    # stage may set it on itself in its fit (``line_dedup`` with one bucket).
    process_anywhere: bool = False
    # The fit is a fold over documents: ``fit_part`` summarizes a run of them anywhere and
    # ``fit_merge`` folds the summaries in stream order, so an executor can compute the parts
    # where the documents already are (Ray tasks) instead of a pass over the spill here.
    fit_in_parts: ClassVar[bool] = False

    def __init__(self, buckets: list[str] | None = None, skip_buckets: list[str] | None = None) -> None:
        if buckets is not None and skip_buckets is not None:
            raise ConfigError(f"stage {self.name}: give buckets or skip_buckets, not both")
        self.buckets = None if buckets is None else set(buckets)
        self.skip_buckets = set(skip_buckets or ())
        self.label = self.name  # unique within a pipeline; the runner suffixes repeats (#2, ...)
        self.stats = StageStats(self.name, type(self).__name__)
        self.ctx: Context | None = None

    # -- hooks
    def setup(self, ctx: Context) -> None:
        """Called once before any data flows (load models, open files)."""
        self.ctx = ctx

    def fit(self, docs: Iterator[Doc]) -> None:
        """One pass over this stage's whole input (only documents it applies to), before ``process``."""

    def fit_part(self, docs: list[Doc]) -> Any:
        """The summary of a run of this stage's input (only with ``fit_in_parts``)."""
        raise NotImplementedError(f"stage {self.label} has no fit in parts")

    def fit_merge(self, parts: Iterable[Any]) -> None:
        """Fold the summaries of consecutive runs of the input, in stream order: the same as ``fit``."""
        raise NotImplementedError(f"stage {self.label} has no fit in parts")

    def process(self, docs: list[Doc]) -> None:
        """Handle one batch in place: rewrite ``doc.text``, tag, or ``self.drop(doc, reason)``."""
        raise NotImplementedError

    def skip(self, docs: list[Doc]) -> None:
        """These documents (the ones this stage applies to) went by in a block that an interrupted run had
        finished and that is restored, not run (``tasks.py``): advance what ``process`` keeps per position
        in the stream, deciding nothing. Only a fitted stage that counts positions needs it; without it,
        such a stage's pass runs again from its start on resume."""
        raise NotImplementedError(f"stage {self.label} cannot skip restored documents")

    def finish(self) -> None:
        """Called once after the last batch (release memory, add counters)."""

    # -- helpers
    def applies(self, doc: Doc) -> bool:
        bucket = doc.bucket or doc.domain
        if self.buckets is not None:
            return bucket in self.buckets
        return bucket not in self.skip_buckets

    def drop(self, doc: Doc, reason: str, detail: str | None = None, nbytes: int | None = None,
             duplicate_of: str | None = None) -> None:  # fmt: skip
        """Drop ``doc`` for ``reason``; a duplicate names the kept document's id in ``duplicate_of``."""
        doc.drop_reason, doc.drop_detail = reason, detail
        entry = self.stats.dropped.setdefault(reason, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += doc.nbytes if nbytes is None else nbytes
        if self.ctx is not None:
            self.ctx.sample(self.label, doc)
            if self.ctx.fate is not None:
                self.ctx.fate(self.label, doc, "dropped", duplicate_of)

    def count(self, counter: str, n: int = 1) -> None:
        if n:
            self.stats.counters[counter] = self.stats.counters.get(counter, 0) + n

    # -- driven by the runner
    def run_batch(self, batch: list[Doc]) -> list[Doc]:
        t0 = time.perf_counter()
        self.stats.documents_in += len(batch)
        self.stats.bytes_in += sum(d.nbytes for d in batch)
        mine = [d for d in batch if self.applies(d)]
        if mine:
            before = [d.text for d in mine]
            self.process(mine)
            for doc, text in zip(mine, before):
                # Identity first: most stages leave the very same string object in place.
                if doc.text is not text and doc.text != text:
                    doc.edited_by.append(self.label)
        kept = [d for d in batch if d.drop_reason is None]
        self.stats.documents_out += len(kept)
        self.stats.bytes_out += sum(d.nbytes for d in kept)
        self.stats.seconds += time.perf_counter() - t0
        return kept

    def run_fit(self, docs: Iterable[Doc]) -> None:
        t0 = time.perf_counter()
        self.fit(d for d in docs if self.applies(d))
        self.stats.seconds += time.perf_counter() - t0

    def run_fit_parts(self, parts: Iterable[Any]) -> None:
        t0 = time.perf_counter()
        self.fit_merge(parts)
        self.stats.seconds += time.perf_counter() - t0

    def describe(self) -> str:
        return self.label


def build_stage(spec: Any, where: str) -> Stage:
    """A stage from one config entry: ``{name: url_dedup, args: {...}}`` or ``{class_path: pkg.mod.Cls, args}``
    (``init_args`` is accepted for ``args``), or just a name string."""
    _load_builtin()
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a stage is {{name: ..., args: {{...}}}} or a name, got {spec!r}")
    unknown = set(spec) - {"name", "class_path", "args", "init_args"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a stage has name/class_path and args")
    args = spec.get("args", spec.get("init_args")) or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: args must be a mapping, got {args!r}")
    if "class_path" in spec:
        module, _, attr = str(spec["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(
                f"{where}: cannot import class_path {spec['class_path']!r}; check the dotted path"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"{where}: {spec['class_path']} is not a recipe.data.curate Stage subclass")
    elif "name" in spec:
        cls = _REGISTRY.get(str(spec["name"]))
        if cls is None:
            raise ConfigError(f"{where}: unknown stage {spec['name']!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    else:
        raise ConfigError(f"{where}: a stage needs a name (one of {', '.join(sorted(_REGISTRY))}) or a class_path")
    try:
        return cls(**args)
    except TypeError as e:
        raise ConfigError(f"{where}: bad args for {cls.__name__} ({e}); see its docstring for the arguments") from None
