"""Where the per-document stages run: in this process (``executor: local``) or on Ray Data (``executor: ray``).

The runner (``pipeline.py``) cuts the stage list into segments at every stage that needs
its whole input first (``needs_fit``); an executor runs one segment over a stream of
batches and yields the surviving documents batch by batch, in input order.

``local`` runs every stage on each batch in turn, in this process.

``ray`` runs the segment's per-document stages (those without ``needs_fit``, and a fitted
stage whose ``process`` keeps no position, ``process_anywhere``: ``token_kl``) as Ray Data
``map_batches`` tasks, one block per input batch. What a task decides is sent back with
the documents - every drop (for the audit samples and the fate log) and each stage's
counters - and the driver replays it in the order the local executor would have met it,
so the report, the audit files, ``fates.parquet`` and the shards are the same as a local
run's. A global stage whose fit is a fold over documents (``fit_in_parts``: ``url_dedup``'s
newest date per URL, ``near_dedup``'s hashes, MinHash signatures and LSH band keys,
``line_dedup``'s line hashes, ``token_kl``'s token counts per bucket) has its parts computed
in the same tasks, from the survivors, and only folded on the driver; its pass over the
spill is skipped. A segment with no stage to run in Ray (``url_dedup``'s positional pass before
``near_dedup``) still ships its survivors to Ray tasks for the parts alone (the MinHash
signatures), and the tasks send back only the parts. The fold's independent pieces run
as Ray tasks through ``Context.map`` (``ray_map.py``): ``near_dedup``'s candidate pairs band
by band and their verification, ``line_dedup``'s counting bucket by bucket. Each input file
is read (parsed; a WARC's HTML extracted) by a Ray task that streams its records back in
order (``records``). Still on the driver: batching the records, the folds themselves
(writing the signatures, the union-find
over the LSH candidate pairs, the URL table), the positional second pass of ``url_dedup``,
``near_dedup`` and ``line_dedup`` (with several buckets; with one, ``line_dedup``'s second
pass runs in the Ray tasks), and mixing and packing. The driver ships a
segment in windows of batches (``max(8, 4 x CPUs)``), one Ray Data execution each, and reads
the next window while Ray runs the last one: at most two windows are in the object store.

Ray starts in-process with ``num_cpus`` = the config's ``workers`` (no services needed),
or joins a running cluster with ``executor: {name: ray, address: auto}`` (the cluster this
node belongs to) or ``address: HEAD:6379``; a Ray already initialized in this process is
used as it is. Every node needs this package installed: the tasks import the stages from it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.data.curate.fate import FateLog
from recipe.data.curate.progress import Progress
from recipe.data.curate.reader import Input, Quarantined, Skipped, list_sources, read_input, read_records
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Context, Stage, StageStats
from recipe.data.curate.tasks import batched
from recipe.data.errors import DataError
from recipe.errors import ConfigError

__all__ = ["EXECUTORS", "Executor", "ExecutorSpec", "LocalExecutor", "RayExecutor", "make_executor"]

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSpec:
    """The ``executor`` key: a name, or ``{name: ray, address: ...}``."""

    name: str = "local"
    address: str | None = None

    @classmethod
    def parse(cls, value: Any, where: str = "config") -> ExecutorSpec:
        """``local``, ``ray`` or ``{name: ray, address: auto | HEAD:6379}``."""
        if value is None:
            return cls()
        if isinstance(value, ExecutorSpec):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: executor must be local, ray or {{name: ray, address: ...}}, got {value!r}")
        unknown = sorted(set(value) - {"name", "address"})
        if unknown:
            raise ConfigError(f"{where}: unknown executor key(s) {', '.join(unknown)}; known keys: name, address")
        name = str(value.get("name", "local"))
        if name not in EXECUTORS:
            raise ConfigError(f"{where}: unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
        address = value.get("address")
        if address is not None and name != "ray":
            raise ConfigError(f"{where}: executor address {address!r} needs name: ray")
        return cls(name, None if address is None else str(address))


class Executor:
    """Runs one segment of stages over a stream of batches; yields the survivors batch by batch, in order."""

    name = "executor"

    def start(self, ctx: Context, fates: FateLog | None) -> None:
        self.ctx, self.fates = ctx, fates

    def records(self, roots: list[str], text_field: str, max_chars: int) -> Iterator[Doc | Quarantined | Skipped]:
        """Every record of every input, in order: read here (``reader.read_records``)."""
        return read_records(roots, text_field, max_chars)

    def stream(self, source: Iterator[list[Doc]], stages: list[Stage], desc: str, total: int | None,
               fit: Stage | None = None) -> Iterator[list[Doc]]:  # fmt: skip
        """One list of survivors per input batch (empty if none survived), in order, each handed on after
        everything its batch logged and before anything the next one logs (``tasks.py`` cuts blocks there).
        ``fit``: the stage that will fit on the survivors; an executor may fit it on the way (see ``fitted``)."""
        raise NotImplementedError

    def fitted(self, stage: Stage) -> bool:
        """Whether the last ``stream`` already fitted ``stage`` (its pass over the spill is then skipped)."""
        return False

    def close(self) -> None:
        """Release what ``start`` took (a Ray started here is shut down)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class LocalExecutor(Executor):
    """Every stage on each batch, in this process."""

    name = "local"

    def stream(self, source: Iterator[list[Doc]], stages: list[Stage], desc: str, total: int | None,
               fit: Stage | None = None) -> Iterator[list[Doc]]:  # fmt: skip
        bar = Progress(desc, total, self.ctx.progress)
        try:
            for batch in source:
                bar.update(len(batch))
                for stage in stages:
                    batch = stage.run_batch(batch)
                    if not batch:
                        break
                yield batch
        finally:
            bar.close()


