"""``recipe report RUN_DIR``: one PNG and one HTML page of a run, read from its TensorBoard event files.

``RUN_DIR`` is a run's ``trainer.default_root_dir`` (``runs/tiny``) or any folder under it
(``runs/tiny/lightning_logs/version_0``): every event file below it is read. A run resumed
several times has one ``version_<n>`` per start; their values are merged by step, and where
two starts logged the same step (the steps replayed after a crash) the later one counts.

The page plots, against the optimizer step, what the recipe logs:

- loss: ``train/loss``, ``val/loss`` (and ``test/loss``), skipped steps marked;
- learning rate: ``train/lr``, the annealing phase (``train/phase`` = 1) shaded;
- batch and sequence: ``train/batch_tokens`` and ``train/seq_len`` (the batch-size ramp and
  the context-length stages, ``train/context_stage``);
- data mix: the weights ``train/mix/<domain>``;
- throughput: ``train/tokens_per_sec`` and ``train/mfu``;
- stability: ``train/grad_norm``, ``train/skipped_steps``, ``train/loss_spikes``.

A tag the run did not log leaves its curve (or its whole panel) out, with a note on the
page saying why it may be missing; it is never an error.
"""

from __future__ import annotations

import argparse
import base64
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.errors import RecipeError

EVENT_GLOB = "events.out.tfevents.*"
# Lightning's TensorBoardLogger writes this placeholder (-1) with the hyperparameters, before any step.
PLACEHOLDER_TAGS = ("hp_metric",)

# Why a tag can be absent from a run: shown on the page next to each missing tag.
WHY_MISSING = {
    "val/loss": "no validation ran (trainer.val_check_interval beyond the last step, or data.val_batches: 0)",
    "train/phase": "logged with a run plan; annealing needs the callbacks.annealing.LRAnnealing callback",
    "train/context_stage": "logged with a run plan (callbacks.context_stages.ContextLengthStages)",
    "train/mix/": "the callbacks.data_mix.DataMixSchedule callback logs the mix",
    "train/tokens_per_sec": "the callbacks.throughput.TokenThroughput callback logs it from its second step",
    "train/mfu": "TokenThroughput logs MFU only with a peak: peak_flops_per_device or measure_peak: true",
    "train/loss_spikes": "logged when the step guard has a spike_factor (model.guard)",
}


class ReportError(RecipeError):
    """A run folder the report cannot be made from."""


# ---------------------------------------------------------------------------- reading


def event_files(run_dir: str | Path) -> list[Path]:
    """Every TensorBoard event file under ``run_dir`` (a folder, at any depth), oldest first."""
    root = Path(run_dir)
    return sorted(root.rglob(EVENT_GLOB), key=lambda p: (p.stat().st_mtime, str(p)))


def _accumulator(path: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 keeps every value: the default samples a long run down to 10,000 steps.
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def has_scalars(path: str | Path) -> bool:
    """Whether the event file ``path`` holds at least one logged value (Lightning's ``hp_metric``
    placeholder does not count)."""
    return any(tag not in PLACEHOLDER_TAGS for tag in _accumulator(Path(path)).Tags()["scalars"])


def read_scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar under ``run_dir`` but ``hp_metric``: tag -> {step: value}; the latest write of a step wins."""
    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for path in event_files(run_dir):
        acc = _accumulator(path)
        for tag in acc.Tags()["scalars"]:
            if tag in PLACEHOLDER_TAGS:
                continue
            steps = latest.setdefault(tag, {})
            for event in acc.Scalars(tag):
                if event.step not in steps or event.wall_time >= steps[event.step][0]:
                    steps[event.step] = (event.wall_time, float(event.value))
    return {tag: {step: value for step, (_, value) in sorted(steps.items())} for tag, steps in latest.items()}


def load_run(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """The run's scalars, or a one-line ``ReportError`` naming what is wrong with ``run_dir``."""
    root = Path(run_dir)
    hint = "pass a run's folder (its trainer.default_root_dir, e.g. runs/tiny)"
    if not root.exists():
        raise ReportError(f"{root} does not exist; {hint}")
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; {hint}")
    files = event_files(root)
    if not files:
        raise ReportError(f"{root} holds no TensorBoard event files ({EVENT_GLOB}); {hint} "
                          "or one of its lightning_logs/version_<n> folders")
    scalars = read_scalars(root)
    if not scalars:
        raise ReportError(f"the {len(files)} event file(s) under {root} hold no logged values: the run stopped "
                          "before its first step; train it further, then report again")
    return scalars


# ---------------------------------------------------------------------------- the panels


@dataclass
class Panel:
    """One plot: its title, the tags it needs (any one draws it) and the function that draws it."""

    title: str
    tags: tuple[str, ...]
    draw: Callable[[Any, dict[str, dict[int, float]]], None]
    optional: tuple[str, ...] = field(default_factory=tuple)


def _xy(series: dict[int, float]) -> tuple[list[int], list[float]]:
    return list(series), list(series.values())


def _spans(series: dict[int, float], value: float) -> list[tuple[int, int]]:
    """The ``[first, last]`` step ranges where ``series`` equals ``value``."""
    spans: list[tuple[int, int]] = []
    previous = None
    for step, v in series.items():
        if v == value:
            if spans and spans[-1][1] == previous:
                spans[-1] = (spans[-1][0], step)
            else:
                spans.append((step, step))
        previous = step
    return spans


def _skipped_at(scalars: dict[str, dict[int, float]]) -> list[int]:
    """The steps where ``train/skipped_steps`` (a running count) went up."""
    count, steps, before = scalars.get("train/skipped_steps", {}), [], 0.0
    for step, value in count.items():
        if value > before:
            steps.append(step)
        before = value
    return steps


def _draw_loss(ax: Any, s: dict[str, dict[int, float]]) -> None:
    if "train/loss" in s:
        ax.plot(*_xy(s["train/loss"]), label="train/loss", lw=1)
    for tag, style in (("val/loss", "o-"), ("test/loss", "s")):
        if tag in s:
            ax.plot(*_xy(s[tag]), style, label=tag, ms=4)
    skipped = [step for step in _skipped_at(s) if step in s.get("train/loss", {})]
    if skipped:
        ax.plot(skipped, [s["train/loss"][k] for k in skipped], "rx", ms=8, label="skipped step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right")


def _draw_lr(ax: Any, s: dict[str, dict[int, float]]) -> None:
    ax.plot(*_xy(s["train/lr"]), label="train/lr", color="C0")
    for i, (a, b) in enumerate(_spans(s.get("train/phase", {}), 1.0)):
        ax.axvspan(a, b, color="C1", alpha=0.2, label="annealing (train/phase 1)" if i == 0 else None)
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7, loc="upper right")


