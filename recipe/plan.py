"""The run plan: the shape of every step as a pure function of the global data position.

A pre-training run changes its step along the way: the batch-size ramp, the long-context
stages (with their own batch, length and RoPE), the data mix, the LR schedule and the
final annealing. ``RunPlan`` holds all of them and answers one question - what does the
step that starts at global token ``position`` look like (``RunPlan.at``)? - with a
``StepShape``: its batch and sequence length, micro-batch size, mix weights, RoPE, context
stage, phase and LR.

One clock: the position is the number of tokens the data stream has consumed before the
step (``batch["position"]``). Every schedule follows it - a step that the step guard
skips consumes its batch and its slot in every schedule like any other step, so the LR
of step ``n`` is the schedule's LR for ``n`` = the number of steps that start before its
position, whatever was skipped.

The only thing the plan cannot know in advance is when a gated context stage begins:
that depends on evaluations of the live model (``callbacks.context_stages``). The
callback records the start with ``record_stage_start``; the starts are the plan's
state (``state_dict``), saved with the checkpoint, so a resumed run - under any parallel
layout, since the state is a list of token positions - cuts exactly the same steps.

Built once (``build_run_plan``) from the recipe callbacks' settings and checked once
against the parallel layout (``check_layout`` with ``ParallelDims.check_batch``).
Pure Python: no Lightning, no torch.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recipe.config import LRSchedule, RopeScaling
from recipe.errors import ConfigError, ModelConfigError, RecipeError

__all__ = [
    "AnnealSettings", "ContextSettings", "ContextStage", "MixSettings", "MixStage", "RampSettings", "RampStage",
    "RunPlan", "StepShape", "build_run_plan", "choose_mix", "paper_stages",
]

SUM_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------- stages


@dataclass
class RampStage:
    """From data position ``tokens`` on: ``batch_tokens`` per optimizer step in ``seq_len``-token sequences."""

    tokens: int
    batch_tokens: int
    seq_len: int


@dataclass
class ContextStage:
    """Train at ``seq_len`` for at least ``tokens`` tokens.

    ``batch_tokens`` (None: whatever the batch schedule gives at that point) sets the
    global batch in tokens; ``rope_theta`` / ``rope_scaling`` (None: keep the previous
    stage's, at first the model's) change the rotary embedding from this stage on.
    """

    seq_len: int
    tokens: int
    batch_tokens: int | None = None
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)


@dataclass
class MixStage:
    """From data position ``tokens`` on, sample domain ``d`` with probability ``weights[d]``.

    Domains of the data that a stage leaves out get weight 0.
    """

    tokens: int
    weights: dict[str, float] = field(default_factory=dict)


def paper_stages(total_tokens: int = 800_000_000_000) -> list[ContextStage]:
    """8K -> 128K in six increments sharing ``total_tokens`` (about 800B in the paper)."""
    lengths = [16_384, 32_768, 49_152, 65_536, 98_304, 131_072]
    return [ContextStage(seq_len=n, tokens=total_tokens // len(lengths)) for n in lengths]


# ---------------------------------------------------------------------------- settings


def _stages_from_zero(stages: list, kind: type, owner: str, what: str) -> list:
    """``stages`` as ``kind`` instances (YAML gives dicts), checked: the first at tokens=0, then increasing."""
    if not stages:
        raise ConfigError(f"{owner} needs at least one stage")
    stages = [s if isinstance(s, kind) else kind(**s) for s in stages]
    if stages[0].tokens != 0:
        raise ConfigError(f"the first {what} stage must start at tokens=0, got {stages[0].tokens:,}")
    for before, after in zip(stages, stages[1:]):
        if after.tokens <= before.tokens:
            raise ConfigError(
                f"{what} thresholds must increase: {after.tokens:,} follows {before.tokens:,}; sort the stages"
            )
    return stages


@dataclass
class RampSettings:
    """The batch-size ramp (``callbacks.batch_ramp.BatchSizeRamp``): stages ordered by ``tokens``, the first at 0."""

    stages: list[RampStage]

    def __post_init__(self) -> None:
        stages = _stages_from_zero(self.stages, RampStage, "BatchSizeRamp", "ramp")
        for s in stages:
            if s.seq_len <= 0 or s.batch_tokens <= 0 or s.batch_tokens % s.seq_len:
                raise ConfigError(
                    f"ramp stage at {s.tokens:,} tokens: batch_tokens={s.batch_tokens:,} must be a positive "
                    f"multiple of seq_len={s.seq_len}"
                )
        self.stages = stages
        self._starts = [s.tokens for s in stages]

    def stage_at(self, position: int) -> RampStage:
        return self.stages[bisect.bisect_right(self._starts, position) - 1]

    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global batch in sequences, seq_len)`` of a step starting at ``position``."""
        stage = self.stage_at(position)
        return stage.batch_tokens // stage.seq_len, stage.seq_len


