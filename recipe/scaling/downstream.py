"""Downstream forecast in two steps (paper section 3.2.1): compute -> NLL -> accuracy.

1. The compute-optimal model of each budget is scored on a multiple-choice benchmark by
   the normalized negative log-likelihood of the correct answer (mean NLL per answer
   token); over budgets that NLL follows a power law in compute.
2. Accuracy (the choice with the lowest normalized NLL) is a sigmoid of that NLL, fitted
   on every run of the sweep - and on older, larger models if their points are given -
   because accuracy saturates at chance and at the ceiling while NLL keeps moving.

Benchmarks: ``arithmetic`` (generated questions, distractors near the right answer),
``cloze`` (the next word of a validation-set document against words drawn from the same
documents: even a model that only knows word frequencies beats chance, so tiny models
give a usable NLL -> accuracy curve), or a jsonl file - ARC-Challenge in its published
format (``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``), its
Hugging Face form (``"choices": {"text": [...], "label": [...]}``) or this module's
(``{"prompt", "choices", "answer"}``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recipe.errors import ConfigError
from recipe.scaling import ScalingError
from recipe.scaling.isoflop import PowerLaw, fit_power_law


@dataclass
class MCItem:
    prompt: str
    choices: list[str]  # each with its leading space, as it continues the prompt
    answer: int


# ---------------------------------------------------------------------------- benchmarks


def arithmetic_items(n: int = 200, seed: int = 0) -> list[MCItem]:
    """``Question: What is 37 + 45?`` with the answer and three near misses (off by 1, 10, ...)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 19), rng.randint(2, 19))
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        wrong: set[int] = set()
        while len(wrong) < 3:
            cand = value + rng.choice([-10, -2, -1, 1, 2, 10, 11, -11])
            if cand >= 0 and cand != value:
                wrong.add(cand)
        choices = [value, *sorted(wrong)]
        rng.shuffle(choices)
        items.append(MCItem(f"Question: What is {a} {op} {b}?\nAnswer:", [f" {c}" for c in choices],
                            choices.index(value)))
    return items


_WORD = re.compile(r"(?<= )[A-Za-z]{3,}(?=[ ,.;:!?\n])")


def cloze_items(texts: Sequence[str], n: int = 200, seed: int = 0, context_chars: int = 300,
                n_choices: int = 4) -> list[MCItem]:
    """Next-word items from ``texts``: the word that follows, or one of ``n_choices - 1`` others."""
    rng = random.Random(seed)
    spots = [(i, m) for i, text in enumerate(texts) for m in _WORD.finditer(text) if m.start() > 40]
    pool = sorted({m.group(0) for _, m in spots})
    if len(pool) < n_choices or not spots:
        raise ScalingError(f"the cloze benchmark found only {len(pool)} distinct words; give it more text")
    items = []
    for i, match in rng.sample(spots, min(n, len(spots))):
        text, word = texts[i], match.group(0)
        prompt = text[max(0, match.start() - 1 - context_chars):match.start() - 1]
        distractors: set[str] = set()
        while len(distractors) < n_choices - 1:
            cand = rng.choice(pool)
            if cand != word:
                distractors.add(cand)
        choices = [word, *sorted(distractors)]
        rng.shuffle(choices)
        items.append(MCItem(prompt, [f" {c}" for c in choices], choices.index(word)))
    return items


def val_texts(data_dir: str | os.PathLike, tokenizer: Any, max_documents: int = 400,
              domain: str | None = None) -> list[str]:
    """The validation split's documents (of one domain, if given) as text, bos/eos dropped."""
    from recipe.data.shards import ShardSet

    val = ShardSet(Path(data_dir) / "val")
    if domain is not None:
        val = val.domain(domain)
    special = {tokenizer.bos_id, tokenizer.eos_id}
    out = []
    for i in range(min(val.num_documents, max_documents)):
        ids = [int(t) for t in val.document(i) if int(t) not in special]
        out.append(tokenizer.decode(ids))
    return out


