"""The whole recipe resumes under another parallel layout as if it had never stopped.

A batch-size ramp, two gated context-length stages (the second with its own RoPE base),
a data-mix schedule with an annealing mix, LR annealing and Polyak averaging train one
process for 7 steps. A 2-rank context-parallel run saves after step 4 - right after the
first stage's gates passed, with the next stage's start recorded but not reached - and
a 2-stage pipeline resumes it: its losses, the gates' measurements (short-context loss
and needle likelihoods, evaluated under CP and then PP), stage starts, data position and
the Polyak average must match the uninterrupted single process.
"""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.annealing import LRAnnealing
from callbacks.averaging import PolyakAveraging
from callbacks.batch_ramp import BatchSizeRamp, RampStage
from callbacks.context_stages import ContextLengthStages, ContextStage
from callbacks.data_mix import DataMixSchedule, MixStage
from dist_harness import run_world
from recipe.data.build import build_shards
from recipe.data.datamodule import TokenDataModule
from recipe.model import ModelArgs
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule
from stdlib_corpus import DEFAULT_MODULES, stdlib_corpus

ARCH = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, ffn_dim_multiplier=None, max_seq_len=128)
DATA = dict(seq_len=16, global_batch_size=8, micro_batch_size=2, val_batches=0, build_demo=False)
STEPS, SAVED_AT = 7, 4
# Tokens after each step: 128, 256 (ramp to 32-token rows), 512, 768 (stage 0: 64-token
# rows; its gates pass here, so stage 1 starts one step later), 1024, 1536, 2048 (stage 1:
# 128-token rows, annealing and the annealing mix).


def recipe_callbacks() -> list[L.Callback]:
    return [
        BatchSizeRamp([RampStage(0, 128, 16), RampStage(256, 256, 32)]),
        ContextLengthStages([ContextStage(64, 256), ContextStage(128, 512, batch_tokens=512, rope_theta=1e6)],
                            start_tokens=512, val_loss_tolerance=10.0, val_batches=1, niah_trials=1,
                            niah_candidates=2, niah_min_accuracy=None),
        DataMixSchedule([MixStage(0, {"a": 0.5, "b": 0.5}), MixStage(256, {"a": 0.75, "b": 0.25})],
                        anneal_weights={"a": 0.25, "b": 0.75}),
        LRAnnealing(total_tokens=2048, anneal_tokens=1024),
        PolyakAveraging(start_tokens=1024),
    ]


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def run(data_dir: Path, strategy="auto", devices: int = 1, max_steps: int = STEPS, ckpt_dir: Path | None = None,
        ckpt_path: str | None = None) -> dict:
    module = LlamaLightningModule(arch=ModelArgs(**ARCH), optimizer=OptimizerConfig(lr=2e-3),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=20, min_lr=1e-4), grad_clip=1.0)
    callbacks = recipe_callbacks()
    recorder = LossRecorder()
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_last=True))
    data = TokenDataModule(data_dir=str(data_dir), **DATA)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[*callbacks, recorder])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    stages, polyak = callbacks[1], callbacks[4]
    average = polyak.full_state_dict(trainer, module) if polyak.count else {}
    return {"losses": recorder.losses, "starts": list(stages.starts), "gates": stages.history,
            "data": data.state_dict(), "average": average, "averaged_steps": polyak.count}


def _save_then_resume(data_dir: str, ckpt_dir: str) -> dict:
    from recipe.parallel.strategy import Parallel4DStrategy

    world = int(os.environ["WORLD_SIZE"])
    run(Path(data_dir), Parallel4DStrategy(cp=2, dp_shard=1), world, max_steps=SAVED_AT, ckpt_dir=Path(ckpt_dir))
    return run(Path(data_dir), Parallel4DStrategy(pp=2, dp_shard=1, pp_schedule="1F1B"), world,
               ckpt_path=str(Path(ckpt_dir) / "last.ckpt"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    texts = stdlib_corpus(root / "text", DEFAULT_MODULES)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:  # two domains of real text
        for i, path in enumerate(sorted(texts.iterdir())):
            f.write(json.dumps({"text": path.read_text(), "domain": "ab"[i % 2]}) + "\n")
    build_shards(corpus, root / "shards", val_fraction=0.3)
    return root / "shards"


def test_recipe_resumes_under_another_layout(data_dir, tmp_path):
    reference = run(data_dir)
    assert len(reference["losses"]) == STEPS and reference["starts"] == [512, 1024]
    assert reference["averaged_steps"] == 2  # the two annealing steps
    got = run_world(_save_then_resume, 2, init_pg=False, data_dir=str(data_dir), ckpt_dir=str(tmp_path / "ckpt"))[0]
    assert got["losses"] == pytest.approx(reference["losses"][SAVED_AT:], abs=1e-5, rel=0)
    assert got["starts"] == reference["starts"]
    assert [g["position"] for g in got["gates"]] == [g["position"] for g in reference["gates"]] == [768, 1536]
    for mine, theirs in zip(got["gates"], reference["gates"]):
        for key in ("short_val_loss", "reference", "niah_margin"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (mine, theirs)
    assert got["data"] == reference["data"]  # position, samples and each domain's position
    assert got["averaged_steps"] == reference["averaged_steps"]
    assert set(got["average"]) == set(reference["average"])
    for name, value in reference["average"].items():
        torch.testing.assert_close(got["average"][name], value, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
