"""Annealing as a data-quality probe (paper section 3.1.3).

Take a partly trained checkpoint and anneal it twice over the same number of tokens, the
LR falling linearly to 0 from where its schedule stood: once on the default mix alone and
once on ``fraction`` (30% in the paper) of the candidate plus ``1 - fraction`` of the
default mix. The candidate's value is the change of the scores between the two - cheaper
than a scaling-law experiment per dataset, and measured on a model that already knows
the basics, where small high-quality sets show their effect.

Both arms resume the full Lightning checkpoint (optimizer moments, step, data position),
so they differ in their data only. A candidate is a domain of the shards (build a new
dataset into its own domain with ``recipe data build`` and a ``domain`` field) or a
mapping of domain weights.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.scaling import ScalingError

DEFAULT_FRACTION = 0.3


def blend(default: Mapping[str, float], candidate: str | Mapping[str, float], fraction: float,
          domains: list[str]) -> dict[str, float]:
    """``fraction`` x candidate + ``(1 - fraction)`` x default, over ``domains``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the candidate fraction must be in (0, 1), got {fraction}")
    if isinstance(candidate, str):
        if candidate not in domains:
            raise ConfigError(f"candidate domain {candidate!r} is not in the data (domains: {', '.join(domains)}); "
                              "build the candidate set into its own domain")
        candidate = {candidate: 1.0}
    for name, weights in (("default mix", default), ("candidate", candidate)):
        unknown = sorted(set(weights) - set(domains))
        if unknown:
            raise ConfigError(f"the {name} names domain(s) {unknown} the data lacks (it has {', '.join(domains)})")
        total = math.fsum(weights.values())
        if total <= 0 or any(w < 0 for w in weights.values()):
            raise ConfigError(f"the {name} needs non-negative weights with a positive sum, got {dict(weights)}")
    d_total, c_total = math.fsum(default.values()), math.fsum(candidate.values())
    return {d: (1 - fraction) * default.get(d, 0.0) / d_total + fraction * candidate.get(d, 0.0) / c_total
            for d in domains}


def _checkpoint_mix(checkpoint: Mapping[str, Any], position: int) -> dict[str, float] | None:
    """The data mix the checkpoint's run was using at ``position`` (from its DataMixSchedule state)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if "DataMixSchedule" in str(key) and isinstance(state, dict) and state.get("stages"):
            current = [s for s in state["stages"] if int(s["tokens"]) <= position]
            return dict(current[-1]["weights"]) if current else None
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    from recipe.checkpointing import load_trusted
    from recipe.errors import RecipeError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}; pass a Lightning .ckpt (a sweep run's final.ckpt)")
    try:
        checkpoint = load_trusted(path, mmap=True)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ConfigError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                          "pass a Lightning .ckpt") from None
    missing = [k for k in ("hyper_parameters", "datamodule_hyper_parameters", "global_step") if k not in checkpoint]
    if missing:
        raise ConfigError(f"{path} lacks {missing}: the annealing probe needs a full checkpoint of a recipe run "
                          "(checkpoint: full in a sweep, or ModelCheckpoint in recipe fit)")
    return checkpoint


def evaluate_scores(module: Any, datamodule: Any, benchmark: tuple[Any, list] | None = None) -> dict[str, float]:
    """Validation loss (natural mix and per domain) and, if given, the benchmark's NLL / accuracy."""
    from recipe.scaling.sweep import validation_stream

    scores = {"val_loss": module.evaluate_loss(validation_stream(datamodule))}
    for domain in datamodule.val_set.domains:
        scores[f"val_loss/{domain}"] = module.evaluate_loss(validation_stream(datamodule, domain))
    if benchmark is not None:
        from recipe.scaling.downstream import score_benchmark

        tokenizer, items = benchmark
        result = score_benchmark(module.model, tokenizer, items)
        scores.update({"bench_nll": result.nll, "bench_acc": result.accuracy})
    return scores


