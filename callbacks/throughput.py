"""Tokens per second of the training loop, as the user experiences it.

Counts the *global* tokens the module reports (``tokens_seen``), so the figure stays
right under any parallel layout, and times whole steps (data loading and logging
included) between consecutive batch ends; validation pauses the clock.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L


class TokenThroughput(L.Callback):
    def __init__(self, window: int = 10) -> None:
        """Args: window: steps averaged for the logged rate (the first step is never timed alone)."""
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def _mark(self, pl_module: L.LightningModule) -> None:
        self._samples.append((time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0))))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples.clear()
        self._mark(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restart the window: time spent validating is not training throughput.
        if trainer.training:
            self._samples.clear()
            self._mark(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._mark(pl_module)
        if len(self._samples) < 2:
            return
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 > t0:
            pl_module.log("train/tokens_per_sec", (n1 - n0) / (t1 - t0), prog_bar=True)
