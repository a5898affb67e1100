"""LightningModule: one ``training_step`` is one optimizer step over its micro-batches.

Manual optimization because the step owns its micro-batch loop: the batch-size ramp
changes the number of micro-batches per step and a pipeline schedule runs forward and
backward itself. Each micro-batch's loss is ``sum(token CE) / tokens in the global batch``,
so accumulated gradients equal the gradient of the global mean loss exactly, whatever the
micro-batch count or data-parallel split.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from recipe.config import LRSchedule, ModelArgs, OptimizerConfig, RopeScaling
from recipe.errors import ConfigError, ModelConfigError
from recipe.guard import StepGuard
from recipe.model import Transformer, init_parameter
from recipe.parallel.clip import clip_grad_norm
from recipe.parallel.fsdp import set_gradient_sync


class LlamaLightningModule(L.LightningModule):
    def __init__(
        self,
        arch: ModelArgs | None = None,
        optimizer: OptimizerConfig | None = None,
        lr_schedule: LRSchedule | None = None,
        grad_clip: float | None = 1.0,
        init_seed: int = 0,
        init_weights_path: str | None = None,
        init_mode: Literal["replicable", "local"] = "replicable",
        guard: StepGuard | None = None,
    ) -> None:
        """
        Args:
            arch: model shape (Table 3 of the paper for the released sizes).
            optimizer: AdamW settings; ``lr`` is the peak learning rate.
            lr_schedule: warm-up and cosine decay to a floor, in optimizer steps.
            grad_clip: clip the global gradient norm to this value (None: no clipping).
            init_seed: seed of the weight initialisation, independent of the data order.
            init_weights_path: the starting weights, loaded after initialisation under any
                parallel layout: a full (unsharded) state dict saved with ``torch.save``, or a
                distributed checkpoint directory of the full model (what ``recipe import``
                writes), read shard by shard on each rank.
            init_mode: "replicable" draws every parameter in full from its own seeded stream
                and shards it, so every parallel layout starts from the same weights as one
                process (costs one full layer of host memory at a time); "local" draws each
                shard on its own rank (fast for huge models, but layout-dependent).
            guard: skip steps with non-finite loss or gradients, watch for loss spikes
                (``recipe.guard.StepGuard``; default: skip, stop after 5 in a row).
        """
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch or ModelArgs()
        self.optim_config = optimizer or OptimizerConfig()
        self.lr_schedule = lr_schedule or LRSchedule()
        self.grad_clip = grad_clip
        self.init_seed = init_seed
        self.init_weights_path = init_weights_path
        self.init_mode = init_mode
        self.guard = guard or StepGuard()
        self.automatic_optimization = False
        self.model: Transformer | None = None
        self.pipeline = None  # a PipelineRunner when the strategy splits the model into stages
        self.tokens_seen = 0
        # Knob for recipe callbacks: (tokens_seen, scheduled lr) -> lr of the coming step.
        self.lr_override = None
        self.phase = 0  # 0 main training, 1 annealing (set by the annealing callback)
        self.live_rope: tuple[float, RopeScaling | None] | None = None  # set when a context stage changes RoPE
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

    # ------------------------------------------------------------------ model and optimizer

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with torch.device("meta"):
            model = Transformer(self.arch)
        model = self.parallelize(model)
        parallel = self._parallel()
        # Under PP `model` is a container of this rank's stages, which own the buffers.
        parts = [stage for _, stage in parallel.pipeline_stages] if parallel and parallel.pipeline_stages else [model]
        for part in parts:
            part.to_empty(device=self.device)
            part.init_buffers(self.device)
        if self.init_mode == "replicable":
            replicable_init(model, self.init_seed)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed)
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        init_parameter(self.arch, name, param)
        if self.init_weights_path is not None:
            load_full_weights(model, self.init_weights_path)
        self.model = model
        self.pipeline = parallel.pipeline_runner() if parallel is not None else None

    def parallelize(self, model: Transformer) -> torch.nn.Module:
        """Apply the strategy's parallelisms to the meta-device model (identity on one device)."""
        apply = getattr(self.trainer.strategy, "parallelize_model", None) if self._trainer else None
        return apply(model) if apply is not None else model

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optim_config
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]  # norm gains
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused)

    # ------------------------------------------------------------------ checks

    def on_fit_start(self) -> None:
        self._check_data_matches_model()
        dm = self.trainer.datamodule
        if getattr(dm, "batch_schedule", None) is None and hasattr(dm, "global_batch_size"):
            self.check_batch_layout(dm.global_batch_size, dm.seq_len)

    def on_validation_start(self) -> None:
        self._check_data_matches_model()
        dm = self.trainer.datamodule
        if hasattr(dm, "val_batch_size"):
            self.check_batch_layout(dm.val_batch_size, dm.seq_len)

    def check_batch_layout(self, batch_size: int, seq_len: int) -> None:
        """One-line error when the parallel layout cannot cut such a batch (before any step)."""
        dm, parallel = self.trainer.datamodule, self._parallel()
        if parallel is not None:
            parallel.validate_batch_layout(seq_len, batch_size, dm.micro_batch_size)

    def _check_data_matches_model(self) -> None:
        dm = self.trainer.datamodule
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.arch.max_seq_len:
            raise ModelConfigError(
                f"data.seq_len={seq_len} exceeds model.arch.max_seq_len={self.arch.max_seq_len}; "
                "shorten data.seq_len or raise max_seq_len"
            )
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.arch.vocab_size:
            raise ModelConfigError(
                f"the data was tokenized with a {vocab}-token vocabulary but model.arch.vocab_size="
                f"{self.arch.vocab_size}; set vocab_size to at least {vocab}"
            )

    # ------------------------------------------------------------------ training

    def _parallel(self):
        """The 4D strategy when training under one, else None (single process, plain DDP)."""
        from recipe.parallel.strategy import Parallel4DStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, Parallel4DStrategy) else None

    def _sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank holding different tokens (data-parallel and context-parallel)."""
        parallel = self._parallel()
        if parallel is not None:
            return parallel.reduce_over(tensor, "dp_cp")
        if self._trainer is not None:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    def _cp_size(self) -> int:
        parallel = self._parallel()
        return parallel.dims.cp if parallel is not None else 1

    def _loss_context(self) -> contextlib.AbstractContextManager:
        parallel = self._parallel()
        if parallel is not None and parallel.dims.tp > 1 and parallel.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _pp_group(self):
        parallel = self._parallel()
        return parallel.device_mesh["pp"].get_group() if parallel is not None and parallel.dims.pp > 1 else None

    def _sum_over_pipeline(self, tensor: torch.Tensor) -> torch.Tensor:
        parallel = self._parallel()
        return parallel.reduce_over(tensor, "pp") if parallel is not None and parallel.dims.pp > 1 else tensor

    def pipeline_pass(self, tokens: torch.Tensor, doc_ids: torch.Tensor, normalizer: float,
                      train: bool, loss_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """All micro-batches of a step through the pipeline schedule; the loss on the last stage.

        tokens, doc_ids: ``[n_micro, micro_batch, seq_len + 1]``. Under context parallelism
        the rows are cut into this rank's sequence shard first, and every stage gets the
        shard's positions and mask instead of the document ids. ``loss_mask``
        (``[n_micro, micro_batch, seq_len]``, evaluation only) picks the targets scored.
        """
        parallel = self._parallel()
        n_micro = tokens.shape[0]
        rows, docs = tokens.flatten(0, 1), doc_ids.flatten(0, 1)
        targets = _masked_targets(rows[:, 1:], None if loss_mask is None else loss_mask.flatten(0, 1))
        run = self.pipeline.step_local if train else self.pipeline.evaluate_local
        if parallel.dims.cp == 1:
            # Explicit positions: a later stage sees only hidden states, sequence-sharded
            # under tensor parallelism, so it cannot infer the sequence length.
            positions = torch.arange(rows.shape[1] - 1, device=rows.device).expand(rows.shape[0], -1)
            return run(rows[:, :-1], targets, n_micro, normalizer, positions=positions, doc_ids=docs[:, :-1])
        from recipe.parallel.context import shard_for_context_parallel

        local = shard_for_context_parallel(rows[:, :-1], targets, docs[:, :-1], parallel.device_mesh["cp"])
        positions = local["positions"].expand(rows.shape[0], -1)
        return run(local["tokens"], local["targets"], n_micro, normalizer, positions=positions, mask=local["mask"])

    def micro_batch_loss(self, tokens: torch.Tensor, doc_ids: torch.Tensor, normalizer: float,
                         loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of next-token cross-entropies of one micro-batch, divided by ``normalizer``.

        Under context parallelism this rank computes its share of the sequence only; the
        shares' gradients are summed by FSDP's reduce-scatter over dp_shard x cp.
        ``loss_mask`` (``[micro_batch, seq_len]``) restricts the sum to the targets it marks.
        """
        inputs, targets, docs = tokens[:, :-1], _masked_targets(tokens[:, 1:], loss_mask), doc_ids[:, :-1]
        parallel = self._parallel()
        if parallel is not None and parallel.dims.cp > 1:
            from recipe.parallel.context import shard_for_context_parallel

            local = shard_for_context_parallel(inputs, targets, docs, parallel.device_mesh["cp"])
            logits = self.model(local["tokens"], positions=local["positions"], mask=local["mask"])
            targets = local["targets"]
        else:
            logits = self.model(inputs, docs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return loss / normalizer

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        optimizer = self.optimizers()
        tokens, doc_ids = batch["tokens"], batch["doc_ids"]  # [n_micro, micro_batch, seq_len + 1]
        # Context-parallel ranks hold the same rows and score 1/cp of their tokens each.
        local_targets = tokens[..., 1:].numel() / self._cp_size()
        global_targets = int(self._sum_over_data(torch.tensor(local_targets)).item())
        lr = self.lr_schedule.lr_at(self.trainer.global_step, self.optim_config.lr)
        if self.lr_override is not None:  # set by a recipe phase (annealing) for this step
            lr = self.lr_override(self.tokens_seen, lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        n_micro = tokens.shape[0]
        loss_sum = torch.zeros((), device=self.device)
        with self._loss_context():
            if self.pipeline is not None:
                # The schedule runs every micro-batch's forward and backward (and defers the
                # gradient reduce-scatter to the last one itself).
                loss = self.pipeline_pass(tokens, doc_ids, global_targets, train=True)
                if loss is not None:
                    loss_sum += as_local(loss.detach())
            else:
                every = bool(getattr(self._parallel(), "reduce_every_micro_batch", False))
                for micro in range(n_micro):
                    # Reduce-scatter gradients once per step, on the last micro-batch (or
                    # after each one, trading traffic for sharded gradients).
                    set_gradient_sync(list(self.model.modules()), every or micro == n_micro - 1)
                    loss = self.micro_batch_loss(tokens[micro], doc_ids[micro], global_targets)
                    self.manual_backward(loss)
                    loss_sum += as_local(loss.detach())

        grad_norm = clip_grad_norm(self.parameters(), self.grad_clip, pp_group=self._pp_group())
        # Only the last pipeline stage holds a loss (the others add zero).
        loss = self._sum_over_pipeline(self._sum_over_data(loss_sum))
        # Loss and norm are global, so every rank reaches the same verdict.
        skip, reason = self.guard.check(float(loss), float(grad_norm), f"at {self.tokens_seen:,} tokens")
        if skip:
            rank_zero_warn(f"skipped the step at {self.tokens_seen:,} tokens: {reason}")
        else:
            optimizer.step()
            self.tokens_seen += global_targets
        optimizer.zero_grad(set_to_none=True)

        seq_len = tokens.shape[-1] - 1
        self.log("train/loss", loss, prog_bar=True, rank_zero_only=True)
        self.log("train/lr", lr, rank_zero_only=True)
        self.log("train/phase", float(self.phase), rank_zero_only=True)
        self.log("train/grad_norm", grad_norm, rank_zero_only=True)
        self.log("train/tokens_seen", float(self.tokens_seen), rank_zero_only=True)
        self.log("train/batch_tokens", float(global_targets), rank_zero_only=True)
        self.log("train/seq_len", float(seq_len), rank_zero_only=True)
        self.log("train/step_time", time.perf_counter() - start, rank_zero_only=True)
        self.log("train/skipped_steps", float(self.guard.skipped_steps), rank_zero_only=True)
        if self.guard.spike_factor is not None:
            self.log("train/loss_spikes", float(self.guard.spikes), rank_zero_only=True)
        return loss

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self._eval_sums(batch)
        self._val_sum += loss_sum
        self._val_count += count

    def _eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (sum of scored token CE, number of scored targets) over a step batch.

        The sums still need reducing over data (and pipeline, for the loss) ranks. An
        optional ``loss_mask`` entry ``[n_micro, micro_batch, seq_len]`` picks the targets.
        """
        tokens, doc_ids, mask = batch["tokens"], batch["doc_ids"], batch.get("loss_mask")
        scored = tokens[..., 1:].numel() if mask is None else int(mask.sum())
        count = torch.tensor(scored / self._cp_size(), device=self.device, dtype=torch.float64)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        with self._loss_context():
            if self.pipeline is not None:
                loss = self.pipeline_pass(tokens, doc_ids, 1.0, train=False, loss_mask=mask)
                if loss is not None:
                    loss_sum += as_local(loss).double()
                return loss_sum, count
            for micro in range(tokens.shape[0]):
                micro_mask = None if mask is None else mask[micro]
                loss_sum += as_local(self.micro_batch_loss(tokens[micro], doc_ids[micro], 1.0, micro_mask)).double()
        return loss_sum, count

    @torch.no_grad()
    def evaluate_loss(self, batches: Iterable[dict[str, torch.Tensor]]) -> float:
        """Mean token CE over step batches under any parallel layout (every rank calls it).

        Used by recipe callbacks that evaluate outside Lightning's validation loop, such as
        the context-length gates; ``loss_mask`` entries score only the targets they mark.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            count = torch.zeros((), device=self.device, dtype=torch.float64)
            for batch in batches:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss_sum, scored = self._eval_sums(batch)
                total += loss_sum
                count += scored
            total = self._sum_over_pipeline(self._sum_over_data(total))
            count = self._sum_over_data(count)
            return float(total / count.clamp(min=1))
        finally:
            self.model.train(was_training)

    def set_rope(self, rope_theta: float, rope_scaling: RopeScaling | None) -> None:
        """Switch the RoPE base and scaling of the live model (a context-length stage may)."""
        parallel = self._parallel()
        parts = [stage for _, stage in parallel.pipeline_stages] if parallel and parallel.pipeline_stages else [self.model]
        for part in parts:
            part.args = replace(part.args, rope_theta=rope_theta, rope_scaling=rope_scaling)
            part.init_buffers(self.device)
        self.live_rope = (rope_theta, rope_scaling)

    def on_validation_epoch_end(self) -> None:
        total = self._sum_over_pipeline(self._sum_over_data(self._val_sum))
        count = self._sum_over_data(self._val_count)
        name = "test/loss" if self.trainer.testing else "val/loss"
        self.log(name, (total / count.clamp(min=1)).float(), prog_bar=True, rank_zero_only=True)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ------------------------------------------------------------------ state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        hparams = checkpoint.get("hyper_parameters")
        if self.live_rope is not None and isinstance(hparams, dict) and hparams.get("arch") is not None:
            # The weights were last trained with this RoPE (a context stage changed it): record
            # it, so that an export or evaluation of the checkpoint rebuilds the same model.
            theta, scaling = self.live_rope
            arch = hparams["arch"]
            if isinstance(arch, ModelArgs):
                arch = replace(arch, rope_theta=theta, rope_scaling=scaling)
            else:
                arch = {**dict(arch), "rope_theta": theta, "rope_scaling": None if scaling is None else vars(scaling)}
            checkpoint["hyper_parameters"] = {**hparams, "arch": arch}
        checkpoint["step_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.guard.load_state_dict(checkpoint.get("step_guard", {}))


def _masked_targets(targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Targets with the unscored ones set to cross-entropy's ignore index."""
    return targets if loss_mask is None else targets.masked_fill(~loss_mask.bool(), -100)


def as_local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (the loss under loss_parallel) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _parameter_seed(seed: int, name: str) -> int:
    # A stable hash (Python's hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def replicable_init(model: Transformer, seed: int) -> None:
    """Initialise each parameter in full from a stream seeded by its name, then shard it.

    Goes one unit (embedding, a block, norm, head) at a time so host memory holds at most
    one full block. Works for plain and DTensor parameters alike.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    units: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        unit = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        full = torch.empty(param.shape, dtype=param.dtype)
        init_parameter(model.args, name, full, torch.Generator().manual_seed(_parameter_seed(seed, name)))
        units.setdefault(unit, {})[name] = full
        if len(units) > 1:  # a unit is complete once the next one starts
            first = next(iter(units))
            set_model_state_dict(model, units.pop(first), options=StateDictOptions(full_state_dict=True, strict=False))
    for state in units.values():
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_weights(model: Transformer, path: str | Path) -> None:
    """Load full-model weights into ``model`` whatever its sharding (DTensor or plain).

    ``path`` is a full state dict saved with ``torch.save``, or a DCP directory of one (what
    ``recipe import`` writes; a Lightning DCP checkpoint's model weights load too). From
    DCP each rank reads just the slices its shards need, so no rank ever holds the full
    model and any layout loads the same weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(path)
    if path.is_dir():
        _load_dcp_weights(model, path)
        return
    if not path.is_file():
        raise ConfigError(f"init_weights_path {path} does not exist; pass a state dict saved with torch.save "
                          "or a weights directory written by `recipe import`")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} model tensors (first: {missing[0]}); "
                          "save the state dict of a model of the same shape")
    state = {k: v for k, v in state.items() if k in own}
    _check_shapes(path, {k: tuple(v.shape) for k, v in state.items()}, own)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _check_shapes(path: Path, stored: dict[str, tuple[int, ...]], own: dict[str, torch.Tensor]) -> None:
    for name, tensor in own.items():
        if name in stored and stored[name] != tuple(tensor.shape):
            raise ConfigError(f"{path}: {name} has shape {list(stored[name])} but the model has "
                              f"{list(tensor.shape)}; set model.arch to the architecture of these weights")


def _load_dcp_weights(model: Transformer, path: Path) -> None:
    """``dcp.load`` into this rank's (possibly sharded) parameters: DCP reshards on read."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if not (path / ".metadata").is_file():
        raise ConfigError(f"init_weights_path {path} is a directory without DCP .metadata; pass a weights "
                          "directory written by `recipe import` or a torch.save state dict")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored = {k: tuple(m.size) for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
    # A Lightning DCP checkpoint keeps the LightningModule's weights as state_dict.model.<name>.
    prefix = "state_dict.model." if any(k.startswith("state_dict.model.") for k in stored) else ""
    state = get_model_state_dict(model)  # this rank's shards (DTensors), keyed by parameter name
    missing = sorted(k for k in state if prefix + k not in stored)
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} model tensors (first: {missing[0]}); "
                          "set model.arch to the architecture of these weights")
    _check_shapes(path, {k: stored[prefix + k] for k in state}, state)
    to_load = {prefix + k: v for k, v in state.items()}
    with warnings.catch_warnings():  # one process: DCP warns that it runs without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(to_load, checkpoint_id=str(path))
    state = {k: to_load[prefix + k] for k in state}
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
