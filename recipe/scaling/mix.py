"""Data-mix selection by scaling laws: small models per candidate mix predict the large one.

For each mix, the best validation loss at each budget (the compute-optimal frontier over
the sizes trained at that budget) is fitted with ``loss = B * C**(-b)`` - or, when the
irreducible loss ``E`` is given, ``loss = E + B * C**(-b)`` - and extrapolated to the
target budget. Mixes are ranked by that prediction, not by their small-scale loss: a mix
whose curve falls faster wins at scale even if it starts behind.

Every mix is scored on the same validation set (the data's natural mix by default), so the
losses are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recipe.scaling import ScalingError
from recipe.scaling.isoflop import PowerLaw, fit_power_law


@dataclass
class MixCurve:
    name: str
    law: PowerLaw  # (loss - irreducible) = coefficient * C**exponent, exponent < 0
    irreducible: float
    frontier: list[tuple[float, float]]  # (budget, best loss at that budget)
    predicted: float  # loss at the target budget

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.irreducible + self.law(compute)


@dataclass
class MixRanking:
    target: float
    curves: list[MixCurve]  # best (lowest predicted loss) first
    unusable: dict[str, str]  # mix -> why it has no curve

    def table(self) -> list[dict[str, Any]]:
        return [{"rank": i + 1, "mix": c.name, "predicted_loss": c.predicted, "exponent": c.law.exponent,
                 "coefficient": c.law.coefficient, "best_measured_loss": min(l for _, l in c.frontier),
                 "budgets": len(c.frontier)} for i, c in enumerate(self.curves)]


def mix_frontiers(rows: Iterable[Mapping[str, Any]], loss_key: str = "val_loss"
                  ) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """Per mix: ``(budget, lowest finite loss over its sizes)``; and the runs left out."""
    best: dict[str, dict[float, float]] = {}
    excluded = []
    for row in rows:
        name = row.get("mix") or "default"
        value = row.get(loss_key)
        if value is None or value == "" or not math.isfinite(float(value)):
            excluded.append(f"run {row.get('run_id', '?')}: {loss_key} is {value!r}, left out")
            continue
        budget = float(row["budget"])
        per_mix = best.setdefault(name, {})
        per_mix[budget] = min(per_mix.get(budget, math.inf), float(value))
    return {m: sorted(v.items()) for m, v in best.items()}, excluded


def rank_mixes(frontiers: Mapping[str, list[tuple[float, float]]], target: float,
               irreducible: float = 0.0) -> MixRanking:
    """Fit each mix's loss-vs-compute law and rank the mixes by their loss at ``target``."""
    if not math.isfinite(target) or target <= 0:
        raise ScalingError(f"the target budget must be a positive number of FLOPs, got {target}")
    curves, unusable = [], {}
    for name, points in frontiers.items():
        budgets = [b for b, _ in points]
        excess = [l - irreducible for _, l in points]
        if len(points) < 2:
            unusable[name] = f"losses at {len(points)} budget(s); a loss-vs-compute law needs at least 2"
            continue
        if min(excess) <= 0:
            lowest = min(l for _, l in points)
            unusable[name] = f"a loss ({lowest:.4g}) is at or below the irreducible loss {irreducible}"
            continue
        law = fit_power_law(budgets, excess, f"mix {name}")
        if law.exponent >= 0:
            unusable[name] = f"loss does not fall with compute (exponent {law.exponent:+.3g}); check the runs"
            continue
        curve = MixCurve(name, law, irreducible, list(points), 0.0)
        curve.predicted = float(curve(target))
        curves.append(curve)
    if not curves:
        reasons = "; ".join(f"{m}: {why}" for m, why in unusable.items())
        raise ScalingError(f"no mix has a usable loss-vs-compute curve ({reasons})")
    curves.sort(key=lambda c: c.predicted)
    return MixRanking(target, curves, unusable)
