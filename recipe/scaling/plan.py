"""Budgets x model sizes -> the runs of an IsoFLOP sweep, from a YAML config.

For a compute budget ``C`` and a model of ``N`` parameters the run trains ``D = C / (k N)``
tokens, rounded to whole optimizer steps of the budget's fixed batch. ``k N`` is the
training FLOPs per token:

* ``flops: 6n`` (default, the paper's and Chinchilla's ``C = 6 N D``): ``N`` counts the
  parameters that do compute for every token - every matmul weight, the output head
  included, plus the norm gains (``recipe.flops.non_embedding_params``). The input
  embedding is a table lookup with no FLOPs, so it is left out. With the 128K vocabulary
  the head is most of a tiny model's compute, which is why it must be counted.
* ``flops: 6n+attention``: ``recipe.flops.flops_per_token`` - the same matmuls plus the
  attention scores (causal, ``seq_len / 2`` keys per query), which matter for small
  models at long context.

``C`` is then the budget that was actually spent (steps x batch x FLOPs per token),
recorded with each run; fits use it rather than the nominal budget only for plotting.

The schedule is the paper's scaling-law one: linear warm-up, cosine decay to
``min_lr_ratio`` (0.1) x the peak LR, AdamW with weight decay ``0.1`` (see
``ScheduleSpec``), one fixed batch per budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from recipe.config import read_yaml
from recipe.errors import ConfigError, RecipeError
from recipe.model import ModelArgs

FLOPS_FORMULAS = ("6n", "6n+attention")


@dataclass
class DataSpec:
    """The ``data:`` section: which shards, how they are cut, how validation is read."""

    data_dir: str = "data/demo"
    seq_len: int = 2048
    micro_batch_size: int = 1
    val_batches: int = 8
    val_batch_size: int | None = None  # sequences per validation step (None: 8)
    build_demo: bool = True
    mix: dict[str, float] | None = None  # domain weights of every run (None: natural shares)
    val_domain: str | None = None  # score validation loss on this domain only (None: natural mix)


@dataclass
class SizeSpec:
    """One model of the size grid: a name, its ``ModelArgs`` overrides and its peak LR."""

    name: str
    arch: dict[str, Any]
    lr: float


@dataclass
class BudgetSpec:
    flops: float
    batch_tokens: int  # fixed per budget, as in the paper (250K at 6e18 ... 4M at 1e22)
    # The sizes trained at this budget (None: all). As in the paper, each budget trains the
    # sizes around its expected optimum: far from it a run only costs time (the smallest
    # model of a large budget trains the most tokens) and bends the parabola.
    sizes: list[str] | None = None


@dataclass
class ScheduleSpec:
    """LR schedule and optimizer of every run.

    ``weight_decay = 0.1`` gives the paper's "weight decay at each step of 0.1 x the LR of
    that step": torch's AdamW is decoupled and scales the decay by the current LR,
    ``p <- p - lr_t * weight_decay * p``, so the per-step shrink is ``0.1 x lr_t`` with no
    extra coupling to the schedule.
    """

    warmup_steps: int = 2000  # the paper's; capped at a quarter of a short run
    warmup_fraction: float | None = None  # if set: min(warmup_steps, ceil(fraction x steps))
    min_lr_ratio: float = 0.1  # cosine to 0.1 x peak
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    min_steps: int = 10  # fewer optimizer steps than this cannot follow the schedule


@dataclass
class DownstreamSpec:
    """Multiple-choice benchmark scored after each run (``recipe.scaling.downstream``)."""

    benchmark: str = "cloze"  # cloze | arithmetic | path to a jsonl (ARC or this recipe's format)
    items: int = 200
    seed: int = 0
    domain: str | None = None  # cloze: draw items from this domain's validation documents only


@dataclass
class RunSpec:
    """One training run of a sweep, fully determined (its hash decides "already done")."""

    run_id: str
    budget: float  # nominal FLOPs
    size: str
    arch: dict[str, Any]
    params: int  # N of C = k N D
    flops_per_token: float
    batch_tokens: int
    global_batch_size: int
    steps: int
    tokens: int
    compute: float  # FLOPs actually spent: steps x batch_tokens x flops_per_token
    lr: float
    warmup_steps: int
    min_lr: float
    weight_decay: float
    seed: int
    mix_name: str | None = None
    mix: dict[str, float] | None = None
    data_dir: str = ""
    seq_len: int = 0
    val_domain: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def model_args(self) -> ModelArgs:
        return ModelArgs(**self.arch)


@dataclass
class SweepConfig:
    out_dir: str
    data: DataSpec
    sizes: list[SizeSpec]
    budgets: list[BudgetSpec]
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    flops: str = "6n"
    seed: int = 0
    checkpoint: str = "full"  # full (Lightning, resumable) | weights (state dict) | none
    checkpoint_every: int | None = None  # steps between resumable checkpoints of a run
    trainer: dict[str, Any] = field(default_factory=dict)  # extra lightning.Trainer kwargs
    downstream: DownstreamSpec | None = None
    mixes: dict[str, dict[str, float]] | None = None  # candidate mixes: each run x each mix
    target_flops: float | None = None  # the budget forecasts are made for
    source: str | None = None  # the YAML file this came from


@dataclass
class Plan:
    runs: list[RunSpec]
    skipped: list[str]  # "(budget, size): why" for grid points that cannot run

    def by_id(self) -> dict[str, RunSpec]:
        return {r.run_id: r for r in self.runs}


# ---------------------------------------------------------------------------- parsing


def _number(value: Any, where: str) -> float:
    # YAML 1.1 reads "6e18" (no dot) as a string; accept it as the number it obviously is.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where} must be a positive finite number, got {value!r}")
    return number


def _section(raw: dict[str, Any], key: str, cls: type, where: str) -> Any:
    values = raw.get(key) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: `{key}` must be a mapping, got {type(values).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {key} keys {unknown}; valid keys are {sorted(known)}")
    return cls(**values)


def _check_weights(weights: Any, where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{where} must map domain -> weight, got {weights!r}")
    out: dict[str, float] = {}
    for domain, weight in weights.items():
        try:
            out[str(domain)] = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight of {domain!r} is {weight!r}, not a number") from None
        if not math.isfinite(out[str(domain)]) or out[str(domain)] < 0:
            raise ConfigError(f"{where}: weight of {domain!r} is {weight!r}; weights must be finite and >= 0")
    total = math.fsum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{where}: weights sum to {total:.6g}, not 1; rescale them")
    return out


def parse_config(raw: dict[str, Any], source: str = "<config>") -> SweepConfig:
    """A ``SweepConfig`` from the parsed YAML, with one-line errors for every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the scaling config must be a YAML mapping")
    top = {"out_dir", "data", "model", "sizes", "budgets", "schedule", "flops", "seed", "checkpoint",
           "checkpoint_every", "trainer", "downstream", "mixes", "target_flops"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(top)}")
    data = _section(raw, "data", DataSpec, source)
    if data.mix is not None:
        data.mix = _check_weights(data.mix, f"{source}: data.mix")
    schedule = _section(raw, "schedule", ScheduleSpec, source)
    schedule.betas = tuple(schedule.betas)  # type: ignore[assignment]
    if not 0 < schedule.min_lr_ratio <= 1:
        raise ConfigError(f"{source}: schedule.min_lr_ratio must be in (0, 1], got {schedule.min_lr_ratio}")
    if schedule.min_steps < 1:
        raise ConfigError(f"{source}: schedule.min_steps must be >= 1, got {schedule.min_steps}")

    shared = dict(raw.get("model") or {})
    sizes_raw = raw.get("sizes") or []
    if not isinstance(sizes_raw, list) or not sizes_raw:
        raise ConfigError(f"{source}: `sizes` must be a non-empty list of models ({{name, lr, dim, n_layers, ...}})")
    sizes: list[SizeSpec] = []
    for i, entry in enumerate(sizes_raw):
        if not isinstance(entry, dict) or "name" not in entry or "lr" not in entry:
            raise ConfigError(f"{source}: sizes[{i}] needs at least `name` and `lr` (plus ModelArgs fields)")
        entry = dict(entry)
        name, lr = str(entry.pop("name")), _number(entry.pop("lr"), f"{source}: sizes[{i}].lr")
        arch = {**shared, **entry}
        fields = set(ModelArgs.__dataclass_fields__)
        bad = sorted(set(arch) - fields)
        if bad:
            raise ConfigError(f"{source}: size {name!r} has unknown model keys {bad}; valid keys are {sorted(fields)}")
        try:
            ModelArgs(**arch)
        except RecipeError as err:  # shape errors (dim % n_heads ...) name the size they come from
            raise ConfigError(f"{source}: size {name!r}: {err}") from None
        sizes.append(SizeSpec(name, arch, lr))
    names = [s.name for s in sizes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: size names must be unique, got {names}")

    budgets_raw = raw.get("budgets") or []
    if not isinstance(budgets_raw, list) or not budgets_raw:
        raise ConfigError(f"{source}: `budgets` must be a non-empty list of {{flops, batch_tokens}}")
    budgets = []
    for i, entry in enumerate(budgets_raw):
        if not isinstance(entry, dict) or not {"flops", "batch_tokens"} <= set(entry) <= {"flops", "batch_tokens",
                                                                                          "sizes"}:
            raise ConfigError(f"{source}: budgets[{i}] must be {{flops, batch_tokens[, sizes]}}, got {entry!r}")
        batch = int(_number(entry["batch_tokens"], f"{source}: budgets[{i}].batch_tokens"))
        chosen = entry.get("sizes")
        if chosen is not None:
            chosen = [str(c) for c in chosen]
            unknown = sorted(set(chosen) - set(names))
            if unknown:
                raise ConfigError(f"{source}: budgets[{i}].sizes names unknown size(s) {unknown}; sizes are {names}")
        budgets.append(BudgetSpec(_number(entry["flops"], f"{source}: budgets[{i}].flops"), batch, chosen))
    flops = [b.flops for b in budgets]
    if len(set(flops)) != len(flops):
        raise ConfigError(f"{source}: budgets must be distinct, got {flops}")

    flops_formula = str(raw.get("flops", "6n")).lower().replace(" ", "")
    if flops_formula not in FLOPS_FORMULAS:
        raise ConfigError(f"{source}: flops must be one of {FLOPS_FORMULAS}, got {raw.get('flops')!r}")
    checkpoint = str(raw.get("checkpoint", "full"))
    if checkpoint not in ("full", "weights", "none"):
        raise ConfigError(f"{source}: checkpoint must be full, weights or none, got {checkpoint!r}")
    downstream = None
    if raw.get("downstream") is not None:
        downstream = _section(raw, "downstream", DownstreamSpec, source)
    mixes = None
    if raw.get("mixes") is not None:
        if not isinstance(raw["mixes"], dict) or not raw["mixes"]:
            raise ConfigError(f"{source}: `mixes` must map a mix name to its domain weights")
        mixes = {str(n): _check_weights(w, f"{source}: mixes.{n}") for n, w in raw["mixes"].items()}
        if data.mix is not None:
            raise ConfigError(f"{source}: give either data.mix (one mix) or mixes (candidates), not both")
    every = raw.get("checkpoint_every")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError(f"{source}: checkpoint_every must be a positive number of steps, got {every!r}")
    target = raw.get("target_flops")
    return SweepConfig(
        out_dir=str(raw.get("out_dir") or "runs/scaling"), data=data, sizes=sizes, budgets=budgets,
        schedule=schedule, flops=flops_formula, seed=int(raw.get("seed", 0)), checkpoint=checkpoint,
        checkpoint_every=raw.get("checkpoint_every"), trainer=dict(raw.get("trainer") or {}),
        downstream=downstream, mixes=mixes,
        target_flops=None if target is None else _number(target, f"{source}: target_flops"), source=source,
    )


def load_config(path: str | os.PathLike) -> SweepConfig:
    return parse_config(read_yaml(path, "scaling config"), str(path))


# ---------------------------------------------------------------------------- planning


def params_and_flops(args: ModelArgs, seq_len: int, formula: str = "6n") -> tuple[int, float]:
    """``(N, training FLOPs per token)`` under the sweep's FLOPs formula."""
    from recipe.flops import flops_per_token, non_embedding_params

    n = non_embedding_params(args)
    per_token = 6.0 * n if formula == "6n" else flops_per_token(args, seq_len, causal=True)
    return n, per_token


def budget_tag(flops: float) -> str:
    """``2e11``, ``3.16e11``: a file-name-safe short form of a budget."""
    return f"{flops:.3g}".replace("+", "")


def warmup_for(steps: int, schedule: ScheduleSpec) -> int:
    warmup = schedule.warmup_steps
    if schedule.warmup_fraction is not None:
        warmup = min(warmup, math.ceil(schedule.warmup_fraction * steps))
    # The paper's 2,000 warm-up steps would swallow a short run; keep 3/4 of it for the cosine.
    return max(1, min(warmup, steps // 4))


def plan_sweep(config: SweepConfig) -> Plan:
    """Every (mix, budget, size) run with its token count and schedule.

    A size whose budget buys fewer than ``min_steps`` optimizer steps is skipped (and listed);
    a budget too small even for the smallest model is an error - it would contribute no point.
    """
    data, sched = config.data, config.schedule
    sized = []
    for size in config.sizes:
        args = ModelArgs(**size.arch)
        if data.seq_len > args.max_seq_len:
            raise ConfigError(f"data.seq_len={data.seq_len} exceeds size {size.name!r} max_seq_len="
                              f"{args.max_seq_len}; raise model.max_seq_len or shorten data.seq_len")
        n, per_token = params_and_flops(args, data.seq_len, config.flops)
        sized.append((size, n, per_token))
    runs: list[RunSpec] = []
    skipped: list[str] = []
    mixes: list[tuple[str | None, dict[str, float] | None]] = (
        list(config.mixes.items()) if config.mixes else [(None, data.mix)])
    for budget in sorted(config.budgets, key=lambda b: b.flops):
        if budget.batch_tokens % data.seq_len:
            raise ConfigError(f"budget {budget.flops:.3g}: batch_tokens={budget.batch_tokens} is not a multiple "
                              f"of data.seq_len={data.seq_len}")
        sequences = budget.batch_tokens // data.seq_len
        if sequences % data.micro_batch_size:
            raise ConfigError(f"budget {budget.flops:.3g}: {sequences} sequences per step is not a multiple of "
                              f"data.micro_batch_size={data.micro_batch_size}")
        grid = [s for s in sized if budget.sizes is None or s[0].name in budget.sizes]
        smallest = min(grid, key=lambda s: s[2])
        affordable = round(budget.flops / (budget.batch_tokens * smallest[2]))
        if affordable < sched.min_steps:
            need = sched.min_steps * budget.batch_tokens * smallest[2]
            raise ConfigError(
                f"budget {budget.flops:.3g} FLOPs is too small for the smallest model {smallest[0].name!r} "
                f"(N={smallest[1]:,}, {smallest[2]:.3g} FLOPs/token): it buys {affordable} steps of "
                f"{budget.batch_tokens:,} tokens, below schedule.min_steps={sched.min_steps}; raise it to at "
                f"least {need:.3g} FLOPs or shrink its batch_tokens")
        for size, n, per_token in grid:
            steps = round(budget.flops / (budget.batch_tokens * per_token))
            if steps < sched.min_steps:
                skipped.append(f"budget {budget.flops:.3g} x size {size.name}: only {steps} steps "
                               f"(min_steps={sched.min_steps})")
                continue
            tokens = steps * budget.batch_tokens
            for mix_name, mix in mixes:
                prefix = f"{mix_name}_" if mix_name else ""
                runs.append(RunSpec(
                    run_id=f"{prefix}C{budget_tag(budget.flops)}_{size.name}", budget=budget.flops,
                    size=size.name, arch=dict(size.arch), params=n, flops_per_token=per_token,
                    batch_tokens=budget.batch_tokens, global_batch_size=sequences, steps=steps, tokens=tokens,
                    compute=tokens * per_token, lr=size.lr, warmup_steps=warmup_for(steps, sched),
                    min_lr=sched.min_lr_ratio * size.lr, weight_decay=sched.weight_decay, seed=config.seed,
                    mix_name=mix_name, mix=mix, data_dir=data.data_dir, seq_len=data.seq_len,
                    val_domain=data.val_domain,
                ))
    return Plan(runs, skipped)


def describe_plan(plan: Plan) -> str:
    lines = [f"{'run':<28}{'N':>13}{'tokens':>12}{'steps':>7}{'batch':>8}{'compute':>11}{'lr':>9}"]
    for r in plan.runs:
        lines.append(f"{r.run_id:<28}{r.params:>13,}{r.tokens:>12,}{r.steps:>7}{r.batch_tokens:>8,}"
                     f"{r.compute:>11.3g}{r.lr:>9.2g}")
    lines += [f"skipped: {s}" for s in plan.skipped]
    return "\n".join(lines)
