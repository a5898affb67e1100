"""The recipe's plain configuration dataclasses: model shape, optimizer, LR schedule.

A leaf module: behaviour modules (the model, the LightningModule, checkpointing, the
planner) import these, never the other way round. LightningCLI builds them from the
``model:`` section of a YAML config.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recipe.errors import ConfigError, ModelConfigError


def read_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The parsed YAML file at ``path`` (``{}`` when empty), or a one-line ``ConfigError``
    naming ``what`` is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}; pass an existing YAML file to --config")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "invalid YAML"
        raise ConfigError(f"{path} is not valid YAML ({first}); fix the file") from None


ATTENTION_BACKENDS = ("auto", "dense", "segmented", "varlen", "flex")


@dataclass
class RopeScaling:
    """Llama 3.1 long-context frequency scaling (Meta's ``apply_scaling``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    # Depth-scaled init of the output projections (wo, w2, w3), as in torchtitan; False
    # uses one std for every layer.
    depth_init: bool = True
    init_std: float = 0.02
    # How attention runs (recipe/attention.py): auto | dense | segmented | varlen | flex.
    # Every backend gives the same result; auto picks the fastest exact one for the device.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ModelConfigError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "pick n_heads that divides dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                "GQA needs n_kv_heads to divide n_heads"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ModelConfigError(f"model.attention={self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}; "
                                   "auto picks the fastest exact backend for the device")
        if self.head_dim % 2:
            raise ModelConfigError(f"head dim {self.head_dim} (dim / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up to ``multiple_of``."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass
class OptimizerConfig:
    """AdamW. ``lr`` is the peak LR that the schedule scales."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool | None = None  # None: torch's default implementation (foreach)


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
