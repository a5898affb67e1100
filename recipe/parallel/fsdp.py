"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over DP.

One FSDP unit per transformer block, one for the embedding, one for [norm, output],
then the root - so only one block's full parameters exist at a time. Gradients are
*summed* (divide factor 1): the loss is already normalised by the global token count,
which makes the summed gradient equal the single-process gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from recipe.model import Transformer

Precision = Literal["fp32", "bf16"]


def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction (the paper's numerics), or plain fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, precision: Precision = "fp32",
               reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place. ``dp_mesh`` is 1-D (FSDP) or 2-D (replicate, shard) for HSDP.

    Under pipeline parallelism pass ``reshard_after_forward=False``: a stage runs several
    micro-batches forward before their backward, and re-gathering the parameters for each
    backward would multiply the all-gather traffic.
    """
    kwargs = dict(mesh=dp_mesh, mp_policy=mixed_precision_policy(precision),
                  reshard_after_forward=reshard_after_forward)
    if model.tok_embeddings is not None:
        fully_shard(model.tok_embeddings, **kwargs)
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    head = [m for m in (model.norm, model.output) if m is not None]
    if head:
        # The last unit is needed right at the start of backward: never free it after forward.
        fully_shard(head, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and with a factor of 1 there is
            # nothing to pre-multiply anyway.
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (gradients accumulate unsharded)."""
    for module in modules:
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled)
