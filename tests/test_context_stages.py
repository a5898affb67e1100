"""Context-length stages: schedule, gates (short-context loss, needle in a haystack), RoPE, resume."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from callbacks.annealing import LRAnnealing
from callbacks.context_stages import ContextLengthStages, ContextStage, paper_stages
from cli_runs import read_scalars, tiny_fit_config
from recipe.cli import main
from recipe.errors import ConfigError
from recipe.evals.niah import build_trials, score_trials
from recipe.config import LRSchedule, OptimizerConfig
from recipe.model import ModelArgs, RopeScaling, rope_cache
from recipe.module import LlamaLightningModule
from recipe.plan import ContextSettings, RunPlan, build_run_plan
from stdlib_corpus import stdlib_shards

UNGATED = dict(val_loss_tolerance=None, niah_min_accuracy=None, niah_trials=0)


def test_paper_stages_go_from_8k_to_128k_in_six_steps():
    stages = paper_stages()
    assert len(stages) == 6
    assert [s.seq_len for s in stages][-1] == 131_072 and stages[0].seq_len > 8192
    assert all(a.seq_len < b.seq_len for a, b in zip(stages, stages[1:]))
    assert sum(s.tokens for s in stages) == pytest.approx(800e9, rel=1e-3)


def stages_plan(cb: ContextLengthStages, global_batch_size: int, seq_len: int, annealing=None,
                max_seq_len: int = 1024) -> RunPlan:
    """The run plan of ``cb`` over a data module's fixed layout (no ramp)."""
    module = SimpleNamespace(arch=ModelArgs(max_seq_len=max_seq_len), lr_schedule=LRSchedule(),
                             optim_config=OptimizerConfig())
    data = SimpleNamespace(global_batch_size=global_batch_size, seq_len=seq_len, micro_batch_size=1)
    return build_run_plan(SimpleNamespace(callbacks=[cb, *([annealing] if annealing else [])]), module, data)


def test_ungated_stages_follow_fixed_token_counts():
    cb = ContextLengthStages([ContextStage(64, 1000), ContextStage(128, 2000, batch_tokens=1024)], start_tokens=500,
                             **UNGATED)
    plan = stages_plan(cb, 8, 16)  # the batch schedule before the stages: 128 tokens in 16-token rows
    assert cb.starts == plan.stage_starts == [500, 1500]
    assert plan.layout_at(0) == plan.layout_at(499) == (8, 16)
    assert plan.layout_at(500) == plan.layout_at(1499) == (2, 64)  # the base's batch tokens at the stage's length
    assert plan.layout_at(1500) == plan.layout_at(10**12) == (8, 128)  # the last stage runs to the end


def test_rope_of_each_stage_is_the_last_one_set():
    scaling = RopeScaling(factor=8.0)
    cb = ContextLengthStages([ContextStage(64, 10), ContextStage(128, 10, rope_theta=1e6),
                              ContextStage(256, 10, rope_scaling={"factor": 8.0})], **UNGATED)
    plan = stages_plan(cb, 4, 64)
    assert plan.rope_theta == 5e5 and plan.rope_scaling is None  # the model's
    assert [plan.rope_at(k) for k in (-1, 0, 1, 2)] == [(5e5, None), (5e5, None), (1e6, None), (1e6, scaling)]


