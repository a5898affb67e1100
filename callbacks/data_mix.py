"""Data-mix schedule: the sampling weight of each data domain as a function of the data position.

The paper chooses the mix of knowledge categories, code, reasoning and multilingual data
(section 3.1.2), adjusts it during training (3.4.3), and anneals on an upweighted mix of
the highest-quality sources (3.1.3, 3.4.3). This callback holds the schedule; the run
plan (``recipe.plan``) reads it and the data stream asks the plan for the mix of the step
that starts at each position, like the batch-size ramp: prefetching, resuming and a
change of parallel layout all draw exactly the same samples. The stream picks each
sample's domain from a low-discrepancy sequence (``recipe.data.stream``), so even a single
step carries the scheduled mix, not a noisy draw of it.

From ``LRAnnealing``'s ``anneal_start`` on, ``anneal_weights`` (if given) replace the stages.
Logs ``train/mix/<domain>`` at every step.

The data module's ``mix`` setting can turn the schedule off (``--data.mix false``, or on
its own for data with a single domain when the mix names others, such as a corpus built
without a ``domain`` field): the callback then does nothing and each domain is sampled at
its share.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from recipe.errors import ConfigError
from recipe.plan import AnnealSettings, MixSettings, MixStage

__all__ = ["DataMixSchedule", "MixStage"]


class DataMixSchedule(L.Callback):
    def __init__(self, stages: list[MixStage], anneal_weights: dict[str, float] | None = None) -> None:
        """
        Args:
            stages: ordered by ``tokens`` (data position); the first starts at 0. Each gives the
                domain weights (summing to 1) from its threshold on.
            anneal_weights: the mix of the annealing phase, from the ``LRAnnealing`` callback's
                ``anneal_start`` on (that callback must be configured too).
        """
        self.run_plan_settings = MixSettings(list(stages), anneal_weights)
        self.stages = self.run_plan_settings.stages
        self.anneal_weights = self.run_plan_settings.anneal_weights
        self.anneal_start: int | None = None  # set at setup from the LRAnnealing callback
        self.domains: list[str] = []  # the data's domains, known at setup
        self.active = True  # False when the data module turns the mix off (its ``mix`` setting)

    def stage_at(self, position: int) -> MixStage:
        return self.run_plan_settings.stage_at(position)

    def weights_at(self, position: int) -> dict[str, float]:
        """Domain -> weight of the step that starts at global token ``position``.

        Every domain of the data (once set up) appears, those a stage leaves out with 0.
        """
        return self.run_plan_settings.weights_at(position, self.anneal_start, self.domains)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "domains") or not hasattr(data, "global_batch_size"):
            raise ConfigError("DataMixSchedule needs the recipe's TokenDataModule (data: section)")
        active_mix = getattr(data, "active_mix", None)
        self.active = not callable(active_mix) or active_mix(self.run_plan_settings) is not None
        if not self.active:
            return  # no weights to check or log: the run plan has no mix either
        if self.anneal_weights is not None:
            annealing = [s for s in (getattr(cb, "run_plan_settings", None) for cb in trainer.callbacks)
                         if isinstance(s, AnnealSettings)]
            if not annealing:
                raise ConfigError(
                    "DataMixSchedule anneal_weights need the callbacks.annealing.LRAnnealing callback; add it or "
                    "drop anneal_weights"
                )
            self.anneal_start = annealing[0].anneal_start
        domains = list(data.domains)
        named = [(f"stage at {s.tokens:,} tokens", s.weights) for s in self.stages]
        if self.anneal_weights is not None:
            named.append(("anneal_weights", self.anneal_weights))
        for where, weights in named:
            missing = sorted(set(weights) - set(domains))
            if missing:
                raise ConfigError(
                    f"data-mix {where} names domain(s) {', '.join(map(repr, missing))} that the data lacks; "
                    f"use its domains: {', '.join(domains)}"
                )
        self.domains = domains

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active or not isinstance(batch, dict) or "position" not in batch:
            return
        position = int(batch["position"])
        plan = getattr(pl_module, "run_plan", None)
        weights = (plan.mix_at(position) if plan is not None else None) or self.weights_at(position)
        for domain in self.domains:
            pl_module.log(f"train/mix/{domain}", weights.get(domain, 0.0), rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        # The mix follows from the data position (saved by the data module); the schedule is
        # kept to warn when a resume changes it.
        return {"stages": [{"tokens": s.tokens, "weights": dict(s.weights)} for s in self.stages],
                "anneal_weights": self.anneal_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [MixStage(**s) for s in state_dict.get("stages", [])]
        changed = (saved and saved != self.stages) or state_dict.get("anneal_weights") != self.anneal_weights
        if changed:
            rank_zero_warn("resuming with a data-mix schedule that differs from the checkpoint's; the new weights "
                           "apply from the checkpoint's data position on")
