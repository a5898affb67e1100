"""Global gradient-norm clipping for parameters spread over several meshes.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails when DTensor
gradients live on different meshes (TP + FSDP mixes 1-D and 2-D ones). Here the squared
norm is summed per mesh (DTensor reductions resolve the sharded dimensions), the groups
are added, and the total is summed across pipeline stages, which own disjoint parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def total_grad_norm(parameters: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the model, identical on every rank."""
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    squared = torch.zeros((), dtype=torch.float64)
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.double().cpu() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(squared, group=pp_group)
    return squared.sqrt().float()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None,
                   pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip all gradients to a global norm of ``max_norm`` (None: only measure); return the norm."""
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params, pp_group)
    if max_norm is not None and params:
        # torch's rule (coefficient max_norm / (norm + 1e-6), capped at 1), applied with a
        # Python float so that DTensor and plain gradients scale alike.
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)
    return norm
