"""Context-length stages: raise the sequence length in steps, each step gated on quality.

Section 3.4.2 of the paper extends the 405B model from 8K to 128K tokens of context in
six stages (about 800B tokens in all), moving on only once short-context quality has
recovered and the model solves needle-in-a-haystack retrieval at the new length. Here a
stage is a sequence length with a token budget (and optionally its own batch tokens and
RoPE base/scaling). When a stage has spent its budget the gates run on the live model:

* short-context validation loss within ``val_loss_tolerance`` (relative) of its value
  when the stage began;
* needle in a haystack at the stage's length (``recipe.evals.niah``) with at least
  ``niah_min_accuracy`` of the trials retrieved.

Passing gates start the next stage; failing ones extend the stage by ``recheck_tokens``
and try again (the run stops with a message after ``max_extra_tokens``).

Why the next stage starts one step late: the trainer fetches each batch one step ahead,
so when the gates pass after the step ending at position ``p``, the batch starting at
``p`` has already been cut at the old length. The decision therefore records the start
of the stage as the end of that step, and the data stream - which reads the layout as a
function of the position and of the recorded starts - never cuts a batch whose layout
later changes. The starts are saved with the checkpoint, so a resumed run (under any
layout) cuts exactly the same batches. This needs ``data.num_workers: 0`` when gates are
on (worker processes would read ahead with a stale copy of the starts).

Without gates the stages follow each other at fixed token counts: a pure function of
the position, like the batch-size ramp.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from recipe.data.stream import check_batch_layout as check_data_layout
from recipe.errors import ConfigError
from recipe.model import RopeScaling


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


def paper_stages(total_tokens: int = 800_000_000_000) -> list[ContextStage]:
    """8K -> 128K in six increments sharing ``total_tokens`` (about 800B in the paper)."""
    lengths = [16_384, 32_768, 49_152, 65_536, 98_304, 131_072]
    return [ContextStage(seq_len=n, tokens=total_tokens // len(lengths)) for n in lengths]


class ContextLengthStages(L.Callback):
    def __init__(
        self,
        stages: list[ContextStage] | None = None,
        start_tokens: int = 0,
        short_seq_len: int | None = None,
        val_loss_tolerance: float | None = 0.02,
        val_batches: int = 4,
        niah_trials: int = 5,
        niah_candidates: int = 4,
        niah_min_accuracy: float | None = 1.0,
        recheck_tokens: int | None = None,
        max_extra_tokens: int | None = None,
        tokenizer_path: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            stages: the stages in order of increasing ``seq_len`` (None: the paper's six).
            start_tokens: tokens seen when the first stage begins (the batch schedule, e.g.
                the batch-size ramp, applies before).
            short_seq_len: length of the short-context validation (None: the length in use
                just before the first stage).
            val_loss_tolerance: gate: short-context validation loss at most
                ``(1 + tolerance) x`` its value at the stage's start (None: no such gate).
            val_batches: validation batches of the short-context gate.
            niah_trials: needle-in-a-haystack trials run at each gate (0: none).
            niah_candidates: candidate keys per trial (chance level is 1 / candidates).
            niah_min_accuracy: gate: share of trials retrieved (None: measured and logged
                but not required).
            recheck_tokens: tokens a failed stage trains before the gates run again
                (None: a tenth of the stage's budget).
            max_extra_tokens: stop the run when a stage has needed this many extra tokens
                (None: never).
            tokenizer_path: tokenizer of the needle texts (None: the data module's).
            seed: seed of the needle keys and depths.
        """
        stages = paper_stages() if stages is None else [
            s if isinstance(s, ContextStage) else ContextStage(**s) for s in stages]
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
        if start_tokens < 0:
            raise ConfigError(f"ContextLengthStages start_tokens must be >= 0, got {start_tokens:,}")
        if val_loss_tolerance is not None and val_loss_tolerance < 0:
            raise ConfigError(f"val_loss_tolerance must be >= 0 (a relative increase), got {val_loss_tolerance}")
        if niah_min_accuracy is not None and not 0.0 <= niah_min_accuracy <= 1.0:
            raise ConfigError(f"niah_min_accuracy must be in [0, 1], got {niah_min_accuracy}")
        if niah_min_accuracy is not None and niah_trials < 1:
            raise ConfigError("niah_min_accuracy needs niah_trials >= 1; set niah_trials or niah_min_accuracy: null")
        if recheck_tokens is not None and recheck_tokens <= 0:
            raise ConfigError(f"recheck_tokens must be positive, got {recheck_tokens:,}")
        self.stages = stages
        self.start_tokens = int(start_tokens)
        self.short_seq_len = short_seq_len
        self.val_loss_tolerance = val_loss_tolerance
        self.val_batches = val_batches
        self.niah_trials = niah_trials
        self.niah_candidates = niah_candidates
        self.niah_min_accuracy = niah_min_accuracy
        self.recheck_tokens = recheck_tokens
        self.max_extra_tokens = max_extra_tokens
        self.tokenizer_path = tokenizer_path
        self.seed = seed
        self.gated = val_loss_tolerance is not None or niah_min_accuracy is not None
        # Token offsets where each stage began (or will begin): all of them up front
        # without gates, one by one as the gates pass with them.
        self.starts = [self.start_tokens]
        if not self.gated:
            for s in stages[:-1]:
                self.starts.append(self.starts[-1] + s.tokens)
        self.reference: float | None = None  # short-context val loss when the current stage began
        # The stage whose gates run next, and from which position on (None: no more checks).
        self.check_stage = 0
        self.next_check: int | None = self.start_tokens + stages[0].tokens if self.gated or niah_trials else None
        self.extra_tokens = 0
        self.history: list[dict[str, Any]] = []
        self._base = None
        self._rope_stage: int | None = None
        self._base_rope: tuple[float, RopeScaling | None] | None = None
        self._ramp = None
        self._stage_of_step = -1
        self._tokenizer = None
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ schedule

    def stage_at(self, position: int) -> int:
        """Index of the stage in force at ``position`` (-1 before the first)."""
        return bisect.bisect_right(self.starts, position) - 1

    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global_batch_size in sequences, seq_len)`` of the step starting at ``position``."""
        base_batch, base_len = self._base(position)
        k = self.stage_at(position)
        if k < 0:
            return base_batch, base_len
        stage = self.stages[k]
        batch_tokens = stage.batch_tokens or base_batch * base_len
        return batch_tokens // stage.seq_len, stage.seq_len

    def rope_at(self, k: int) -> tuple[float, RopeScaling | None]:
        """RoPE (theta, scaling) in force during stage ``k``: the last one a stage set."""
        theta, scaling = self._base_rope
        for stage in self.stages[: k + 1]:
            if stage.rope_theta is not None:
                theta = stage.rope_theta
            if stage.rope_scaling is not None:
                scaling = stage.rope_scaling
        return theta, scaling

    # ------------------------------------------------------------------ checks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "batch_schedule"):
            raise ConfigError("ContextLengthStages needs the recipe's TokenDataModule (data: section)")
        max_seq_len = pl_module.arch.max_seq_len
        for i, s in enumerate(self.stages):
            if s.seq_len > max_seq_len:
                raise ConfigError(
                    f"context stage {i} uses seq_len={s.seq_len}, beyond the RoPE table of model.arch.max_seq_len="
                    f"{max_seq_len}; raise max_seq_len to at least {s.seq_len} or shorten the stage"
                )
        if self.gated and getattr(data, "num_workers", 0) > 0:
            raise ConfigError("gated context stages need data.num_workers: 0 (workers read ahead with a stale "
                              "schedule); set num_workers to 0 or turn the gates off")
        from callbacks.annealing import LRAnnealing
        from callbacks.batch_ramp import BatchSizeRamp

        self._ramp = next((cb for cb in trainer.callbacks if isinstance(cb, BatchSizeRamp)), None)
        anneal = next((cb for cb in trainer.callbacks if isinstance(cb, LRAnnealing)), None)
        last_start = self.start_tokens + sum(s.tokens for s in self.stages[:-1])
        if anneal is not None and last_start > anneal.anneal_start:
            raise ConfigError(
                f"the last context stage starts at {last_start:,} tokens, after annealing begins at "
                f"{anneal.anneal_start:,}; annealing runs at the final length - shorten the stages or start them earlier"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After every callback's setup, so a batch-size ramp installed there is the base.
        data = trainer.datamodule
        default = (data.global_batch_size, data.seq_len)
        self._base = data.batch_schedule or (lambda position: default)
        self._base_rope = (pl_module.arch.rope_theta, pl_module.arch.rope_scaling)
        if self.short_seq_len is None:
            self.short_seq_len = self._base(max(0, self.start_tokens - 1))[1]
        for i, s in enumerate(self.stages):
            batch_tokens = [s.batch_tokens] if s.batch_tokens else self.base_batch_tokens(self._ramp, data)
            for tokens in batch_tokens:
                if tokens % s.seq_len:
                    raise ConfigError(f"context stage {i}: the batch schedule's {tokens:,} tokens per step are not a "
                                      f"multiple of seq_len={s.seq_len}; set the stage's batch_tokens")
                check_data_layout(tokens // s.seq_len, data.micro_batch_size, data.dp_size)
                pl_module.check_batch_layout(tokens // s.seq_len, s.seq_len)
        if self.val_loss_tolerance is not None:
            pl_module.check_batch_layout(data.val_batch_size, self.short_seq_len)
        if self.niah_trials:  # a stage too short for the needle fails now, not at its gates
            for s in self.stages:
                self._needle_trials(data, s.seq_len)
        data.batch_schedule = self.layout_at

    def base_batch_tokens(self, ramp: Any, data: Any) -> set[int]:
        """Every batch size (in tokens) the base schedule - ``ramp``, or the data's fixed
        batch - can give from the first stage on."""
        if ramp is None:
            return {data.global_batch_size * data.seq_len}
        return {s.batch_tokens for s in ramp.stages if s.tokens >= ramp.stage_at(self.start_tokens).tokens}

    # ------------------------------------------------------------------ training

    @staticmethod
    def _position(trainer: L.Trainer) -> int:
        # The data position, not tokens_seen: the stage starts are stream positions, and the
        # two differ once a guarded step has been skipped.
        return int(trainer.datamodule.position)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_rope(pl_module, self.stage_at(self._position(trainer)))

    def _apply_rope(self, pl_module: L.LightningModule, k: int) -> None:
        if k != self._rope_stage:
            pl_module.set_rope(*self.rope_at(k))
            self._rope_stage = k

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        k = self.stage_at(int(batch["position"]) if "position" in batch else self._position(trainer))
        self._stage_of_step = k
        self._apply_rope(pl_module, k)
        if k >= 0 and self.reference is None and self.val_loss_tolerance is not None:
            self.reference = self._short_val_loss(trainer, pl_module)  # the first stage's starting point

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        position = self._position(trainer)  # where the next step starts
        if self.next_check is not None and position >= self.next_check:
            self._run_gates(trainer, pl_module, self.check_stage, position)
        pl_module.log("train/context_stage", float(self._stage_of_step), rank_zero_only=True)
        if self._last_metrics:
            # Straight to the loggers: metrics given to ``pl_module.log`` once would be
            # logged again at every later step with their old values.
            for logger in trainer.loggers:
                logger.log_metrics(self._last_metrics, step=trainer.global_step - 1)
            self._last_metrics = {}

    def _run_gates(self, trainer: L.Trainer, pl_module: L.LightningModule, k: int, position: int) -> None:
        stage = self.stages[k]
        record: dict[str, Any] = {"stage": k, "seq_len": stage.seq_len, "position": position}
        passed = True
        short = self._short_val_loss(trainer, pl_module) if self.val_loss_tolerance is not None else None
        if short is not None:
            record["short_val_loss"] = short
            record["reference"] = self.reference
            self._last_metrics["context/short_val_loss"] = short
            if self.reference is not None and short > self.reference * (1 + self.val_loss_tolerance):
                passed = False
        if self.niah_trials:
            niah = self._needle(trainer, pl_module, stage.seq_len)
            record["niah_accuracy"], record["niah_margin"] = niah.accuracy, niah.margin
            self._last_metrics["context/niah_accuracy"] = niah.accuracy
            self._last_metrics["context/niah_margin"] = niah.margin
            if self.niah_min_accuracy is not None and niah.accuracy < self.niah_min_accuracy:
                passed = False
        record["passed"] = passed
        self.history.append(record)
        rank_zero_info(f"context stage {k} ({stage.seq_len} tokens) gates at {position:,} tokens: "
                       + ", ".join(f"{key}={value:.4g}" for key, value in record.items()
                                   if isinstance(value, float)) + (" - passed" if passed else " - not yet"))
        if k == len(self.stages) - 1:
            self.next_check = None  # the last stage runs to the end; its gates only report
            return
        if not self.gated:  # measured and logged only; the next stage starts on schedule
            self._enter(k + 1, self.starts[k + 1], short)
            return
        if passed:
            batch, seq_len = self.layout_at(position)  # the step already cut at the old length
            self.starts.append(position + batch * seq_len)
            self._enter(k + 1, self.starts[-1], short)
            return
        recheck = self.recheck_tokens or max(1, stage.tokens // 10)
        self.extra_tokens = position - (self.starts[k] + stage.tokens)
        if self.max_extra_tokens is not None and self.extra_tokens + recheck > self.max_extra_tokens:
            rank_zero_warn(
                f"context stage {k} ({stage.seq_len} tokens) still fails its gates after {self.extra_tokens:,} extra "
                f"tokens (max_extra_tokens={self.max_extra_tokens:,}): {record}; stopping - resume from the last "
                "checkpoint with a longer budget or looser gates"
            )
            trainer.should_stop = True
        self.next_check = position + recheck

    def _enter(self, k: int, start: int, reference: float | None) -> None:
        self.check_stage = k
        self.next_check = start + self.stages[k].tokens
        self.reference = reference
        self.extra_tokens = 0

    # ------------------------------------------------------------------ evaluations

    def _short_val_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        data = trainer.datamodule
        stream = data.val_stream(seq_len=self.short_seq_len, num_batches=self.val_batches)
        return pl_module.evaluate_loss(stream)

    def _needle_trials(self, data: Any, seq_len: int) -> list:
        from recipe.evals.niah import build_trials

        if self._tokenizer is None:
            from recipe.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.tokenizer_path or getattr(data, "tokenizer_path", None))
        return build_trials(self._tokenizer, seq_len, trials=self.niah_trials, candidates=self.niah_candidates,
                            seed=self.seed)

    def _needle(self, trainer: L.Trainer, pl_module: L.LightningModule, seq_len: int):
        from recipe.evals.niah import answer_batch, score_trials

        data = trainer.datamodule
        trials = self._needle_trials(data, seq_len)
        # One row per rank; a pipeline needs the validation layout's micro-batch count.
        n_micro = data.val_batch_size // data.dp_size // data.micro_batch_size if pl_module.pipeline else 1

        def answer_loss(sequence, answer_length: int) -> float:
            return pl_module.evaluate_loss([answer_batch(sequence, answer_length, n_micro=n_micro)])

        return score_trials(trials, answer_loss)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "starts": list(self.starts),
            "reference": self.reference,
            "check_stage": self.check_stage,
            "next_check": self.next_check,
            "extra_tokens": self.extra_tokens,
            "history": list(self.history),
            "stages": [asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("stages")
        if saved is not None and saved != [asdict(s) for s in self.stages]:
            rank_zero_warn("resuming with context stages that differ from the checkpoint's; stages already begun keep "
                           "their recorded starts")
        if self.gated:
            self.starts = [int(s) for s in state_dict["starts"]]
        self.reference = state_dict.get("reference")
        self.check_stage = int(state_dict.get("check_stage", 0))
        self.next_check = state_dict.get("next_check")
        self.extra_tokens = int(state_dict.get("extra_tokens", 0))
        self.history = list(state_dict.get("history", []))
