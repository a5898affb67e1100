"""IsoFLOP parabolas, the compute-optimal power law over their minima, bootstrap intervals.

Per budget, validation loss is fitted as a parabola in ``log10(training tokens)`` (and,
separately, in ``log10(parameters)``); the vertex is the compute-optimal point of that
budget. Over the budgets' minima, ``D*(C) = A * C**alpha`` is a straight line in log-log
space, fitted by least squares. The paper reports alpha = 0.537, A = 0.299 for training
tokens, i.e. about 16.3T tokens at 3.8e25 FLOPs.

A budget whose points cannot give a minimum is not dropped silently: ``IsoFlopFit.unusable``
maps it to the reason (fewer than three finite points, a concave or flat parabola, a vertex
outside the sampled range), and the CLI prints it.

Intervals come from a residual bootstrap: the parabola residuals of all budgets (pooled,
rescaled for the three fitted parameters) are redrawn onto each budget's fitted curve, the
parabolas and the power law refitted, and percentiles taken. A resampled vertex may fall
just outside the sampled range (it is still the estimate); only a resample with no
minimum at all drops its budget from that refit, and those drops are counted. Pooling assumes one noise
level for every run (evaluation noise on the same validation set), which lets a budget of
three runs - whose own residuals are zero - still carry uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recipe.scaling import ScalingError

PAPER_ALPHA = 0.537
PAPER_A = 0.299


@dataclass
class Parabola:
    """``loss = a (x - x_opt)^2 + loss_opt`` with ``x = log10(variable)``."""

    a: float
    x_opt: float
    loss_opt: float
    x_range: tuple[float, float]
    residuals: np.ndarray = field(repr=False)

    @property
    def optimum(self) -> float:
        return 10.0 ** self.x_opt

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.a * (np.asarray(x) - self.x_opt) ** 2 + self.loss_opt


@dataclass
class PowerLaw:
    """``y = coefficient * C**exponent``."""

    coefficient: float
    exponent: float

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(compute, dtype=np.float64) ** self.exponent


@dataclass
class BudgetFit:
    budget: float
    compute: float  # mean FLOPs actually spent by the budget's runs
    tokens: Parabola
    params: Parabola | None  # None when the parameter parabola has no minimum of its own
    points: int


@dataclass
class IsoFlopFit:
    budgets: list[BudgetFit]
    unusable: dict[float, str]  # budget -> why it gave no compute-optimal point
    excluded: list[str]  # runs left out (non-finite loss), one line each
    tokens_law: PowerLaw  # D*(C)
    params_law: PowerLaw | None  # N*(C), from the parameter parabolas
    bootstrap: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def interval(self, key: str, level: float = 0.95) -> tuple[float, float] | None:
        samples = self.bootstrap.get(key)
        if samples is None or len(samples) < 10:
            return None
        tail = 50 * (1 - level)
        low, high = np.percentile(samples, [tail, 100 - tail])
        return float(low), float(high)

    def forecast(self, compute: float, level: float = 0.95) -> dict[str, Any]:
        """Optimal tokens and parameters at ``compute`` FLOPs, with bootstrap intervals."""
        return forecast(self.tokens_law, compute, self.params_law, self.bootstrap, level)


# ---------------------------------------------------------------------------- parabolas


def fit_parabola(x: Sequence[float], loss: Sequence[float], what: str = "points",
                 require_interior: bool = True) -> Parabola:
    """Least-squares parabola in ``x`` (already log10); its vertex must be a minimum.

    ``require_interior``: the vertex must lie within the sampled x range - outside it the
    "optimum" is an extrapolation the sweep did not bracket.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if xs.shape != ys.shape:
        raise ScalingError(f"{what}: {len(xs)} x values but {len(ys)} losses")
    if not np.all(np.isfinite(ys)) or not np.all(np.isfinite(xs)):
        raise ScalingError(f"{what}: non-finite values (loss {ys.tolist()}); drop or rerun the diverged runs")
    distinct = len(np.unique(np.round(xs, 12)))
    if distinct < 3:
        raise ScalingError(f"{what}: {distinct} distinct point(s); a parabola needs at least 3 - add model sizes")
    c2, c1, c0 = np.polyfit(xs, ys, 2)
    span = float(xs.max() - xs.min())
    # Curvature relative to the loss spread: a tiny positive c2 on noisy data is a line.
    if c2 <= 1e-12 * max(1.0, float(np.ptp(ys))) / max(span, 1e-12) ** 2:
        raise ScalingError(f"{what}: the parabola opens downward or is flat (curvature {c2:.3g}): no interior "
                           "minimum; the loss is monotonic in this range - extend the size grid")
    x_opt = -c1 / (2 * c2)
    lo, hi = float(xs.min()), float(xs.max())
    if require_interior and not lo <= x_opt <= hi:
        side = "smallest" if x_opt < lo else "largest"
        raise ScalingError(f"{what}: the minimum (10^{x_opt:.2f}) lies outside the sampled range "
                           f"[10^{lo:.2f}, 10^{hi:.2f}]; add models beyond the {side} one")
    loss_opt = c0 - c1 * c1 / (4 * c2)
    residuals = ys - np.polyval([c2, c1, c0], xs)
    return Parabola(float(c2), float(x_opt), float(loss_opt), (lo, hi), residuals)


