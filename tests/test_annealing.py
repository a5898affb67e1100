"""LR annealing to zero over the last tokens of the run: schedule, phase, stop, exact resume."""

from pathlib import Path

import pytest

from callbacks.annealing import LRAnnealing
from recipe.cli import main
from recipe.errors import ConfigError
from cli_runs import read_scalars, tiny_fit_config
from stdlib_corpus import stdlib_shards


def test_paper_annealing_schedule():
    anneal = LRAnnealing(total_tokens=15_600_000_000_000, anneal_tokens=40_000_000)
    start = anneal.anneal_start
    # A pure function of the position, the main schedule's LR there and its LR at the first
    # annealing step (the run plan computes that one from the schedule: nothing recorded).
    assert anneal.lr(start - 1, 8e-7, 8e-7) == 8e-7  # the main schedule until the last 40M tokens
    assert anneal.lr(start, 8e-7, 8e-7) == 8e-7
    assert anneal.lr(start + 20_000_000, 1.0, 8e-7) == pytest.approx(4e-7)  # linear in tokens, from the start LR
    assert anneal.lr(anneal.total_tokens, 1.0, 8e-7) == 0.0  # exactly zero at the end


def test_an_old_checkpoints_start_lr_is_not_read():
    anneal = LRAnnealing(total_tokens=384, anneal_tokens=192)
    anneal.load_state_dict({"start_lr": 0.5, "total_tokens": 384, "anneal_tokens": 192})
    assert anneal.state_dict() == {"total_tokens": 384, "anneal_tokens": 192}
    with pytest.warns(UserWarning, match="annealed over 100 of 400"):
        anneal.load_state_dict({"total_tokens": 400, "anneal_tokens": 100})


def test_annealing_longer_than_the_run_is_rejected():
    with pytest.raises(ConfigError, match="longer than the run") as err:
        LRAnnealing(total_tokens=10, anneal_tokens=20)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return stdlib_shards(tmp_path_factory.mktemp("anneal"), ["textwrap.py", "fnmatch.py", "bisect.py"], 0.3)


def config(tmp_path: Path, data_dir: Path, run: str, max_steps: int) -> Path:
    # 6 steps of 64 tokens; the last 3 anneal.
    anneal = {"class_path": "callbacks.annealing.LRAnnealing", "init_args": {"total_tokens": 384, "anneal_tokens": 192}}
    return tiny_fit_config(tmp_path, data_dir, run, max_steps, [anneal], seed=5, checkpoint_every=1,
                           lr_schedule={"warmup_steps": 2, "decay_steps": 100, "min_lr": 0.0})


def test_annealing_run_stops_at_zero_and_resumes_exactly(tmp_path, data_dir):
    # max_steps is larger than the run: annealing ends it at total_tokens.
    assert main(["fit", "--config", str(config(tmp_path, data_dir, "straight", 50))]) == 0
    a = read_scalars(tmp_path / "straight")
    assert sorted(a["train/loss"]) == list(range(6))
    assert [a["train/phase"][s] for s in range(6)] == [0, 0, 0, 1, 1, 1]
    start = a["train/lr"][3]
    assert start > 0
    assert [a["train/lr"][s] for s in (4, 5)] == pytest.approx([start * 2 / 3, start / 3], rel=1e-6)

    cut = config(tmp_path, data_dir, "resumed", 4)  # stopped inside the annealing phase
    assert main(["fit", "--config", str(cut)]) == 0
    assert main(["fit", "--config", str(cut), "--trainer.max_steps", "50", "--ckpt_path", "last"]) == 0
    b = read_scalars(tmp_path / "resumed")
    assert sorted(b["train/loss"]) == list(range(6))
    for step in range(6):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6, rel=0), step
        assert b["train/lr"][step] == pytest.approx(a["train/lr"][step], rel=1e-7), step
