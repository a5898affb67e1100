"""Activation checkpointing: recompute a block's activations in backward instead of storing them.

Wraps the block's ``forward`` in place (an instance attribute), so module structure and
parameter names - and therefore checkpoints and FSDP units - stay exactly as they were.
"""

from __future__ import annotations

import functools
from typing import Literal

from torch.utils.checkpoint import checkpoint

from recipe.errors import ConfigError
from recipe.model import Transformer

CheckpointMode = Literal["none", "full", "selective"]


def apply_activation_checkpointing(model: Transformer, mode: CheckpointMode = "full", every_n: int = 2) -> int:
    """Checkpoint every block ("full") or every ``every_n``-th block by global index ("selective").

    Returns the number of blocks checkpointed. Apply after TP/CP and before FSDP.
    """
    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ConfigError(f"activation_checkpointing={mode!r}; use 'none', 'full' or 'selective'")
    if every_n < 1:
        raise ConfigError(f"activation_checkpointing_every_n={every_n} must be >= 1")
    count = 0
    for key, block in model.layers.items():
        if mode == "selective" and int(key) % every_n:
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        count += 1
    return count
