"""Activation checkpointing: recompute a block's activations in backward instead of storing them.

Wraps the block's ``forward`` in place (an instance attribute), so module structure and
parameter names - and therefore checkpoints and FSDP units - stay exactly as they were.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

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
        block.forward = _checkpointed(block.forward)
        count += 1
    return count


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    # A plain function rather than functools.partial: torch.compile recognises a call of
    # ``checkpoint`` inside a traced function, not one hidden in a partial object.
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