@dataclass
class ContextSettings:
    """The long-context stages (``callbacks.context_stages.ContextLengthStages``).

    ``gated``: the stages after the first start when their gates pass (recorded at run
    time); otherwise each starts when the previous one has spent its ``tokens``.
    ``short_validation``: the short-context validation gate runs (at ``short_seq_len``,
    None: the length in use just before the first stage).
    """

    stages: list[ContextStage]
    start_tokens: int = 0
    gated: bool = False
    short_seq_len: int | None = None
    short_validation: bool = False

    def __post_init__(self) -> None:
        stages = [s if isinstance(s, ContextStage) else ContextStage(**s) for s in self.stages]
        if not stages:
            raise ConfigError("ContextLengthStages needs at least one stage")
        for i, s in enumerate(stages):
            if s.seq_len <= 0 or s.tokens <= 0:
                raise ConfigError(f"context stage {i}: seq_len and tokens must be positive, got {s.seq_len} and "
                                  f"{s.tokens:,}")
            if s.batch_tokens is not None and (s.batch_tokens <= 0 or s.batch_tokens % s.seq_len):
                raise ConfigError(f"context stage {i}: batch_tokens={s.batch_tokens:,} must be a positive multiple "
                                  f"of seq_len={s.seq_len}")
        for i, (before, after) in enumerate(zip(stages, stages[1:]), start=1):
            if after.seq_len <= before.seq_len:
                raise ConfigError(f"context stage {i}: seq_len {after.seq_len} does not exceed the previous stage's "
                                  f"{before.seq_len}; order the stages by increasing length")
        if self.start_tokens < 0:
            raise ConfigError(f"ContextLengthStages start_tokens must be >= 0, got {self.start_tokens:,}")
        if self.short_seq_len is not None and self.short_seq_len <= 0:
            raise ConfigError(f"short_seq_len must be positive, got {self.short_seq_len}")
        self.stages = stages
        self.start_tokens = int(self.start_tokens)

    def initial_starts(self) -> list[int]:
        """The starts known before the run: every stage's without gates, the first one's with them."""
        starts = [self.start_tokens]
        if not self.gated:
            for s in self.stages[:-1]:
                starts.append(starts[-1] + s.tokens)
        return starts

    @property
    def nominal_last_start(self) -> int:
        """Where the last stage starts if every stage ends on its budget."""
        return self.start_tokens + sum(s.tokens for s in self.stages[:-1])


def check_weights(weights: dict[str, float], where: str) -> None:
    """One-line ConfigError unless ``weights`` maps domains to numbers >= 0 summing to 1."""
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{where} needs weights as a mapping domain -> weight, got {weights!r}")
    for domain, weight in weights.items():
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}: weight of {domain!r} is {weight!r}; weights must be numbers >= 0")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{where}: weights sum to {total:.6g}, not 1; rescale them so that they sum to 1")


