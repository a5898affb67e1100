"""Tokens per second, model TFLOP/s per device and MFU of the training loop.

Counts the *global* tokens the module reports (``tokens_seen``: every data-parallel rank's
tokens, each counted once whatever the tensor/pipeline/context split), so the figures stay
right under any parallel layout - unlike Lightning's ``ThroughputMonitor``, which counts
samples per rank and over-counts by tp x pp x cp. Times whole steps (data loading and
logging included) between consecutive batch ends; validation pauses the clock.

Logged each step once ``window`` steps (at least two batch ends) are timed:

- ``train/tokens_per_sec``: global tokens per second (progress bar).
- ``train/tflops_per_device``: model FLOP/s per process / 1e12 =
  ``tokens_per_sec x flops_per_token / world_size / 1e12``, with
  ``recipe.flops.flops_per_token`` (6 x matmul weights + causal attention) at the batch's
  sequence length. Every process is one device. If the sequence length changes inside
  the window (context-length stages), each step's tokens count at their own length.
- ``train/mfu``: ``tflops_per_device / peak`` and ``train/peak_tflops``, when a peak is
  known: ``peak_flops_per_device`` (FLOP/s, or a device name of
  ``recipe.flops.DEVICE_PEAK_FLOPS``), else measured once when training starts with
  ``measure_peak=True`` (fp32 GEMM rate of this process: the CPU's practical peak; all
  ranks measure at once, so ranks sharing a CPU each get their share; rank 0's figure is
  used everywhere). The measured peak is saved in the callback state, so a resumed run
  does not measure again.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L

from recipe.errors import ConfigError
from recipe.flops import flops_per_token, measured_peak_flops, peak_flops


class TokenThroughput(L.Callback):
    def __init__(self, window: int = 10, peak_flops_per_device: float | str | None = None,
                 measure_peak: bool = False) -> None:
        """
        Args:
            window: steps averaged for the logged rates (the first step is never timed alone).
            peak_flops_per_device: peak FLOP/s of one device (e.g. 989e12 for H100 SXM bf16),
                or a name from ``recipe.flops.DEVICE_PEAK_FLOPS`` ("h100-sxm", "a100" ...).
                Enables ``train/mfu``; takes precedence over ``measure_peak``.
            measure_peak: without a given peak, time an fp32 matmul once at the start of
                training and use it as the peak (the CPU case).
        """
        if window < 1:
            raise ConfigError(f"TokenThroughput window must be >= 1, got {window}")
        self.window = window
        self.peak_flops_per_device = _as_peak(peak_flops_per_device)
        self.measure_peak = measure_peak
        self.measured_peak: float | None = None
        # (time, global tokens, global model FLOPs) at each batch end.
        self._samples: deque[tuple[float, int, float]] = deque(maxlen=window + 1)
        self._flops_total = 0.0
        self._fpt_cache: dict[int, float] = {}

    @property
    def peak(self) -> float | None:
        """Peak FLOP/s per device used for MFU (None: MFU is not logged)."""
        return self.peak_flops_per_device if self.peak_flops_per_device is not None else self.measured_peak

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here rather than on_fit_start: model-parallel strategies restore callback state
        # after on_fit_start, and a resumed run must not measure again.
        if self.measure_peak and self.peak is None:
            self.measured_peak = self._measure(trainer)
        self._samples.clear()
        self._mark(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restart the window: time spent validating is not training throughput.
        if trainer.training:
            self._samples.clear()
            self._mark(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        fpt = self._flops_per_token(pl_module, batch)
        if fpt is not None and self._samples:
            new_tokens = int(getattr(pl_module, "tokens_seen", 0)) - self._samples[-1][1]
            self._flops_total += new_tokens * fpt
        self._mark(pl_module)
        if len(self._samples) < 2:
            return
        (t0, n0, f0), (t1, n1, f1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return
        pl_module.log("train/tokens_per_sec", (n1 - n0) / (t1 - t0), prog_bar=True)
        if fpt is None:
            return
        per_device = (f1 - f0) / (t1 - t0) / max(int(trainer.world_size), 1)
        pl_module.log("train/tflops_per_device", per_device / 1e12)
        peak = self.peak
        if peak is not None:
            pl_module.log("train/peak_tflops", peak / 1e12)
            pl_module.log("train/mfu", per_device / peak)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"measured_peak": self.measured_peak}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_peak = state_dict.get("measured_peak")

    # ------------------------------------------------------------------ helpers

    def _mark(self, pl_module: L.LightningModule) -> None:
        self._samples.append((time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0)), self._flops_total))

    def _flops_per_token(self, pl_module: L.LightningModule, batch: Any) -> float | None:
        """Training FLOPs per token of this batch; None without a model shape or token batch."""
        arch = getattr(pl_module, "arch", None)
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if arch is None or tokens is None:
            return None
        seq_len = int(tokens.shape[-1]) - 1  # rows carry seq_len + 1 ids (inputs and targets)
        if seq_len not in self._fpt_cache:
            self._fpt_cache[seq_len] = flops_per_token(arch, seq_len)
        return self._fpt_cache[seq_len]

    @staticmethod
    def _measure(trainer: L.Trainer) -> float:
        from recipe.parallel import collectives

        collectives.barrier()  # all ranks at once: ranks sharing a CPU share it
        return float(collectives.broadcast_object(measured_peak_flops(), src=0))


def _as_peak(value: float | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return peak_flops(value)
    if not value > 0:
        raise ConfigError(f"peak_flops_per_device must be positive FLOP/s, got {value}")
    return float(value)
