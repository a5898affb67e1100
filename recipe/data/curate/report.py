"""The curation report: per stage, documents/bytes in and out and every drop reason.

Written into ``<output>/report/``:
  report.json       everything, machine-readable (also stored in the shard indexes)
  report.md         the same as tables, for a person
  report.html       the tables plus a bar chart of the drops (PNG embedded)
  dropped/<stage>.<reason>.jsonl   up to ``samples_per_reason`` dropped documents each
  quarantine.jsonl  every input record that could not be read, with its reason
  fates.parquet     one row per input document: the stage that decided it, the decision and
                    the reason (written by ``fate.FateLog``; ``fate_log: false`` turns it off)
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe.data.curate.reader import Quarantined
from recipe.data.curate.record import Doc

__all__ = ["AuditSink", "write_reports"]


class AuditSink:
    """Writes capped samples of dropped documents, and the quarantine file, as they happen."""

    def __init__(self, report_dir: Path, samples_per_reason: int = 20) -> None:
        self.dir = report_dir
        (self.dir / "dropped").mkdir(parents=True, exist_ok=True)
        self.cap = samples_per_reason
        self.counts: dict[tuple[str, str], int] = {}
        self._files: dict[tuple[str, str], Any] = {}
        self._quarantine = open(self.dir / "quarantine.jsonl", "w", encoding="utf-8")
        self.tap: Callable[[str, Doc], None] | None = None  # sees every sample (tasks.Recorder)

    def sample(self, stage: str, doc: Doc) -> None:
        if self.tap is not None:
            self.tap(stage, doc)
        key = (stage, doc.drop_reason or "unknown")
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        if n >= self.cap:
            return
        f = self._files.get(key)
        if f is None:
            safe = ".".join("".join(c if c.isalnum() or c in "-_#" else "_" for c in part) for part in key)
            f = self._files[key] = open(self.dir / "dropped" / f"{safe}.jsonl", "w", encoding="utf-8")
        f.write(json.dumps(doc.sample(), ensure_ascii=False) + "\n")

    def quarantine(self, rec: Quarantined) -> None:
        self._quarantine.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._quarantine.close()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def _stage_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["stages"]:
        reasons = ", ".join(f"{r} {d['documents']:,}" for r, d in s["dropped"].items()) or "-"
        shown = {k: v for k, v in s["counters"].items() if not k.startswith(("language:", "topic:"))}
        counters = ", ".join(f"{k} {v:,}" for k, v in shown.items())
        rows.append([s["name"], f"{s['documents_in']:,}", f"{s['documents_out']:,}", f"{s['documents_dropped']:,}",
                     _mb(s["bytes_in"]), _mb(s["bytes_out"]), reasons, counters or "-",
                     f"{s['seconds']:.1f}"])  # fmt: skip
    return rows


_STAGE_HEAD = ["stage", "docs in", "docs out", "dropped", "MB in", "MB out", "drop reasons", "counters", "s"]
_MIX_HEAD = ["bucket", "shard domain", "weight", "documents kept", "tokens kept", "share", "of tokens available"]


def _mix_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for b, m in report.get("mix", {}).items():
        weight = "-" if m["weight"] is None else f"{m['weight']:.2f}"
        rows.append([b, m["shard_domain"], weight, f"{m['documents_kept']:,} / {m['documents']:,}",
                     f"{m['tokens_kept']:,}", f"{m['share']:.1%}", f"{m['tokens']:,}"])  # fmt: skip
    return rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def format_markdown(report: dict[str, Any]) -> str:
    shards = report.get("shards", {})
    lines = [
        "# Curation report", "",
        f"- input: {', '.join(report['input'])}", f"- output: {report['output']}",
        f"- documents read: {report['documents_read']:,}; quarantined: {report['documents_quarantined']:,}; "
        f"written: {report['documents_written']:,}",
        *(f"- {split}: {v['documents']:,} documents, {v['tokens']:,} tokens" for split, v in shards.items()),
        f"- wall time: {report['wall_time_s']:.1f} s", "",
        *([f"**Failed: {report['error']}**", ""] if report.get("error") else []),
        "## Stages", "", _md_table(_STAGE_HEAD, _stage_rows(report)), "",
        "## Mix", "", _md_table(_MIX_HEAD, _mix_rows(report)), "",
        "Samples of every drop reason: `report/dropped/<stage>.<reason>.jsonl`; "
        "unreadable input: `report/quarantine.jsonl`"
        + ("; every document's fate: `report/fates.parquet`." if report.get("fate_log") else "."), "",
    ]  # fmt: skip
    return "\n".join(lines)


def _chart_png(report: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values = [], []
    for s in report["stages"]:
        for reason, d in s["dropped"].items():
            labels.append(f"{s['name']}: {reason}")
            values.append(d["documents"])
    fig = Figure(figsize=(8, max(2.0, 0.3 * len(labels) + 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(labels)), values, color="#c0504d")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("documents dropped")
    ax.set_title("Drops per stage and reason")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def format_html(report: dict[str, Any]) -> str:
    png = base64.b64encode(_chart_png(report)).decode()
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left}")  # fmt: skip
    summary = html.escape(
        f"read {report['documents_read']:,} documents, quarantined {report['documents_quarantined']:,}, "
        f"wrote {report['documents_written']:,} in {report['wall_time_s']:.1f} s"
        + (f"; failed: {report['error']}" if report.get("error") else "")
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Curation report</title><style>{style}</style>"
            f"</head><body><h1>Curation report</h1><p>{summary}</p><h2>Stages</h2>"
            f"{_html_table(_STAGE_HEAD, _stage_rows(report))}"
            f"<img alt='drops per stage' src='data:image/png;base64,{png}'>"
            f"<h2>Mix</h2>{_html_table(_MIX_HEAD, _mix_rows(report))}</body></html>\n")  # fmt: skip


def write_reports(report_dir: Path, report: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", "utf-8")
    (report_dir / "report.md").write_text(format_markdown(report), "utf-8")
    (report_dir / "report.html").write_text(format_html(report), "utf-8")
