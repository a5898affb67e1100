"""The fate of every input document: ``<output>/report/fates.parquet``, one row per document read.

Columns:
  doc_id        16 hex digits, a hash of ``source``: stable across runs over the same input
  source        ``<file relative to its input root>:<line | row | WARC byte offset>``
  url, date     the record's own (a WARC's ``WARC-Target-URI`` / ``WARC-Date``), or null
  bucket        the domain bucket, once the domains stage has set it
  stage         the stage that decided: ``read`` (quarantined), a filter's label, or ``pack``
  decision      ``kept`` (written unchanged), ``modified`` (written, text changed by
                ``modified_by``), ``dropped`` or ``quarantined``
  reason        the drop or quarantine reason, as counted in the report; ``written`` if kept
  detail        the drop's detail (a score, a threshold, a count), or null
  duplicate_of  for a duplicate (``url_duplicate``, ``exact_duplicate``, ``near_duplicate``),
                the ``doc_id`` of the document that was kept instead
  modified_by   the stages that changed the text, comma-separated (also for dropped documents)

Documents that the mix does not take are ``dropped`` by ``pack`` with reason
``mix_downsample``. So kept + modified + dropped + quarantined = documents read, and the
dropped/quarantined rows per (stage, reason) equal the report's drop counts. Rows are
buffered and written in row groups of ``batch_rows`` (memory stays at one buffer); read it
with ``pyarrow.parquet.read_table`` or ``pandas.read_parquet``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe.data.curate.reader import Quarantined
from recipe.data.curate.record import Doc, doc_id

__all__ = ["DECISIONS", "FATE_FILE", "FateLog"]

FATE_FILE = "fates.parquet"
DECISIONS = ("kept", "modified", "dropped", "quarantined")
_COLUMNS = ("doc_id", "source", "url", "date", "bucket", "stage", "decision", "reason", "detail", "duplicate_of",
            "modified_by")  # fmt: skip


class FateLog:
    """Collects one row per document and writes them to a parquet file in row groups."""

    def __init__(self, path: Path, batch_rows: int = 65_536) -> None:
        import pyarrow as pa

        self.path, self.batch_rows = path, batch_rows
        self.schema = pa.schema([(c, pa.string()) for c in _COLUMNS])
        self._rows: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
        self._writer: Any = None
        self._held: list[tuple] | None = None
        self.counts: dict[str, int] = dict.fromkeys(DECISIONS, 0)
        self.tap: Callable[[tuple], None] | None = None  # sees every row as it is written (tasks.Recorder)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def hold(self) -> None:
        """Keep the rows logged from now on aside, until ``release``: an executor that learns of some
        decisions late (from Ray tasks) writes them back in the order a local run logs them."""
        if self._held is None:
            self._held = []

    def release(self) -> list[tuple]:
        """The rows held since ``hold`` (not written); logging writes again."""
        rows, self._held = self._held or [], None
        return rows

    def write_rows(self, rows: list[tuple]) -> None:
        """Write rows that ``release`` returned (already counted)."""
        for row in rows:
            self._add(row)

    def restore_rows(self, rows: list[list[Any]]) -> None:
        """Write and count rows stored by a finished task of an interrupted run."""
        for row in rows:
            self.counts[row[6]] += 1
            self._add(tuple(row))

    def _add(self, row: tuple) -> None:
        if self._held is not None:
            self._held.append(row)
            return
        if self.tap is not None:
            self.tap(row)
        for column, value in zip(self._rows.values(), row):
            column.append(value)
        if len(self._rows["doc_id"]) >= self.batch_rows:
            self.flush()

    def document(self, stage: str, doc: Doc, decision: str, duplicate_of: str | None = None) -> None:
        """A decision about ``doc``: ``dropped`` (its ``drop_reason``) or kept (``kept``/``modified`` by its edits)."""
        if decision != "dropped":
            decision = "modified" if doc.edited_by else "kept"
        self.counts[decision] += 1
        reason = doc.drop_reason if decision == "dropped" else "written"
        self._add((doc.doc_id, doc.source, doc.url, doc.date, doc.bucket, stage, decision, reason,
                   doc.drop_detail if decision == "dropped" else None, duplicate_of,
                   ",".join(doc.edited_by) or None))  # fmt: skip

    def quarantined(self, rec: Quarantined) -> None:
        self.counts["quarantined"] += 1
        self._add((doc_id(rec.source), rec.source, None, None, None, "read", "quarantined", rec.reason, rec.detail,
                   None, None))  # fmt: skip

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows["doc_id"] and self._writer is not None:
            return
        table = pa.table(self._rows, schema=self.schema)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self._writer.write_table(table)
        self._rows = {c: [] for c in _COLUMNS}

    def close(self) -> dict[str, Any]:
        """Write what is buffered and close the file; return the row counts for the report."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return {"file": self.path.name, "rows": self.rows, "decisions": dict(self.counts)}
