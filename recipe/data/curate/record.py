"""The record that flows through the curation stages, and its spill format.

A ``Doc`` is mutable on purpose: cleaning and PII masking rewrite ``text`` in place,
the domain classifier sets ``bucket``/``language``/``topic``, a filter sets
``drop_reason``. The runner reads ``drop_reason`` after each stage, so a stage never
has to rebuild the batch to drop something, and records in ``edited_by`` each stage
that changed ``text`` (the fate log reports those documents as modified).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Doc", "doc_id", "hash01", "hash01_pair", "text_hash64"]

_SPILL_FIELDS = ("text", "source", "url", "date", "domain", "bucket", "language", "topic", "scores", "edited_by")


@dataclass(slots=True, eq=False)
class Doc:
    """One document being curated. ``domain`` is the record's own field, ``bucket`` the routing decision."""

    text: str
    source: str
    url: str | None = None
    date: str | None = None
    domain: str | None = None
    bucket: str | None = None
    language: str | None = None
    topic: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    drop_reason: str | None = None
    drop_detail: str | None = None
    edited_by: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))

    @property
    def doc_id(self) -> str:
        """A stable id of this input document (see ``doc_id``)."""
        return doc_id(self.source)

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _SPILL_FIELDS}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Doc:
        return cls(**json.loads(line))

    def sample(self, max_chars: int = 2000) -> dict[str, Any]:
        """What an auditor needs to judge a drop: where it came from, why, and the start of the text."""
        return {
            "source": self.source,
            "reason": self.drop_reason,
            "detail": self.drop_detail,
            "url": self.url,
            "bucket": self.bucket or self.domain,
            "chars": len(self.text),
            "text": self.text[:max_chars],
        }


def doc_id(source: str) -> str:
    """The stable id of the input document read from ``source`` (``<file>:<line|row|offset>``):
    16 hex digits of its hash, the same in every run over the same input."""
    return f"{text_hash64(source):016x}"


def text_hash64(text: str, salt: bytes = b"") -> int:
    """A stable 64-bit hash of ``text`` (blake2b: identical across processes and runs)."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt[:64])
    return int.from_bytes(h.digest(), "big")


def hash01(text: str, salt: bytes = b"") -> float:
    """A deterministic uniform number in [0, 1) from ``text``; a salt gives an independent draw."""
    return text_hash64(text, salt) / 2.0**64


def hash01_pair(text: str, salt: bytes = b"") -> tuple[float, float]:
    """Two independent deterministic uniform numbers in [0, 1) from one pass over ``text``
    (the two halves of a 128-bit digest): hashing is a visible share of packing's time."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=salt[:64]).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:], "big") / 2.0**64
