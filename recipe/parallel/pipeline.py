"""Pipeline parallelism on ``torch.distributed.pipelining``, equal to one process.

The model is cut into ``pp_size x stages_per_rank`` contiguous *virtual stages*; rank ``r``
owns stages ``r, r + pp, r + 2 pp, ...`` (the looped assignment every non-V schedule of
torch uses). Each stage is a copy of :class:`recipe.model.Transformer` that keeps only its
layers (``layers`` is a ModuleDict keyed by the *global* layer index, so parameter names
and therefore checkpoints do not depend on the layout) and sets ``tok_embeddings`` /
``norm`` / ``output`` to ``None`` where it does not own them; the model's own ``forward``
then treats its input as hidden states and skips the head.

The attention plan (``recipe/attention.py``: document layout and query positions, built on
the host) reaches every stage as a *keyword argument* of ``schedule.step`` (the way
torchtitan passes its attention masks): it is a pytree node whose leaf is the host document
ids, so the schedule splits it into micro-batches exactly like the inputs and hands
micro-batch ``i``'s plan to every local stage, and each stage attends exactly as the
single-process model does without sending anything through the pipeline's point-to-point
path. Every pipeline rank of a data-parallel group therefore gets the whole step batch
(tokens and doc ids), which it has anyway: the last stage needs the targets and the first
the inputs.

Loss contract: on the last stage each micro-batch contributes
``sum(token cross-entropy) / normalizer`` where ``normalizer`` is the number of target
tokens in the *global* batch (all data-parallel ranks). Schedules are built with
``scale_grads=False`` (torch's default divides the gradients by the number of
micro-batches, which is right only for a per-micro-batch *mean* loss), so the accumulated
gradient is exactly the single-process gradient of the global mean loss.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)

from recipe.attention import AttentionPlan
from recipe.errors import RecipeError
from recipe.parallel import collectives


class PipelineError(RecipeError):
    """A pipeline layout or schedule that cannot work."""


# Schedules that run one stage per rank, and looped ones that run several. Zero-bubble V
# schedules (ZBVZeroBubble, DualPipeV) place stages in a V, not looped: not offered.
SINGLE_STAGE_SCHEDULES: tuple[str, ...] = ("GPipe", "1F1B")
MULTI_STAGE_SCHEDULES: tuple[str, ...] = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
SCHEDULES: tuple[str, ...] = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES

# Transformer attributes that hold whole-model parts, owned by the first / last stage.
_FIRST_STAGE_PARTS: tuple[str, ...] = ("tok_embeddings",)
_LAST_STAGE_PARTS: tuple[str, ...] = ("norm", "output")


# ----------------------------------------------------------------------------- layout


def _even_shares(total: int, parts: int, extra_order: Sequence[int]) -> list[int]:
    """``total`` split into ``parts`` integers differing by at most one; the remainder
    goes, one each, to the parts in ``extra_order``."""
    shares = [total // parts] * parts
    for i in list(extra_order)[: total % parts]:
        shares[i] += 1
    return shares


def split_layers(n_layers: int, n_stages: int, first_last_fewer: bool = False) -> list[list[int]]:
    """Contiguous split of layer indices ``0..n_layers-1`` over ``n_stages`` virtual stages.

    Plain: as even as possible, the first stages taking the remainder
    (10 layers, 4 stages -> sizes 3, 3, 2, 2).

    ``first_last_fewer`` (the paper's choice): the embedding and the output head + loss
    each count as one layer of work, so the ``n_layers + 2`` units are split as evenly as
    possible - the remainder going to the middle stages first, since they carry neither -
    and the first and the last stage hold their share minus one layer
    (126 layers, 16 stages -> 7, 8 x 14, 7; 8 layers, 4 stages -> 1, 3, 3, 1;
    4 layers, 2 stages -> 2, 2). Every stage keeps at least one layer.
    """
    if n_layers < 1 or n_stages < 1:
        raise PipelineError(f"need at least one layer and one stage, got n_layers={n_layers}, n_stages={n_stages}")
    if not first_last_fewer:
        if n_stages > n_layers:
            raise PipelineError(
                f"cannot split {n_layers} layers into {n_stages} pipeline stages (pp_size x stages_per_rank); "
                f"use at most {n_layers} stages or a deeper model"
            )
        sizes = _even_shares(n_layers, n_stages, range(n_stages))
    else:
        needed = max(2 * n_stages - 2, n_stages)  # first/last share >= 2 so they keep a layer
        if n_layers < needed:
            raise PipelineError(
                f"cannot split {n_layers} layers into {n_stages} pipeline stages with first_last_fewer "
                f"(needs at least {needed} layers); use fewer stages (pp_size x stages_per_rank) "
                "or turn first_last_fewer off"
            )
        middle_first = [*range(1, n_stages - 1), 0, n_stages - 1]
        sizes = _even_shares(n_layers + 2, n_stages, middle_first)
        sizes[0] -= 1
        sizes[-1] -= 1
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int) -> list[int]:
    """Looped assignment: rank ``r`` owns virtual stages ``r, r + pp, r + 2 pp, ...``."""
    if not 0 <= pp_rank < pp_size:
        raise PipelineError(f"pp_rank={pp_rank} is outside 0..{pp_size - 1}")
    if stages_per_rank < 1:
        raise PipelineError(f"stages_per_rank must be at least 1, got {stages_per_rank}")
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def check_schedule(schedule: str, stages_per_rank: int) -> str:
    """The canonical schedule name, or a one-line error naming the valid choices."""
    canonical = {name.lower(): name for name in SCHEDULES}.get(schedule.lower())
    if canonical is None:
        raise PipelineError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if canonical in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        raise PipelineError(
            f"schedule {canonical} runs one stage per rank but stages_per_rank={stages_per_rank}; "
            f"set stages_per_rank=1 or pick one of {', '.join(MULTI_STAGE_SCHEDULES)}"
        )
    return canonical


# ----------------------------------------------------------------------------- stage modules


def _copy_without(model: nn.Module, dropped: Sequence[nn.Module]) -> nn.Module:
    """Deep copy of ``model`` in which every module of ``dropped`` becomes ``None``.

    Seeding deepcopy's memo with ``id(module) -> None`` means the dropped parts are never
    copied - a stage of a large real-weight model costs only its own parameters.
    """
    memo: dict[int, object] = {id(m): None for m in dropped}
    return copy.deepcopy(model, memo)


def build_stage_module(model: nn.Module, stage_index: int, n_stages: int, layer_ids: Sequence[int]) -> nn.Module:
    """One virtual stage: a copy of ``model`` keeping only ``layer_ids`` (and the embedding
    on the first stage, the final norm and output head on the last); names unchanged."""
    keep = {str(i) for i in layer_ids}
    dropped: list[nn.Module] = [layer for key, layer in model.layers.items() if key not in keep]
    if stage_index != 0:
        dropped += [getattr(model, name) for name in _FIRST_STAGE_PARTS if getattr(model, name) is not None]
    if stage_index != n_stages - 1:
        dropped += [getattr(model, name) for name in _LAST_STAGE_PARTS if getattr(model, name) is not None]
    stage = _copy_without(model, dropped)
    # The dropped layers are now ``None`` entries of the ModuleDict: remove the keys.
    for key in [k for k, layer in stage.layers.items() if layer is None]:
        del stage.layers[key]
    return stage


def build_stage_modules(model: nn.Module, pp_rank: int, pp_size: int, stages_per_rank: int = 1,
                        first_last_fewer: bool = False) -> list[tuple[int, nn.Module]]:
    """``(stage_index, module)`` for every virtual stage this pipeline rank owns.

    ``model`` is the full :class:`~recipe.model.Transformer` (on any device, ``meta``
    included: then materialise each stage with ``to_empty`` + ``init_weights``). It is not
    modified. Parameter names of each stage are a subset of the full model's.
    """
    n_stages = pp_size * stages_per_rank
    layer_keys = sorted(model.layers.keys(), key=int)
    if layer_keys != [str(i) for i in range(len(layer_keys))]:
        raise PipelineError(f"expected the full model with layers 0..n-1, got layer keys {layer_keys}")
    layout = split_layers(len(layer_keys), n_stages, first_last_fewer)
    return [(s, build_stage_module(model, s, n_stages, layout[s]))
            for s in stage_ids_for_rank(pp_rank, pp_size, stages_per_rank)]


# ----------------------------------------------------------------------------- loss


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies in fp32 (labels of -100 are not scored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """``sum(token cross-entropy) / normalizer`` in fp32 (the module's per-micro-batch loss)."""
    return cross_entropy_sum(logits, labels) / normalizer


def _as_group(pp_group: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    if isinstance(pp_group, DeviceMesh):
        if pp_group.ndim != 1:
            raise PipelineError(f"pass the 1-D pipeline sub-mesh (mesh['pp']), got a {pp_group.ndim}-D mesh")
        return pp_group.get_group()
    return pp_group


def broadcast_loss(loss: torch.Tensor | None, pp_group: dist.ProcessGroup | DeviceMesh,
                   src_group_rank: int | None = None) -> torch.Tensor:
    """The last stage's loss on every pipeline rank (rank 0 logs, the last stage knows it).

    ``src_group_rank``: the pipeline rank that holds the loss (default: the last one, which
    owns the last stage in the looped layout). Ranks without it pass ``None``. The result
    lies on the group's device.
    """
    group = _as_group(pp_group)
    if src_group_rank is None:
        src_group_rank = collectives.group_size(group) - 1
    if collectives.group_rank(group) == src_group_rank:
        if loss is None:
            raise PipelineError(f"pipeline rank {src_group_rank} should hold the loss but passed None")
        buf = loss.detach().float().reshape(())
    else:
        buf = torch.zeros((), dtype=torch.float32)
    return collectives.broadcast(buf, group, group_src=src_group_rank)


# ----------------------------------------------------------------------------- runner


@dataclass
class _Batch:
    """One step's batch flattened to rows, with the micro-batch count it splits into.

    ``stage_kwargs`` are row-aligned values every stage receives for its micro-batch
    (the attention plan, which the schedule splits by rows like a tensor).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    stage_kwargs: dict[str, Any]
    n_microbatches: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.n_microbatches, self.inputs.shape[0] // self.n_microbatches, self.inputs.shape[1])


class PipelineRunner:
    """Runs one optimizer step's forward + backward of a pipelined model.

    ``stages``: this rank's ``(stage_index, module)`` pairs from :func:`build_stage_modules`
    (after any TP/FSDP wrapping and materialisation). ``pp_group``: the pipeline process
    group or the 1-D ``pp`` sub-mesh. Every rank calls :meth:`step` with the same batch
    (that of its data-parallel group); gradients accumulate into the stage parameters'
    ``.grad`` (the caller zeroes them, reduces over DP, steps the optimizer).

    A torch schedule and its ``PipelineStage`` wrappers are fixed to one micro-batch count
    and one micro-batch shape (their receive buffers are sized on the first step by a
    metadata pass), while the batch-size ramp and sequence-length stages change both between
    steps: schedules are built on demand and cached by ``(n_microbatches, micro_batch,
    seq_len)``, the ``max_cached`` most recent kept. Building one costs a metadata
    forward/backward of one micro-batch that does not touch parameter gradients.
    """

    def __init__(self, stages: Sequence[tuple[int, nn.Module]], pp_group: dist.ProcessGroup | DeviceMesh,
                 schedule: str = "1F1B", n_microbatches: int | None = None,
                 device: torch.device | str | None = None, max_cached: int = 4,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        if not stages:
            raise PipelineError("a pipeline rank needs at least one stage")
        self.group = _as_group(pp_group)
        self.pp_size = dist.get_world_size(self.group)
        self.pp_rank = dist.get_rank(self.group)
        self.stage_ids = [s for s, _ in stages]
        self.modules = [m for _, m in stages]
        self.num_stages = self.pp_size * len(stages)
        expected = stage_ids_for_rank(self.pp_rank, self.pp_size, len(stages))
        if self.stage_ids != expected:
            raise PipelineError(
                f"pipeline rank {self.pp_rank} of {self.pp_size} must own stages {expected} (looped layout), "
                f"got {self.stage_ids}; build them with build_stage_modules"
            )
        self.schedule_name = check_schedule(schedule, len(stages))
        self.schedule_class = get_schedule_class(self.schedule_name)
        self.default_n_microbatches = n_microbatches
        self.device = torch.device(device) if device is not None else self._infer_device()
        self.max_cached = max_cached
        self._train: OrderedDict[tuple, _PipelineSchedule] = OrderedDict()
        self._eval: OrderedDict[tuple, _PipelineSchedule] = OrderedDict()
        self._normalizer: float | torch.Tensor = 1.0
        # Sum of the token losses of one micro-batch (the LightningModule's loss).
        self.loss_fn = loss_fn or cross_entropy_sum

    # -- who holds what

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def last_stage_rank(self) -> int:
        """Pipeline rank that owns the last stage (and therefore the loss)."""
        return (self.num_stages - 1) % self.pp_size

    def parameters(self):
        """Parameters of every local stage (what this rank's optimizer updates)."""
        for module in self.modules:
            yield from module.parameters()

    def named_parameters(self):
        """``(name, parameter)`` of every local stage, names as in the full model."""
        for module in self.modules:
            yield from module.named_parameters()

    # -- schedules

    def _infer_device(self) -> torch.device:
        param = next(self.modules[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if device.type == "meta":
            raise PipelineError("the stage modules are still on the meta device; materialise them before running")
        return device

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A bound method reading the current normalizer: cached schedules keep the function,
        # while the global token count changes every step.
        return self.loss_fn(logits, labels) / self._normalizer

    def _build(self, n_microbatches: int, train: bool) -> _PipelineSchedule:
        # Fresh PipelineStage wrappers per schedule: a stage's receive buffers and chunk count
        # belong to one micro-batch count and shape. The modules (and weights) are shared.
        stages = [PipelineStage(m, s, self.num_stages, self.device, group=self.group)
                  for s, m in zip(self.stage_ids, self.modules)]
        loss_fn = self._loss if train else None
        try:
            if issubclass(self.schedule_class, PipelineScheduleSingle):
                return self.schedule_class(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
            return self.schedule_class(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        except ValueError as err:  # e.g. 1F1B with fewer micro-batches than stages
            raise PipelineError(
                f"schedule {self.schedule_name} cannot run {n_microbatches} micro-batches on {self.num_stages} "
                f"stages ({err}); raise the micro-batch count or pick another schedule"
            ) from err

    def _schedule(self, key: tuple, train: bool) -> _PipelineSchedule:
        cache = self._train if train else self._eval
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = self._build(key[0], train)
            while len(cache) > self.max_cached:
                cache.popitem(last=False)
        return cache[key]

    # -- running

    def _prepare(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None, n_microbatches: int | None) -> _Batch:
        """Accept ``[rows, L+1]`` or ``[n_micro, mb, L+1]``; cut inputs, targets, doc ids."""
        if tokens.dim() == 3:
            if n_microbatches is not None and n_microbatches != tokens.shape[0]:
                raise PipelineError(
                    f"tokens hold {tokens.shape[0]} micro-batches but n_microbatches={n_microbatches}"
                )
            n_microbatches = tokens.shape[0]
            tokens = tokens.flatten(0, 1)
            doc_ids = doc_ids.flatten(0, 1) if doc_ids is not None else None
        elif tokens.dim() != 2:
            raise PipelineError(f"tokens must be [rows, L+1] or [n_micro, mb, L+1], got shape {tuple(tokens.shape)}")
        n_microbatches = n_microbatches or self.default_n_microbatches
        if n_microbatches is None:
            raise PipelineError("pass n_microbatches (or a [n_micro, mb, L+1] batch) to split a 2-D batch")
        if tokens.shape[0] % n_microbatches:
            raise PipelineError(
                f"{tokens.shape[0]} rows do not split into {n_microbatches} equal micro-batches; "
                "make the rows a multiple of n_microbatches"
            )
        if doc_ids is not None and doc_ids.shape != tokens.shape:
            raise PipelineError(f"doc_ids shape {tuple(doc_ids.shape)} differs from tokens {tuple(tokens.shape)}")
        # Contiguous slices: gloo refuses to send a strided tensor, and a custom stage that
        # forwards its inputs would otherwise fail only on the wire.
        tokens = tokens.to(self.device)
        docs = doc_ids[:, :-1].cpu() if doc_ids is not None else torch.zeros(tokens[:, :-1].shape, dtype=torch.long)
        kwargs = {"attention": AttentionPlan(docs)}
        return _Batch(inputs=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), stage_kwargs=kwargs,
                      n_microbatches=n_microbatches)

    def _run(self, schedule: _PipelineSchedule, batch: _Batch, train: bool) -> torch.Tensor | None:
        args = (batch.inputs,) if self.has_first_stage else ()
        kwargs = batch.stage_kwargs
        target = batch.labels if self.has_last_stage and train else None
        losses: list[torch.Tensor] | None = [] if self.has_last_stage and train else None
        outputs = schedule.step(*args, target=target, losses=losses, return_outputs=not train, **kwargs)
        if not train:
            return outputs if self.has_last_stage else None
        return torch.stack([loss.detach() for loss in losses]).sum() if losses is not None else None

    def step(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None, normalizer: float | torch.Tensor,
             n_microbatches: int | None = None) -> torch.Tensor | None:
        """Forward + backward of one step; gradients accumulate into the stage parameters.

        tokens, doc_ids: ``[n_micro * mb, L+1]`` or ``[n_micro, mb, L+1]`` (inputs are
        ``[:, :-1]``, targets ``[:, 1:]``, doc ids of the inputs ``[:, :-1]``); the same on
        every pipeline rank. ``normalizer``: target tokens in the global batch.
        Returns the summed loss (``sum CE / normalizer`` over all micro-batches) on the
        rank holding the last stage, ``None`` elsewhere (see :func:`broadcast_loss`).
        """
        batch = self._prepare(tokens, doc_ids, n_microbatches)
        self._normalizer = normalizer
        return self._run(self._schedule(batch.key, train=True), batch, train=True)

    def step_local(self, inputs: torch.Tensor, labels: torch.Tensor, n_microbatches: int,
                   normalizer: float | torch.Tensor, **stage_kwargs: Any) -> torch.Tensor | None:
        """:meth:`step` for inputs already cut by the caller, e.g. a context-parallel shard.

        inputs, labels: ``[rows, seq]``; each of ``stage_kwargs`` is row-aligned (``[rows, ...]``)
        and reaches every stage's ``forward`` as a keyword, split like the inputs.
        """
        if inputs.shape[0] % n_microbatches:
            raise PipelineError(f"{inputs.shape[0]} rows do not split into {n_microbatches} equal micro-batches")
        batch = _Batch(inputs=inputs.to(self.device).contiguous(), labels=labels.to(self.device).contiguous(),
                       stage_kwargs=_on_device(stage_kwargs, self.device), n_microbatches=n_microbatches)
        self._normalizer = normalizer
        return self._run(self._schedule(batch.key, train=True), batch, train=True)

    @torch.no_grad()
    def evaluate_local(self, inputs: torch.Tensor, labels: torch.Tensor, n_microbatches: int,
                       normalizer: float | torch.Tensor = 1.0, **stage_kwargs: Any) -> torch.Tensor | None:
        """:meth:`evaluate` for inputs already cut by the caller (see :meth:`step_local`)."""
        batch = _Batch(inputs=inputs.to(self.device).contiguous(), labels=labels.to(self.device).contiguous(),
                       stage_kwargs=_on_device(stage_kwargs, self.device), n_microbatches=n_microbatches)
        logits = self._run(self._schedule(batch.key, train=False), batch, train=False)
        return self.loss_fn(logits, batch.labels) / normalizer if logits is not None else None

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None, normalizer: float | torch.Tensor = 1.0,
                 n_microbatches: int | None = None) -> torch.Tensor | None:
        """Forward only: ``sum CE / normalizer`` on the last stage's rank, ``None`` elsewhere.

        Uses its own cached schedules, so alternating with :meth:`step` never re-runs the
        metadata pass (torch re-initialises a schedule whose mode flips).
        """
        batch = self._prepare(tokens, doc_ids, n_microbatches)
        logits = self._run(self._schedule(batch.key, train=False), batch, train=False)
        return self.loss_fn(logits, batch.labels) / normalizer if logits is not None else None


def _on_device(stage_kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved (contiguous: gloo refuses strided sends); attention plans stay on the host."""
    return {k: v.to(device).contiguous() if isinstance(v, torch.Tensor) else v for k, v in stage_kwargs.items()}


class StageUnion(nn.Module):
    """All stages of one pipeline rank under the full model's parameter names.

    Holds the *same* submodules as the stage modules (no copies), so the optimizer, the
    checkpoint and gradient clipping see ``layers.5.attention.wq.weight`` exactly as in
    the unsplit model, whatever the layout. It is a container: the pipeline runs the stages.
    """

    def __init__(self, stages: Sequence[tuple[int, nn.Module]]) -> None:
        super().__init__()
        modules = [m for _, m in stages]
        self.stages = list(stages)  # (stage index, module): what the pipeline schedule runs
        self.args = modules[0].args
        self.layers = nn.ModuleDict()
        for module in modules:
            for key, layer in module.layers.items():
                self.layers[key] = layer
        for part in _FIRST_STAGE_PARTS + _LAST_STAGE_PARTS:
            setattr(self, part, next((getattr(m, part) for m in modules if getattr(m, part) is not None), None))
