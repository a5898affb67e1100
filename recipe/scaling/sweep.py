"""Train the runs of a sweep plan one after another, record each, skip the finished ones.

Every run owns ``<out_dir>/runs/<run_id>/``: TensorBoard logs, its checkpoint and
``result.json`` - written last and atomically, so its presence means "finished". The
results table (``results.csv`` / ``results.json`` in ``out_dir``) is rebuilt from those
files, never appended to, which keeps it right when cluster jobs (``--print-jobs``, one
run each) finish in any order or a sweep is interrupted and restarted.

A run whose ``result.json`` was produced from different settings (its spec digest
differs) is an error rather than silently reused or overwritten: change ``out_dir`` or
delete that run's folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.files import atomic_write_text
from recipe.scaling.plan import Plan, RunSpec, SweepConfig

COLUMNS = ["run_id", "mix", "budget", "size", "params", "tokens", "steps", "batch_tokens", "flops_per_token",
           "compute", "lr", "val_loss", "bench_nll", "bench_acc", "bench_chance", "checkpoint", "wall_s", "status"]


def run_dir(config: SweepConfig, spec: RunSpec) -> Path:
    return Path(config.out_dir) / "runs" / spec.run_id


def finished_result(config: SweepConfig, spec: RunSpec) -> dict[str, Any] | None:
    """The recorded result of ``spec``, or None if it has not finished."""
    path = run_dir(config, spec) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes, but a hand-edited file means "redo"
    if result.get("digest") != spec.digest:
        raise ConfigError(f"{path} was recorded with different settings than run {spec.run_id} has now; "
                          f"use another out_dir or delete {path.parent}")
    return result


# ---------------------------------------------------------------------------- one run


def keep_freed_memory_on_cpu() -> None:
    """Let glibc keep large freed blocks instead of unmapping them (Linux CPU runs).

    A tiny model's step allocates a few logits-sized buffers (tokens x 128,256 floats);
    by default glibc returns each to the OS on free and the next step faults it back in
    page by page - a third of the step time in the mini sweep. Raising the mmap and trim
    thresholds keeps them in the heap for reuse. No effect elsewhere (macOS, musl).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter ids
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


_BENCHMARKS: dict[tuple, tuple[Any, list]] = {}


def _benchmark(config: SweepConfig) -> tuple[Any, list]:
    """(tokenizer, items) of the config's benchmark, built once per process."""
    from recipe.scaling.downstream import build_benchmark
    from recipe.tokenizer import Tokenizer

    spec = config.downstream
    key = (spec.benchmark, spec.items, spec.seed, config.data.data_dir, spec.domain)
    if key not in _BENCHMARKS:
        tokenizer = Tokenizer()
        _BENCHMARKS[key] = (tokenizer, build_benchmark(spec.benchmark, spec.items, spec.seed,
                                                       config.data.data_dir, tokenizer, spec.domain))
    return _BENCHMARKS[key]


