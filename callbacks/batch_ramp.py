"""Batch-size ramp: global batch tokens and sequence length as a function of the data position.

The paper (section 3.4.1) trains the 405B model with 4M-token batches of 4,096-token
sequences, 8M-token batches of 8,192 after 252M tokens, and 16M-token batches after
2.87T tokens. This callback holds those settings; the run plan (``recipe.plan``) reads
them, and the data stream asks the plan for the layout of the step that starts at each
position, so prefetching, resuming and a change of parallel layout all cut exactly the
same batches. The LightningModule counts the targets of each batch, so the loss
normalisation stays exact when the micro-batch count changes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from recipe.plan import RampSettings, RampStage

__all__ = ["BatchSizeRamp", "RampStage"]


class BatchSizeRamp(L.Callback):
    def __init__(self, stages: list[RampStage]) -> None:
        """Args: stages: ordered by ``tokens`` (data position); the first starts at 0."""
        self.run_plan_settings = RampSettings(list(stages))
        self.stages = self.run_plan_settings.stages

    def stage_at(self, position: int) -> RampStage:
        return self.run_plan_settings.stage_at(position)

    def layout_at(self, position: int) -> tuple[int, int]:
        """``(global_batch_size in sequences, seq_len)`` for a step starting at ``position``."""
        return self.run_plan_settings.layout_at(position)

    def state_dict(self) -> dict[str, Any]:
        # The stage follows from the data position (saved by the data module); the stages
        # are kept to warn when a resume changes the ramp.
        return {"stages": [asdict(s) for s in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [RampStage(**s) for s in state_dict.get("stages", [])]
        if saved and saved != self.stages:
            rank_zero_warn("resuming with a batch-size ramp that differs from the checkpoint's; the new stages apply "
                           "from the checkpoint's data position on")