def fit_power_law(compute: Sequence[float], values: Sequence[float], what: str = "minima") -> PowerLaw:
    """``values = coefficient * compute**exponent`` by least squares in log-log space."""
    c, v = np.asarray(compute, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(c) < 2:
        raise ScalingError(f"{what}: a power law needs at least 2 budgets, got {len(c)}")
    if np.any(c <= 0) or np.any(v <= 0) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(v)):
        raise ScalingError(f"{what}: compute and values must be positive and finite")
    if np.ptp(np.log10(c)) == 0:
        raise ScalingError(f"{what}: all points share one compute budget; the exponent is undetermined")
    exponent, intercept = np.polyfit(np.log10(c), np.log10(v), 1)
    return PowerLaw(float(10.0 ** intercept), float(exponent))


# ---------------------------------------------------------------------------- sweep fit


def _finite_rows(rows: Iterable[Mapping[str, Any]], loss_key: str) -> tuple[list[dict], list[str]]:
    kept, excluded = [], []
    for row in rows:
        value = row.get(loss_key)
        try:
            finite = value is not None and value != "" and math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if finite:
            kept.append(dict(row))
        else:
            excluded.append(f"run {row.get('run_id', '?')} (budget {float(row['budget']):.3g}): "
                            f"{loss_key} is {value!r}, left out")
    return kept, excluded


def group_by_budget(rows: Iterable[Mapping[str, Any]]) -> dict[float, list[dict]]:
    groups: dict[float, list[dict]] = {}
    for row in rows:
        groups.setdefault(float(row["budget"]), []).append(dict(row))
    return dict(sorted(groups.items()))


def _budget_fits(groups: Mapping[float, list[dict]], losses: Mapping[float, np.ndarray] | None,
                 loss_key: str, require_interior: bool = True) -> tuple[list[BudgetFit], dict[float, str]]:
    fits, unusable = [], {}
    for budget, rows in groups.items():
        loss = losses[budget] if losses is not None else np.array([float(r[loss_key]) for r in rows])
        tokens = np.log10([float(r["tokens"]) for r in rows])
        params = np.log10([float(r["params"]) for r in rows])
        try:
            token_fit = fit_parabola(tokens, loss, f"budget {budget:.3g}", require_interior)
        except ScalingError as err:
            unusable[budget] = str(err).split(": ", 1)[1]
            continue
        try:
            param_fit: Parabola | None = fit_parabola(params, loss, f"budget {budget:.3g} (params)", require_interior)
        except ScalingError:
            param_fit = None
        compute = float(np.mean([float(r.get("compute") or budget) for r in rows]))
        fits.append(BudgetFit(budget, compute, token_fit, param_fit, len(rows)))
    return fits, unusable


def _laws(fits: Sequence[BudgetFit], unusable: Mapping[float, str]) -> tuple[PowerLaw, PowerLaw | None]:
    if len(fits) < 2:
        reasons = "; ".join(f"{b:.3g}: {why}" for b, why in unusable.items()) or "none"
        raise ScalingError(f"the power law needs compute-optimal points at >= 2 budgets, got {len(fits)} "
                           f"(unusable budgets - {reasons})")
    tokens_law = fit_power_law([f.budget for f in fits], [f.tokens.optimum for f in fits], "token minima")
    with_params = [f for f in fits if f.params is not None]
    params_law = None
    if len(with_params) >= 2:
        params_law = fit_power_law([f.budget for f in with_params], [f.params.optimum for f in with_params],
                                   "parameter minima")
    return tokens_law, params_law


def fit_isoflops(rows: Iterable[Mapping[str, Any]], loss_key: str = "val_loss", bootstrap: int = 1000,
                 seed: int = 0) -> IsoFlopFit:
    """Parabolas per budget, power laws over the minima, and ``bootstrap`` resamples.

    ``rows``: the sweep's results table (``budget``, ``tokens``, ``params``, ``loss_key``;
    ``compute`` optional). The power laws are fitted against the nominal budget, as the
    paper plots them; runs round to whole steps, so ``compute`` differs by well under 1%.
    """
    rows, excluded = _finite_rows(rows, loss_key)
    groups = group_by_budget(rows)
    fits, unusable = _budget_fits(groups, None, loss_key)
    tokens_law, params_law = _laws(fits, unusable)
    result = IsoFlopFit(fits, unusable, excluded, tokens_law, params_law)
    if bootstrap > 0:
        result.bootstrap = _bootstrap({f.budget: groups[f.budget] for f in fits}, fits, bootstrap, seed, loss_key)
    return result


