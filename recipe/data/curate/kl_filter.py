"""Stage 5 (part): token-distribution KL divergence against the corpus.

A document "full of outlier tokens" (random strings, encoded blobs, keyword salad in
a rare vocabulary) has a token distribution far from the corpus's. The first pass
counts tokens (lowercased words, hashed into ``bins``) per domain bucket - so
French is compared with French, not with the English majority. The second pass
scores each document with KL(document || rest of its bucket), leaving the document's
own counts out so a rare word it repeats does not vouch for itself, with add-``alpha``
smoothing; above ``max_kl`` nats it is dropped (``token_kl``).

Word statistics miss one kind of outlier: random-character pages ("k9#Lq !2x ...").
Their words split into single letters and digits, which are common tokens in every
bucket (most of all in math, where such pages land because their digits and ``+``/``=``
look like formulas), so their KL stays under the threshold. Before the KL score, each
document (in every bucket the stage runs on) is checked at the character level: if the
class of a character (space, vowel, consonant, capital, digit, symbol) barely depends
on the previous one's (``char_class_dependence`` below ``min_char_dependence``), the
characters follow no pattern and the document is dropped (``random_chars``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from recipe.data.curate.heuristics import char_class_dependence
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register
from recipe.data.curate.text import hash_words

__all__ = ["TokenKL", "kl_scores"]


def _bucket(doc: Doc) -> str:
    return doc.bucket or doc.domain or "default"


def kl_scores(doc_bins: list[np.ndarray], counts: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """KL(doc || corpus minus doc) in nats for each document's array of token bins."""
    total, size = float(counts.sum()), counts.size
    out = np.zeros(len(doc_bins))
    for i, b in enumerate(doc_bins):
        if b.size == 0:
            continue
        values, c = np.unique(b, return_counts=True)
        p = c / b.size
        rest = np.maximum(counts[values] - c, 0) + alpha
        q = rest / (max(total - b.size, 0.0) + alpha * size)
        out[i] = float(np.sum(p * np.log(p / q)))
    return out


@register
class TokenKL(Stage):
    """Drop documents whose token distribution diverges from their bucket's (``token_kl``).

    Args:
        max_kl: nats above which a document is dropped.
        bins: hash bins of the token counts (memory: 8 bytes per bin per bucket).
        min_words: shorter documents are not judged.
        alpha: add-alpha smoothing of the corpus counts.
        min_char_dependence: documents whose ``char_class_dependence`` is below this are random
            characters (``random_chars``); null turns the check off. Real text, code and LaTeX
            score 0.09 and up, random strings under 0.04.
        min_chars: shorter documents are not checked for random characters.
    """

    name = "token_kl"
    needs_fit = True
    process_anywhere = True  # scores use only the fitted bucket counts
    fit_in_parts = True  # the bucket counts are sums

    def __init__(self, max_kl: float = 6.0, bins: int = 1 << 18, min_words: int = 20, alpha: float = 0.5,
                 min_char_dependence: float | None = 0.06, min_chars: int = 200, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        self.max_kl, self.bins, self.min_words, self.alpha = max_kl, bins, min_words, alpha
        self.min_char_dependence, self.min_chars = min_char_dependence, min_chars
        self.counts: dict[str, np.ndarray] = {}

    def _bins(self, docs: list[Doc]) -> list[np.ndarray]:
        batch = hash_words([d.text for d in docs])
        binned = (batch.hashes % np.uint64(self.bins)).astype(np.int64)
        return [binned[batch.offsets[i] : batch.offsets[i + 1]] for i in range(len(docs))]

    def fit(self, docs: Iterator[Doc]) -> None:
        batch: list[Doc] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == 512:
                self._count(batch)
                batch = []
        self._count(batch)
        self.stats.notes["tokens_per_bucket"] = {k: int(v.sum()) for k, v in sorted(self.counts.items())}

    def _count(self, docs: list[Doc]) -> None:
        for doc, b in zip(docs, self._bins(docs)):
            counts = self.counts.setdefault(_bucket(doc), np.zeros(self.bins, np.int64))
            counts += np.bincount(b, minlength=self.bins)

    def fit_part(self, docs: list[Doc]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Sparse token counts of a run of documents: ``{bucket: (bins, counts)}`` (a dense part is 2 MB)."""
        per_bucket: dict[str, list[np.ndarray]] = {}
        for doc, b in zip(docs, self._bins(docs)):
            per_bucket.setdefault(_bucket(doc), []).append(b)
        return {k: np.unique(np.concatenate(v), return_counts=True) for k, v in per_bucket.items()}

    def fit_merge(self, parts: Iterable[dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
        for part in parts:
            for bucket, (values, counts) in part.items():
                self.counts.setdefault(bucket, np.zeros(self.bins, np.int64))[values] += counts
        self.stats.notes["tokens_per_bucket"] = {k: int(v.sum()) for k, v in sorted(self.counts.items())}

    def process(self, docs: list[Doc]) -> None:
        bins = self._bins(docs)
        for doc, b in zip(docs, bins):
            if self.min_char_dependence is not None:
                dep = char_class_dependence(doc.text, min_chars=self.min_chars)
                if dep is not None:
                    doc.scores["char_dependence"] = round(dep, 4)
                    if dep < self.min_char_dependence:
                        self.drop(doc, "random_chars", f"character class dependence {dep:.3f} < "
                                                       f"{self.min_char_dependence}")  # fmt: skip
                        continue
            if b.size < self.min_words:
                continue
            kl = float(kl_scores([b], self.counts[_bucket(doc)], self.alpha)[0])
            doc.scores["token_kl"] = round(kl, 4)
            if kl > self.max_kl:
                self.drop(doc, "token_kl", f"KL {kl:.2f} nats > {self.max_kl}")

    def finish(self) -> None:
        self.counts = {}