def _distributable(stage: Stage) -> bool:
    # A fitted stage's second pass may run anywhere only if it keeps no position in the stream.
    return not stage.needs_fit or stage.process_anywhere


# One event of a worker: ("sample", label, doc) or ("fate", label, doc, decision, duplicate_of).
Event = tuple
# What the driver logged while reading one input batch: fate-log rows and audit samples.
Logged = tuple[list[tuple], list[tuple[str, Doc]]]


class _Capture:
    """A worker's Context callbacks: every drop is recorded, in order, to be replayed on the driver."""

    def __init__(self, fate: bool) -> None:
        self.events: list[Event] = []
        self.fate = self._fate if fate else None

    def sample(self, label: str, doc: Doc) -> None:
        self.events.append(("sample", label, doc))

    def _fate(self, label: str, doc: Doc, decision: str, duplicate_of: str | None) -> None:
        self.events.append(("fate", label, doc, decision, duplicate_of))


# Per worker process: each segment's stages (and the next fit's stage), unpickled once.
_WORKER_STAGES: dict[str, tuple[list[Stage], Stage | None]] = {}


def _run_block(block: Any, stages_ref: Any, fate: bool, return_docs: bool = True) -> Any:
    """One Ray Data block (documents of one or more input batches): run the stages on each input batch.
    Returns one row per input batch: its index and (survivors, events, stage stats, the next fit's
    part) as a Python object, which Ray Data serializes itself between the task and the driver."""
    import numpy as np
    import ray

    key = stages_ref.hex()
    if key not in _WORKER_STAGES:
        _WORKER_STAGES.clear()  # the segments of one run follow each other: keep one set of stages
        _WORKER_STAGES[key] = ray.get(stages_ref)
    stages, fit = _WORKER_STAGES[key]
    batch_ids = block.column("batch").to_pylist()
    texts = block.column("doc").to_pylist()
    out_ids: list[int] = []
    out_payloads: list[tuple] = []
    start = 0
    while start < len(batch_ids):
        end = start
        while end < len(batch_ids) and batch_ids[end] == batch_ids[start]:
            end += 1
        batch = [Doc.from_json(t) for t in texts[start:end]]
        capture = _Capture(fate)
        ctx = Context(work_dir=Path(tempfile.gettempdir()), workers=1, log=lambda s: None, sample=capture.sample,
                      fate=capture.fate)  # fmt: skip
        stats = []
        for stage in stages:
            stage.ctx = ctx
            stage.stats = StageStats(stage.label, type(stage).__name__)
            batch = stage.run_batch(batch) if batch else batch
            stats.append(stage.stats)
        # The next global stage's summary of these survivors (what its fit would read from the spill).
        part = None if fit is None else fit.fit_part([d for d in batch if fit.applies(d)])
        out_ids.append(batch_ids[start])
        # Without stages (only the next fit's part is wanted) the driver still holds the documents.
        out_payloads.append((batch if return_docs else [], capture.events, stats, part))
        start = end
    payloads = np.empty(len(out_payloads), dtype=object)  # one object per row, not an array of their fields
    payloads[:] = out_payloads
    return {"batch": np.asarray(out_ids, dtype=np.int64), "payload": payloads}


