"""The step path: how one optimizer step's forward and backward run under a strategy.

The LightningModule knows the model, the optimizer and the loss of one micro-batch; this
object knows the layout. It cuts each micro-batch for this rank (inputs, targets and the
document ids, or under context parallelism the rank's sequence shard with its positions
and mask), runs the micro-batches - a plain loop that lets gradients synchronise on the
last one only, or the pipeline schedule - and provides the global sums (loss, token
counts) and the global gradient norm. One path serves one process, plain DDP, FSDP,
HSDP and every 4D layout: the layouts differ only in the groups and the pipeline given
to the constructor.

Loss contract: every micro-batch contributes ``sum(token CE) / normalizer`` where
``normalizer`` is the number of targets in the *global* batch. Gradients are *summed*
over data-parallel ranks (FSDP's divide factor is 1; DDP gets a summing communication
hook), so every layout gets the one-process gradient of the global mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from recipe.attention import AttentionPlan
from recipe.errors import ConfigError
from recipe.parallel import collectives
from recipe.parallel.clip import clip_grad_norm
from recipe.parallel.collectives import Group
from recipe.parallel.mesh import ParallelDims


class StepModule(Protocol):
    """What the step path needs of the LightningModule."""

    model: nn.Module | None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def manual_backward(self, loss: torch.Tensor) -> None: ...


def as_local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (the loss under loss_parallel) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def host_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document ids on the host, where attention plans are built (the recipe's data module
    keeps them there; ids a custom one moved to the device cost one wait per step)."""
    return doc_ids if doc_ids.device.type == "cpu" else doc_ids.cpu()


