"""Every collective of the recipe goes through this module.

Why one module: NCCL takes CUDA tensors only, while gloo takes CPU and CUDA tensors
alike, so a CPU test suite cannot notice a CPU tensor handed to a collective that a GPU
run would reject at its first step. Here each function puts its tensor on the device of
the process group's backend (the current GPU for NCCL, the CPU for gloo) before it
communicates, and returns the result on that device.

Size-1 groups are *not* skipped: whenever a process group exists the collective runs,
so a one-GPU run under the 4D strategy reaches every call site (and every device
mistake) that a multi-GPU run does. Without any process group (one process, no
strategy world) the functions return their input unchanged.

``tests/test_collectives.py`` fails when code in ``recipe/`` or ``callbacks/`` calls a
collective anywhere else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

Group = dist.ProcessGroup | DeviceMesh | None
"""A process group, a 1-D device mesh, or None for the default (world) group."""

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    """Whether a default process group exists (False in a plain one-process run)."""
    return dist.is_available() and dist.is_initialized()


def process_group(group: Group) -> dist.ProcessGroup | None:
    """The process group behind ``group`` (a 1-D mesh gives its group; None the world)."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"collectives take a 1-D device mesh, got a {group.ndim}-D one")
        return group.get_group()
    return group


def group_device(group: Group = None) -> torch.device:
    """Where the backend of ``group`` expects tensors: the current GPU for NCCL, else the CPU."""
    backend = str(dist.get_backend(process_group(group)))
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def group_size(group: Group = None) -> int:
    return dist.get_world_size(process_group(group)) if initialized() else 1


def group_rank(group: Group = None) -> int:
    return dist.get_rank(process_group(group)) if initialized() else 0


def _on_group_device(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    device = group_device(group)
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def all_reduce(tensor: torch.Tensor, group: Group = None, op: str = "sum") -> torch.Tensor:
    """``op`` ("sum", "max", "min") of ``tensor`` over ``group``, as a new tensor on the group's device."""
    if not initialized():
        return tensor.clone()
    out = _on_group_device(tensor, group)
    out = out.clone() if out is tensor else out
    dist.all_reduce(out, op=_OPS[op], group=process_group(group))
    return out


def broadcast(tensor: torch.Tensor, group: Group = None, group_src: int = 0) -> torch.Tensor:
    """``tensor`` of the rank ``group_src`` of ``group`` on every rank (a new tensor on the group's device)."""
    if not initialized():
        return tensor.clone()
    out = _on_group_device(tensor, group)
    out = out.clone() if out is tensor else out
    dist.broadcast(out, group=process_group(group), group_src=group_src)
    return out


def all_gather(tensor: torch.Tensor, group: Group = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in group-rank order; not differentiable."""
    if not initialized():
        return [tensor]
    local = _on_group_device(tensor, group).contiguous()
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local, group=process_group(group))
    return parts


def all_gather_autograd(tensor: torch.Tensor, dim: int, group: Group | str) -> torch.Tensor:
    """Differentiable all-gather along ``dim`` in group-rank order (backward: reduce-scatter, sum).

    ``group`` may be a group name, so that modules holding it stay deep-copyable. The
    tensor stays where it is: this runs inside the model, on the device of the activations.
    """
    if isinstance(group, DeviceMesh):
        group = process_group(group)
    return funcol.all_gather_single_autograd(tensor.contiguous(), dim, group)


def barrier(group: Group = None) -> None:
    if initialized():
        dist.barrier(group=process_group(group))


def all_gather_object(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=process_group(group))
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` on global rank ``dst`` (None elsewhere)."""
    if not initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group``."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=process_group(group))
    return box[0]


def ddp_sum_hook(group, bucket):  # no annotations: DDP checks them, and these would be strings
    """A DDP communication hook that *sums* gradients instead of averaging them (``group``:
    the DDP process group or None for the world; ``bucket``: a ``dist.GradBucket``).

    The recipe's loss is already divided by the global token count, so the sum of the
    ranks' gradients is the one-process gradient; DDP's default mean would halve it on two
    ranks (and silently weaken gradient clipping).
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
