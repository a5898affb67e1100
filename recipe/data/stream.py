"""The per-data-parallel-rank token stream: step batches cut from per-domain endless epochs.

Exact semantics (tests rely on them):

* The state before a step is global: ``position`` (tokens consumed, all domains
  together), ``samples`` (sequences consumed) and ``domain_positions`` (the token offset
  reached in each domain's own endless stream, ``ShardSet.domain``).
* A step starting at that state takes ``(B, L) = batch_schedule(position)``
  (``global_batch_size`` sequences of ``seq_len`` tokens) and mix weights
  ``w = mix_schedule(position)`` (default: each domain's share of the set's tokens).
  Global sample ``j`` (``0 <= j < B``) draws its domain from ``u = frac((k + 1) * phi)``
  with ``k = samples + j`` and ``phi = 0.6180339887498949``: the first domain, in
  sorted order, whose cumulative weight exceeds ``u`` (a weight of 0 is never drawn).
* The ``i``-th sample of domain ``d`` in the step covers offsets
  ``[p_d + i*L, p_d + i*L + L + 1)`` of that domain's stream, ``p_d`` its position:
  ``L`` inputs plus one extra token for the shifted targets, so consecutive samples of
  a domain overlap by one token and every token is an input exactly once per epoch
  of its domain. After the step ``p_d`` has advanced by (samples of ``d``) x ``L``.
* Rank ``r`` of ``dp_size`` owns samples ``[r*local, (r+1)*local)``,
  ``local = B // dp_size``, split into micro-batches. Each rank works out the whole
  step's assignment (``B`` multiplications) and reads one contiguous window per domain.

With one domain every sample is that domain's, ``p_d`` is the position, and sample
``j`` covers ``[position + j*L, position + j*L + L + 1)``: the flat stream.

Why the golden-ratio (Weyl) sequence rather than random draws: the share of each domain
among any ``n`` consecutive samples stays within ``O(log n / n)`` of its weight
(the sequence's discrepancy), instead of the ``O(1/sqrt(n))`` noise of random sampling,
so even one small batch has the intended mix. Sample ``k``'s domain is a function of
``k`` alone: no generator state to save, and every rank, DataLoader worker and resumed
run computes the same assignment. In float64 the sequence stays exact to about 1e-7 up
to 10^9 samples, far finer than any mix weight.

The state is global, so a checkpoint taken under one DP size resumes under another:
restart with the saved ``(position, samples, domain_positions)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recipe.data.errors import DataError
from recipe.data.shards import ShardSet
from recipe.errors import ConfigError
from recipe.parallel.mesh import ParallelDims

__all__ = ["GOLDEN_FRACTION", "StreamState", "TokenStream", "domain_of_samples", "local_rows"]

GOLDEN_FRACTION = 0.6180339887498949  # (sqrt(5) - 1) / 2


def local_rows(global_batch_size: int, seq_len: int, micro_batch_size: int, dp_size: int) -> int:
    """Sequences per data-parallel rank of a step, by the mesh's batch-layout rule
    (``ParallelDims.check_batch``); a layout it cannot cut is a one-line ``DataError``."""
    try:
        n_micro = ParallelDims(dp_shard=dp_size).check_batch(global_batch_size, seq_len, micro_batch_size)
    except ConfigError as err:
        raise DataError(str(err)) from None
    return n_micro * micro_batch_size


def domain_of_samples(first_sample: int, count: int, cumulative: np.ndarray) -> np.ndarray:
    """Domain index of global samples ``first_sample .. first_sample + count - 1``.

    ``cumulative``: the cumulative weights in domain order, the last positively weighted
    entry (and those after it) set to ``inf`` so that rounding never draws past it.
    """
    k = np.arange(first_sample + 1, first_sample + count + 1, dtype=np.int64).astype(np.float64)
    u = np.modf(k * GOLDEN_FRACTION)[0]
    return np.searchsorted(cumulative, u, side="right").astype(np.int64)


@dataclass
class StreamState:
    """Where the stream stands before a step (all of it global, none of it per rank)."""

    position: int = 0
    samples: int = 0
    domain_positions: dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """The whole step that starts at a state: its layout and every sample's domain."""

    batch: int
    seq_len: int
    domains: np.ndarray  # [batch] domain index of each global sample
    counts: np.ndarray  # [n_domains] samples per domain
    next_state: StreamState