def _anneal(checkpoint_path: Path, checkpoint: Mapping[str, Any], mix: dict[str, float], anneal_steps: int,
            data_dir: str | None, logdir: Path, benchmark: tuple[Any, list] | None) -> dict[str, float]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.annealing import LRAnnealing
    from callbacks.data_mix import DataMixSchedule, MixStage
    from recipe.checkpointing import AtomicCheckpointIO
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule

    hparams = dict(checkpoint["hyper_parameters"])
    data_hparams = dict(checkpoint["datamodule_hyper_parameters"])
    if data_dir is not None:
        data_hparams["data_dir"] = data_dir
    data_hparams["build_demo"] = False
    module = LlamaLightningModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    datamodule = TokenDataModule(**data_hparams)
    step_tokens = datamodule.global_batch_size * datamodule.seq_len
    tokens_seen = int(checkpoint.get("tokens_seen", 0))
    anneal_tokens = anneal_steps * step_tokens
    callbacks = [
        # The LR falls linearly to 0 over the probe, from the schedule's LR at the checkpoint.
        LRAnnealing(total_tokens=tokens_seen + anneal_tokens, anneal_tokens=anneal_tokens),
        # Positions before the checkpoint are never read again, so one stage is the whole probe's mix.
        DataMixSchedule([MixStage(0, mix)]),
    ]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(checkpoint["global_step"]) + anneal_steps,
                        default_root_dir=str(logdir), limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, plugins=[AtomicCheckpointIO()],  # weights-only resume
                        logger=TensorBoardLogger(save_dir=str(logdir), name="", version=""), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data-mix schedule that differs.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint_path))
    if int(trainer.global_step) != int(checkpoint["global_step"]) + anneal_steps:
        raise ScalingError(f"the annealing stopped at step {trainer.global_step}, not at "
                           f"{int(checkpoint['global_step']) + anneal_steps}")
    scores = evaluate_scores(module, datamodule, benchmark)
    trainer.logger.log_metrics({f"probe/{k}": v for k, v in scores.items()}, step=int(trainer.global_step))
    trainer.logger.finalize("success")
    return scores


def anneal_probe(checkpoint_path: str | os.PathLike, candidate: str | Mapping[str, float],
                 fraction: float = DEFAULT_FRACTION, anneal_tokens: int | None = None,
                 default_mix: Mapping[str, float] | None = None, data_dir: str | None = None,
                 benchmark: tuple[Any, list] | None = None, out_dir: str | os.PathLike = "runs/anneal_probe",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both arms of the probe and the score changes (candidate minus default).

    ``anneal_tokens`` (rounded up to whole steps) defaults to a quarter of the tokens the
    checkpoint has seen. ``default_mix`` defaults to the mix the checkpoint's run used at
    its last step, else the data's natural shares.
    """
    from recipe.data.shards import ShardSet

    start = time.perf_counter()
    checkpoint_path = Path(checkpoint_path)
    checkpoint = read_checkpoint(checkpoint_path)
    data_hparams = checkpoint["datamodule_hyper_parameters"]
    train = ShardSet(Path(data_dir or data_hparams["data_dir"]) / "train")
    domains = train.domains
    tokens_seen = int(checkpoint.get("tokens_seen", 0))
    if default_mix is None:
        default_mix = _checkpoint_mix(checkpoint, tokens_seen) or {
            d: n / train.num_tokens for d, n in train.domain_tokens.items()}
    default = blend(default_mix, default_mix, 0.5, domains)  # normalised over the data's domains
    mixed = blend(default_mix, candidate, fraction, domains)
    step_tokens = int(data_hparams["global_batch_size"]) * int(data_hparams["seq_len"])
    if anneal_tokens is None:
        anneal_tokens = max(step_tokens, tokens_seen // 4)
    if anneal_tokens <= 0:
        raise ConfigError(f"anneal_tokens must be positive, got {anneal_tokens}")
    anneal_steps = math.ceil(anneal_tokens / step_tokens)
    out = Path(out_dir)
    log(f"annealing {checkpoint_path} (step {int(checkpoint['global_step'])}, {tokens_seen:,} tokens) over "
        f"{anneal_steps} steps ({anneal_steps * step_tokens:,} tokens), twice")
    arms = {}
    for name, mix in (("default", default), ("candidate", mixed)):
        log(f"  {name} mix: " + ", ".join(f"{d} {w:.3f}" for d, w in mix.items()))
        arms[name] = _anneal(checkpoint_path, checkpoint, mix, anneal_steps, data_dir, out / name, benchmark)
    delta = {k: arms["candidate"][k] - arms["default"][k] for k in arms["default"]}
    report = {"checkpoint": str(checkpoint_path), "candidate": candidate, "fraction": fraction,
              "anneal_tokens": anneal_steps * step_tokens, "default_mix": default, "candidate_mix": mixed,
              "default": arms["default"], "with_candidate": arms["candidate"], "change": delta,
              "wall_s": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    from recipe.files import atomic_write_text

    atomic_write_text(out / "anneal_probe.json", json.dumps(report, indent=1))
    return report


def describe_probe(report: Mapping[str, Any]) -> str:
    lines = [f"{'score':<22}{'default':>12}{'+candidate':>12}{'change':>12}"]
    for key, base in report["default"].items():
        lines.append(f"{key:<22}{base:>12.4f}{report['with_candidate'][key]:>12.4f}{report['change'][key]:>+12.4f}")
    lines.append("lower loss / NLL and higher accuracy are better; change = with candidate - default")
    return "\n".join(lines)
