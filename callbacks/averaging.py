"""Weight averaging that works under any parallel layout: EMA and Polyak (checkpoint) averages.

The paper's final model is the Polyak average of the checkpoints taken during annealing.
Lightning's own ``WeightAveraging`` deep-copies the module, which FSDP2 forbids, so these
callbacks keep the average per parameter *shard* instead:

* after every ``every_n_steps``-th optimizer step (``on_train_batch_end``) each parameter's
  local shard (``p.to_local()`` for a DTensor, the tensor itself otherwise) is blended into
  an fp32 tensor of the same local shape - elementwise, no communication, so FSDP, TP, PP
  and CP all work unchanged;
* the averages are DTensors on the parameter's mesh and placements, keyed by the full-model
  parameter name, so they check-point like the model: under a distributed (DCP) checkpoint
  they are entries ``averaging.<name>.<param>`` of ``checkpoint["state_dict"]``, written by
  every rank (sharded) and loadable under another layout; only the counters go to the
  rank-0 ``meta.pt``. A plain checkpoint (one process, DDP) carries the full tensors in the
  callback state instead.
* ``use_for_validation`` swaps the averages into the parameters for validation, in place.
* ``PolyakAveraging(save_path=...)`` writes the averaged model as a full state dict at the
  end of training (a relative ``save_path`` under ``trainer.default_root_dir``); it loads
  into ``Transformer`` with ``strict=True`` or through the module's ``init_weights_path``.

Resume: on a DCP checkpoint the callback reads its entries itself in ``on_load_checkpoint``
(one extra DCP read of just those keys), so the strategy needs no change. A strategy may
instead fold them into its own ``dcp.load``: ask each callback for
``distributed_state(pl_module)`` (tensors to fill in place), load the keys the checkpoint
holds, and the callback adopts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor

from recipe.errors import ConfigError
from recipe.lightning_compat import attached_trainer, callback_state_key, saves_distributed_checkpoint
from recipe.parallel import collectives

_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard, as a view that in-place operations write through."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard on the parameter's mesh and placements (no communication)."""
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return local


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective over the DTensor's mesh)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def _uses_dcp(trainer: L.Trainer) -> bool:
    """Whether the strategy writes sharded (DCP) checkpoints, where each rank saves its own shards."""
    return saves_distributed_checkpoint(trainer.strategy)