def test_set_rope_rebuilds_the_table_of_the_live_model():
    arch = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                     ffn_dim_multiplier=None, max_seq_len=32)
    module = LlamaLightningModule(arch=arch)
    module.configure_model()
    tokens = torch.randint(0, 64, (1, 32))
    before = module.model(tokens)
    module.set_rope(1e4, RopeScaling(factor=4.0, original_max_seq_len=8))
    expected = rope_cache(replace(arch, rope_theta=1e4, rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=8)))
    assert torch.equal(module.model.rope, expected)
    assert module.arch.rope_theta == 500000.0  # the configured shape is untouched
    assert not torch.allclose(module.model(tokens), before)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(stages=[]), "at least one stage"),
    (dict(stages=[ContextStage(128, 10), ContextStage(64, 10)]), "order the stages by increasing length"),
    (dict(stages=[ContextStage(64, 0)]), "must be positive"),
    (dict(stages=[ContextStage(64, 10, batch_tokens=100)]), "multiple of seq_len=64"),
    (dict(stages=[ContextStage(64, 10)], val_loss_tolerance=-0.1), "val_loss_tolerance must be >= 0"),
    (dict(stages=[ContextStage(64, 10)], niah_min_accuracy=1.5), "niah_min_accuracy must be in [0, 1]"),
    (dict(stages=[ContextStage(64, 10)], niah_trials=0), "needs niah_trials >= 1"),
    (dict(stages=[ContextStage(64, 10)], start_tokens=-1), "start_tokens must be >= 0"),
])
def test_bad_stages_are_rejected_at_config_time(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")) as err:
        ContextLengthStages(**kwargs)
    assert "\n" not in str(err.value)


def _fake_trainer(callbacks=(), num_workers=0):
    data = SimpleNamespace(val_stream=None, num_workers=num_workers)
    return SimpleNamespace(datamodule=data, callbacks=list(callbacks))


@pytest.mark.parametrize("case, needle", [
    ("rope", "context stage 1 uses seq_len=2048, which exceeds model.arch.max_seq_len=1024"),
    ("anneal", "after annealing begins"),
    ("workers", "need data.num_workers: 0"),
])
def test_stages_that_cannot_run_are_rejected_at_setup(case, needle):
    # The lengths and the annealing overlap are the run plan's checks (the module builds
    # it in setup, the launcher before any rank starts); the loader workers the callback's.
    stages = [ContextStage(512, 1000), ContextStage(2048 if case == "rope" else 1024, 1000)]
    cb = ContextLengthStages(stages, start_tokens=100)
    with pytest.raises(ConfigError, match=needle) as err:
        if case == "workers":
            cb.setup(_fake_trainer([cb], num_workers=2), None, "fit")
        else:
            annealing = LRAnnealing(total_tokens=2000, anneal_tokens=1500) if case == "anneal" else None
            stages_plan(cb, 2, 512, annealing=annealing)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- needle in a haystack


@pytest.fixture(scope="module")
def tokenizer():
    from recipe.tokenizer import Tokenizer

    return Tokenizer()


def test_needle_trials_plant_the_key_and_end_with_the_answer(tokenizer):
    trials = build_trials(tokenizer, seq_len=200, trials=5, candidates=3, seed=1)
    assert [t.depth for t in trials] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for trial in trials:
        assert len(set(trial.candidates)) == 3 and trial.key == trial.candidates[0]
        for seq, n, key in zip(trial.sequences, trial.answer_lengths, trial.candidates):
            assert seq.shape == (201,)
            assert tokenizer.decode(seq[-n:].tolist()).strip() == key
            text = tokenizer.decode(seq[:-n].tolist())
            assert text.count(f"The pass key is {trial.key}.") == 1 and text.endswith("The pass key is")
    # The needle moves from the start of the haystack to its end with the depth.
    where = [tokenizer.decode(t.sequences[0].tolist()).index("The pass key is") for t in trials]
    assert where == sorted(where) and where[0] < where[-1]


def test_needle_scoring_by_likelihood(tokenizer):
    trials = build_trials(tokenizer, seq_len=120, trials=4, candidates=4, seed=2)
    truth = {tuple(t.sequences[0]) for t in trials}
    knows = score_trials(trials, lambda seq, n: 0.1 if tuple(seq) in truth else 2.0)
    assert knows.accuracy == 1.0 and knows.margin == pytest.approx(3 * (2.0 - 0.1))
    chance = score_trials(trials, lambda seq, n: 1.0)  # ties never count as retrieved
    assert chance.accuracy == 0.0
    wrong = score_trials(trials, lambda seq, n: 2.0 if tuple(seq) in truth else 0.1)
    assert wrong.accuracy == 0.0 and wrong.margin < 0


def test_needle_needs_room(tokenizer):
    with pytest.raises(ConfigError, match="leaves no room for the haystack"):
        build_trials(tokenizer, seq_len=32)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return stdlib_shards(tmp_path_factory.mktemp("stages"), val_fraction=0.3)


def stages_config(tmp_path: Path, data_dir: Path, run: str, max_steps: int, **gates) -> Path:
    """64-token steps of 16 tokens; from 128 tokens on 128-token steps of 64, then 256-token steps of 128."""
    stages = {"class_path": "callbacks.context_stages.ContextLengthStages",
              "init_args": {"stages": [{"seq_len": 64, "tokens": 256, "batch_tokens": 128},
                                       {"seq_len": 128, "tokens": 512, "batch_tokens": 256, "rope_theta": 1.0e6}],
                            "start_tokens": 128, "val_batches": 1, "niah_trials": 2, "niah_candidates": 2, **gates}}
    path = tiny_fit_config(tmp_path, data_dir, run, max_steps, [stages], seed=7, checkpoint_every=1,
                           lr_schedule={"warmup_steps": 1, "decay_steps": 100, "min_lr": 1e-4})
    config = yaml.safe_load(path.read_text())
    config["model"]["arch"]["max_seq_len"] = 128
    path.write_text(yaml.safe_dump(config))
    return path


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ContextLengthStages"))
    return {**state, "starts": ckpt["run_plan"]["context_starts"]}  # the recorded starts are the plan's state


def test_gated_stages_advance_one_step_after_passing_and_resume_exactly(tmp_path, data_dir):
    gates = {"val_loss_tolerance": 10.0, "niah_min_accuracy": None}
    assert main(["fit", "--config", str(stages_config(tmp_path, data_dir, "straight", 7, **gates))]) == 0
    a = read_scalars(tmp_path / "straight")
    # Stage 0 spends its 256 tokens after step 3 (at 384); the batch at 384 is already cut,
    # so stage 1 starts at 512 - one 128-token step later.
    assert [a["train/seq_len"][s] for s in range(7)] == [16, 16, 64, 64, 64, 128, 128]
    assert [a["train/batch_tokens"][s] for s in range(7)] == [64, 64, 128, 128, 128, 256, 256]
    assert [a["train/context_stage"][s] for s in range(7)] == [-1, -1, 0, 0, 0, 1, 1]
    # Gates after stage 0 (step 3, at 384 tokens) and, reporting only, after the last stage (1,024).
    assert set(a["context/short_val_loss"]) == set(a["context/niah_accuracy"]) == {3, 6}
    state = final_state(tmp_path / "straight")
    assert state["starts"] == [128, 512] and state["history"][0]["passed"]
    # The checkpoint describes the model as last trained: stage 1's RoPE base.
    ckpt = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["arch"]["rope_theta"] == 1e6

    cut = stages_config(tmp_path, data_dir, "resumed", 4, **gates)  # stopped right after the gates passed
    assert main(["fit", "--config", str(cut)]) == 0
    assert main(["fit", "--config", str(cut), "--trainer.max_steps", "7", "--ckpt_path", "last"]) == 0
    b = read_scalars(tmp_path / "resumed")
    for step in range(7):
        assert b["train/seq_len"][step] == a["train/seq_len"][step], step
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6, rel=0), step
    assert final_state(tmp_path / "resumed")["starts"] == state["starts"]


