"""EMA and Polyak weight averaging: exact values, validation swap, export, resume, parallel layouts.

One single-process reference run (4 steps, validation after step 3 with the Polyak average)
records the weights after every step; the averages must equal the mean / EMA recomputed
from those records. A 2-rank world then trains FSDP and TP runs and a checkpoint saved
under FSDP that resumes under TP, and every average must equal the reference's.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.averaging import EMAAveraging, PolyakAveraging
from dist_harness import run_world
from recipe.data.build import build_shards
from recipe.data.datamodule import TokenDataModule
from recipe.errors import ConfigError
from recipe.model import ModelArgs, Transformer
from recipe.parallel.strategy import Parallel4DStrategy
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule
from stdlib_corpus import stdlib_corpus

ARCH = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, max_seq_len=64)
DATA = dict(seq_len=16, global_batch_size=4, micro_batch_size=2, val_batches=1, build_demo=False)
STEPS = 4
POLYAK_START = 2  # the average of the weights after steps 2, 3 and 4
EMA_DECAY = 0.7
VAL_AT = 3  # validate once, after step 3, with the Polyak average (of steps 2 and 3)


def make_module(init_weights_path: str | None = None) -> LlamaLightningModule:
    return LlamaLightningModule(
        arch=ModelArgs(**ARCH), optimizer=OptimizerConfig(lr=3e-3),
        lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=1e-4), grad_clip=1.0,
        init_weights_path=init_weights_path,
    )


def make_averagers(save_path: str | None = None) -> tuple[PolyakAveraging, EMAAveraging]:
    return (PolyakAveraging(start_step=POLYAK_START, use_for_validation=True, save_path=save_path),
            EMAAveraging(decay=EMA_DECAY))


def full_params(module: LlamaLightningModule) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.model.named_parameters()}


class Recorder(L.Callback):
    """Weights after every step and after validation (single process), and the validation losses."""

    def __init__(self, snapshots: bool = True) -> None:
        self.snapshots = snapshots
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.after_val: dict[str, torch.Tensor] = {}
        self.seen_in_val: dict[str, torch.Tensor] = {}
        self.val_losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.snapshots:
            self.after_step[trainer.global_step] = full_params(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.snapshots and not self.seen_in_val:
            self.seen_in_val = full_params(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Runs after the averaging callbacks' on_validation_end (listed before this one).
        if "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
        if self.snapshots:
            self.after_val = full_params(pl_module)


def fit(module, data_dir: Path, callbacks: list, strategy="auto", devices: int = 1, max_steps: int = STEPS,
        validate: bool = True, ckpt_dir: Path | None = None, ckpt_path: str | None = None) -> L.Trainer:
    callbacks = list(callbacks)
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=None if validate else 0, val_check_interval=VAL_AT,
                        check_val_every_n_epoch=None, callbacks=callbacks)
    trainer.fit(module, datamodule=TokenDataModule(data_dir=str(data_dir), **DATA), ckpt_path=ckpt_path,
                weights_only=False if ckpt_path else None)
    return trainer


def averages_of(trainer: L.Trainer, module, polyak: PolyakAveraging, ema: EMAAveraging) -> dict:
    """Full averaged weights (complete on rank 0) of both callbacks."""
    return {"polyak": polyak.full_state_dict(trainer, module), "ema": ema.full_state_dict(trainer, module)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("averaging")
    corpus = stdlib_corpus(root / "corpus", ["textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py"])
    data_dir = root / "shards"
    build_shards(corpus, data_dir, val_fraction=0.25)
    module, recorder = make_module(), Recorder()
    polyak, ema = make_averagers(save_path=str(root / "polyak.pt"))
    trainer = fit(module, data_dir, [polyak, ema, recorder])
    averages = averages_of(trainer, module, polyak, ema)
    torch.save(averages, root / "reference_averages.pt")
    return {"root": root, "data_dir": data_dir, "recorder": recorder, "averages": averages,
            "polyak": polyak, "ema": ema, "saved": root / "polyak.pt"}


def assert_all_close(got: dict, want: dict, atol: float, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=lambda m, n=name: f"{what}: {n}: {m}")


def test_averages_equal_direct_recomputation(reference):
    snaps = reference["recorder"].after_step
    assert sorted(snaps) == list(range(1, STEPS + 1))
    # Training moved the weights, so the average is not trivially any one snapshot.
    assert max((snaps[STEPS][n] - snaps[POLYAK_START][n]).abs().max().item() for n in snaps[STEPS]) > 1e-3
    polyak, ema = reference["polyak"], reference["ema"]
    assert polyak.count == STEPS - POLYAK_START + 1 and polyak.first_step == POLYAK_START
    assert ema.count == STEPS and ema.first_step == 1

    mean = {n: torch.stack([snaps[s][n] for s in range(POLYAK_START, STEPS + 1)]).mean(0) for n in snaps[1]}
    assert_all_close(reference["averages"]["polyak"], mean, 1e-6, "polyak")
    expected = {n: t.clone() for n, t in snaps[1].items()}
    for step in range(2, STEPS + 1):
        expected = {n: EMA_DECAY * e + (1 - EMA_DECAY) * snaps[step][n] for n, e in expected.items()}
    assert_all_close(reference["averages"]["ema"], expected, 1e-6, "ema")
    # Kept in fp32, one per parameter, under the model's parameter names.
    assert all(t.dtype == torch.float32 for t in polyak.averages.values())


def test_saved_average_loads_as_a_model(reference):
    saved = torch.load(reference["saved"], weights_only=True)
    assert_all_close(saved, reference["averages"]["polyak"], 0, "saved file")
    model = Transformer(ModelArgs(**ARCH))
    model.load_state_dict(saved, strict=True)
    # ... and as the starting weights of a new run.
    module = make_module(init_weights_path=str(reference["saved"]))
    module.configure_model()
    assert_all_close(full_params(module), saved, 0, "init_weights_path")


def test_validation_uses_the_average_then_restores(reference):
    recorder, snaps = reference["recorder"], reference["recorder"].after_step
    mean_2_3 = {n: (snaps[2][n] + snaps[3][n]) / 2 for n in snaps[1]}
    assert_all_close(recorder.seen_in_val, mean_2_3, 1e-6, "weights during validation")
    assert_all_close(recorder.after_val, snaps[VAL_AT], 0, "weights after validation")
    # The logged loss is the loss of the averaged model.
    path = reference["root"] / "mean_2_3.pt"
    torch.save(mean_2_3, path)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    (result,) = trainer.validate(make_module(init_weights_path=str(path)),
                                 datamodule=TokenDataModule(data_dir=str(reference["data_dir"]), **DATA), verbose=False)
    assert recorder.val_losses == pytest.approx([result["val/loss"]], abs=1e-6, rel=0)


def test_resume_single_process(reference, tmp_path):
    """Stopped after step 3 with a checkpoint, resumed to step 4: the same averages as one run."""
    data_dir = reference["data_dir"]
    fit(make_module(), data_dir, list(make_averagers()), max_steps=STEPS - 1, validate=False, ckpt_dir=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    states = [s for k, s in ckpt["callbacks"].items() if k.startswith("PolyakAveraging")]
    assert states and states[0]["count"] == STEPS - 1 - POLYAK_START + 1 and states[0]["stored"] == "state"
    module, (polyak, ema) = make_module(), make_averagers()
    trainer = fit(module, data_dir, [polyak, ema], validate=False, ckpt_path=str(tmp_path / "last.ckpt"))
    got = averages_of(trainer, module, polyak, ema)
    for kind in ("polyak", "ema"):
        assert_all_close(got[kind], reference["averages"][kind], 1e-6, f"resumed {kind}")


def test_options_are_checked():
    with pytest.raises(ConfigError, match="decay"):
        EMAAveraging(decay=1.0)
    with pytest.raises(ConfigError, match="every_n_steps"):
        PolyakAveraging(every_n_steps=0)


@pytest.mark.parametrize("offset,sampled", [(0, [2, 4]), (1, [3])])
def test_start_tokens_and_every_n_steps(reference, offset, sampled):
    """Started by tokens - the steps whose data position (``batch["position"]``) is at or past
    the mark (the annealed steps, with ``LRAnnealing.anneal_start``), not a step that merely
    crosses it - sampled every 2nd step."""
    snaps = reference["recorder"].after_step
    tokens_per_step = DATA["global_batch_size"] * DATA["seq_len"]
    polyak = PolyakAveraging(start_tokens=tokens_per_step + offset, every_n_steps=2)
    module = make_module()
    module.configure_model()

    class Stub:  # what the hooks read from the trainer
        global_step = 0
        strategy = None

    trainer = Stub()
    for step in range(1, STEPS + 1):
        trainer.global_step = step - 1
        batch = {"position": torch.tensor((step - 1) * tokens_per_step)}
        polyak.on_train_batch_start(trainer, module, batch, step - 1)
        with torch.no_grad():  # "train" the step: its weights are the reference run's
            for name, p in module.model.named_parameters():
                p.copy_(snaps[step][name])
        trainer.global_step = step
        polyak.on_train_batch_end(trainer, module, None, batch, step - 1)
    assert polyak.first_step == sampled[0] and polyak.count == len(sampled)
    mean = {n: torch.stack([snaps[s][n] for s in sampled]).mean(0) for n in snaps[1]}
    assert_all_close(polyak.averages, mean, 1e-6, f"sampled after steps {sampled}")


# ---------------------------------------------------------------------- two ranks


class HookedStrategy(Parallel4DStrategy):
    """``Parallel4DStrategy`` with the proposed hook in ``load_checkpoint``.

    Around the strategy's own ``dcp.load``: ask each callback for ``distributed_state``, add
    the entries the checkpoint holds to ``state["state_dict"]``, load, and take them out
    again before ``set_model_state_dict`` (strict) sees the model's keys.
    """

    extra_loaded: int | None = None

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        import torch.distributed.checkpoint as dcp

        real_load = dcp.load

        def load(state, checkpoint_id=None, **kwargs):
            extra = {}
            for callback in self.lightning_module.trainer.callbacks:
                if hasattr(callback, "distributed_state"):
                    extra.update(callback.distributed_state(self.lightning_module))
            if extra:
                stored = dcp.FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata
                extra = {k: v for k, v in extra.items() if f"state_dict.{k}" in stored}
                state["state_dict"].update(extra)
            real_load(state, checkpoint_id=checkpoint_id, **kwargs)
            for key in extra:
                del state["state_dict"][key]
            self.extra_loaded = len(extra)

        dcp.load = load
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            dcp.load = real_load


def _max_diffs(got: dict, want: dict) -> dict:
    out = {}
    for kind, tensors in want.items():
        assert set(got[kind]) == set(tensors), kind
        name = max(tensors, key=lambda n: (got[kind][n] - tensors[n]).abs().max().item())
        out[kind] = ((got[kind][name] - tensors[name]).abs().max().item(), name)
    return out


LAYOUTS = {"fsdp2": dict(dp_shard=2), "tp2": dict(tp=2, dp_shard=1), "pp2": dict(pp=2, dp_shard=1)}


def _world(data_dir: str, reference_path: str, ckpt_dir: str) -> dict:
    """In one 2-rank world: FSDP, TP and PP runs, and FSDP-saved checkpoints resumed under TP."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    want = torch.load(reference_path, weights_only=True)
    data, results = Path(data_dir), {}
    for name, layout in LAYOUTS.items():
        # Under PP rank 0 holds only the first stage: the exported file must gather both.
        save_path = str(Path(ckpt_dir) / f"{name}_polyak.pt") if layout.get("pp", 1) > 1 else None
        module, recorder, (polyak, ema) = make_module(), Recorder(snapshots=False), make_averagers(save_path)
        trainer = fit(module, data, [polyak, ema, recorder], strategy=Parallel4DStrategy(**layout), devices=2)
        got = averages_of(trainer, module, polyak, ema)  # a collective: on every rank
        results[name] = {"diffs": _max_diffs(got, want) if dist.get_rank() == 0 else None, "val": recorder.val_losses}
    # Saved under FSDP after step 3 (sharded, through DCP), resumed under TP to step 4: once
    # with the stock strategy (the callback reads its entries itself), once with the hook.
    save_dir = Path(ckpt_dir) / "fsdp2"
    fit(make_module(), data, list(make_averagers()), strategy=Parallel4DStrategy(dp_shard=2), devices=2,
        max_steps=STEPS - 1, validate=False, ckpt_dir=save_dir)
    for name, strategy in {"resumed_stock": Parallel4DStrategy(tp=2, dp_shard=1),
                           "resumed_hooked": HookedStrategy(tp=2, dp_shard=1)}.items():
        module, (polyak, ema) = make_module(), make_averagers()
        trainer = fit(module, data, [polyak, ema], strategy=strategy, devices=2, validate=False,
                      ckpt_path=str(save_dir / "last.ckpt"))
        got = averages_of(trainer, module, polyak, ema)
        results[name] = {"diffs": _max_diffs(got, want) if dist.get_rank() == 0 else None,
                         "extra_loaded": getattr(strategy, "extra_loaded", None), "count": polyak.count}
    return results


