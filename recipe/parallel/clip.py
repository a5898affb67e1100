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
from torch.distributed.tensor import DTensor

from recipe.parallel import collectives
from recipe.parallel.collectives import Group


def total_grad_norm(parameters: Iterable[torch.nn.Parameter], pp_group: Group = None) -> torch.Tensor:
    """L2 norm of all gradients of the model, identical on every rank (fp32, on the gradients' device)."""
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    device = None
    for p in parameters:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
            device = device or p.grad.device
    squared = torch.zeros((), dtype=torch.float64, device=device)
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.double() ** 2
    if pp_group is not None:
        # Stages own disjoint parameters: their squared norms add up.
        squared = collectives.all_reduce(squared, pp_group)
    return squared.sqrt().float()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None,
                   pp_group: Group = None) -> torch.Tensor:
    """Clip all gradients to a global norm of ``max_norm`` (None: only measure); return the norm.

    torch's rule (coefficient ``max_norm / (norm + 1e-6)``, capped at 1), applied as a
    device tensor: no host synchronisation, and a coefficient of exactly 1 leaves the
    gradients unchanged.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params, pp_group)
    if max_norm is not None and params:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            # DTensor gradients scale shard by shard: the coefficient is the same everywhere.
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            by_device[local.device].append(local)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, coef.to(device))
    return norm
