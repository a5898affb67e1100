"""Step guards: a NaN batch is skipped as if it had never been in the data; spikes; divergence."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from recipe.data.datamodule import TokenDataModule
from recipe.errors import ConfigError
from recipe.guard import StepGuard, TrainingDivergedError
from recipe.model import ModelArgs
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule
from stdlib_corpus import stdlib_shards

ARCH = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, max_seq_len=32)
DATA = dict(seq_len=16, global_batch_size=4, micro_batch_size=2, val_batches=0, build_demo=False)
POISONED = 2  # index of the batch whose forward pass is poisoned


def test_non_finite_steps_are_skipped_then_the_run_stops():
    guard = StepGuard(max_consecutive_skips=3)
    assert guard.check(2.0, 1.0, "") == (False, None)
    assert guard.check(float("nan"), 1.0, "") == (True, "non-finite loss")
    assert guard.check(2.0, float("inf"), "") == (True, "non-finite gradient norm")
    assert guard.check(2.0, 1.0, "")[0] is False  # a good step resets the run of skips
    guard.check(float("nan"), 1.0, "")
    guard.check(float("nan"), 1.0, "")
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps were skipped") as err:
        guard.check(float("nan"), 1.0, "at 1,024 tokens")
    assert "at 1,024 tokens" in str(err.value) and "\n" not in str(err.value)
    assert guard.skipped_steps == 5


def test_loss_spikes_against_the_running_median():
    guard = StepGuard(spike_factor=2.0, spike_window=3, skip_spikes=True)
    for loss in (3.0, 2.0, 2.5):
        assert guard.check(loss, 1.0, "") == (False, None)
    skip, reason = guard.check(5.1, 1.0, "")  # > 2 x median(3, 2, 2.5) = 5.0
    assert skip and reason.startswith("loss spike") and guard.spikes == 1
    assert guard.check(4.9, 1.0, "")[0] is False
    restored = StepGuard(spike_factor=2.0, spike_window=3, skip_spikes=True)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert list(restored.recent) == [2.0, 2.5, 4.9]
    logging_only = StepGuard(spike_factor=2.0, spike_window=3)
    for loss in (1.0, 1.0, 1.0, 9.0):
        assert logging_only.check(loss, 1.0, "")[0] is False
    assert logging_only.spikes == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_consecutive_skips=0), "max_consecutive_skips must be >= 1"),
    (dict(spike_factor=0.5), "spike_factor must be > 1"),
    (dict(spike_window=1), "spike_window must be >= 3"),
])
def test_bad_guard_settings(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        StepGuard(**kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return stdlib_shards(tmp_path_factory.mktemp("guard"))


class PoisonOneBatch(L.Callback):
    """Makes the embedding output NaN for one batch: its loss and every gradient are NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        embeddings = pl_module.model.tok_embeddings
        if batch_idx == POISONED:
            embeddings.forward = lambda tokens, _orig=embeddings.forward: _orig(tokens) * math.nan
        elif "forward" in vars(embeddings):
            del embeddings.forward


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


class WithoutOneBatch(TokenDataModule):
    """The same stream with the poisoned batch left out."""

    def train_dataloader(self):
        return (batch for i, batch in enumerate(super().train_dataloader()) if i != POISONED)


def fit(data: TokenDataModule, callbacks: list) -> tuple[LlamaLightningModule, LossRecorder]:
    torch.manual_seed(0)
    module = LlamaLightningModule(arch=ModelArgs(**ARCH), optimizer=OptimizerConfig(lr=3e-3),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=1e-4))
    recorder = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[*callbacks, recorder])
    trainer.fit(module, datamodule=data)
    return module, recorder


def test_a_nan_batch_is_skipped_as_if_it_were_not_in_the_data(data_dir):
    with pytest.warns(UserWarning, match="skipped the step at token 128: non-finite loss"):
        poisoned, seen = fit(TokenDataModule(data_dir=str(data_dir), **DATA), [PoisonOneBatch()])
    clean, expected = fit(WithoutOneBatch(data_dir=str(data_dir), **DATA), [])
    assert math.isnan(seen.losses[POISONED]) and len(seen.losses) == 6  # 5 optimizer steps from 6 batches
    assert seen.losses[:POISONED] + seen.losses[POISONED + 1:] == pytest.approx(expected.losses, abs=0, rel=0)
    # tokens_seen is the data position: both runs consumed the six batches of the stream
    # (the clean one skips the poisoned batch's slot, positions and LR schedule included).
    assert poisoned.guard.skipped_steps == 1 and poisoned.tokens_seen == clean.tokens_seen == 6 * 64
    for (name, a), b in zip(poisoned.model.named_parameters(), clean.model.parameters()):
        assert torch.equal(a, b), name