def validation_stream(datamodule: Any, domain: str | None = None) -> Any:
    """The data module's validation stream, or the same read from one domain's documents."""
    from recipe.data.stream import TokenStream

    if domain is None:
        return datamodule.val_stream()
    if datamodule.val_set is None:
        datamodule.setup("validate")
    view = datamodule.val_set.domain(domain)
    batch, seq = datamodule.val_batch_size, datamodule.seq_len
    # A small domain is read once, not repeated up to val_batches.
    steps = max(1, min(datamodule.val_batches, view.num_tokens // (batch * seq)))
    return TokenStream(view, seq, batch, datamodule.micro_batch_size, num_steps=steps)


def train_run(config: SweepConfig, spec: RunSpec) -> dict[str, Any]:
    """Train one run with the recipe's module, data module and Trainer; return its result."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.data_mix import DataMixSchedule, MixStage
    from recipe.checkpointing import AtomicCheckpointIO
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.config import OptimizerConfig
    from recipe.config import LRSchedule

    start = time.perf_counter()
    folder = run_dir(config, spec)
    folder.mkdir(parents=True, exist_ok=True)
    sched, data = config.schedule, config.data
    L.seed_everything(spec.seed, verbose=False)
    module = LlamaLightningModule(
        arch=spec.model_args(),
        # weight_decay=0.1 is the paper's per-step decay of 0.1 x LR: AdamW multiplies it by lr_t.
        optimizer=OptimizerConfig(lr=spec.lr, betas=tuple(sched.betas), eps=sched.eps,
                                  weight_decay=spec.weight_decay),
        lr_schedule=LRSchedule(warmup_steps=spec.warmup_steps, decay_steps=spec.steps, min_lr=spec.min_lr),
        grad_clip=sched.grad_clip, init_seed=spec.seed,
    )
    datamodule = TokenDataModule(
        data_dir=data.data_dir, seq_len=data.seq_len, global_batch_size=spec.global_batch_size,
        micro_batch_size=data.micro_batch_size, val_batches=data.val_batches,
        val_batch_size=data.val_batch_size or 8, build_demo=data.build_demo,
    )
    callbacks: list[Any] = []
    if spec.mix is not None:
        callbacks.append(DataMixSchedule([MixStage(0, dict(spec.mix))]))
    ckpt_dir = folder / "checkpoints"
    if config.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=int(config.checkpoint_every),
                                         save_last=True, save_top_k=1))
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=spec.steps, default_root_dir=str(folder), limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir=str(folder), name="", version="tb"), log_every_n_steps=1,
        enable_checkpointing=bool(config.checkpoint_every), enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],  # atomic saves; a resume loads weights-only
    )
    kwargs.update(config.trainer)
    if kwargs.get("accelerator") == "cpu":
        keep_freed_memory_on_cpu()
    resume = ckpt_dir / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer = L.Trainer(**kwargs)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume.is_file() else None)
    val_loss = module.evaluate_loss(validation_stream(datamodule, data.val_domain))
    result: dict[str, Any] = {
        "run_id": spec.run_id, "mix": spec.mix_name, "budget": spec.budget, "size": spec.size,
        "params": spec.params, "tokens": spec.tokens, "steps": spec.steps, "batch_tokens": spec.batch_tokens,
        "flops_per_token": spec.flops_per_token, "compute": spec.compute, "lr": spec.lr,
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "status": "ok" if math.isfinite(val_loss) else "diverged",
    }
    if config.downstream is not None and trainer.world_size == 1 and math.isfinite(val_loss):
        from recipe.scaling.downstream import score_benchmark

        tokenizer, items = _benchmark(config)
        result.update(score_benchmark(module.model, tokenizer, items).to_dict())
    if trainer.logger is not None:
        bench = {f"bench/{k[6:]}": v for k, v in result.items() if k.startswith("bench_")}
        metrics = {"val/loss": val_loss, **bench}
        trainer.logger.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=spec.steps)
        trainer.logger.finalize("success")
    result["checkpoint"] = _save_checkpoint(config.checkpoint, trainer, module, folder)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if trainer.is_global_zero:
        atomic_write_text(folder / "result.json",
                          json.dumps({**result, "digest": spec.digest, "spec": spec.to_dict()}, indent=1))
    return result


def _save_checkpoint(kind: str, trainer: Any, module: Any, folder: Path) -> str | None:
    import torch

    if kind == "none":
        return None
    if kind == "full":  # resumable: optimizer, schedule position, data position (the annealing probe's input)
        from recipe.checkpointing import AtomicCheckpointIO

        path = folder / "final.ckpt"
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):  # atomic itself, with a manifest
            trainer.save_checkpoint(path)
            return str(path)
        tmp = folder / f".final.ckpt.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp)
    else:
        path = folder / "weights.pt"
        tmp = folder / f".weights.pt.tmp-{os.getpid()}"
        torch.save(module.model.state_dict(), tmp)
    if trainer.is_global_zero:
        os.replace(tmp, path)
    return str(path)


# ---------------------------------------------------------------------------- the sweep


def run_sweep(config: SweepConfig, plan: Plan, only: list[str] | None = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every unfinished run of ``plan`` (or of ``only``), then write the results table."""
    runs = plan.runs
    if only:
        known = plan.by_id()
        missing = [r for r in only if r not in known]
        if missing:
            raise ConfigError(f"unknown run id(s) {missing}; `recipe scaling sweep --config ... --plan` lists them")
        runs = [known[r] for r in only]
    for i, spec in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {spec.run_id}"
        done = finished_result(config, spec)
        if done is not None:
            log(f"{head}: finished earlier (val_loss {_fmt(done.get('val_loss'))}), skipped")
            continue
        log(f"{head}: N={spec.params:,}, {spec.tokens:,} tokens in {spec.steps} steps, lr {spec.lr:g} ...")
        result = train_run(config, spec)
        bench = f", bench acc {result['bench_acc']:.3f}" if "bench_acc" in result else ""
        log(f"{head}: val_loss {_fmt(result['val_loss'])}{bench} ({result['wall_s']:.1f} s)")
        write_table(config, plan)
    return write_table(config, plan)


def _fmt(value: Any) -> str:
    return "nan" if value is None else f"{float(value):.4f}"


def collect(config: SweepConfig, plan: Plan) -> list[dict[str, Any]]:
    """Finished runs of the plan, in plan order."""
    rows = []
    for spec in plan.runs:
        result = finished_result(config, spec)
        if result is not None:
            rows.append({c: result.get(c) for c in COLUMNS})
    return rows


def write_table(config: SweepConfig, plan: Plan) -> list[dict[str, Any]]:
    rows = collect(config, plan)
    out = Path(config.out_dir)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    return rows


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A results table from ``results.json`` or ``results.csv`` (a folder: its results.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConfigError(f"results table not found: {path}; run `recipe scaling sweep` first")
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = [dict(r) for r in csv.DictReader(handle)]
        for row in rows:
            for key, value in row.items():
                if key not in ("run_id", "mix", "size", "checkpoint", "status"):
                    row[key] = float(value) if value not in ("", None) else None
        return rows
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}); rewrite it with `recipe scaling sweep`") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path} must hold a list of run records")
    return rows


def job_commands(config_path: str, plan: Plan) -> list[str]:
    """One shell command per run (a cluster job each); ``fit`` collects their results."""
    quoted = shlex.quote(str(config_path))
    return [f"recipe scaling sweep --config {quoted} --only {spec.run_id}" for spec in plan.runs]