def load_jsonl(path: str | os.PathLike) -> list[MCItem]:
    """ARC (published or Hugging Face layout) or ``{"prompt", "choices", "answer"}`` records."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark file not found: {path}; pass a jsonl file (ARC format) or cloze/arithmetic")
    items = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_parse_record(json.loads(line)))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}:{line_no}: not an ARC or {{prompt, choices, answer}} record ({err})") from None
    if not items:
        raise ConfigError(f"{path} holds no benchmark items")
    return items


def _parse_record(rec: dict[str, Any]) -> MCItem:
    if "prompt" in rec:
        choices = [str(c) for c in rec["choices"]]
        answer = int(rec["answer"])
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer {answer} outside 0..{len(choices) - 1}")
        return MCItem(str(rec["prompt"]), choices, answer)
    question = rec["question"]
    if isinstance(question, dict):  # the published ARC jsonl
        stem = question["stem"]
        texts = [c["text"] for c in question["choices"]]
        labels = [str(c["label"]) for c in question["choices"]]
    else:  # the Hugging Face dataset rows
        stem, texts, labels = question, list(rec["choices"]["text"]), [str(x) for x in rec["choices"]["label"]]
    key = str(rec["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    return MCItem(f"Question: {stem}\nAnswer:", [f" {t}" for t in texts], labels.index(key))


def build_benchmark(name: str, n: int = 200, seed: int = 0, data_dir: str | os.PathLike = "data/demo",
                    tokenizer: Any = None, domain: str | None = None) -> list[MCItem]:
    if name == "arithmetic":
        return arithmetic_items(n, seed)
    if name == "cloze":
        return cloze_items(val_texts(data_dir, tokenizer, domain=domain), n, seed)
    items = load_jsonl(name)
    return items[:n] if n else items


# ---------------------------------------------------------------------------- scoring


@dataclass
class BenchmarkScore:
    nll: float  # mean over items of the correct answer's NLL per token
    accuracy: float  # share of items whose correct answer has the lowest NLL per token
    items: int
    chance: float

    def to_dict(self) -> dict[str, float]:
        return {"bench_nll": self.nll, "bench_acc": self.accuracy, "bench_items": self.items,
                "bench_chance": self.chance}


def score_benchmark(model: Any, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 32) -> BenchmarkScore:
    """Normalized NLL of the right answer and accuracy of a ``recipe.model.Transformer``.

    Runs the trunk on whole rows but applies the 128K-wide output head only at the answer
    positions: with a tiny model the head is nearly all of the cost.
    """
    import torch
    import torch.nn.functional as F

    max_len = model.args.max_seq_len
    rows, spans = [], []  # spans: (item, choice, first target index, n answer tokens)
    for i, item in enumerate(items):
        prompt = tokenizer.encode(item.prompt, bos=True)
        for j, choice in enumerate(item.choices):
            answer = tokenizer.encode(choice)
            if not answer:
                raise ScalingError(f"benchmark item {i} has an empty choice {j}")
            row = (prompt + answer)[-max_len:]  # keep the answer, cut the prompt's start if needed
            rows.append(row)
            spans.append((i, j, len(row) - len(answer), len(answer)))
    nll = np.zeros((len(items), max(len(it.choices) for it in items)))
    nll.fill(np.inf)
    device = next(model.parameters()).device
    head, was_training = model.output, model.training
    model.eval()
    try:
        model.output = None  # forward then returns the final-norm hidden states
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch, span = rows[start:start + batch_size], spans[start:start + batch_size]
                width = max(len(r) for r in batch)
                tokens = torch.full((len(batch), width), tokenizer.pad_id if hasattr(tokenizer, "pad_id") else 0,
                                    dtype=torch.long)
                for k, r in enumerate(batch):  # right padding: causal attention never sees it
                    tokens[k, :len(r)] = torch.tensor(r)
                hidden = model(tokens.to(device))
                for k, (i, j, first, count) in enumerate(span):
                    positions = torch.arange(first - 1, first - 1 + count, device=device)
                    logits = head(hidden[k, positions]).float()
                    targets = tokens[k, first:first + count].to(device)
                    nll[i, j] = float(F.cross_entropy(logits, targets, reduction="mean"))
    finally:
        model.output = head
        model.train(was_training)
    correct = np.array([nll[i, it.answer] for i, it in enumerate(items)])
    picks = np.argmin(nll, axis=1)
    accuracy = float(np.mean([picks[i] == it.answer for i, it in enumerate(items)]))
    chance = float(np.mean([1.0 / len(it.choices) for it in items]))
    return BenchmarkScore(float(correct.mean()), accuracy, len(items), chance)


# ---------------------------------------------------------------------------- sigmoid


@dataclass
class Sigmoid:
    """``accuracy = floor + (ceiling - floor) / (1 + exp(slope (nll - midpoint)))``: falls with NLL."""

    midpoint: float
    slope: float
    floor: float
    ceiling: float = 1.0

    def __call__(self, nll: float | np.ndarray) -> float | np.ndarray:
        z = np.clip(self.slope * (np.asarray(nll, dtype=np.float64) - self.midpoint), -60, 60)
        return self.floor + (self.ceiling - self.floor) / (1.0 + np.exp(z))

    def to_dict(self) -> dict[str, float]:
        return {"midpoint": self.midpoint, "slope": self.slope, "floor": self.floor, "ceiling": self.ceiling}


def fit_sigmoid(nll: Sequence[float], accuracy: Sequence[float], floor: float = 0.25,
                fit_ceiling: bool = False) -> Sigmoid:
    """Least-squares sigmoid with a fixed floor (chance), by grid start + Gauss-Newton.

    ``fit_ceiling``: also fit the ceiling (below 1 for a benchmark with label noise);
    otherwise it is 1.
    """
    x, y = np.asarray(nll, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n_params = 3 if fit_ceiling else 2
    if len(x) < n_params + 1:
        raise ScalingError(f"the sigmoid needs at least {n_params + 1} finite (NLL, accuracy) points, got {len(x)}")
    if np.ptp(x) == 0:
        raise ScalingError("every point has the same NLL: the sigmoid's slope is undetermined")

    def model(p: np.ndarray) -> np.ndarray:
        ceiling = floor + (1 - floor) / (1 + math.exp(-p[2])) if fit_ceiling else 1.0
        return Sigmoid(p[0], math.exp(p[1]), floor, ceiling)(x)

    def sse(p: np.ndarray) -> float:
        return float(np.sum((model(p) - y) ** 2))

    # Grid over midpoint and slope: the surface has flat plateaus where Gauss-Newton stalls.
    span = float(np.ptp(x))
    best = None
    for mid in np.linspace(x.min() - span, x.max() + span, 41):
        for log_slope in np.linspace(math.log(0.5 / span), math.log(200 / span), 25):
            p = np.array([mid, log_slope, 2.0][:n_params])
            value = sse(p)
            if best is None or value < best[0]:
                best = (value, p)
    p = best[1]
    damping = 1e-3
    for _ in range(200):  # Levenberg-Marquardt on numerical derivatives
        r = model(p) - y
        jac = np.empty((len(x), n_params))
        for k in range(n_params):
            step = 1e-6 * max(1.0, abs(p[k]))
            dp = p.copy()
            dp[k] += step
            jac[:, k] = (model(dp) - model(p)) / step
        hess = jac.T @ jac
        grad = jac.T @ r
        candidate = p - np.linalg.solve(hess + damping * np.diag(np.diag(hess) + 1e-12), grad)
        if sse(candidate) < sse(p):
            if abs(sse(p) - sse(candidate)) < 1e-15:
                p = candidate
                break
            p, damping = candidate, damping / 3
        else:
            damping *= 4
            if damping > 1e8:
                break
    ceiling = floor + (1 - floor) / (1 + math.exp(-p[2])) if fit_ceiling else 1.0
    return Sigmoid(float(p[0]), float(math.exp(p[1])), floor, float(ceiling))


# ---------------------------------------------------------------------------- two steps


def compute_optimal_nll(rows: Iterable[dict[str, Any]], optimal_tokens: dict[float, float],
                        nll_key: str = "bench_nll") -> list[tuple[float, float]]:
    """``(budget, NLL of the compute-optimal model)`` per budget with a known optimum.

    The benchmark NLL is interpolated at the loss-optimal tokens with a quadratic in
    log10(tokens) through the budget's runs (the nearest run when fewer than three).
    """
    by_budget: dict[float, list[tuple[float, float]]] = {}
    for row in rows:
        value = row.get(nll_key)
        if value is None or value == "" or not math.isfinite(float(value)):
            continue
        by_budget.setdefault(float(row["budget"]), []).append((math.log10(float(row["tokens"])), float(value)))
    out = []
    for budget, x_opt in sorted(optimal_tokens.items()):
        points = by_budget.get(budget)
        if not points:
            continue
        xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        target = math.log10(x_opt)
        if len(np.unique(xs)) >= 3:
            value = float(np.polyval(np.polyfit(xs, ys, 2), np.clip(target, xs.min(), xs.max())))
        else:
            value = float(ys[np.argmin(np.abs(xs - target))])
        out.append((budget, value))
    return out


@dataclass
class DownstreamForecast:
    nll_law: PowerLaw  # NLL(C)
    sigmoid: Sigmoid  # accuracy(NLL)
    budget_points: list[tuple[float, float]]  # (budget, compute-optimal NLL)
    accuracy_points: list[tuple[float, float]]  # (NLL, accuracy) the sigmoid was fitted on

    def predict(self, compute: float) -> dict[str, float]:
        nll = float(self.nll_law(compute))
        return {"compute": compute, "nll": nll, "accuracy": float(self.sigmoid(nll))}


def fit_downstream(budget_points: Sequence[tuple[float, float]], accuracy_points: Sequence[tuple[float, float]],
                   floor: float = 0.25, fit_ceiling: bool = False) -> DownstreamForecast:
    """Both steps: the NLL power law over budgets and the NLL -> accuracy sigmoid."""
    if len(budget_points) < 2:
        raise ScalingError(f"the NLL forecast needs the compute-optimal NLL at >= 2 budgets, got "
                           f"{len(budget_points)}; score the sweep's runs on the benchmark (downstream: in the config)")
    nll_law = fit_power_law([b for b, _ in budget_points], [v for _, v in budget_points], "benchmark NLL")
    sigmoid = fit_sigmoid([p[0] for p in accuracy_points], [p[1] for p in accuracy_points], floor, fit_ceiling)
    return DownstreamForecast(nll_law, sigmoid, list(budget_points), list(accuracy_points))
