"""Lightning strategy for the paper's 4D layout: FSDP2 x tensor x context x pipeline.

A subclass of Lightning's ``ModelParallelStrategy`` (which gives DCP checkpoints, meta-device
init and the launchers) whose mesh is the five-axis one of ``recipe.parallel.mesh``.
In YAML::

    trainer:
      strategy:
        class_path: recipe.parallel.strategy.Parallel4DStrategy
        init_args: {pp: 1, dp_replicate: 1, dp_shard: -1, cp: 2, tp: 2}

The strategy owns the layout: ``parallelize_model`` applies TP, CP, activation
checkpointing, compile and FSDP (torchtitan's order), ``data_parallel_rank/size`` tell
the token stream which share of a batch this rank reads, and ``step_path`` returns the
object that runs a training step's micro-batches (or pipeline schedule) and reduces its
loss and gradient norm - the LightningModule only defines the model and the loss.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.optim import Optimizer

from recipe.errors import ConfigError
from recipe.lightning_compat import saves_distributed_checkpoint, set_device_mesh, setup_distributed
from recipe.model import Transformer
from recipe.parallel import collectives
from recipe.parallel.mesh import ParallelDims
from recipe.parallel.step import StepPath

ScheduleName = Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"]


class Parallel4DStrategy(ModelParallelStrategy):
    def __init__(
        self,
        pp: int = 1,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        cp: int = 1,
        tp: int = 1,
        pp_schedule: ScheduleName = "1F1B",
        pp_stages_per_rank: int = 1,
        pp_first_last_fewer: bool = False,
        loss_parallel: bool = True,
        activation_checkpointing: Literal["none", "full", "selective"] = "none",
        activation_checkpointing_every_n: int = 2,
        compile: bool = False,
        reduce_every_micro_batch: bool = False,
        precision: Literal["fp32", "bf16"] = "fp32",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        """
        Args:
            pp, dp_replicate, dp_shard, cp, tp: sizes of the parallel axes; their product is
                the world size (``dp_shard=-1``: the rest).
            pp_schedule: pipeline schedule; GPipe and 1F1B run one stage per rank, the others
                (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) several (``pp_stages_per_rank``).
            pp_stages_per_rank: virtual pipeline stages per rank (interleaving).
            pp_first_last_fewer: one transformer layer fewer on the first and last stage, which
                also carry the embedding and the output head (the paper's balance).
            loss_parallel: cross-entropy on vocabulary shards under TP (never gathers logits).
            activation_checkpointing: recompute block activations in backward: "full" (every
                block) or "selective" (every ``activation_checkpointing_every_n``-th block).
            compile: ``torch.compile`` each transformer block (inductor; on CPU its C++
                backend). Off by default: eager is faster for small CPU runs, where the
                compile time is never paid back (``bench/compile.py``).
            reduce_every_micro_batch: reduce-scatter FSDP gradients after every
                micro-batch instead of once per step. Without it gradients accumulate
                unsharded in fp32 (4 bytes per parameter of the rank) for one reduce-scatter;
                with it they stay sharded at the cost of one reduce-scatter per micro-batch.
                Pipeline schedules always reduce once per step.
            precision: "fp32", or "bf16" parameters with fp32 gradient reduction (GPU).
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=tp,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.requested_dims = ParallelDims(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp)
        self.dims: ParallelDims | None = None
        self.pp_schedule = pp_schedule
        self.pp_stages_per_rank = pp_stages_per_rank
        self.pp_first_last_fewer = pp_first_last_fewer
        self.loss_parallel = loss_parallel
        self.activation_checkpointing = activation_checkpointing
        self.activation_checkpointing_every_n = activation_checkpointing_every_n
        self.compile = compile
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.param_precision = precision
        self.pipeline_stages: list[tuple[int, nn.Module]] = []
        from recipe.checkpointing import AtomicCheckpointIO

        self.checkpoint_io = AtomicCheckpointIO()  # full-state (non-DCP) saves
        self.loaded_checkpoint_path: Path | None = None

    # ------------------------------------------------------------------ environment

    def setup_environment(self) -> None:
        # ModelParallelStrategy would build its fixed 2-D (dp, tp) mesh here; build ours.
        setup_distributed(self)
        self.dims = self.requested_dims.resolved(self.world_size)
        assert self.lightning_module is not None
        set_device_mesh(self, self.lightning_module, self.dims.build_mesh(self.root_device.type))

    @property
    def data_parallel_rank(self) -> int:
        return self.device_mesh["dp"].get_local_rank()

    @property
    def data_parallel_size(self) -> int:
        return self.device_mesh["dp"].size()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    def step_path(self) -> StepPath:
        """How a training step runs under this layout (see ``recipe.parallel.step``).

        Every group is handed over even when its size is 1, so a one-GPU run reaches every
        collective that a multi-GPU run does.
        """
        assert self.dims is not None
        mesh = self.device_mesh
        return StepPath(
            self.dims, self.root_device, data_group=mesh["dp_cp"], pp_group=mesh["pp"],
            cp_group=mesh["cp"] if self.dims.cp > 1 else None,
            loss_parallel=self.loss_parallel and self.dims.tp > 1,
            reduce_every_micro_batch=self.reduce_every_micro_batch, pp_schedule=self.pp_schedule,
            pp_stages_per_rank=self.pp_stages_per_rank, parallelize=self.parallelize_model,
        )

    # ------------------------------------------------------------------ model

    def parallelize_model(self, model: Transformer) -> nn.Module:
        """Split into pipeline stages, then apply TP, CP and FSDP to each (torchtitan's order).

        Without PP the model itself comes back; with PP a ``StageUnion`` of this rank's
        stages (full-model parameter names), the stages being kept in ``pipeline_stages``.
        """
        from recipe.parallel.pipeline import StageUnion, build_stage_modules

        assert self.dims is not None
        a = model.args
        self.dims.validate_model(a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.dim, self.pp_stages_per_rank)
        if self.dims.pp == 1:
            self._parallelize_stage(model)
            return model
        pp_rank = self.device_mesh["pp"].get_local_rank()
        self.pipeline_stages = build_stage_modules(model, pp_rank, self.dims.pp, self.pp_stages_per_rank,
                                                   self.pp_first_last_fewer)
        for _, stage in self.pipeline_stages:
            self._parallelize_stage(stage)
        return StageUnion(self.pipeline_stages)

    def _parallelize_stage(self, model: Transformer) -> None:
        from recipe.parallel.activation_checkpoint import apply_activation_checkpointing
        from recipe.parallel.compile import apply_compile
        from recipe.parallel.context import apply_context_parallel
        from recipe.parallel.fsdp import apply_fsdp
        from recipe.parallel.tensor import apply_tensor_parallel

        assert self.dims is not None
        if self.dims.tp > 1:
            apply_tensor_parallel(model, self.device_mesh["tp"], loss_parallel=self.loss_parallel)
        if self.dims.cp > 1:
            apply_context_parallel(model, self.device_mesh["cp"])
        apply_activation_checkpointing(model, self.activation_checkpointing, self.activation_checkpointing_every_n)
        if self.compile:
            apply_compile(model, self.root_device.type, tp=self.dims.tp)
        if self.dims.dp_replicate > 1:
            dp_mesh = self.device_mesh["dp_replicate", "dp_shard_cp"]
        else:
            dp_mesh = self.device_mesh["dp_shard_cp"]
        if self.dims.dp_replicate * self.dims.dp_shard * self.dims.cp > 1 or self.param_precision != "fp32":
            apply_fsdp(model, dp_mesh, precision=self.param_precision, reshard_after_forward=self.dims.pp == 1)

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Flattened ("state.<param name>.exp_avg"): keyed by parameter name alone, so a
        # checkpoint saved under one layout (pipeline split, sharding) loads under another.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        options = StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True,
                                   full_state_dict=not saves_distributed_checkpoint(self))
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        """Write a DCP checkpoint under ``<path>.partial`` and publish it only when complete.

        Every rank writes its shards and hashes its share of the files; rank 0 writes
        ``meta.pt`` and the manifest, then renames the directory into place. ``path`` is
        therefore always a complete checkpoint (or absent), whatever moment a crash hits. A
        write error on any rank (disk full) removes the temporary directory and raises the
        same ``CheckpointWriteError`` on every rank (``_save_phase``).
        """
        if not saves_distributed_checkpoint(self):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        import shutil

        import torch.distributed.checkpoint as dcp

        from recipe.checkpointing import (
            DIR_MANIFEST,
            PARTIAL,
            file_entry,
            finish_interrupted_publish,
            free_bytes,
            publish_dir,
            state_bytes,
            write_manifest,
        )

        path = Path(collectives.broadcast_object(str(filepath)))
        tmp = path.with_name(path.name + PARTIAL)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))})
        needed = state_bytes(state)
        free_before = free_bytes(path.parent) if self.global_rank == 0 else None

        def prepare() -> None:
            if self.global_rank == 0:
                finish_interrupted_publish(path)  # a crash's complete leftover keeps a name
                if tmp.exists():
                    shutil.rmtree(tmp)  # the leftover of a save that crashed
                tmp.mkdir(parents=True)

        def write() -> None:
            dcp.save(state, checkpoint_id=tmp)
            if self.global_rank == 0:
                torch.save(checkpoint, tmp / "meta.pt")

        def hash_my_share() -> dict[str, Any]:
            names = sorted(p.name for p in tmp.iterdir())
            return {name: file_entry(tmp / name) for name in names[self.global_rank::self.world_size]}

        # Each phase ends in a gather of every rank's outcome, which is also the barrier
        # between them: no rank waits in a collective that a failed rank never reaches.
        self._save_phase(path, prepare, needed, free_before)
        self._save_phase(path, write, needed, free_before)
        shares = self._save_phase(path, hash_my_share, needed, free_before)
        files = {name: entry for share in shares for name, entry in share.items()}

        def publish() -> None:
            if self.global_rank == 0:
                write_manifest(tmp / DIR_MANIFEST, files, checkpoint.get("global_step"))
                publish_dir(tmp, path)

        self._save_phase(path, publish, needed, free_before)

    def _save_phase(self, path: Path, phase: Any, needed: int, free_before: int | None) -> list[Any]:
        """Run one phase of a sharded save on every rank; all ranks learn of any rank's failure.

        On a failure the temporary directory is removed and every rank raises the same
        ``CheckpointWriteError`` (naming the folder, the space needed and the last good
        checkpoint), so the run stops together at this step boundary. Returns each rank's result.
        """
        import shutil

        from torch.distributed.checkpoint.api import CheckpointException

        from recipe.checkpointing import PARTIAL, CheckpointWriteError, failed_save_message, write_error_reason

        result, failure = None, None
        try:
            result = phase()
        except CheckpointException as err:  # DCP's gathered errors (a BaseException), alike on every rank
            rank, (error, _) = next(iter(sorted(err.failures.items(), key=lambda item: item[0])))
            failure = f"rank {rank}: {write_error_reason(error, path.parent, needed)}"
        except Exception as err:  # this rank's write error: disk full, I/O error
            failure = f"rank {self.global_rank}: {write_error_reason(err, path.parent, needed)}"
        gathered = collectives.all_gather_object((result, failure, needed))
        failures = [f for _, f, _ in gathered if f]
        if not failures:
            return [r for r, _, _ in gathered]
        if self.global_rank == 0:
            shutil.rmtree(path.with_name(path.name + PARTIAL), ignore_errors=True)
        collectives.barrier()
        total = sum(n for _, _, n in gathered)
        free = collectives.broadcast_object(free_before)  # rank 0's: it made the folder
        raise CheckpointWriteError(failed_save_message(path, failures[0], total, free), collective=True)

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.global_rank == 0:
            from recipe.checkpointing import remove

            remove(Path(filepath))

    def _intact_checkpoint(self, path: Path) -> Path:
        """``path``, or the newest intact checkpoint beside it; ranks share the hashing."""
        from recipe.checkpointing import manifest_files, problems, resolve_intact

        def check(candidate: Path) -> list[str]:
            names = manifest_files(candidate)
            found = problems(candidate, names[self.global_rank::self.world_size]) if names else \
                problems(candidate, [])
            everyone: list[list[str]] = collectives.all_gather_object(found)
            return [fault for faults in everyone for fault in faults]

        return resolve_intact(path, check)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a DCP checkpoint written under any layout into this one."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from recipe.checkpointing import load_trusted  # weights-only whatever ``weights_only`` asks

        path = self._intact_checkpoint(Path(collectives.broadcast_object(str(checkpoint_path))))
        self.loaded_checkpoint_path = path  # the one actually read, after any fallback
        if path.is_file():
            raise ConfigError(
                f"{path} is a single-file checkpoint (written by one process or DDP), and the 4D strategy resumes "
                "only its own sharded ones: continue it with `strategy: auto`, or start this run in another folder "
                "(--trainer.default_root_dir)"
            )
        if not (path / "meta.pt").is_file():
            raise ConfigError(
                f"{path} is not a distributed checkpoint of this recipe (no meta.pt); pass a checkpoint directory "
                "written by the 4D strategy"
            )
        meta = load_trusted(path / "meta.pt")
        check = getattr(self.lightning_module, "check_resumed_settings", None)
        if check is not None:  # before any shard is read: a changed architecture stops here
            check(meta, str(path))
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        state: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
        for i, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optimizer, options=flat)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=True))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"], options=flat)
        return meta
