"""LightningModule: the model, the optimizer and the loss; one ``training_step`` is one optimizer step.

The module knows nothing of the parallel layout. The strategy's step path
(``recipe.parallel.step``) cuts each batch for this rank, runs its micro-batches (or the
pipeline schedule) through ``self.model`` and ``self.loss``, and returns the global loss
and gradient norm. The run plan (``recipe.plan``) gives every step its shape from the
data position where it starts: learning rate, annealing phase, RoPE settings.

Manual optimization because the step owns its micro-batch loop: the batch-size ramp
changes the number of micro-batches per step and a pipeline schedule runs forward and
backward itself. Each micro-batch's loss is ``sum(token CE) / tokens in the global batch``,
so accumulated gradients equal the gradient of the global mean loss exactly, whatever the
micro-batch count or data-parallel split.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from recipe.config import LRSchedule, ModelArgs, OptimizerConfig, RopeScaling
from recipe.errors import ConfigError, ModelConfigError
from recipe.guard import StepGuard
from recipe.lightning_compat import attached_trainer
from recipe.model import Transformer, init_parameter
from recipe.parallel.step import StepPath, masked_targets, step_path_for
from recipe.resume import SETTINGS_KEY, check_settings, run_settings


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
        self.run_plan = None  # recipe.plan.RunPlan, built in setup() when training on the recipe's data
        self.tokens_seen = 0  # global data position after the last step
        self.live_rope: tuple[float, RopeScaling | None] | None = None  # set when the plan changes RoPE
        self._step_path: tuple[Any, StepPath] | None = None
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())
        self._settings_checked = False

    # ------------------------------------------------------------------ model and optimizer

    @property
    def step_path(self) -> StepPath:
        """How a step runs under the trainer's strategy (one process without a trainer)."""
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if self._step_path is None or self._step_path[0] is not strategy:
            self._step_path = (strategy, step_path_for(strategy, self.device))
        return self._step_path[1]

    def configure_model(self) -> None:
        if self.model is not None:
            return
        path = self.step_path
        with torch.device("meta"):
            model = Transformer(self.arch)
        model = path.parallelize(model)
        for part in path.model_parts(model):
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
        path.attach(model, self.loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optim_config
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]  # norm gains
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch: the sum of its token cross-entropies (fp32; -100 unscored)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def micro_batch_loss(self, tokens: torch.Tensor, doc_ids: torch.Tensor, normalizer: float,
                         loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``loss / normalizer`` of rows ``[micro_batch, seq_len + 1]`` through the whole model.

        The one-process form of a micro-batch, for scripts and benchmarks; under a
        parallel layout the step path cuts the rows for each rank instead.
        """
        logits = self.model(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
        return self.loss(logits, masked_targets(tokens[:, 1:], loss_mask)) / normalizer

    # ------------------------------------------------------------------ checks and plan

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if self.run_plan is None and hasattr(data, "micro_batch_size") and hasattr(data, "seq_len"):
            from recipe.plan import build_run_plan

            self.run_plan = build_run_plan(self.trainer, self, data)
            # The batch-layout rule of this layout, once for every shape the run can take.
            self.run_plan.check_layout(lambda batch, seq_len: self.step_path.check_batch(
                batch, seq_len, data.micro_batch_size))

    def on_fit_start(self) -> None:
        self._check_data_matches_model()

    def on_train_start(self) -> None:
        # A restored optimizer state brings the checkpoint's betas, eps and weight decay
        # back; the run's own settings apply (the LR is set at every step anyway).
        cfg = self.optim_config
        for optimizer in self.trainer.optimizers:
            for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
                group.update(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=decay)

    def on_validation_start(self) -> None:
        self._check_data_matches_model()

    def _check_data_matches_model(self) -> None:
        # Sequence lengths are the run plan's to check (every layout it can produce).
        vocab = getattr(self.trainer.datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.arch.vocab_size:
            raise ModelConfigError(
                f"the data was tokenized with a {vocab}-token vocabulary but model.arch.vocab_size="
                f"{self.arch.vocab_size}; set vocab_size to at least {vocab}"
            )

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        position = int(batch.get("position", self.tokens_seen))
        shape = self.run_plan.at(position) if self.run_plan is not None else None
        if shape is not None:
            lr = shape.lr
            self.set_rope(shape.rope_theta, shape.rope_scaling)
        else:
            lr = self.lr_schedule.lr_at(self.trainer.global_step, self.optim_config.lr)
        optimizer = self.optimizers()
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss = self.step_path.train(self, batch)
        grad_norm = self.step_path.clip_grad_norm(self.parameters(), self.grad_clip)
        # The step's one host synchronisation: the guard's verdict. Loss and norm are
        # global, so every rank reaches the same one.
        loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()
        skip, reason = self.guard.check(loss_value, norm_value, f"at token {position:,}")
        if skip:
            rank_zero_warn(f"skipped the step at token {position:,}: {reason}")
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = batch["tokens"]
        batch_tokens = self.step_path.global_targets(tokens)
        # One clock: the data position. A skipped step consumed its batch like any other.
        self.tokens_seen = int(batch["next_position"]) if "next_position" in batch else position + batch_tokens

        self.log("train/loss", loss_value, prog_bar=True, rank_zero_only=True)
        self.log("train/lr", lr, rank_zero_only=True)
        self.log("train/grad_norm", norm_value, rank_zero_only=True)
        self.log("train/tokens_seen", float(self.tokens_seen), rank_zero_only=True)
        self.log("train/batch_tokens", float(batch_tokens), rank_zero_only=True)
        self.log("train/seq_len", float(tokens.shape[-1] - 1), rank_zero_only=True)
        if shape is not None:
            self.log("train/phase", float(shape.phase), rank_zero_only=True)
            self.log("train/context_stage", float(shape.context_stage), rank_zero_only=True)
        self.log("train/step_time", time.perf_counter() - start, rank_zero_only=True)
        self.log("train/skipped_steps", float(self.guard.skipped_steps), rank_zero_only=True)
        if self.guard.spike_factor is not None:
            self.log("train/loss_spikes", float(self.guard.spikes), rank_zero_only=True)
        return loss

    def set_rope(self, rope_theta: float, rope_scaling: RopeScaling | None) -> None:
        """Switch the RoPE base and scaling of the live model (rebuilds the tables only on a change)."""
        current = self.live_rope or (self.arch.rope_theta, self.arch.rope_scaling)
        if (rope_theta, rope_scaling) == current:
            return
        for part in self.step_path.model_parts(self.model):
            part.args = replace(part.args, rope_theta=rope_theta, rope_scaling=rope_scaling)
            part.init_buffers(self.device)
        self.live_rope = (rope_theta, rope_scaling)

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self.step_path.eval_sums(self, batch)
        self._val_sum += loss_sum
        self._val_count += count

    def on_validation_epoch_end(self) -> None:
        name = "test/loss" if self.trainer.testing else "val/loss"
        loss = self.step_path.mean_loss(self._val_sum, self._val_count)
        self.log(name, loss.float(), prog_bar=True, rank_zero_only=True)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

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
                loss_sum, scored = self.step_path.eval_sums(self, batch)
                total += loss_sum
                count += scored
            return float(self.step_path.mean_loss(total, count))
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        if self.run_plan is not None:
            checkpoint["run_plan"] = self.run_plan.state_dict()
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
        checkpoint[SETTINGS_KEY] = run_settings(self)

    def settings(self) -> dict[str, Any]:
        """The settings in effect (defaults filled in), as a checkpoint records them."""
        return {"arch": self.arch, "optimizer": self.optim_config, "lr_schedule": self.lr_schedule,
                "grad_clip": self.grad_clip, "init_seed": self.init_seed, "init_weights_path": self.init_weights_path,
                "init_mode": self.init_mode, "guard": self.guard}

    def check_resumed_settings(self, checkpoint: dict, source: str) -> None:
        """Compare ``checkpoint``'s settings with this run's before its weights load (``recipe.resume``).

        The 4D strategy calls it itself, since it loads sharded weights before the hooks run.
        """
        if self._settings_checked:
            return
        trainer = attached_trainer(self)
        fitting = trainer is not None and trainer.state.fn == "fit"
        check_settings(checkpoint, run_settings(self), source, list_changes=fitting)
        self._settings_checked = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumed_settings(checkpoint, str(getattr(attached_trainer(self), "ckpt_path", None)
                                                    or "the checkpoint"))
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        if self.run_plan is not None and "run_plan" in checkpoint:
            self.run_plan.load_state_dict(checkpoint["run_plan"])
        self.guard.load_state_dict(checkpoint.get("step_guard", {}))


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
