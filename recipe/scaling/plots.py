"""Figures of the fits: PNG files and TensorBoard images/scalars.

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global
figure state and no display backend, so plotting works the same on a headless cluster node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recipe.scaling.downstream import DownstreamForecast
from recipe.scaling.isoflop import IsoFlopFit, group_by_budget
from recipe.scaling.mix import MixRanking


def _figure(width: float = 6.4, height: float = 4.4) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.8 * i / max(1, n - 1)) for i in range(n)]


def isoflop_figure(fit: IsoFlopFit, rows: Sequence[Mapping[str, Any]], loss_key: str = "val_loss") -> Any:
    """Loss against training tokens per budget, the fitted parabolas and their minima."""
    fig, ax = _figure()
    groups = group_by_budget(r for r in rows if r.get(loss_key) is not None and math.isfinite(float(r[loss_key])))
    fits = {f.budget: f for f in fit.budgets}
    for color, (budget, group) in zip(_colors(len(groups)), groups.items()):
        tokens = np.array([float(r["tokens"]) for r in group])
        loss = np.array([float(r[loss_key]) for r in group])
        label = f"{budget:.3g} FLOPs" + ("" if budget in fits else " (unusable)")
        ax.scatter(tokens, loss, color=color, s=22, label=label, marker="o" if budget in fits else "x")
        if budget in fits:
            parabola = fits[budget].tokens
            xs = np.linspace(parabola.x_range[0] - 0.15, parabola.x_range[1] + 0.15, 100)
            ax.plot(10 ** xs, parabola(xs), color=color, lw=1.2)
            ax.scatter([parabola.optimum], [parabola.loss_opt], color=color, marker="*", s=140,
                       edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("IsoFLOP curves (stars: compute-optimal points)")
    ax.legend(fontsize=8)
    return fig


def power_law_figure(fit: IsoFlopFit, target: float | None = None) -> Any:
    """Compute-optimal tokens against budget, the fitted power law, its 95% band and the forecast."""
    fig, ax = _figure()
    budgets = np.array([f.budget for f in fit.budgets])
    optima = np.array([f.tokens.optimum for f in fit.budgets])
    top = max(budgets.max(), target or 0) * 1.5
    cs = np.logspace(math.log10(budgets.min() / 1.5), math.log10(top), 200)
    law = fit.tokens_law
    ax.plot(cs, law(cs), color="C0", label=f"D* = {law.coefficient:.3g} C^{law.exponent:.3f}")
    boot = fit.bootstrap
    if len(boot.get("alpha", ())) >= 10:
        draws = boot["A"][:, None] * cs[None, :] ** boot["alpha"][:, None]
        low, high = np.percentile(draws, [2.5, 97.5], axis=0)
        ax.fill_between(cs, low, high, color="C0", alpha=0.18, label="95% bootstrap band")
    ax.scatter(budgets, optima, color="black", zorder=3, label="IsoFLOP minima")
    if target is not None:
        forecast = fit.forecast(target)
        ax.scatter([target], [forecast["tokens"]], color="C3", marker="*", s=160, zorder=4,
                   label=f"forecast at {target:.3g}: {forecast['tokens']:.3g} tokens")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute (FLOPs)")
    ax.set_ylabel("compute-optimal training tokens")
    ax.set_title("Compute-optimal tokens")
    ax.legend(fontsize=8)
    return fig


def downstream_figure(forecast: DownstreamForecast, target: float | None = None) -> Any:
    """Left: compute -> normalized NLL; right: NLL -> accuracy with the fitted sigmoid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    budgets = np.array([b for b, _ in forecast.budget_points])
    nll = np.array([v for _, v in forecast.budget_points])
    top = max(budgets.max(), target or 0) * 1.5
    cs = np.logspace(math.log10(budgets.min() / 1.5), math.log10(top), 100)
    left.scatter(budgets, nll, color="black", label="compute-optimal models")
    left.plot(cs, forecast.nll_law(cs), color="C0",
              label=f"NLL = {forecast.nll_law.coefficient:.3g} C^{forecast.nll_law.exponent:.3f}")
    if target is not None:
        predicted = forecast.predict(target)
        left.scatter([target], [predicted["nll"]], color="C3", marker="*", s=150, label=f"forecast {target:.3g}")
    left.set_xscale("log")
    left.set_xlabel("compute (FLOPs)")
    left.set_ylabel("normalized NLL of the correct answer")
    left.legend(fontsize=8)
    xs = np.array([p[0] for p in forecast.accuracy_points])
    ys = np.array([p[1] for p in forecast.accuracy_points])
    right.scatter(xs, ys, color="black", s=18, label="runs")
    s = forecast.sigmoid
    span = np.ptp(xs) if len(xs) > 1 else 1.0
    low, high = xs.min() - 0.3 * span, xs.max() + 0.3 * span
    if target is not None:  # draw the curve out to the forecast's NLL
        low, high = min(low, predicted["nll"] - 0.1 * span), max(high, predicted["nll"] + 0.1 * span)
    grid = np.linspace(max(low, 0.0), high, 200)
    right.plot(grid, s(grid), color="C1", label=f"sigmoid: mid {s.midpoint:.3g}, slope {s.slope:.3g}")
    right.axhline(s.floor, color="grey", lw=0.8, ls="--", label=f"chance {s.floor:.2f}")
    if target is not None:
        right.scatter([predicted["nll"]], [predicted["accuracy"]], color="C3", marker="*", s=150,
                      label=f"forecast: acc {predicted['accuracy']:.3f}")
    right.set_xlabel("normalized NLL of the correct answer")
    right.set_ylabel("accuracy")
    right.legend(fontsize=8)
    return fig


def mix_figure(ranking: MixRanking) -> Any:
    """Each mix's best loss per budget, its fitted law, and the prediction at the target."""
    fig, ax = _figure()
    all_budgets = [b for c in ranking.curves for b, _ in c.frontier]
    cs = np.logspace(math.log10(min(all_budgets) / 1.5), math.log10(ranking.target * 1.5), 100)
    for color, curve in zip(_colors(len(ranking.curves)), ranking.curves):
        ax.scatter([b for b, _ in curve.frontier], [l for _, l in curve.frontier], color=color, s=22)
        ax.plot(cs, curve(cs), color=color, lw=1.2, label=f"{curve.name}: {curve.predicted:.4g} at target")
        ax.scatter([ranking.target], [curve.predicted], color=color, marker="*", s=120, edgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("compute (FLOPs)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Data mixes, ranked at {ranking.target:.3g} FLOPs")
    ax.legend(fontsize=8)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write a figure as a PNG (via a temporary name, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def figure_array(fig: Any) -> np.ndarray:
    """HWC uint8 RGB pixels of a figure (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_tensorboard(logdir: str | os.PathLike, figures: Mapping[str, Any], scalars: Mapping[str, float],
                    step: int = 0) -> None:
    """Figures as images and fit results as scalars under ``logdir`` (``tensorboard --logdir``)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for tag, fig in figures.items():
            writer.add_image(tag, figure_array(fig), step, dataformats="HWC")
        for tag, value in scalars.items():
            if value is not None and math.isfinite(float(value)):
                writer.add_scalar(tag, float(value), step)
    finally:
        writer.close()