def test_two_ranks_layouts_export_and_resume(reference, tmp_path):
    ranks = run_world(_world, 2, timeout=300, init_pg=False, data_dir=str(reference["data_dir"]),
                      reference_path=str(reference["root"] / "reference_averages.pt"), ckpt_dir=str(tmp_path))
    # The averages of every rank went to the checkpoint, as DCP entries (not into meta.pt).
    meta = torch.load(tmp_path / "fsdp2" / "last.ckpt" / "meta.pt", weights_only=False)
    assert all("averages" not in state for state in meta["callbacks"].values())
    assert any(state.get("stored") == "dcp" for state in meta["callbacks"].values())
    got = ranks[0]
    for run in (*LAYOUTS, "resumed_stock", "resumed_hooked"):
        for kind, (diff, name) in got[run]["diffs"].items():
            assert diff <= 1e-5, f"{run} {kind}: {name} differs by {diff}"
    for run in LAYOUTS:
        assert got[run]["val"] == pytest.approx(reference["recorder"].val_losses, abs=1e-5, rel=0), run
    # 2 callbacks x every parameter, through the strategy's own dcp.load.
    n_params = len(reference["averages"]["polyak"])
    assert got["resumed_hooked"]["extra_loaded"] == 2 * n_params
    assert all(r["resumed_stock"]["count"] == STEPS - POLYAK_START + 1 for r in ranks)
    # The file written under PP holds both stages' averaged weights.
    saved = torch.load(tmp_path / "pp2_polyak.pt", weights_only=True)
    assert_all_close(saved, reference["averages"]["polyak"], 1e-5, "pp2 file")
