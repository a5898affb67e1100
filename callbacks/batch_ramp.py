"""Batch-size ramp: global batch tokens and sequence length as a function of tokens seen.

The paper (section 3.4.1) trains the 405B model with 4M-token batches of 4,096-token
sequences, 8M-token batches of 8,192 after 252M tokens, and 16M-token batches after
2.87T tokens. The ramp installs a pure function of the stream position into the data
module, so each step's shape follows from where the data stream stands: prefetching,
resuming and a change of parallel layout all cut exactly the same batches. The
LightningModule counts the targets of each batch, so the loss normalisation stays exact
when the micro-batch count changes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from recipe.data.stream import check_batch_layout as check_data_layout
from recipe.errors import ConfigError


@dataclass
class RampStage:
    """From ``tokens`` seen on: ``batch_tokens`` per optimizer step in ``seq_len``-token sequences."""

    tokens: int
    batch_tokens: int
    seq_len: int


class BatchSizeRamp(L.Callback):
    def __init__(self, stages: list[RampStage]) -> None:
        """Args: stages: ordered by ``tokens``; the first starts at 0."""
        if not stages:
            raise ConfigError("BatchSizeRamp needs at least one stage")
        stages = [s if isinstance(s, RampStage) else RampStage(**s) for s in stages]
        if stages[0].tokens != 0:
            raise ConfigError(f"the first ramp stage must start at tokens=0, got {stages[0].tokens}")
        for before, after in zip(stages, stages[1:]):
            if after.tokens <= before.tokens:
                raise ConfigError(
                    f"ramp thresholds must increase: {after.tokens:,} follows {before.tokens:,}; sort the stages"
                )
        for s in stages:
            if s.seq_len <= 0 or s.batch_tokens <= 0 or s.batch_tokens % s.seq_len:
                raise ConfigError(
                    f"ramp stage at {s.tokens:,} tokens: batch_tokens={s.batch_tokens:,} must be a positive "
                    f"multiple of seq_len={s.seq_len}"
                )
        self.stages = stages
        self._starts = [s.tokens for s in stages]

    def stage_at(self, tokens_seen: int) -> RampStage:
        return self.stages[bisect.bisect_right(self._starts, tokens_seen) - 1]

    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global_batch_size in sequences, seq_len)`` for a step starting at ``position``."""
        stage = self.stage_at(position)
        return stage.batch_tokens // stage.seq_len, stage.seq_len

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "batch_schedule"):
            raise ConfigError("BatchSizeRamp needs the recipe's TokenDataModule (data: section)")
        max_seq_len = pl_module.arch.max_seq_len
        for s in self.stages:
            if s.seq_len > max_seq_len:
                raise ConfigError(
                    f"ramp stage at {s.tokens:,} tokens uses seq_len={s.seq_len} above model.arch.max_seq_len="
                    f"{max_seq_len}; raise max_seq_len or shorten the stage"
                )
            check_data_layout(s.batch_tokens // s.seq_len, data.micro_batch_size, data.dp_size)
            check = getattr(pl_module, "check_batch_layout", None)
            if check is not None:
                check(s.batch_tokens // s.seq_len, s.seq_len)
        data.batch_schedule = self.layout_at

    def state_dict(self) -> dict[str, Any]:
        # The stage follows from the data position (saved by the data module); the stages
        # are kept to refuse a resume whose ramp differs from the one that was trained.
        return {"stages": [vars(s).copy() for s in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [RampStage(**s) for s in state_dict.get("stages", [])]
        if saved and saved != self.stages:
            rank_zero_warn("resuming with a batch-size ramp that differs from the checkpoint's; the new stages apply "
                           "from the checkpoint's data position on")