@dataclass
class MixSettings:
    """The data mix (``callbacks.data_mix.DataMixSchedule``): stages from 0 on, and the annealing mix."""

    stages: list[MixStage]
    anneal_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        stages = _stages_from_zero(self.stages, MixStage, "DataMixSchedule", "data-mix")
        for s in stages:
            check_weights(s.weights, f"data-mix stage at {s.tokens:,} tokens")
        if self.anneal_weights is not None:
            self.anneal_weights = dict(self.anneal_weights)
            check_weights(self.anneal_weights, "data-mix anneal_weights")
        self.stages = stages
        self._starts = [s.tokens for s in stages]

    def stage_at(self, position: int) -> MixStage:
        return self.stages[bisect.bisect_right(self._starts, position) - 1]

    def weights_at(self, position: int, anneal_start: int | None = None,
                   domains: list[str] | None = None) -> dict[str, float]:
        """Domain -> weight of the step starting at ``position``: ``anneal_weights`` from
        ``anneal_start`` on, else the stage's; every domain of ``domains`` present (0 if left out)."""
        if self.anneal_weights is not None and anneal_start is not None and position >= anneal_start:
            weights = self.anneal_weights
        else:
            weights = self.stage_at(position).weights
        return {**dict.fromkeys(domains or [], 0.0), **{d: float(w) for d, w in weights.items()}}

    @property
    def domains(self) -> list[str]:
        """Every domain a stage or the annealing mix names, sorted."""
        named = {d for s in self.stages for d in s.weights} | set(self.anneal_weights or {})
        return sorted(named)


def choose_mix(mix: MixSettings | None, data_domains: list[str] | None, mode: bool | str = "auto",
               data_name: str = "the data") -> tuple[MixSettings | None, str | None]:
    """The mix a run trains with, and a one-line notice when the configured one is dropped.

    ``mode`` is the data module's ``mix`` setting: False turns the mix off (each domain is
    then sampled at its share of the tokens), True keeps it, and ``"auto"`` keeps it unless
    the data has a single domain and the mix names others - a corpus built without domain
    tags, where a mix of the shipped configs' domains cannot apply. Data with
    several domains keeps the mix even when it names a domain they lack: that is a
    mistake in the weights or the data, which the domain check reports.
    ``data_domains`` None (data not built yet) keeps the mix.
    """
    if mode not in (True, False, "auto"):
        raise ConfigError(f"data.mix is {mode!r}; use auto, true (keep the data mix) or false (turn it off)")
    if mix is None or mode is True:
        return mix, None
    if mode is False:
        return None, ("the data mix is off (data.mix: false): each domain of "
                      f"{data_name} is sampled at its share of the tokens")
    if data_domains is None or len(data_domains) != 1 or set(mix.domains) <= set(data_domains):
        return mix, None
    return None, (f"the data mix is off: {data_name} has one domain ({data_domains[0]}) and the mix names "
                  f"{', '.join(mix.domains)}; give its records a `domain` field to keep it, "
                  "or pass --data.mix false to turn it off explicitly")


@dataclass
class AnnealSettings:
    """LR annealing (``callbacks.annealing.LRAnnealing``): linear to 0 over the last ``anneal_tokens`` of the run."""

    total_tokens: int
    anneal_tokens: int = 40_000_000

    def __post_init__(self) -> None:
        if self.anneal_tokens <= 0 or self.total_tokens <= 0:
            raise ConfigError(f"LRAnnealing needs positive token counts, got total_tokens={self.total_tokens}, "
                              f"anneal_tokens={self.anneal_tokens}")
        if self.anneal_tokens > self.total_tokens:
            raise ConfigError(
                f"annealing over {self.anneal_tokens:,} tokens is longer than the run ({self.total_tokens:,} tokens); "
                "shorten anneal_tokens or raise total_tokens"
            )

    @property
    def anneal_start(self) -> int:
        return self.total_tokens - self.anneal_tokens

    def lr(self, position: int, scheduled_lr: float, start_lr: float) -> float:
        """LR of the step starting at ``position``: ``scheduled_lr`` before the annealing, then
        ``start_lr`` falling linearly in tokens to exactly 0 at ``total_tokens``."""
        if position < self.anneal_start:
            return scheduled_lr
        return start_lr * max(0, self.total_tokens - position) / self.anneal_tokens


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StepShape:
    """Everything about the step that starts at ``position`` that does not need the live model."""

    position: int
    step_index: int  # steps that start before this one (skipped ones included): the LR schedule's step
    batch_size: int  # global sequences
    seq_len: int
    micro_batch_size: int
    mix: dict[str, float] | None  # None: the data's natural shares
    rope_theta: float
    rope_scaling: RopeScaling | None
    context_stage: int  # -1 before the first context stage
    phase: int  # 0 main, 1 annealing
    lr: float

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len


