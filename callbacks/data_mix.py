"""Data-mix schedule: the sampling weight of each data domain as a function of tokens seen.

The paper chooses the mix of knowledge categories, code, reasoning and multilingual data
(section 3.1.2), adjusts it during training (3.4.3), and anneals on an upweighted mix of
the highest-quality sources (3.1.3, 3.4.3). This callback installs a pure function of the stream
position (``weights_at``) into the data module, like the batch-size ramp: each step's mix
follows from where the data stream stands, so prefetching, resuming and a change of
parallel layout all draw exactly the same samples. The stream picks each sample's domain
from a low-discrepancy sequence (``recipe.data.stream``), so even a single step carries
the scheduled mix, not a noisy draw of it.

From ``LRAnnealing.anneal_start`` on, ``anneal_weights`` (if given) replace the stages.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from recipe.errors import ConfigError

__all__ = ["DataMixSchedule", "MixStage"]

SUM_TOLERANCE = 1e-6


@dataclass
class MixStage:
    """From ``tokens`` seen on, sample domain ``d`` with probability ``weights[d]``.

    Domains of the data that a stage leaves out get weight 0.
    """

    tokens: int
    weights: dict[str, float] = field(default_factory=dict)


def _check_weights(weights: dict[str, float], where: str) -> None:
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{where} needs weights as a mapping domain -> weight, got {weights!r}")
    for domain, weight in weights.items():
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}: weight of {domain!r} is {weight!r}; weights must be numbers >= 0")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{where}: weights sum to {total:.6g}, not 1; rescale them so that they sum to 1")


class DataMixSchedule(L.Callback):
    def __init__(self, stages: list[MixStage], anneal_weights: dict[str, float] | None = None) -> None:
        """
        Args:
            stages: ordered by ``tokens``; the first starts at 0. Each gives the domain weights
                (summing to 1) from its threshold on.
            anneal_weights: the mix of the annealing phase, from the ``LRAnnealing`` callback's
                ``anneal_start`` on (that callback must be configured too).
        """
        if not stages:
            raise ConfigError("DataMixSchedule needs at least one stage")
        stages = [s if isinstance(s, MixStage) else MixStage(**s) for s in stages]
        if stages[0].tokens != 0:
            raise ConfigError(f"the first data-mix stage must start at tokens=0, got {stages[0].tokens:,}")
        for before, after in zip(stages, stages[1:]):
            if after.tokens <= before.tokens:
                raise ConfigError(
                    f"data-mix thresholds must increase: {after.tokens:,} follows {before.tokens:,}; sort the stages"
                )
        for s in stages:
            _check_weights(s.weights, f"data-mix stage at {s.tokens:,} tokens")
        if anneal_weights is not None:
            anneal_weights = dict(anneal_weights)
            _check_weights(anneal_weights, "data-mix anneal_weights")
        self.stages = stages
        self.anneal_weights = anneal_weights
        self._starts = [s.tokens for s in stages]
        self.anneal_start: int | None = None  # set at setup from the LRAnnealing callback
        self.domains: list[str] = []  # the data's domains, known at setup

    def stage_at(self, position: int) -> MixStage:
        return self.stages[bisect.bisect_right(self._starts, position) - 1]

    def weights_at(self, position: int) -> dict[str, float]:
        """Domain -> weight of the step that starts at global token ``position``.

        Every domain of the data (once set up) appears, those a stage leaves out with 0.
        """
        if self.anneal_weights is not None and self.anneal_start is not None and position >= self.anneal_start:
            weights = self.anneal_weights
        else:
            weights = self.stage_at(position).weights
        return {**dict.fromkeys(self.domains, 0.0), **{d: float(w) for d, w in weights.items()}}

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "mix_schedule") or not hasattr(data, "domains"):
            raise ConfigError("DataMixSchedule needs the recipe's TokenDataModule (data: section)")
        if self.anneal_weights is not None:
            from callbacks.annealing import LRAnnealing

            annealing = [c for c in trainer.callbacks if isinstance(c, LRAnnealing)]
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
        data.mix_schedule = self.weights_at

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, dict) or "position" not in batch:
            return
        weights = self.weights_at(int(batch["position"]))
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
