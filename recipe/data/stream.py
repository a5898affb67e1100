"""The per-data-parallel-rank token stream: step batches cut from one endless epoch.

Exact semantics (tests rely on them):

* A step that starts at global token offset ``p`` is ``global_batch_size`` samples;
  global sample ``j`` covers offsets ``[p + j*L, p + j*L + L + 1)`` with ``L = seq_len``:
  ``L`` inputs plus one extra token for the shifted targets, so consecutive samples
  overlap by one token and every token is an input exactly once.
* The step consumes ``global_batch_size * L`` tokens; the next starts there.
* Rank ``r`` of ``dp_size`` owns samples ``[r*local, (r+1)*local)``,
  ``local = global_batch_size // dp_size``, split into micro-batches.

The only state is the global position, so a checkpoint taken under one DP size
resumes under another: restart with ``start_position`` = the saved position.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recipe.data.errors import DataError
from recipe.data.shards import ShardSet

__all__ = ["TokenStream", "check_batch_layout"]


def check_batch_layout(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Validate the batch layout; return the per-rank sample count ``local``."""
    if global_batch_size < 1 or micro_batch_size < 1 or dp_size < 1:
        raise DataError(
            f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size} and "
            f"dp_size={dp_size} must all be >= 1"
        )
    if global_batch_size % dp_size:
        raise DataError(
            f"global_batch_size={global_batch_size} is not divisible by the data-parallel size {dp_size}; "
            f"choose a global_batch_size that is a multiple of {dp_size}"
        )
    local = global_batch_size // dp_size
    if local % micro_batch_size:
        raise DataError(
            f"global_batch_size={global_batch_size} / dp_size={dp_size} = {local} sequences per rank is not a "
            f"multiple of micro_batch_size={micro_batch_size}; make global_batch_size a multiple of "
            f"dp_size x micro_batch_size = {dp_size * micro_batch_size}"
        )
    return local


class TokenStream(IterableDataset):
    """Endless (or ``num_steps``-long) stream of step batches for one DP rank.

    Each item is a dict:
      ``tokens``, ``doc_ids``: LongTensor ``[n_micro, micro_batch_size, seq_len + 1]``
      (micro-batch ``i`` is ``tokens[i]``; inputs ``[:, :-1]``, targets ``[:, 1:]``,
      document ids of the inputs ``doc_ids[i][:, :-1]``);
      ``position`` / ``next_position``: LongTensor scalars, the global token offsets
      where this step starts and where the next one starts.

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
    ) -> None:
        super().__init__()
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.local = check_batch_layout(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if start_position < 0:
            raise DataError(f"start_position must be >= 0, got {start_position}")
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
        self.start_position = int(start_position)
        self.num_steps = num_steps
        # (global_batch_size, seq_len) of the step starting at a position: a batch-size ramp
        # or context-length stage plugs in here. A pure function of the position, so a
        # resumed (or prefetched) stream cuts exactly the same batches.
        self.batch_schedule = batch_schedule
        self._gathers: dict[tuple[int, int], np.ndarray] = {}

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
        position = self.start_position
        for _ in range(step):
            position += self.step_tokens(position)
        return position

    def _gather(self, local: int, seq_len: int) -> np.ndarray:
        # Index of sample k's tokens inside this rank's window: k*L + [0, L].
        key = (local, seq_len)
        if key not in self._gathers:
            self._gathers[key] = (np.arange(local)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]).astype(np.int64)
        return self._gathers[key]

    def step_batch(self, position: int) -> dict[str, torch.Tensor]:
        """This rank's part of the step that starts at global offset ``position``."""
        batch, L = self.layout_at(position)
        local = self.local if self.batch_schedule is None else check_batch_layout(batch, self.micro_batch_size,
                                                                                 self.dp_size)
        first = position + self.dp_rank * local * L
        # One contiguous read covers all of this rank's samples (they overlap by one token).
        tokens, doc_ids = self.shards.window(first, local * L + 1)
        shape = (local // self.micro_batch_size, self.micro_batch_size, L + 1)
        gather = self._gather(local, L)
        return {
            "tokens": torch.from_numpy(tokens[gather].reshape(shape)),
            "doc_ids": torch.from_numpy(doc_ids[gather].reshape(shape)),
            "position": torch.tensor(position, dtype=torch.long),
            "next_position": torch.tensor(position + batch * L, dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        step, position = 0, self.start_position
        while self.num_steps is None or step < self.num_steps:
            # Every worker walks all positions (steps may differ in size) and cuts its own.
            if step % stride == first:
                yield self.step_batch(position)
            position += self.step_tokens(position)
            step += 1