class TokenStream(IterableDataset):
    """Endless (or ``num_steps``-long) stream of step batches for one DP rank.

    Each item is a dict:
      ``tokens``, ``doc_ids``: LongTensor ``[n_micro, micro_batch_size, seq_len + 1]``
      (micro-batch ``i`` is ``tokens[i]``; inputs ``[:, :-1]``, targets ``[:, 1:]``,
      document ids of the inputs ``doc_ids[i][:, :-1]``; with ``n`` domains the id of a
      document of domain ``d`` is ``n * (its id in the domain) + d``, unique across domains);
      ``position`` / ``next_position``: LongTensor scalars, the global token offsets
      where this step starts and where the next one starts;
      ``next_samples``: LongTensor scalar, global samples consumed after this step;
      ``next_domain_positions``: LongTensor ``[n_domains]`` (``domains`` order), each
      domain's position after this step;
      ``domain_tokens``: LongTensor ``[n_domains]``, this step's global tokens per domain.

    Use it with ``DataLoader(stream, batch_size=None)``. With ``num_workers > 1`` the
    workers take steps round-robin, which the DataLoader returns in order.
    """

    def __init__(
        self,
        shards: ShardSet | str | os.PathLike,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        start_position: int = 0,
        num_steps: int | None = None,
        batch_schedule: Callable[[int], tuple[int, int]] | None = None,
        mix_schedule: Callable[[int], Mapping[str, float]] | None = None,
        start_samples: int = 0,
        start_domain_positions: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.local = local_rows(global_batch_size, seq_len, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if start_position < 0 or start_samples < 0:
            raise DataError(
                f"start_position and start_samples must be >= 0, got {start_position} and {start_samples}"
            )
        if num_steps is not None and num_steps < 0:
            raise DataError(f"num_steps must be >= 0 or None, got {num_steps}")
        if self.shards.num_tokens == 0:
            raise DataError(
                f"{self.shards.path} is an empty shard set (0 tokens); rebuild it from a corpus with documents"
            )
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.num_steps = num_steps
        # (global_batch_size, seq_len) of the step starting at a position: a batch-size ramp
        # or context-length stage plugs in here. A pure function of the position, so a
        # resumed (or prefetched) stream cuts exactly the same batches.
        self.batch_schedule = batch_schedule
        # Domain -> weight of the step starting at a position (a data-mix schedule); pure
        # for the same reason.
        self.mix_schedule = mix_schedule
        self.domains: list[str] = self.shards.domains
        self._views = [self.shards.domain(d) for d in self.domains]
        tokens = self.shards.domain_tokens
        self.natural_weights: dict[str, float] = {d: tokens[d] / self.shards.num_tokens for d in self.domains}
        self._natural = _cumulative(np.array([self.natural_weights[d] for d in self.domains]))
        self._mixes: dict[tuple[tuple[str, float], ...], np.ndarray] = {}
        self._gathers: dict[tuple[int, int], np.ndarray] = {}
        self.start_state = StreamState(
            int(start_position), int(start_samples), self._start_domain_positions(start_position,
                                                                                   start_domain_positions)
        )

    def _start_domain_positions(self, position: int, given: Mapping[str, int] | None) -> dict[str, int]:
        if given is None:
            if len(self.domains) == 1:
                return {self.domains[0]: int(position)}
            if position:
                raise DataError(
                    f"starting at position {position:,} of {self.shards.path}, which has several domains, needs "
                    "each domain's position; pass start_domain_positions from the saved data state"
                )
            given = {}
        unknown = sorted(set(given) - set(self.domains))
        if unknown:
            raise DataError(
                f"the start state has positions for domain(s) {', '.join(unknown)} that {self.shards.path} lacks "
                f"(it has {', '.join(self.domains)}); resume with the data the state was saved with"
            )
        if any(int(v) < 0 for v in given.values()):
            raise DataError(f"domain positions must be >= 0, got {dict(given)}")
        return {d: int(given.get(d, 0)) for d in self.domains}

    @property
    def start_position(self) -> int:
        return self.start_state.position

    # ------------------------------------------------------------------ schedule
    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global_batch_size, seq_len)`` of the step that starts at ``position``."""
        if self.batch_schedule is None:
            return self.global_batch_size, self.seq_len
        return self.batch_schedule(position)

    def step_tokens(self, position: int) -> int:
        """Global tokens consumed by the step that starts at ``position`` (all ranks together)."""
        batch, seq_len = self.layout_at(position)
        return batch * seq_len

    @property
    def tokens_per_step(self) -> int:
        """Global tokens per step without a batch schedule."""
        return self.global_batch_size * self.seq_len

    def position_of_step(self, step: int) -> int:
        """Global token offset where step ``step`` (counted from ``start_position``) starts."""
        position = self.start_state.position
        for _ in range(step):
            position += self.step_tokens(position)
        return position

    def state_of_step(self, step: int) -> StreamState:
        """The state before step ``step`` (counted from the start state)."""
        state = self.start_state
        for _ in range(step):
            state = self._plan(state).next_state
        return state

    def weights_at(self, position: int) -> dict[str, float]:
        """The (normalised) mix weights of the step that starts at ``position``."""
        cumulative = self._mix_at(position)
        finite = np.where(np.isinf(cumulative), 1.0, cumulative)
        return dict(zip(self.domains, np.diff(finite, prepend=0.0).tolist()))

    def _mix_at(self, position: int) -> np.ndarray:
        if self.mix_schedule is None:
            return self._natural
        raw = self.mix_schedule(position)
        key = tuple(sorted((str(d), float(w)) for d, w in raw.items()))
        if key not in self._mixes:
            if len(self._mixes) > 64:
                self._mixes.clear()
            self._mixes[key] = self._checked_mix(dict(key), position)
        return self._mixes[key]

    def _checked_mix(self, raw: dict[str, float], position: int) -> np.ndarray:
        unknown = sorted(set(raw) - set(self.domains))
        if unknown:
            raise DataError(
                f"the data mix at position {position:,} names domain(s) {', '.join(unknown)} that "
                f"{self.shards.path} lacks (it has {', '.join(self.domains)}); fix the mix weights or the data"
            )
        weights = np.array([raw.get(d, 0.0) for d in self.domains], dtype=np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise DataError(f"the data mix at position {position:,} has a negative or non-finite weight: {raw}; "
                            "use weights >= 0")
        if weights.sum() <= 0:
            raise DataError(
                f"the data mix at position {position:,} gives no weight to any domain of {self.shards.path}; "
                f"give at least one of {', '.join(self.domains)} a positive weight"
            )
        return _cumulative(weights / weights.sum())

    # ------------------------------------------------------------------ cutting
    def _plan(self, state: StreamState) -> _Plan:
        batch, seq_len = self.layout_at(state.position)
        n = len(self.domains)
        cumulative = self._mix_at(state.position)  # checked even with one domain: a typo fails early
        if n == 1:
            domains = np.zeros(batch, dtype=np.int64)
        else:
            domains = domain_of_samples(state.samples, batch, cumulative)
        counts = np.bincount(domains, minlength=n)
        positions = {d: state.domain_positions[d] + int(c) * seq_len for d, c in zip(self.domains, counts)}
        return _Plan(batch, seq_len, domains, counts,
                     StreamState(state.position + batch * seq_len, state.samples + batch, positions))

    def _gather(self, count: int, seq_len: int) -> np.ndarray:
        # Index of sample i's tokens inside a window of consecutive samples: i*L + [0, L].
        key = (count, seq_len)
        if key not in self._gathers:
            if len(self._gathers) > 256:
                self._gathers.clear()
            self._gathers[key] = (np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]).astype(
                np.int64
            )
        return self._gathers[key]

    def step_batch(self, state: StreamState | int) -> dict[str, torch.Tensor]:
        """This rank's part of the step that starts at ``state``.

        A bare position is accepted for a single-domain set, where it is the whole state.
        """
        if not isinstance(state, StreamState):
            if len(self.domains) != 1:
                raise DataError(f"{self.shards.path} has several domains; pass step_batch a StreamState, not a "
                                "position")
            state = StreamState(int(state), 0, {self.domains[0]: int(state)})
        return self._cut(state, self._plan(state))

    def _cut(self, state: StreamState, plan: _Plan) -> dict[str, torch.Tensor]:
        batch, L, n = plan.batch, plan.seq_len, len(self.domains)
        local = self.local if self.batch_schedule is None else local_rows(batch, L, self.micro_batch_size,
                                                                         self.dp_size)
        first = self.dp_rank * local
        mine = plan.domains[first : first + local]
        # Samples of domain d before this rank's first one: where its window starts in d's stream.
        before = np.bincount(plan.domains[:first], minlength=n)
        tokens = np.empty((local, L + 1), dtype=np.int64)
        doc_ids = np.empty((local, L + 1), dtype=np.int64)
        for d in np.unique(mine).tolist():
            rows = mine == d
            count = int(rows.sum())
            start = state.domain_positions[self.domains[d]] + int(before[d]) * L
            # One contiguous read covers all of this rank's samples of d (they overlap by one token).
            window, ids = self._views[d].window(start, count * L + 1)
            gather = self._gather(count, L)
            if count == local:
                tokens, doc_ids = window[gather], ids[gather]
            else:
                tokens[rows], doc_ids[rows] = window[gather], ids[gather]
            if n > 1:
                doc_ids[rows] = doc_ids[rows] * n + d
        shape = (local // self.micro_batch_size, self.micro_batch_size, L + 1)
        next_state = plan.next_state
        return {
            "tokens": torch.from_numpy(tokens.reshape(shape)),
            "doc_ids": torch.from_numpy(doc_ids.reshape(shape)),
            "position": torch.tensor(state.position, dtype=torch.long),
            "next_position": torch.tensor(next_state.position, dtype=torch.long),
            "next_samples": torch.tensor(next_state.samples, dtype=torch.long),
            "next_domain_positions": torch.tensor([next_state.domain_positions[d] for d in self.domains],
                                                  dtype=torch.long),
            "domain_tokens": torch.from_numpy(plan.counts.astype(np.int64) * L),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        step, state = 0, self.start_state
        while self.num_steps is None or step < self.num_steps:
            # Every worker walks all states (steps may differ in size and mix) and cuts its own.
            plan = self._plan(state)
            if step % stride == first:
                yield self._cut(state, plan)
            state = plan.next_state
            step += 1


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """Cumulative weights for ``domain_of_samples``: from the last positive weight on, ``inf``."""
    cumulative = np.cumsum(weights)
    last = int(np.flatnonzero(weights > 0)[-1])
    cumulative[last:] = np.inf
    return cumulative
