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
from collections.abc import Iterator

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
        # Index of sample k's tokens inside this rank's window: k*L + [0, L].
        self._gather = (np.arange(self.local)[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]).astype(
            np.int64
        )

    @property
    def tokens_per_step(self) -> int:
        """Global tokens consumed by one optimizer step (all ranks together)."""
        return self.global_batch_size * self.seq_len

    def position_of_step(self, step: int) -> int:
        """Global token offset where step ``step`` (counted from ``start_position``) starts."""
        return self.start_position + step * self.tokens_per_step

    def step_batch(self, position: int) -> dict[str, torch.Tensor]:
        """This rank's part of the step that starts at global offset ``position``."""
        L = self.seq_len
        first = position + self.dp_rank * self.local * L
        # One contiguous read covers all of this rank's samples (they overlap by one token).
        tokens, doc_ids = self.shards.window(first, self.local * L + 1)
        shape = (self.local // self.micro_batch_size, self.micro_batch_size, L + 1)
        return {
            "tokens": torch.from_numpy(tokens[self._gather].reshape(shape)),
            "doc_ids": torch.from_numpy(doc_ids[self._gather].reshape(shape)),
            "position": torch.tensor(position, dtype=torch.long),
            "next_position": torch.tensor(position + self.tokens_per_step, dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        step, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        while self.num_steps is None or step < self.num_steps:
            yield self.step_batch(self.position_of_step(step))
            step += stride