def masked_targets(targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Targets with the unscored ones set to cross-entropy's ignore index."""
    return targets if loss_mask is None else targets.masked_fill(~loss_mask.bool(), -100)


class StepPath:
    """Runs the micro-batches of a step and reduces what the step reports.

    Args:
        dims: the resolved parallel sizes (all 1 for one process; ``dp_replicate`` = world
            for plain DDP).
        device: this rank's device.
        data_group: the ranks that hold different tokens (data x context parallel); sums
            of losses and token counts run over it. None: the default group, when one exists.
        pp_group: the pipeline ranks (losses live on the last stage; gradient norms are
            summed over stages). None without a pipeline axis.
        cp_group: the context-parallel ranks, to cut sequence shards; None when cp is 1.
        loss_parallel: cross-entropy on vocabulary-sharded logits (tensor parallelism).
        reduce_every_micro_batch: let FSDP reduce-scatter after every micro-batch.
        pp_schedule, pp_stages_per_rank: the pipeline schedule (when the model is split).
        parallelize: applies the strategy's parallelisms to the meta-device model.
        ddp_model: returns the DDP wrapper of a plain-DDP strategy (its ``no_sync`` and
            communication hook), None otherwise.
    """

    def __init__(
        self,
        dims: ParallelDims,
        device: torch.device,
        *,
        data_group: Group = None,
        pp_group: Group = None,
        cp_group: Group = None,
        loss_parallel: bool = False,
        reduce_every_micro_batch: bool = False,
        pp_schedule: str = "1F1B",
        pp_stages_per_rank: int = 1,
        parallelize: Callable[[nn.Module], nn.Module] | None = None,
        ddp_model: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.dims = dims
        self.device = torch.device(device)
        self.data_group = data_group
        self.pp_group = pp_group
        self.cp_group = cp_group
        self.loss_parallel = loss_parallel
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.pp_schedule = pp_schedule
        self.pp_stages_per_rank = pp_stages_per_rank
        self._parallelize = parallelize
        self._ddp_model = ddp_model
        self._ddp_hooked = False
        self.pipeline = None  # a PipelineRunner once a split model is attached
        self._sharded: list[nn.Module] = []

    # ------------------------------------------------------------------ model

    def parallelize(self, model: nn.Module) -> nn.Module:
        """The meta-device model with the strategy's parallelisms applied (itself on one device)."""
        return self._parallelize(model) if self._parallelize is not None else model

    @staticmethod
    def model_parts(model: nn.Module) -> list[nn.Module]:
        """The modules that own buffers and a full forward: the model, or this rank's pipeline stages."""
        stages = getattr(model, "stages", None)
        return [module for _, module in stages] if stages else [model]

    def attach(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Adopt the materialised model: build the pipeline schedule runner over its stages."""
        from torch.distributed.fsdp import FSDPModule

        self._sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        stages = getattr(model, "stages", None)
        if stages:
            from recipe.parallel.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(stages, self.pp_group, schedule=self.pp_schedule, device=self.device,
                                           loss_fn=loss)

    def check_batch(self, batch_size: int, seq_len: int, micro_batch_size: int) -> int:
        """The batch-layout rule of this layout (one-line error); micro-batches per rank."""
        return self.dims.check_batch(batch_size, seq_len, micro_batch_size, self.pp_schedule, self.pp_stages_per_rank)

    # ------------------------------------------------------------------ cutting

    def cut(self, tokens: torch.Tensor, doc_ids: torch.Tensor,
            loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """This rank's ``(inputs, targets, model keywords)`` of rows ``[rows, seq_len + 1]``.

        ``doc_ids`` are host tensors: the micro-batch's attention plan (which every layer,
        and under pipeline parallelism every stage, reuses) is built from them without
        waiting on the device. It carries the queries' positions too, so a later pipeline
        stage, which sees only hidden states, still knows where its tokens sit.
        """
        inputs, targets = tokens[:, :-1], masked_targets(tokens[:, 1:], loss_mask)
        docs = doc_ids[:, :-1]
        if self.cp_group is not None:
            from recipe.parallel.context import shard_for_context_parallel

            local = shard_for_context_parallel(inputs, targets, docs, self.cp_group)
            return local["tokens"], local["targets"], {"attention": local["attention"]}
        return inputs, targets, {"attention": AttentionPlan(docs)}

    # ------------------------------------------------------------------ running

    def _loss_context(self) -> contextlib.AbstractContextManager:
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Let data-parallel gradients synchronise in this backward, or only accumulate."""
        if self._ddp_model is not None:
            with contextlib.nullcontext() if enabled else self._ddp_model().no_sync():
                yield
            return
        for module in self._sharded:
            module.set_requires_gradient_sync(enabled)
        yield

    def _prepare_ddp(self) -> None:
        if self._ddp_model is None or self._ddp_hooked:
            return
        try:
            self._ddp_model().register_comm_hook(state=None, hook=collectives.ddp_sum_hook)
        except RuntimeError as err:
            raise ConfigError(f"the DDP strategy already has a communication hook ({err}); the recipe needs its "
                              "summing hook: drop the strategy's ddp_comm_hook") from None
        self._ddp_hooked = True

    def global_targets(self, tokens: torch.Tensor) -> int:
        """Targets of the global batch: this rank's rows times the data-parallel ranks."""
        return tokens[..., 1:].numel() * self.dims.dp

    def train(self, module: StepModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of every micro-batch; the global loss (a device tensor).

        ``batch``: ``tokens`` and ``doc_ids`` ``[n_micro, micro_batch, seq_len + 1]``.
        Gradients accumulate into the parameters; the caller clips and steps.
        """
        self._prepare_ddp()
        tokens, doc_ids = batch["tokens"], host_ids(batch["doc_ids"])
        normalizer = self.global_targets(tokens)
        n_micro = tokens.shape[0]
        local = torch.zeros((), device=self.device)
        with self._loss_context():
            if self.pipeline is not None:
                # The schedule runs every micro-batch's forward and backward (and defers the
                # gradient reduce-scatter to the last one itself).
                inputs, targets, kwargs = self.cut(tokens.flatten(0, 1), doc_ids.flatten(0, 1))
                loss = self.pipeline.step_local(inputs, targets, n_micro, normalizer, **kwargs)
                if loss is not None:
                    local = local + as_local(loss.detach())
            else:
                for micro in range(n_micro):
                    with self._gradient_sync(self.reduce_every_micro_batch or micro == n_micro - 1):
                        inputs, targets, kwargs = self.cut(tokens[micro], doc_ids[micro])
                        loss = module.loss(module.model(inputs, **kwargs), targets) / normalizer
                        module.manual_backward(loss)
                    local = local + as_local(loss.detach())
        return self.sum_over_pipeline(self.sum_over_data(local))

    def eval_sums(self, module: StepModule, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (sum of scored token CE, scored targets) over a step batch, float64.

        Reduce them with :meth:`mean_loss`. An optional ``loss_mask``
        ``[n_micro, micro_batch, seq_len]`` picks the targets scored.
        """
        tokens, doc_ids, mask = batch["tokens"], host_ids(batch["doc_ids"]), batch.get("loss_mask")
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        with self._loss_context():
            if self.pipeline is not None:
                flat_mask = None if mask is None else mask.flatten(0, 1)
                inputs, targets, kwargs = self.cut(tokens.flatten(0, 1), doc_ids.flatten(0, 1), flat_mask)
                loss = self.pipeline.evaluate_local(inputs, targets, tokens.shape[0], **kwargs)
                if loss is not None:
                    loss_sum += as_local(loss).double()
                return loss_sum, count + (targets != -100).sum()
            for micro in range(tokens.shape[0]):
                inputs, targets, kwargs = self.cut(tokens[micro], doc_ids[micro], None if mask is None else mask[micro])
                loss_sum += as_local(module.loss(module.model(inputs, **kwargs), targets)).double()
                count += (targets != -100).sum()
        return loss_sum, count

    def mean_loss(self, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Global mean from every rank's :meth:`eval_sums` (a device tensor)."""
        total = self.sum_over_pipeline(self.sum_over_data(loss_sum))
        return total / self.sum_over_data(count).clamp(min=1)

    # ------------------------------------------------------------------ reductions

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank holding different tokens (data and context parallel)."""
        return collectives.all_reduce(tensor, self.data_group)

    def sum_over_pipeline(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages (only the last one holds a loss)."""
        return collectives.all_reduce(tensor, self.pp_group) if self.pp_group is not None else tensor

    def clip_grad_norm(self, parameters: Any, max_norm: float | None) -> torch.Tensor:
        """The global gradient norm (a device tensor), clipping to ``max_norm`` unless None."""
        return clip_grad_norm(parameters, max_norm, pp_group=self.pp_group)


def step_path_for(strategy: Any, device: torch.device) -> StepPath:
    """The step path of a Lightning strategy (None: a module used without a Trainer)."""
    if strategy is not None and hasattr(strategy, "step_path"):
        return strategy.step_path()
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if strategy is None or isinstance(strategy, SingleDeviceStrategy):
        return StepPath(ParallelDims(dp_shard=1), device)
    if isinstance(strategy, DDPStrategy):
        dims = ParallelDims(dp_replicate=strategy.world_size, dp_shard=1)
        return StepPath(dims, device, data_group=None, ddp_model=lambda: strategy.model)
    raise ConfigError(unsupported_strategy(strategy))


def unsupported_strategy(strategy: Any) -> str:
    return (f"trainer.strategy {type(strategy).__name__} is not supported by the recipe's step; use "
            "recipe.parallel.strategy.Parallel4DStrategy (dp_shard: N for FSDP, dp_replicate: N for plain data "
            "parallel, see configs/parallel/) or Lightning's ddp")


def check_strategy(strategy: Any) -> None:
    """One-line error, before any process starts, for a strategy the step cannot run under."""
    if hasattr(strategy, "step_path"):
        return
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        raise ConfigError(unsupported_strategy(strategy))
