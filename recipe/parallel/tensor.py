"""Tensor parallelism (Megatron-style) with sequence parallel norms, via DTensor.

Attention and SwiGLU: the first projections are column-parallel (each TP rank owns a
slice of heads / of the FFN width), the last ones row-parallel, so each block costs one
all-gather and one reduce-scatter of activations. Between blocks the residual stream is
sharded over the sequence (SequenceParallel norms), which divides activation memory by
tp. The embedding is vocabulary-parallel; the output head is column-parallel over the
vocabulary and, with ``loss_parallel``, the cross-entropy runs on vocabulary shards so
full logits are never gathered.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from recipe.model import Transformer


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Shard ``model`` in place over ``tp_mesh`` (pipeline stages may lack embedding/head)."""
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)

    block_plan = {
        "attention_norm": SequenceParallel(),
        # Attention's inputs are (x, rope, mask): only x is a sharded activation.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