def _bootstrap(groups: Mapping[float, list[dict]], fits: Sequence[BudgetFit], n: int, seed: int,
               loss_key: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pooled = []
    for fit in fits:
        k = fit.points
        # Residuals of a 3-parameter fit underestimate the noise; rescale by sqrt(k / (k - 3)).
        if k > 3:
            pooled.append(fit.tokens.residuals * math.sqrt(k / (k - 3)))
    noise = np.concatenate(pooled) if pooled else np.zeros(1)
    fitted = {f.budget: f.tokens(np.log10([float(r["tokens"]) for r in groups[f.budget]])) for f in fits}
    samples: dict[str, list[float]] = {"alpha": [], "A": [], "beta": [], "B": []}
    failures = dropped = 0
    for _ in range(n):
        losses = {b: fitted[b] + rng.choice(noise, size=len(fitted[b]), replace=True) for b in fitted}
        # The measured minimum was inside the sampled range; a resample that pushes it just
        # outside still estimates it. Dropping such budgets would bias the interval.
        boot_fits, boot_unusable = _budget_fits(groups, losses, loss_key, require_interior=False)
        dropped += len(boot_unusable)  # concave resamples: no minimum at all
        try:
            tokens_law, params_law = _laws(boot_fits, boot_unusable)
        except ScalingError:
            failures += 1
            continue
        samples["alpha"].append(tokens_law.exponent)
        samples["A"].append(tokens_law.coefficient)
        if params_law is not None:
            samples["beta"].append(params_law.exponent)
            samples["B"].append(params_law.coefficient)
    out = {k: np.asarray(v) for k, v in samples.items()}
    out["failures"] = np.asarray([failures])
    out["dropped_budgets"] = np.asarray([dropped])
    return out


# ---------------------------------------------------------------------------- forecast


def forecast(tokens_law: PowerLaw, compute: float, params_law: PowerLaw | None = None,
             bootstrap: Mapping[str, np.ndarray] | None = None, level: float = 0.95,
             flops_per_param_token: float = 6.0) -> dict[str, Any]:
    """Compute-optimal tokens (and parameters) at ``compute`` FLOPs.

    ``params_from_tokens = C / (6 D*)`` follows from ``C = 6 N D``; ``params`` (when a
    parameter law is given) comes from the parameter parabolas directly.
    """
    if not math.isfinite(compute) or compute <= 0:
        raise ScalingError(f"the forecast budget must be a positive number of FLOPs, got {compute}")
    tokens = float(tokens_law(compute))
    out: dict[str, Any] = {"compute": compute, "tokens": tokens,
                           "params_from_tokens": compute / (flops_per_param_token * tokens),
                           "alpha": tokens_law.exponent, "A": tokens_law.coefficient}
    if params_law is not None:
        out["params"] = float(params_law(compute))
    tail = 50 * (1 - level)
    if bootstrap is not None and len(bootstrap.get("alpha", ())) >= 10:
        draws = bootstrap["A"] * compute ** bootstrap["alpha"]
        out["tokens_ci"] = tuple(float(v) for v in np.percentile(draws, [tail, 100 - tail]))
        out["alpha_ci"] = tuple(float(v) for v in np.percentile(bootstrap["alpha"], [tail, 100 - tail]))
        if params_law is not None and len(bootstrap.get("beta", ())) >= 10:
            draws = bootstrap["B"] * compute ** bootstrap["beta"]
            out["params_ci"] = tuple(float(v) for v in np.percentile(draws, [tail, 100 - tail]))
    return out


def fit_summary(fit: IsoFlopFit, target: float | None = None) -> dict[str, Any]:
    """JSON-ready summary: per-budget optima, the laws, intervals, what was left out."""
    out: dict[str, Any] = {
        "budgets": [{"budget": f.budget, "compute": f.compute, "points": f.points,
                     "optimal_tokens": f.tokens.optimum, "optimal_loss": f.tokens.loss_opt,
                     "curvature": f.tokens.a,
                     "optimal_params": None if f.params is None else f.params.optimum} for f in fit.budgets],
        "unusable_budgets": {f"{b:.6g}": why for b, why in fit.unusable.items()},
        "excluded_runs": fit.excluded,
        "tokens_law": {"A": fit.tokens_law.coefficient, "alpha": fit.tokens_law.exponent,
                       "alpha_ci95": fit.interval("alpha"), "A_ci95": fit.interval("A")},
        "params_law": None if fit.params_law is None else {
            "B": fit.params_law.coefficient, "beta": fit.params_law.exponent, "beta_ci95": fit.interval("beta")},
        "bootstrap": {"samples": int(len(fit.bootstrap.get("alpha", ()))),
                      "failed": int(fit.bootstrap.get("failures", np.zeros(1))[0]) if fit.bootstrap else 0,
                      "budgets_dropped": int(fit.bootstrap.get("dropped_budgets", np.zeros(1))[0])
                      if fit.bootstrap else 0},
    }
    if target is not None:
        out["forecast"] = fit.forecast(target)
    return out