class RunPlan:
    """The shape of each step as a function of its data position and the recorded stage starts.

    Args:
        lr_schedule, peak_lr: the main LR schedule (in steps) and the peak it scales.
        global_batch_size, seq_len: the data's fixed layout (used without a ramp).
        micro_batch_size: sequences per forward/backward on one rank.
        val_batch_size: sequences per validation step (None: ``global_batch_size``).
        rope_theta, rope_scaling: the model's RoPE (context stages may change it).
        max_seq_len: the model's RoPE table; a longer layout is refused (None: unchecked).
        domains: the data's domains, listed with weight 0 in ``mix_at`` when a stage leaves them out.
        ramp, context, mix, annealing: the recipe's schedules (None: absent).

    Raises a one-line ``ConfigError`` for settings that cannot run together.
    """

    def __init__(
        self,
        lr_schedule: LRSchedule,
        peak_lr: float,
        global_batch_size: int,
        seq_len: int,
        micro_batch_size: int = 1,
        val_batch_size: int | None = None,
        rope_theta: float = 500000.0,
        rope_scaling: RopeScaling | None = None,
        max_seq_len: int | None = None,
        domains: list[str] | None = None,
        ramp: RampSettings | None = None,
        context: ContextSettings | None = None,
        mix: MixSettings | None = None,
        annealing: AnnealSettings | None = None,
    ) -> None:
        self.lr_schedule = lr_schedule
        self.peak_lr = float(peak_lr)
        self.global_batch_size = int(global_batch_size)
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.val_batch_size = int(val_batch_size or global_batch_size)
        self.rope_theta = float(rope_theta)
        self.rope_scaling = rope_scaling
        self.max_seq_len = max_seq_len
        self.domains = list(domains) if domains is not None else None
        self.ramp, self.context, self.mix, self.annealing = ramp, context, mix, annealing
        if mix is not None and mix.anneal_weights is not None and annealing is None:
            raise ConfigError("DataMixSchedule anneal_weights need the callbacks.annealing.LRAnnealing callback; "
                              "add it or drop anneal_weights")
        if context is not None and annealing is not None and context.nominal_last_start > annealing.anneal_start:
            raise ConfigError(
                f"the last context stage starts at {context.nominal_last_start:,} tokens, after annealing begins at "
                f"{annealing.anneal_start:,}; annealing runs at the final length - shorten the stages or start them "
                "earlier"
            )
        self._starts: list[int] = context.initial_starts() if context is not None else []
        self._segments: tuple[list[int], list[tuple[int, int, int, int | None]]] | None = None
        stages = [(s.seq_len, f"context stage {i}") for i, s in enumerate(context.stages)] if context else []
        self._check_lengths(stages)  # before the layouts: a stage too long is the first thing to fix
        self._check_lengths([(length, where) for _, length, where in self.layouts()])  # also checks the stages' batches

    def _check_lengths(self, lengths: list[tuple[int, str]]) -> None:
        for length, where in lengths:
            if self.max_seq_len is not None and length > self.max_seq_len:
                raise ModelConfigError(
                    f"{where} uses seq_len={length}, which exceeds model.arch.max_seq_len={self.max_seq_len} (the "
                    f"RoPE table); raise max_seq_len to at least {length} or shorten the sequences"
                )

    # ------------------------------------------------------------------ the step

    def at(self, position: int) -> StepShape:
        """The step that starts at ``position`` (pure, given the recorded stage starts)."""
        position = _position(position)
        batch, seq_len = self.layout_at(position)
        step_index = self.step_index(position)
        k = self.stage_at(position)
        theta, scaling = self.rope_at(k)
        return StepShape(position=position, step_index=step_index, batch_size=batch, seq_len=seq_len,
                         micro_batch_size=self.micro_batch_size, mix=self.mix_at(position), rope_theta=theta,
                         rope_scaling=scaling, context_stage=k, phase=self.phase_at(position),
                         lr=self._lr(position, step_index))

    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global batch in sequences, seq_len)`` of the step starting at ``position``: what
        ``TokenStream``'s ``batch_schedule`` takes."""
        base_batch, base_len = self._base_layout(position)
        k = self.stage_at(position)
        if k < 0:
            return base_batch, base_len
        stage = self.context.stages[k]  # type: ignore[union-attr]
        return (stage.batch_tokens or base_batch * base_len) // stage.seq_len, stage.seq_len

    def next_position(self, position: int) -> int:
        """Where the step after the one starting at ``position`` starts."""
        batch, seq_len = self.layout_at(position)
        return position + batch * seq_len

    def mix_at(self, position: int) -> dict[str, float] | None:
        """Domain weights of the step starting at ``position`` (None: the data's natural shares)."""
        if self.mix is None:
            return None
        return self.mix.weights_at(position, self.anneal_start, self.domains)

    def stage_at(self, position: int) -> int:
        """Index of the context stage in force at ``position`` (-1 before the first, or without stages)."""
        return bisect.bisect_right(self._starts, position) - 1

    def rope_at(self, stage: int) -> tuple[float, RopeScaling | None]:
        """RoPE (theta, scaling) in force during context stage ``stage``: the last one a stage set."""
        theta, scaling = self.rope_theta, self.rope_scaling
        for s in (self.context.stages[: stage + 1] if self.context is not None else []):
            if s.rope_theta is not None:
                theta = s.rope_theta
            if s.rope_scaling is not None:
                scaling = s.rope_scaling
        return theta, scaling

    def phase_at(self, position: int) -> int:
        """0 during the main schedule, 1 from the annealing's start on."""
        start = self.anneal_start
        return int(start is not None and position >= start)

    @property
    def anneal_start(self) -> int | None:
        return self.annealing.anneal_start if self.annealing is not None else None

    @property
    def total_tokens(self) -> int | None:
        """Where the run ends (None: no annealing, the trainer's limits end it)."""
        return self.annealing.total_tokens if self.annealing is not None else None

    @property
    def stage_starts(self) -> list[int]:
        """Positions where the context stages began (or, without gates, will begin)."""
        return list(self._starts)

    @property
    def short_seq_len(self) -> int | None:
        """Length of the short-context validation: the setting, else the length in use just
        before the first context stage (None without context stages)."""
        if self.context is None:
            return None
        if self.context.short_seq_len is not None:
            return self.context.short_seq_len
        return self._base_layout(max(0, self.context.start_tokens - 1))[1]

    # ------------------------------------------------------------------ LR

    def step_index(self, position: int) -> int:
        """How many steps start before ``position`` (walking the layout from 0; O(segments))."""
        position = _position(position)
        if position == 0:
            return 0
        firsts, segments = self._walk()
        j = bisect.bisect_left(firsts, position) - 1  # the last segment whose first step starts before position
        first, index, tokens, count = segments[j]
        within = -(-(position - first) // tokens)
        return index + (within if count is None else min(within, count))

    def _walk(self) -> tuple[list[int], list[tuple[int, int, int, int | None]]]:
        """Per constant-layout segment that holds a step start: (first start, its step index,
        tokens per step, steps starting in it; None for the last, endless one)."""
        if self._segments is None:
            breaks = sorted({0, *(s.tokens for s in (self.ramp.stages if self.ramp else [])), *self._starts})
            segments: list[tuple[int, int, int, int | None]] = []
            position = index = 0
            for i, start in enumerate(breaks):
                end = breaks[i + 1] if i + 1 < len(breaks) else None
                if end is not None and position >= end:
                    continue  # a step starting earlier reaches over this whole segment
                batch, seq_len = self.layout_at(start)  # the layout of every step starting in [start, end)
                tokens = batch * seq_len
                if end is None:
                    segments.append((position, index, tokens, None))
                    break
                count = -(-(end - position) // tokens)
                segments.append((position, index, tokens, count))
                position, index = position + count * tokens, index + count
            self._segments = ([s[0] for s in segments], segments)
        return self._segments

    def _lr(self, position: int, step_index: int) -> float:
        scheduled = self.lr_schedule.lr_at(step_index, self.peak_lr)
        if self.annealing is None or position < self.annealing.anneal_start:
            return scheduled
        return self.annealing.lr(position, scheduled, self.anneal_start_lr())

    def anneal_start_lr(self) -> float | None:
        """The main schedule's LR at the first step starting at or after the annealing's start."""
        if self.annealing is None:
            return None
        return self.lr_schedule.lr_at(self.step_index(self.annealing.anneal_start), self.peak_lr)

    # ------------------------------------------------------------------ gates

    def record_stage_start(self, stage: int, position: int) -> None:
        """Context stage ``stage`` starts at ``position`` (its gates passed; recorded once, in order)."""
        if self.context is None:
            raise ValueError("this run plan has no context stages")
        position = _position(position)
        if stage < len(self._starts):
            if self._starts[stage] != position:
                raise ValueError(f"context stage {stage} already starts at {self._starts[stage]:,}, not {position:,}")
            return
        if not self.context.gated:
            raise ValueError("ungated context stages start at fixed offsets; nothing to record")
        if stage != len(self._starts) or stage >= len(self.context.stages):
            raise ValueError(f"context stage {stage} cannot start next: {len(self._starts)} of "
                             f"{len(self.context.stages)} stages have started")
        if position <= self._starts[-1]:
            raise ValueError(f"context stage {stage} cannot start at {position:,}, before stage {stage - 1}'s start "
                             f"at {self._starts[-1]:,}")
        self._starts.append(position)
        self._segments = None

    def state_dict(self) -> dict[str, Any]:
        """The recorded state: where the context stages started."""
        return {"context_starts": list(self._starts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("context_starts")
        if self.context is None or not self.context.gated or not saved:
            return  # nothing recorded at run time: the starts follow from the settings
        starts = [int(s) for s in saved][: len(self.context.stages)]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < 0:
            raise ConfigError(f"the checkpoint's context-stage starts {starts} do not increase; it is damaged")
        if starts[0] != self.context.start_tokens:
            warnings.warn(f"the checkpoint's first context stage began at {starts[0]:,} tokens, the config says "
                          f"{self.context.start_tokens:,}; stages already begun keep their recorded starts",
                          stacklevel=2)
        self._starts = starts
        self._segments = None

    # ------------------------------------------------------------------ layouts

    def layouts(self) -> list[tuple[int, int, str]]:
        """Every distinct ``(global batch, seq_len, where)`` the plan can produce, validation included."""
        found: list[tuple[int, int, str]] = []
        if self.ramp is not None:
            found += [(s.batch_tokens // s.seq_len, s.seq_len, f"ramp stage at {s.tokens:,} tokens")
                      for s in self.ramp.stages]
        else:
            found.append((self.global_batch_size, self.seq_len, "data"))
        if self.context is not None:
            base = self._base_batch_tokens()
            for i, s in enumerate(self.context.stages):
                for tokens in [s.batch_tokens] if s.batch_tokens else base:
                    if tokens % s.seq_len:
                        raise ConfigError(f"context stage {i}: the batch schedule's {tokens:,} tokens per step are "
                                          f"not a multiple of seq_len={s.seq_len}; set the stage's batch_tokens")
                    found.append((tokens // s.seq_len, s.seq_len, f"context stage {i}"))
        found.append((self.val_batch_size, self.seq_len, "validation"))
        if self.context is not None and self.context.short_validation:
            found.append((self.val_batch_size, self.short_seq_len, "short-context validation"))
        return list(dict.fromkeys(found))

    def check_layout(self, check: Callable[[int, int], object]) -> None:
        """Call ``check(batch, seq_len)`` once per distinct layout; its error comes back as
        ``"<where>: <message>"`` (the first place that layout is used)."""
        done: set[tuple[int, int]] = set()
        for batch, seq_len, where in self.layouts():
            if (batch, seq_len) in done:
                continue
            done.add((batch, seq_len))
            try:
                check(batch, seq_len)
            except RecipeError as err:
                raise type(err)(f"{where}: {err}") from None

    def _base_layout(self, position: int) -> tuple[int, int]:
        """The layout before (or under) the context stages: the ramp's, else the data's."""
        if self.ramp is not None:
            return self.ramp.layout_at(position)
        return self.global_batch_size, self.seq_len

    def _base_batch_tokens(self) -> list[int]:
        """Every batch size (in tokens) the base schedule can give from the first context stage on."""
        if self.ramp is None:
            return [self.global_batch_size * self.seq_len]
        first = self.ramp.stage_at(self.context.start_tokens).tokens  # type: ignore[union-attr]
        return sorted({s.batch_tokens for s in self.ramp.stages if s.tokens >= first})

    def __repr__(self) -> str:
        parts = [f"ramp={len(self.ramp.stages)} stages" if self.ramp else None,
                 f"context starts={self._starts}" if self.context else None,
                 f"mix={len(self.mix.stages)} stages" if self.mix else None,
                 f"annealing from {self.anneal_start:,}" if self.annealing else None]
        return f"RunPlan({', '.join(p for p in parts if p) or 'fixed layout'})"


def _position(position: int) -> int:
    position = int(position)
    if position < 0:
        raise ValueError(f"a data position is >= 0, got {position}")
    return position


def build_run_plan(trainer: Any, module: Any, datamodule: Any) -> RunPlan:
    """The plan of a run: the module's LR schedule and RoPE, the data's layout, and the
    settings of the recipe callbacks in ``trainer.callbacks``.

    A recipe callback offers its settings as ``run_plan_settings`` (a ``RampSettings``,
    ``ContextSettings``, ``MixSettings`` or ``AnnealSettings``). Works on a trainer that has
    not started (the launcher's config checks) as well as inside ``setup``.
    """
    found: dict[type, Any] = {}
    for callback in getattr(trainer, "callbacks", None) or []:
        settings = getattr(callback, "run_plan_settings", None)
        if settings is None:
            continue
        if type(settings) in found:
            raise ConfigError(f"two callbacks ({type(found[type(settings)][0]).__name__} and "
                              f"{type(callback).__name__}) set the run's {type(settings).__name__}; keep one")
        found[type(settings)] = (callback, settings)
    settings = {kind: s for kind, (_, s) in found.items()}
    arch = module.arch
    mix = settings.get(MixSettings)
    active_mix = getattr(datamodule, "active_mix", None)
    if mix is not None and callable(active_mix):  # the data module may turn the mix off (its ``mix`` setting)
        mix = active_mix(mix)
    domains = None
    if getattr(datamodule, "train_set", None) is not None:  # known once the data is set up
        domains = list(datamodule.domains)
    return RunPlan(
        lr_schedule=module.lr_schedule, peak_lr=module.optim_config.lr,
        global_batch_size=datamodule.global_batch_size, seq_len=datamodule.seq_len,
        micro_batch_size=datamodule.micro_batch_size, val_batch_size=getattr(datamodule, "val_batch_size", None),
        rope_theta=arch.rope_theta, rope_scaling=arch.rope_scaling, max_seq_len=arch.max_seq_len, domains=domains,
        ramp=settings.get(RampSettings), context=settings.get(ContextSettings), mix=mix,
        annealing=settings.get(AnnealSettings),
    )