READ_CHUNK = 1024  # records per object a reading task hands back


def _read_chunks(item: Input, text_field: str, max_chars: int) -> Iterator[list]:
    """A reading task: the records of one input, in chunks (a Ray streaming generator)."""
    yield from batched(read_input(item, text_field, max_chars), READ_CHUNK)


def _collect(ds: Any) -> list[tuple[int, tuple]]:
    """Run a dataset of ``_run_block`` to the end: ``(batch index, payload)`` in input order."""
    return [(row["batch"], row["payload"]) for row in ds.iter_rows()]


def _shippable(stage: Stage) -> Stage:
    """A copy of a set-up stage without the driver's context (its audit sink holds open files)."""
    twin = copy.copy(stage)
    twin.ctx = None
    twin.stats = StageStats(stage.label, type(stage).__name__)
    return twin


class RayExecutor(Executor):
    """Per-document stages as Ray Data ``map_batches`` tasks; the rest on the driver (see the module docstring)."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None) -> None:
        self.workers, self.address = workers, address
        self._started = False
        self.remote_batches = 0  # input batches whose per-document stages ran in Ray tasks
        self.remote_batches_segment = 0  # the same, in the segment being streamed
        self.remote_stages: list[str] = []
        self.remote_fits: list[str] = []  # global stages whose fit was summed up from Ray tasks' parts
        self.remote_reads = 0  # input files read by Ray tasks
        self._fitted: Stage | None = None

    def start(self, ctx: Context, fates: FateLog | None) -> None:
        super().start(ctx, fates)
        try:
            import ray
            import ray.data
        except ImportError:
            raise ConfigError("executor: ray needs Ray Data; install it with `pip install 'ray[data]'` or use "
                              "executor: local") from None  # fmt: skip
        if not ray.is_initialized():
            if self.address is None:
                # address="local": a fresh in-process Ray even when RAY_ADDRESS names a cluster.
                ray.init(address="local", num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR")  # fmt: skip
            else:
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
                except ConnectionError as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise DataError(f"executor ray: no Ray cluster at address {self.address!r} ({first}); start one "
                                    f"with `ray start --head`, or leave address out for an in-process Ray") from None
            self._started = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no lines per dataset execution
        # Its warning that the progress bars are off, which they are on purpose (the runner has its own).
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.execution_options.preserve_order = True  # survivors come back in input order
        data_ctx.enable_progress_bars = False
        self.cpus = int(ray.cluster_resources().get("CPU", 0))
        from recipe.data.curate.ray_map import RayMap  # a global stage's independent tasks (bands, buckets)
        ctx.map = RayMap(ahead=2 * max(1, self.cpus))
        ctx.log(f"executor ray: {self.cpus} CPUs ({'in-process' if self.address is None else self.address})")

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "cpus": getattr(self, "cpus", None),
                "remote_batches": self.remote_batches, "remote_stages": self.remote_stages,
                "remote_fits": self.remote_fits, "remote_reads": self.remote_reads}

    def fitted(self, stage: Stage) -> bool:
        return stage is self._fitted

    def records(self, roots: list[str], text_field: str, max_chars: int) -> Iterator[Doc | Quarantined | Skipped]:
        """Each input file is read (parsed, HTML extracted) by a Ray task that streams its records back in
        chunks; the next file's task runs while this one's records are used. A local file is read on this
        node (its path means nothing elsewhere), an fsspec URL anywhere. The tasks take no CPU slot: one
        waiting for its records to be taken must never keep the stages' tasks from a CPU."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        task = ray.remote(num_cpus=0, max_retries=0)(_read_chunks)
        items = iter([item for root in roots for item in list_sources(root)])
        running: deque[Any] = deque()

        def launch() -> None:
            item = next(items, None)
            if item is not None:
                where = here if item.fs is None else "DEFAULT"
                running.append(task.options(scheduling_strategy=where, _generator_backpressure_num_objects=4)
                               .remote(item, text_field, max_chars))  # fmt: skip
                self.remote_reads += 1

        launch()
        while running:
            launch()  # the next file is read ahead
            try:
                for ref in running.popleft():
                    yield from ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, (DataError, ConfigError)):
                    raise e.cause from None  # a bad input's one-line error, as a local run gives it
                raise

    def stream(self, source: Iterator[list[Doc]], stages: list[Stage], desc: str, total: int | None,
               fit: Stage | None = None) -> Iterator[list[Doc]]:  # fmt: skip
        self._fitted = None
        self.remote_batches_segment = 0
        # Leading stages that must see the stream in order run here; the rest go to Ray once
        # one of them can (a stage that cannot, after one that can, keeps the rest here too).
        split = 0
        while split < len(stages) and not _distributable(stages[split]):
            split += 1
        driver, remote = stages[:split], stages[split:]
        if fit is not None and not fit.fit_in_parts:
            fit = None
        # With no stage to run there, Ray tasks still compute the next fit's parts (MinHash signatures).
        if (not remote and fit is None) or any(not _distributable(s) for s in remote):
            yield from LocalExecutor.stream(self, source, stages, desc, total)
            return
        self.remote_stages += [s.label for s in remote]
        if fit is not None:
            self.remote_fits.append(fit.label)
        yield from self._stream_ray(source, driver, remote, fit, desc + " (ray)", total)

    def _stream_ray(self, source: Iterator[list[Doc]], driver: list[Stage], remote: list[Stage], fit: Stage | None,
                    desc: str, total: int | None) -> Iterator[list[Doc]]:  # fmt: skip
        import pyarrow as pa
        import ray
        import ray.data

        stages_ref = ray.put(([_shippable(s) for s in remote], None if fit is None else _shippable(fit)))
        fn_kwargs = {"stages_ref": stages_ref, "fate": self.fates is not None, "return_docs": bool(remote)}
        # Batches per Ray Data execution: the driver reads the next window while Ray runs this one.
        window = max(8, 4 * max(1, getattr(self, "cpus", 1)))
        # Per shipped batch: the input batches before it that the in-order stages emptied (what each
        # logged), what it logged itself, and its documents when no task returns them; each is handed
        # on in its turn, an emptied one as [].
        held: list[tuple[list[Logged], Logged, list[Doc] | None]] = []
        emptied: list[Logged] = []
        rows: list[tuple] = []
        samples: list[tuple[str, Doc]] = []
        parts: list[Any] = []
        bar = Progress(desc, total, self.ctx.progress)
        batches = iter(source)
        running: deque[Future] = deque()
        shipped, done = 0, False
        try:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="curate-ray") as pool:
                while not done:
                    # 1. Read a window of batches here, through the in-order stages.
                    tables: list[Any] = []
                    while len(tables) < window:
                        batch, rows, samples = self._pull(batches, driver, bar)
                        if batch is None:  # rows: logged after the last batch
                            done = True
                            break
                        if not batch:  # nothing to ship: handed on as [] before the next shipped batch
                            emptied.append((rows, samples))
                            continue
                        held.append((emptied, (rows, samples), None if remote else batch))
                        emptied = []
                        tables.append(pa.table({"batch": pa.array([shipped] * len(batch), pa.int64()),
                                                "doc": pa.array([d.to_json() for d in batch], pa.large_string())}))
                        shipped += 1
                    # 2. The per-document stages over its blocks, one block per input batch, in the background.
                    if tables:
                        ds = ray.data.from_arrow(tables).map_batches(
                            _run_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                            fn_kwargs=fn_kwargs, num_cpus=1,
                        )  # fmt: skip
                        running.append(pool.submit(_collect, ds))
                        del tables  # from_arrow put them in the object store: no second copy here
                    # 3. Replay the windows before the newest one (it runs while the next is read).
                    while len(running) > (0 if done else 1):
                        for index, payload in running.popleft().result():
                            before, logged, kept = held[index]
                            held[index] = ([], ([], []), None)
                            for empty in before:
                                self._replay(*empty)
                                yield []
                            self._replay(*logged)
                            survivors = self._replay_batch(index, payload, remote, parts)
                            yield survivors if kept is None else kept
        finally:
            bar.close()
        if self.remote_batches_segment != shipped:
            raise RuntimeError(f"ray executor: {self.remote_batches_segment} of {shipped} batches came back")
        for empty in emptied:  # emptied after the last shipped batch
            self._replay(*empty)
            yield []
        self._replay(rows, samples)
        if fit is not None:
            fit.run_fit_parts(parts)
            self._fitted = fit

    def _pull(self, batches: Iterator[list[Doc]], driver: list[Stage],
              bar: Progress) -> tuple[list[Doc] | None, list[tuple], list[tuple[str, Doc]]]:  # fmt: skip
        """The next batch through the in-order stages, and what was logged meanwhile, held back: the
        local executor logs it between the decisions of the batches before and after (Ray's come later)."""
        samples: list[tuple[str, Doc]] = []
        real_sample = self.ctx.sample
        self.ctx.sample = lambda label, doc: samples.append((label, doc))
        self._hold()
        try:
            batch = next(batches, None)
            if batch is not None:
                bar.update(len(batch))
                for stage in driver:
                    batch = stage.run_batch(batch)
                    if not batch:
                        break
        finally:
            self.ctx.sample = real_sample
            rows = self._release()
        return batch, rows, samples

    def _replay_batch(self, index: int, payload: tuple, remote: list[Stage], parts: list[Any]) -> list[Doc]:
        """Log the decisions its tasks made about one shipped batch, in the local executor's order; return
        its survivors."""
        if index != self.remote_batches_segment:
            raise RuntimeError(f"ray executor: batch {index} came back where batch {self.remote_batches_segment} "
                               f"was due")  # fmt: skip
        survivors, events, stats, part = payload
        parts.append(part)
        for stage, stage_stats in zip(remote, stats):
            stage.stats.add(stage_stats)
        for event in events:
            if event[0] == "sample":
                self.ctx.sample(event[1], event[2])
            elif self.ctx.fate is not None:
                self.ctx.fate(*event[1:])
        self.remote_batches_segment += 1
        self.remote_batches += 1
        return survivors

    def _hold(self) -> None:
        if self.fates is not None:
            self.fates.hold()

    def _release(self) -> list[tuple]:
        return self.fates.release() if self.fates is not None else []

    def _replay(self, rows: list[tuple], samples: list[tuple[str, Doc]]) -> None:
        if self.fates is not None:
            self.fates.write_rows(rows)
        for label, doc in samples:
            self.ctx.sample(label, doc)


def make_executor(spec: ExecutorSpec, workers: int) -> Executor:
    """The executor a config names; ``workers`` is the CPU count of an in-process Ray."""
    if spec.name == "ray":
        return RayExecutor(workers, spec.address)
    return LocalExecutor()