class WeightAveraging(L.Callback):
    """Base: a running average of the weights, one fp32 tensor per local parameter shard.

    Subclasses define when averaging starts (``_started``) and how a new sample is blended
    in (``_blend``). The average is updated after the weights of step ``first_step``,
    ``first_step + every_n_steps``, ... where steps count optimizer steps (``global_step``).
    """

    def __init__(self, every_n_steps: int = 1, use_for_validation: bool = False, name: str | None = None) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.use_for_validation = use_for_validation
        self.name = name or type(self).__name__
        self.count = 0  # samples in the average
        self.first_step: int | None = None  # global step of the first sample
        self.last_step: int | None = None  # global step of the latest sample
        self._averages: dict[str, torch.Tensor] | None = None  # fp32, DTensor where the parameter is one
        self._pending_full: dict[str, torch.Tensor] | None = None  # full tensors from a plain checkpoint
        self._dcp_targets: dict[str, torch.Tensor] | None = None  # filled in place by a strategy's DCP load
        self._backup: dict[str, torch.Tensor] | None = None  # training weights during validation

    # ------------------------------------------------------------------ policy (subclasses)

    def _started(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        raise NotImplementedError

    def _blend(self, averages: list[torch.Tensor], samples: list[torch.Tensor]) -> None:
        """Fold one sample into the averages (local fp32 tensors), in place; ``self.count`` >= 1."""
        raise NotImplementedError

    # ------------------------------------------------------------------ names and state

    @property
    def state_key(self) -> str:
        return callback_state_key(self, name=self.name)

    @property
    def prefix(self) -> str:
        """Prefix of this callback's entries in a DCP checkpoint's ``state_dict``."""
        return f"averaging.{self.name}."

    @property
    def averages(self) -> dict[str, torch.Tensor] | None:
        """The averaged weights by parameter name (fp32; DTensors where the parameters are), or None."""
        return self._averages

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        same = [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging) and cb.name == self.name]
        if len(same) > 1:
            raise ConfigError(f"{len(same)} averaging callbacks are named {self.name!r}; give each its own `name`")

    def state_dict(self) -> dict[str, Any]:
        # The tensors are added by on_save_checkpoint, which knows how the checkpoint is written.
        return {"count": self.count, "first_step": self.first_step, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict["count"])
        self.first_step = state_dict["first_step"]
        self.last_step = state_dict["last_step"]

    @staticmethod
    def _model(pl_module: L.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, nn.Module) else pl_module

    def _parameters(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The parameters by (wrapper-free) name, FSDP units resharded first.

        FSDP2 swaps an unsharded parameter in during forward and keeps it there when
        ``reshard_after_forward=False`` (the head unit, pipeline stages): a forward-only pass
        such as validation would otherwise leave full tensors registered.
        """
        from torch.distributed.fsdp import FSDPModule

        model = self._model(pl_module)
        modules = list(model.modules())
        stages = getattr(trainer.strategy, "pipeline_stages", None) if trainer is not None else None
        for _, stage in stages or []:
            modules.extend(stage.modules())
        for module in modules:
            if isinstance(module, FSDPModule):
                module.reshard()
        return {_clean(n): p for n, p in model.named_parameters()}

    def _materialize(self, params: dict[str, torch.Tensor]) -> None:
        """Turn full tensors restored from a plain checkpoint into this layout's shards."""
        if self._pending_full is None:
            return
        from torch.distributed.tensor import distribute_tensor

        pending, self._pending_full = self._pending_full, None
        missing = sorted(set(params) - set(pending))
        if missing:
            raise ConfigError(f"the checkpoint's {self.name} average lacks {len(missing)} parameters "
                              f"(first: {missing[0]}); it was written for another model")
        averages = {}
        for name, p in params.items():
            full = pending[name].to(device=_local(p).device, dtype=torch.float32)
            if isinstance(p, DTensor):  # src_data_rank=None: each rank cuts its own shard, no communication
                averages[name] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            else:
                averages[name] = full.clone()
        self._averages = averages

    # ------------------------------------------------------------------ training

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step:  # no optimizer step since the last sample
            return
        if self.first_step is None:
            if not self._started(trainer, pl_module):
                return
            self.first_step = step
        if (step - self.first_step) % self.every_n_steps:
            return
        self.update(trainer, pl_module)
        self.last_step = step

    @torch.no_grad()
    def update(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> None:
        """Fold the current weights into the average (called by the hook; public for tests and tools)."""
        params = self._parameters(trainer, pl_module)
        self._materialize(params)
        if self._averages is None or self.count == 0:
            self._averages = {n: _like(p, _local(p).detach().float().clone()) for n, p in params.items()}
            self.count = 1
            return
        self.count += 1
        averages = [_local(self._averages[n]) for n in params]
        samples = [_local(p).detach() for p in params.values()]
        samples = [s if s.dtype == torch.float32 else s.float() for s in samples]
        self._blend(averages, samples)

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.use_for_validation or self._backup is not None:
            return
        params = self._parameters(trainer, pl_module)
        self._materialize(params)
        if self._averages is None or self.count == 0:
            return
        self._backup = {}
        for name, p in params.items():
            local = _local(p)
            self._backup[name] = local.detach().clone()
            local.copy_(_local(self._averages[name]))

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        for name, p in self._parameters(trainer, pl_module).items():  # resharded first (see _parameters)
            _local(p).copy_(self._backup[name])
        self._backup = None

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, self.state_dict())
        params = self._parameters(trainer, pl_module)
        self._materialize(params)
        if self._averages is None or self.count == 0:
            state["stored"] = None
        elif _uses_dcp(trainer):
            # Every rank's shards, through the strategy's sharded DCP save of the state dict.
            state["stored"] = "dcp"
            checkpoint["state_dict"].update({self.prefix + n: t for n, t in self._averages.items()})
        else:
            state["stored"] = "state"  # one process or replicated weights: the full tensors
            state["averages"] = {n: _full(t) for n, t in self._averages.items()}

    def distributed_state(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """DCP entries (keys of ``checkpoint["state_dict"]``) for a strategy to load in place.

        Called by a strategy before its ``dcp.load``; the strategy loads the keys the
        checkpoint holds into these tensors and ``on_load_checkpoint`` adopts them.
        """
        params = self._parameters(attached_trainer(pl_module), pl_module)
        self._dcp_targets = {n: _like(p, torch.zeros_like(_local(p), dtype=torch.float32)) for n, p in params.items()}
        return {self.prefix + n: t for n, t in self._dcp_targets.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        targets, self._dcp_targets = self._dcp_targets, None
        self._averages, self._pending_full, self._backup = None, None, None
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if not state or not state.get("count") or state.get("stored") is None:
            return  # nothing averaged yet when the checkpoint was written
        if state["stored"] == "state":
            self._pending_full = state.pop("averages")  # popped: spares the deep copy Lightning makes of the state
            return
        import torch.distributed.checkpoint as dcp

        # The strategy may have fallen back from a damaged checkpoint to an intact one.
        path = getattr(trainer.strategy, "loaded_checkpoint_path", None) or trainer.ckpt_path
        params = self._parameters(trainer, pl_module)
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        missing = [n for n in params if f"state_dict.{self.prefix}{n}" not in stored]
        if missing:
            raise ConfigError(f"{path} lacks {len(missing)} tensors of the {self.name} average "
                              f"(first: state_dict.{self.prefix}{missing[0]}); it was written for another model")
        if targets is None:  # the strategy did not load them along with the model: read them now
            targets = {n: _like(p, torch.zeros_like(_local(p), dtype=torch.float32)) for n, p in params.items()}
            dcp.load({"state_dict": {self.prefix + n: t for n, t in targets.items()}}, checkpoint_id=path)
        self._averages = targets

    # ------------------------------------------------------------------ export

    def full_state_dict(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The averaged model as full CPU tensors by parameter name on global rank 0 ({} elsewhere).

        A collective: every rank must call it. Each DTensor is gathered over its own mesh;
        under pipeline parallelism the other stages then send theirs to rank 0.
        """
        params = self._parameters(trainer, pl_module)
        self._materialize(params)
        if self._averages is None or self.count == 0:
            raise RuntimeError(f"{self.name} has no average yet (no step has been averaged)")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        names: list[list[str]] = [list(params)]
        if distributed:
            names = collectives.all_gather_object(list(params))
        owner: dict[str, int] = {}
        for r, rank_names in enumerate(names):
            for name in rank_names:
                owner.setdefault(name, r)
        full: dict[str, torch.Tensor] = {}
        for name in params:  # the same order on every rank of a stage: collectives line up
            tensor = _full(self._averages[name])
            if rank == 0 or owner[name] == rank:
                full[name] = tensor
        if distributed and any(r != 0 for r in owner.values()):
            sent = {n: t for n, t in full.items() if owner[n] == rank} if rank != 0 else {}
            gathered = collectives.gather_object(sent, dst=0)
            if rank == 0:
                for part in gathered:  # type: ignore[union-attr]
                    full.update(part)
        return full if rank == 0 else {}

    def save(self, path: str | Path, trainer: L.Trainer | None, pl_module: L.LightningModule) -> None:
        """Write the averaged model as a full state dict (``torch.save``, global rank 0). Collective."""
        state = self.full_state_dict(trainer, pl_module)
        model = self._model(pl_module)
        if not dist.is_initialized() or dist.get_rank() == 0:
            # Persistent buffers, as they are (Llama has none: its RoPE table is not persistent).
            for name, tensor in model.state_dict().items():
                if _clean(name) not in state and not isinstance(tensor, DTensor):
                    state[_clean(name)] = tensor.detach().to("cpu", copy=True)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
        collectives.barrier()


class EMAAveraging(WeightAveraging):
    """Exponential moving average: ``avg <- decay * avg + (1 - decay) * w`` at each sampled step.

    Args:
        decay: weight of the old average per sample (per ``every_n_steps`` steps).
        start_step: first optimizer step (``global_step`` after it) whose weights are sampled;
            the first sample initialises the average.
        every_n_steps: sample every n-th step from the first.
        use_for_validation: validate with the averaged weights.
        name: key of this average in checkpoints (default: the class name).
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1,
                 use_for_validation: bool = False, name: str | None = None) -> None:
        super().__init__(every_n_steps=every_n_steps, use_for_validation=use_for_validation, name=name)
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay={decay} must be in (0, 1)")
        self.decay = decay
        self.start_step = start_step

    def _started(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return trainer.global_step >= self.start_step

    def _blend(self, averages: list[torch.Tensor], samples: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averages, samples, 1.0 - self.decay)


class PolyakAveraging(WeightAveraging):
    """Arithmetic mean of the weights sampled once training passes a point (the paper's annealing average).

    Args:
        start_tokens: average the weights made by every step that starts at data position
            (``batch["position"]``, skipped steps counted like the run plan counts them) at or
            past this count: with ``LRAnnealing.anneal_start``, exactly the annealing steps.
        start_step: or from this optimizer step on (``global_step`` after it, inclusive).
            Averaging starts when either mark is passed; with neither, from the first step.
            Both may be set while training runs.
        every_n_steps: sample every n-th step from the first sample (the "checkpoints").
        use_for_validation: validate with the averaged weights.
        save_path: write the averaged model there at the end of training (full state dict); a
            relative path is under ``trainer.default_root_dir``, with the run's other outputs.
        name: key of this average in checkpoints (default: the class name).
    """

    def __init__(self, start_tokens: int | None = None, start_step: int | None = None, every_n_steps: int = 1,
                 use_for_validation: bool = False, save_path: str | None = None, name: str | None = None) -> None:
        super().__init__(every_n_steps=every_n_steps, use_for_validation=use_for_validation, name=name)
        self.start_tokens = start_tokens
        self.start_step = start_step
        self.save_path = save_path
        self._position_at_step_start: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The run's one clock: where the step starts in the data stream (None: not a recipe batch).
        has_position = isinstance(batch, dict) and "position" in batch
        self._position_at_step_start = int(batch["position"]) if has_position else None

    def _started(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if self.start_tokens is None and self.start_step is None:
            return True
        by_step = self.start_step is not None and trainer.global_step >= self.start_step
        position = self._position_at_step_start
        by_tokens = self.start_tokens is not None and position is not None and position >= self.start_tokens
        return by_step or by_tokens

    def _blend(self, averages: list[torch.Tensor], samples: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averages, samples, 1.0 / self.count)  # mean of count samples

    def resolved_save_path(self, trainer: L.Trainer) -> Path | None:
        """Where ``on_train_end`` writes the average: ``save_path``, a relative one under the trainer's
        ``default_root_dir``; None when nothing is to be written."""
        if self.save_path is None:
            return None
        path = Path(self.save_path).expanduser()
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.resolved_save_path(trainer)
        if path is None:
            return
        if self.count == 0:
            rank_zero_warn(f"{self.name}: no step was averaged, so {path} was not written")
            return
        self.save(path, trainer, pl_module)


__all__ = ["WeightAveraging", "EMAAveraging", "PolyakAveraging"]