def test_failing_gates_hold_the_stage_then_stop(tmp_path, data_dir):
    gates = {"val_loss_tolerance": None, "niah_min_accuracy": 1.0, "niah_trials": 4, "niah_candidates": 4,
             "recheck_tokens": 128, "max_extra_tokens": 256}
    with pytest.warns(UserWarning, match="still fails its gates"):
        assert main(["fit", "--config", str(stages_config(tmp_path, data_dir, "held", 20, **gates))]) == 0
    a = read_scalars(tmp_path / "held")
    steps = sorted(a["train/seq_len"])
    assert set(a["train/seq_len"].values()) == {16.0, 64.0}  # never reached the 128-token stage
    # Gates at 384 (budget spent), then every 128 tokens: 512, 640 - the third exceeds 256 extra tokens.
    assert sorted(a["context/niah_accuracy"]) == [3, 4, 5] and len(steps) == 6
    assert all(v < 1.0 for v in a["context/niah_accuracy"].values())


def test_a_start_recorded_under_a_prefetched_batch_is_caught(data_dir):
    import lightning as L

    from recipe.data.datamodule import TokenDataModule

    class RecordsTooEarly(L.Callback):
        """Gated stages whose second stage is recorded to start at the batch already cut."""

        run_plan_settings = ContextSettings([ContextStage(16, 64), ContextStage(32, 64)], gated=True)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                pl_module.run_plan.record_stage_start(1, int(batch["next_position"]))

    arch = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
                     max_seq_len=64)
    data = TokenDataModule(data_dir=str(data_dir), seq_len=16, global_batch_size=4, micro_batch_size=2,
                           val_batches=0, build_demo=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[RecordsTooEarly()])
    with pytest.raises(RuntimeError, match="a stage start was recorded for a batch already read"):
        trainer.fit(LlamaLightningModule(arch=arch), datamodule=data)
