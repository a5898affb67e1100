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

The schedule itself - each stage's layout and RoPE at each data position - is part of
the run plan (``recipe.plan.RunPlan``), which this callback's settings feed; the module
applies the stage's RoPE at each step. The callback keeps what needs the live model: the
gates, whose outcome (a stage's start) it records in the plan
(``RunPlan.record_stage_start``).

Why the next stage starts one step late: the trainer fetches each batch one step ahead,
so when the gates pass after the step ending at position ``p``, the batch starting at
``p`` has already been cut at the old length. The decision therefore records the start
of the stage as the end of that step, and the data stream - which reads the layout from
the plan, a function of the position and of the recorded starts - never cuts a batch
whose layout later changes. The starts are the plan's state, saved with the checkpoint,
so a resumed run (under any layout) cuts exactly the same batches. This needs
``data.num_workers: 0`` when gates are on (worker processes would read ahead with a
stale copy of the plan).

Without gates the stages follow each other at fixed token counts: a pure function of
the position, like the batch-size ramp.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from recipe.errors import ConfigError
from recipe.plan import ContextSettings, ContextStage, paper_stages

__all__ = ["ContextLengthStages", "ContextStage", "paper_stages"]


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
        gated = val_loss_tolerance is not None or niah_min_accuracy is not None
        self.run_plan_settings = ContextSettings(
            paper_stages() if stages is None else list(stages), start_tokens=start_tokens, gated=gated,
            short_seq_len=short_seq_len, short_validation=val_loss_tolerance is not None)
        if val_loss_tolerance is not None and val_loss_tolerance < 0:
            raise ConfigError(f"val_loss_tolerance must be >= 0 (a relative increase), got {val_loss_tolerance}")
        if niah_min_accuracy is not None and not 0.0 <= niah_min_accuracy <= 1.0:
            raise ConfigError(f"niah_min_accuracy must be in [0, 1], got {niah_min_accuracy}")
        if niah_min_accuracy is not None and niah_trials < 1:
            raise ConfigError("niah_min_accuracy needs niah_trials >= 1; set niah_trials or niah_min_accuracy: null")
        if recheck_tokens is not None and recheck_tokens <= 0:
            raise ConfigError(f"recheck_tokens must be positive, got {recheck_tokens:,}")
        self.stages = self.run_plan_settings.stages
        self.start_tokens = self.run_plan_settings.start_tokens
        self.short_seq_len = short_seq_len  # resolved by the run plan when the run starts
        self.val_loss_tolerance = val_loss_tolerance
        self.val_batches = val_batches
        self.niah_trials = niah_trials
        self.niah_candidates = niah_candidates
        self.niah_min_accuracy = niah_min_accuracy
        self.recheck_tokens = recheck_tokens
        self.max_extra_tokens = max_extra_tokens
        self.tokenizer_path = tokenizer_path
        self.seed = seed
        self.gated = gated
        self.reference: float | None = None  # short-context val loss when the current stage began
        # The stage whose gates run next, and from which position on (None: no more checks).
        self.check_stage = 0
        self.next_check: int | None = self.start_tokens + self.stages[0].tokens if gated or niah_trials else None
        self.extra_tokens = 0
        self.history: list[dict[str, Any]] = []
        self._plan: Any = None  # the module's run plan, from fit start on
        self._tokenizer = None
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ schedule

    @property
    def starts(self) -> list[int]:
        """Positions where the stages began (or, without gates, will begin): the run plan's record."""
        if self._plan is not None:
            return self._plan.stage_starts
        return self.run_plan_settings.initial_starts()

    def _run_plan(self, pl_module: L.LightningModule) -> Any:
        plan = getattr(pl_module, "run_plan", None)
        if plan is None or plan.context is None:
            raise ConfigError("ContextLengthStages needs the recipe's LlamaLightningModule and TokenDataModule "
                              "(model: and data: sections), whose run plan holds the stages")
        self._plan = plan
        return plan

    # ------------------------------------------------------------------ checks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "val_stream"):
            raise ConfigError("ContextLengthStages needs the recipe's TokenDataModule (data: section)")
        if self.gated and getattr(data, "num_workers", 0) > 0:
            raise ConfigError("gated context stages need data.num_workers: 0 (workers read ahead with a stale "
                              "schedule); set num_workers to 0 or turn the gates off")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The layouts, lengths and the annealing overlap were checked when the module built its plan.
        plan = self._run_plan(pl_module)
        self.short_seq_len = plan.short_seq_len
        if self.niah_trials:  # a stage too short for the needle fails now, not at its gates
            for s in self.stages:
                self._needle_trials(trainer.datamodule, s.seq_len)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written before the run plan kept the recorded starts in this callback's state.
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        plan = getattr(pl_module, "run_plan", None)
        if "run_plan" not in checkpoint and state.get("starts") and plan is not None:
            plan.load_state_dict({"context_starts": state["starts"]})

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not isinstance(batch, dict) or "position" not in batch:
            return
        k = self._run_plan(pl_module).stage_at(int(batch["position"]))
        if k >= 0 and self.reference is None and self.val_loss_tolerance is not None:
            self.reference = self._short_val_loss(trainer, pl_module)  # the first stage's starting point

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Where the next step starts (the data position; skipped steps consume theirs too).
        if isinstance(batch, dict) and "next_position" in batch:
            position = int(batch["next_position"])
        else:
            position = int(trainer.datamodule.position)
        if self.next_check is not None and position >= self.next_check:
            self._run_gates(trainer, pl_module, self.check_stage, position)
        if self._last_metrics:
            # Straight to the loggers: metrics given to ``pl_module.log`` once would be
            # logged again at every later step with their old values.
            for logger in trainer.loggers:
                logger.log_metrics(self._last_metrics, step=trainer.global_step - 1)
            self._last_metrics = {}

    def _run_gates(self, trainer: L.Trainer, pl_module: L.LightningModule, k: int, position: int) -> None:
        plan = self._run_plan(pl_module)
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
            self._enter(k + 1, plan.stage_starts[k + 1], short)
            return
        if passed:
            # The step starting at ``position`` is already cut at the old length: the next
            # stage starts where it ends.
            start = plan.next_position(position)
            plan.record_stage_start(k + 1, start)
            self._enter(k + 1, start, short)
            return
        recheck = self.recheck_tokens or max(1, stage.tokens // 10)
        self.extra_tokens = position - (plan.stage_starts[k] + stage.tokens)
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
        pipelined = getattr(getattr(pl_module, "step_path", None), "pipeline", None) is not None
        n_micro = data.val_batch_size // data.dp_size // data.micro_batch_size if pipelined else 1

        def answer_loss(sequence, answer_length: int) -> float:
            return pl_module.evaluate_loss([answer_batch(sequence, answer_length, n_micro=n_micro)])

        return score_trials(trials, answer_loss)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        # The recorded stage starts are the run plan's state (``checkpoint["run_plan"]``).
        return {
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
        self.reference = state_dict.get("reference")
        self.check_stage = int(state_dict.get("check_stage", 0))
        self.next_check = state_dict.get("next_check")
        self.extra_tokens = int(state_dict.get("extra_tokens", 0))
        self.history = list(state_dict.get("history", []))
