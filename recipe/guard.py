"""Step guards: skip optimizer steps with non-finite loss or gradients, and watch for loss spikes.

At scale a single bad batch (or a numerical accident) can put NaNs into every weight in
one step. The guard looks at the step's global loss and gradient norm - both reduced
over every rank, so all ranks reach the same verdict without extra communication -
before the optimizer touches the weights:

* a non-finite loss or gradient norm skips the step: no optimizer update, gradients
  dropped. The batch is consumed and the step keeps its slot in the run plan
  (``recipe.plan``), whose one clock is the data position: the LR, annealing, data mix,
  context stages, Polyak start and the run's end all follow the position, so the steps
  after a skip get exactly the schedule they would have had without it, and the weights
  are those of a run whose data lacked that batch;
* ``max_consecutive_skips`` skipped steps in a row stop the run with a clear error
  (something is wrong beyond one batch);
* a finite loss above ``spike_factor`` x the median of the last ``spike_window`` losses
  is a spike: counted and logged, and skipped too when ``skip_spikes`` is set.

The counters and the loss window are saved with the checkpoint, so a resumed run judges
spikes against the same history.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from recipe.errors import ConfigError, RecipeError


class TrainingDivergedError(RecipeError):
    """Too many consecutive steps had to be skipped."""


@dataclass
class StepGuard:
    """Skip non-finite steps; detect (and optionally skip) loss spikes."""

    max_consecutive_skips: int = 5
    spike_factor: float | None = None
    spike_window: int = 50
    skip_spikes: bool = False
    skipped_steps: int = field(default=0, init=False)
    consecutive_skips: int = field(default=0, init=False)
    spikes: int = field(default=0, init=False)
    recent: deque = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"guard.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise ConfigError(f"guard.spike_factor must be > 1 (a multiple of the median loss), got "
                              f"{self.spike_factor}")
        if self.spike_window < 3:
            raise ConfigError(f"guard.spike_window must be >= 3 steps, got {self.spike_window}")
        self.recent = deque(maxlen=self.spike_window)

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` is a spike against the running median (needs a full window)."""
        if self.spike_factor is None or len(self.recent) < self.recent.maxlen:
            return False
        return loss > self.spike_factor * statistics.median(self.recent)

    def check(self, loss: float, grad_norm: float, where: str) -> tuple[bool, str | None]:
        """``(skip, reason)`` for a step; raises after too many consecutive skips."""
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        elif self.is_spike(loss):
            self.spikes += 1
            if self.skip_spikes:
                reason = f"loss spike ({loss:.4g} > {self.spike_factor:g} x median {statistics.median(self.recent):.4g})"
        if reason is None:
            self.consecutive_skips = 0
            self.recent.append(loss)
            return False, None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDivergedError(
                f"{self.consecutive_skips} consecutive steps were skipped (last: {reason} {where}); the run has "
                "diverged - resume from an earlier checkpoint with a lower LR, or inspect the data at that position"
            )
        return True, reason

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "spikes": self.spikes, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.spikes = int(state.get("spikes", 0))
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.spike_window)