def _legend(ax: Any, right: Any, lines: list[Any], loc: str) -> None:
    """One legend for both y axes, on the axis drawn last so that no curve covers it."""
    (right if right is not None else ax).legend(lines, [line.get_label() for line in lines], fontsize=7, loc=loc)


def _draw_shape(ax: Any, s: dict[str, dict[int, float]]) -> None:
    lines, right = [], None
    if "train/batch_tokens" in s:
        lines += ax.plot(*_xy(s["train/batch_tokens"]), drawstyle="steps-post", label="train/batch_tokens",
                         color="C0")
        ax.set_ylabel("tokens per step")
    if "train/seq_len" in s:
        right = ax.twinx()
        lines += right.plot(*_xy(s["train/seq_len"]), drawstyle="steps-post", label="train/seq_len", color="C2")
        right.set_ylabel("sequence length")
    stages = s.get("train/context_stage", {})
    before = None
    for step, stage in stages.items():
        if before is not None and stage != before:
            ax.axvline(step, color="C3", ls=":", lw=1)
            ax.annotate(f"stage {int(stage)}", (step, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        va="top", rotation=90, color="C3")
        before = stage
    _legend(ax, right, lines, "upper left")


def _draw_mix(ax: Any, s: dict[str, dict[int, float]]) -> None:
    domains = sorted(tag for tag in s if tag.startswith("train/mix/"))
    steps = sorted(set().union(*(s[d] for d in domains)))
    weights = [[s[d].get(step, 0.0) for step in steps] for d in domains]
    ax.stackplot(steps, weights, labels=[d.removeprefix("train/mix/") for d in domains], alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("domain weight")
    ax.legend(fontsize=7, loc="lower left")


def _draw_speed(ax: Any, s: dict[str, dict[int, float]]) -> None:
    lines, right = [], None
    if "train/tokens_per_sec" in s:
        lines += ax.plot(*_xy(s["train/tokens_per_sec"]), label="train/tokens_per_sec", color="C0")
        ax.set_ylabel("tokens / s")
    if "train/mfu" in s:
        right = ax.twinx()
        steps, values = _xy(s["train/mfu"])
        lines += right.plot(steps, [100 * v for v in values], label="train/mfu", color="C1")
        right.set_ylabel("MFU (%)")
    _legend(ax, right, lines, "lower right")


def _draw_stability(ax: Any, s: dict[str, dict[int, float]]) -> None:
    lines, right = [], None
    if "train/grad_norm" in s:
        lines += ax.plot(*_xy(s["train/grad_norm"]), label="train/grad_norm", color="C0", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("gradient norm")
    counts = [tag for tag in ("train/skipped_steps", "train/loss_spikes") if tag in s]
    if counts:
        right = ax.twinx()
        for i, tag in enumerate(counts):
            lines += right.plot(*_xy(s[tag]), drawstyle="steps-post", label=tag, color=f"C{i + 3}")
        right.set_ylabel("count")
    _legend(ax, right, lines, "upper right")


PANELS = (
    Panel("Loss", ("train/loss", "val/loss", "test/loss"), _draw_loss, ("val/loss",)),
    Panel("Learning rate and phases", ("train/lr",), _draw_lr, ("train/phase",)),
    Panel("Batch size and sequence length", ("train/batch_tokens", "train/seq_len"), _draw_shape,
          ("train/context_stage",)),
    Panel("Data mix", ("train/mix/",), _draw_mix),
    Panel("Throughput", ("train/tokens_per_sec", "train/mfu"), _draw_speed, ("train/tokens_per_sec", "train/mfu")),
    Panel("Gradient norm and skipped steps", ("train/grad_norm", "train/skipped_steps"), _draw_stability,
          ("train/loss_spikes",)),
)


def _present(tag: str, scalars: dict[str, dict[int, float]]) -> bool:
    return any(t.startswith(tag) for t in scalars) if tag.endswith("/") else tag in scalars


def _missing_note(tag: str) -> str:
    shown = f"{tag}*" if tag.endswith("/") else tag
    why = WHY_MISSING.get(tag)
    return f"{shown} was not logged" + (f": {why}" if why else "")


# ---------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What ``make_report`` wrote and what it left out."""

    png: Path
    html: Path
    panels: list[str]
    notes: list[str]


def _summary(scalars: dict[str, dict[int, float]]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    loss = scalars.get("train/loss", {})
    if loss:
        rows.append(("steps logged", f"{min(loss)} to {max(loss)} ({len(loss)} steps)"))
        rows.append(("last train/loss", f"{loss[max(loss)]:.4f} (step {max(loss)})"))
    seen = scalars.get("train/tokens_seen", {})
    if seen:
        rows.append(("tokens seen", f"{int(seen[max(seen)]):,}"))
    val = scalars.get("val/loss", {})
    if val:
        best = min(val, key=val.get)
        rows.append(("val/loss", f"last {val[max(val)]:.4f} (step {max(val)}), best {val[best]:.4f} (step {best})"))
    skipped = scalars.get("train/skipped_steps", {})
    if skipped:
        rows.append(("skipped steps", f"{int(skipped[max(skipped)])}" + (
            f" (at steps {', '.join(map(str, _skipped_at(scalars)))})" if _skipped_at(scalars) else "")))
    speed = scalars.get("train/tokens_per_sec", {})
    if speed:
        rows.append(("tokens / s", f"median {sorted(speed.values())[len(speed) // 2]:,.0f}"))
    mfu = scalars.get("train/mfu", {})
    if mfu:
        rows.append(("MFU", f"median {100 * sorted(mfu.values())[len(mfu) // 2]:.1f}%"))
    return rows


def _figure(scalars: dict[str, dict[int, float]], panels: list[Panel], title: str) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import MaxNLocator

    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.5 * cols, 3.4 * rows), layout="constrained")
    fig.suptitle(title)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        panel.draw(ax, scalars)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write ``report.png`` and ``report.html`` (the PNG inlined) of the run under ``run_dir``
    into ``out_dir`` (default: ``run_dir``)."""
    root = Path(run_dir)
    scalars = load_run(root)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    drawn, notes = [], []
    for panel in PANELS:
        if not any(_present(tag, scalars) for tag in panel.tags):
            notes.append(f"{panel.title}: left out, " + "; ".join(_missing_note(t) for t in panel.tags))
            continue
        drawn.append(panel)
        notes += [f"{panel.title}: {_missing_note(t)}" for t in panel.optional if not _present(t, scalars)]

    png = out / "report.png"
    _figure(scalars, drawn, f"{root}").savefig(png, dpi=110)
    page = out / "report.html"
    page.write_text(_html(root, scalars, [p.title for p in drawn], notes, png), encoding="utf-8")
    return Report(png=png, html=page, panels=[p.title for p in drawn], notes=notes)


def _html(root: Path, scalars: dict[str, dict[int, float]], panels: list[str], notes: list[str], png: Path) -> str:
    esc = html.escape
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary(scalars))
    tags = "".join(
        f"<tr><td>{esc(tag)}</td><td>{len(values)}</td><td>{min(values)}-{max(values)}</td>"
        f"<td>{values[max(values)]:.6g}</td></tr>"
        for tag, values in sorted(scalars.items()))
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes) or "<li>every plotted tag was logged</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {esc(str(root))}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Run report: {esc(str(root))}</h1>
<table>{summary}</table>
<h2>Plots</h2><p>{esc(", ".join(panels))}</p>
<img alt="plots of the run's logged values" src="data:image/png;base64,{image}">
<h2>Not plotted</h2><ul>{note_items}</ul>
<h2>Every logged tag</h2>
<table><tr><th>tag</th><th>values</th><th>steps</th><th>last</th></tr>{tags}</table>
</body></html>
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="recipe report",
        description="plots of a run's TensorBoard logs: report.png and report.html (the PNG inlined)")
    parser.add_argument("run_dir", help="a run's folder: its trainer.default_root_dir (e.g. runs/tiny) or a "
                                        "lightning_logs/version_<n> folder under it")
    parser.add_argument("--out", default=None, help="folder for report.png and report.html (default: RUN_DIR)")
    args = parser.parse_args(argv)
    report = make_report(args.run_dir, args.out)
    print(f"wrote {report.png} and {report.html} ({len(report.panels)} plots)")
    for note in report.notes:
        print(f"  not plotted: {note}")
    return 0
