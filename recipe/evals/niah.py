"""Needle in a haystack: retrieve a planted pass key from filler text of a given length.

The paper moves to a longer context only once the model "perfectly solves needle in a
haystack tasks up to that length". Here each trial plants a random pass key at a depth
of the haystack and ends the sequence with the question and an answer. The model is not
asked to generate: it scores each candidate answer (the true key and distractor keys)
by its likelihood, and the trial passes when the true key is the most likely. This
needs only forward passes, so it runs under every parallel layout, and a model at
chance level scores ``1 / candidates``.

Every sequence is exactly ``seq_len + 1`` tokens (one step-batch row) with the answer in
its last tokens; the loss mask marks the answer's targets only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recipe.errors import ConfigError

__all__ = ["NeedleTrial", "NeedleResult", "build_trials", "score_trials", "FILLER", "DEPTHS"]

# The filler of the pass-key retrieval task (Mohtashami & Jaggi, 2023): text that carries
# no information, so only the needle can tell the model the key.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class TokenizerLike:  # the part of recipe.tokenizer.Tokenizer used here
    bos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...


@dataclass
class NeedleTrial:
    """One planted key and its candidate answers; ``sequences[0]`` holds the true key."""

    depth: float
    key: str
    candidates: list[str]
    sequences: list[np.ndarray]  # each seq_len + 1 tokens
    answer_lengths: list[int]  # tokens of each candidate's answer, at the end of its sequence


@dataclass
class NeedleResult:
    accuracy: float  # share of trials whose true key is the most likely candidate
    margin: float  # mean (true key log-likelihood - best distractor's), in nats
    trials: int
    seq_len: int


def build_trials(tokenizer: TokenizerLike, seq_len: int, trials: int = 5, candidates: int = 4,
                 key_digits: int = 5, depths: Sequence[float] = DEPTHS, seed: int = 0) -> list[NeedleTrial]:
    """``trials`` pass-key trials of ``seq_len + 1`` tokens, needles at ``depths`` in turn."""
    if trials < 1 or candidates < 2:
        raise ConfigError(f"needle in a haystack needs trials >= 1 and candidates >= 2, got {trials} and {candidates}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"needle depths must be fractions in [0, 1], got {list(depths)}")
    rng = random.Random(seed)
    head = [tokenizer.bos_id] + tokenizer.encode(INTRO)
    question = tokenizer.encode(QUESTION)
    filler = tokenizer.encode(" " + FILLER * 4)
    # Needles go between sentences: after a filler token that ends one.
    sentence_end = np.array([tokenizer.decode([t]).rstrip().endswith(".") for t in filler])
    out = []
    for t in range(trials):
        keys: list[str] = []
        while len(keys) < candidates:  # distinct keys of the same digit count
            key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
            if key not in keys:
                keys.append(key)
        needle = tokenizer.encode(NEEDLE.format(key=keys[0]))
        answers = [tokenizer.encode(ANSWER.format(key=k)) for k in keys]
        # The longest answer sets the haystack size, so every candidate row has the same prefix.
        room = seq_len + 1 - len(head) - len(needle) - len(question) - max(len(a) for a in answers)
        if room < 0:
            raise ConfigError(
                f"needle in a haystack at seq_len={seq_len} leaves no room for the haystack (needs at least "
                f"{seq_len + 1 - room} tokens); evaluate at a longer sequence length"
            )
        depth = float(depths[t % len(depths)])
        hay = np.resize(np.asarray(filler, dtype=np.int64), room)  # the filler repeated to length
        cuts = np.concatenate([[0], np.flatnonzero(np.resize(sentence_end, room)) + 1, [room]])
        before = int(cuts[np.abs(cuts - room * depth).argmin()])
        prefix = np.concatenate([head, hay[:before], needle, hay[before:], question]).astype(np.int64)
        sequences, lengths = [], []
        for answer in answers:
            pad = max(len(a) for a in answers) - len(answer)
            # Shorter answers take filler before the question so that each answer ends the row.
            row = np.concatenate([prefix[: len(prefix) - len(question)], hay[:pad], question, answer]) if pad else \
                np.concatenate([prefix, answer])
            sequences.append(row.astype(np.int64))
            lengths.append(len(answer))
        out.append(NeedleTrial(depth=depth, key=keys[0], candidates=keys, sequences=sequences, answer_lengths=lengths))
    return out


def answer_batch(sequence: np.ndarray, answer_length: int, n_micro: int = 1, rows: int = 1) -> dict[str, torch.Tensor]:
    """A step batch ``[n_micro, rows, seq_len + 1]`` of copies of one sequence, its answer masked in."""
    tokens = torch.from_numpy(sequence).long()
    mask = torch.zeros(len(sequence) - 1, dtype=torch.bool)
    mask[-answer_length:] = True
    shape = (n_micro, rows, -1)
    return {
        "tokens": tokens.expand(n_micro * rows, -1).reshape(shape).contiguous(),
        "doc_ids": torch.zeros(n_micro * rows, len(sequence), dtype=torch.long).reshape(shape),
        "loss_mask": mask.expand(n_micro * rows, -1).reshape(shape).contiguous(),
    }


def score_trials(trials: Sequence[NeedleTrial], answer_loss: Callable[[np.ndarray, int], float]) -> NeedleResult:
    """Score candidates by ``answer_loss(sequence, answer_length)``: mean CE of the answer tokens.

    A candidate's log-likelihood is ``-mean CE x answer length``; the true key must beat
    every distractor strictly.
    """
    correct, margins = 0, []
    for trial in trials:
        loglik = [-answer_loss(seq, n) * n for seq, n in zip(trial.sequences, trial.answer_lengths)]
        best_other = max(loglik[1:])
        correct += loglik[0] > best_other
        margins.append(loglik[0] - best_other)
    seq_len = len(trials[0].sequences[0]) - 1 if trials else 0
    return NeedleResult(accuracy=correct / max(1, len(trials)), margin=float(np.mean(margins)) if margins else 0.0,
                        trials=len(trials), seq_len=seq_len)
