"""LightningModule: one ``training_step`` is one optimizer step over its micro-batches.

Manual optimization because the step owns its micro-batch loop: the batch-size ramp
changes the number of micro-batches per step and a pipeline schedule runs forward and
backward itself. Each micro-batch's loss is ``sum(token CE) / tokens in the global batch``,
so accumulated gradients equal the gradient of the global mean loss exactly, whatever the
micro-batch count or data-parallel split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from recipe.model import ModelArgs, ModelConfigError, Transformer
from recipe.schedule import LRSchedule


@dataclass
class OptimizerConfig:
    """AdamW. ``lr`` is the peak LR that the schedule scales."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool | None = None  # None: torch's default implementation (foreach)


class LlamaLightningModule(L.LightningModule):
    def __init__(
        self,
        arch: ModelArgs | None = None,
        optimizer: OptimizerConfig | None = None,
        lr_schedule: LRSchedule | None = None,
        grad_clip: float | None = 1.0,
        init_seed: int = 0,
    ) -> None:
        """
        Args:
            arch: model shape (Table 3 of the paper for the released sizes).
            optimizer: AdamW settings; ``lr`` is the peak learning rate.
            lr_schedule: warm-up and cosine decay to a floor, in optimizer steps.
            grad_clip: clip the global gradient norm to this value (None: no clipping).
            init_seed: seed of the weight initialisation, independent of the data order.
        """
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch or ModelArgs()
        self.optim_config = optimizer or OptimizerConfig()
        self.lr_schedule = lr_schedule or LRSchedule()
        self.grad_clip = grad_clip
        self.init_seed = init_seed
        self.automatic_optimization = False
        self.model: Transformer | None = None
        self.tokens_seen = 0
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

    # ------------------------------------------------------------------ model and optimizer

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with torch.device("meta"):
            model = Transformer(self.arch)
        model = self.parallelize(model)
        model.to_empty(device=self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model.init_weights(buffer_device=self.device)
        self.model = model

    def parallelize(self, model: Transformer) -> Transformer:
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

    def on_validation_start(self) -> None:
        self._check_data_matches_model()

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

    def micro_batch_loss(self, tokens: torch.Tensor, doc_ids: torch.Tensor, normalizer: float) -> torch.Tensor:
        """Sum of next-token cross-entropies of one micro-batch, divided by ``normalizer``."""
        logits = self.model(tokens[:, :-1], doc_ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        return loss / normalizer

    def global_token_count(self, local: int) -> int:
        """Targets in the global batch, summed over data-parallel ranks."""
        count = torch.tensor(float(local), device=self.device)
        return int(self.trainer.strategy.reduce(count, reduce_op="sum").item())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        optimizer = self.optimizers()
        tokens, doc_ids = batch["tokens"], batch["doc_ids"]  # [n_micro, micro_batch, seq_len + 1]
        local_targets = tokens[..., 1:].numel()
        global_targets = self.global_token_count(local_targets)
        lr = self.lr_schedule.lr_at(self.trainer.global_step, self.optim_config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tokens.shape[0]):
            loss = self.micro_batch_loss(tokens[micro], doc_ids[micro], global_targets)
            self.manual_backward(loss)
            loss_sum += loss.detach()

        grad_norm = self.clip_grad_norm()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = self.trainer.strategy.reduce(loss_sum, reduce_op="sum")
        self.tokens_seen += global_targets
        seq_len = tokens.shape[-1] - 1
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", lr)
        self.log("train/grad_norm", grad_norm)
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/batch_tokens", float(global_targets))
        self.log("train/seq_len", float(seq_len))
        self.log("train/step_time", time.perf_counter() - start)
        return loss

    def clip_grad_norm(self) -> torch.Tensor:
        """Global gradient norm, clipped to ``grad_clip`` when set."""
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens, doc_ids = batch["tokens"], batch["doc_ids"]
        for micro in range(tokens.shape[0]):
            self._val_sum += self.micro_batch_loss(tokens[micro], doc_ids[micro], 1.0).double()
            self._val_count += tokens[micro, :, 1:].numel()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        name = "test/loss" if self.trainer.testing else "val/loss"
        self.log(name, (total / count.clamp(min=1)).float(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ------------------------------------------------------------------ state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
