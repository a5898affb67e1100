"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

from recipe.errors import ConfigError


@dataclass
class LRSchedule:
    """Peak LR comes from the optimizer config; this shapes it over optimizer steps.

    Defaults are the paper's 405B run: 8,000 warm-up steps, cosine to 8e-7 over 1.2M steps.
    """

    warmup_steps: int = 8000
    decay_steps: int = 1_200_000
    min_lr: float = 8e-7

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps <= 0:
            raise ConfigError(
                f"lr_schedule needs warmup_steps >= 0 and decay_steps > 0, got {self.warmup_steps} and "
                f"{self.decay_steps}; fix model.lr_schedule in the config"
            )

    def lr_at(self, step: int, peak_lr: float) -> float:
        """LR for optimizer step ``step`` (0-based): the first step already has a non-zero LR."""
        if step < self.warmup_steps:
            return peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
