"""Batch-size ramp: the paper's numbers, exact streaming across a change, exact resume."""

from pathlib import Path

import numpy as np
import pytest

from callbacks.batch_ramp import BatchSizeRamp, RampStage
from recipe.cli import main
from recipe.data.shards import ShardSet
from recipe.data.stream import TokenStream
from recipe.errors import ConfigError
from cli_runs import read_scalars, tiny_fit_config
from stdlib_corpus import stdlib_shards

M = 2**20
PAPER = [RampStage(0, 4 * M, 4096), RampStage(252_000_000, 8 * M, 8192), RampStage(2_870_000_000_000, 16 * M, 8192)]


def test_paper_ramp():
    ramp = BatchSizeRamp(PAPER)
    assert ramp.layout_at(0) == (1024, 4096)
    assert ramp.layout_at(251_000_000) == (1024, 4096)
    assert ramp.layout_at(253_000_000) == (1024, 8192)
    assert ramp.layout_at(2_860_000_000_000) == (1024, 8192)
    assert ramp.layout_at(2_880_000_000_000) == (2048, 8192)
    assert ramp.stage_at(2_880_000_000_000).batch_tokens == 16 * M


@pytest.mark.parametrize("stages,needle", [
    ([RampStage(5, 64, 16)], "start at tokens=0"),
    ([RampStage(0, 64, 16), RampStage(0, 128, 16)], "must increase"),
    ([RampStage(0, 60, 16)], "multiple of seq_len"),
])
def test_bad_ramps(stages, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        BatchSizeRamp(stages)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return stdlib_shards(tmp_path_factory.mktemp("ramp"))


@pytest.mark.parametrize("dp_size", [1, 2])
def test_stream_follows_the_ramp_without_losing_tokens(data_dir, dp_size):
    ramp = BatchSizeRamp([RampStage(0, 64, 16), RampStage(200, 128, 32), RampStage(600, 256, 32)])
    streams = [iter(TokenStream(data_dir / "train", seq_len=16, global_batch_size=4, micro_batch_size=2,
                                dp_rank=r, dp_size=dp_size, batch_schedule=ramp.layout_at)) for r in range(dp_size)]
    flat = ShardSet(data_dir / "train")
    position, shapes = 0, []
    for _ in range(8):
        parts = [next(s) for s in streams]
        assert int(parts[0]["position"]) == position
        inputs = np.concatenate([p["tokens"][..., :-1].reshape(-1) for p in parts])
        expected, _ = flat.window(position, len(inputs))
        assert np.array_equal(inputs, expected)  # every token once, in order, across the changes
        shapes.append(tuple(parts[0]["tokens"].shape))
        position = int(parts[0]["next_position"])
    local = lambda batch: batch // dp_size // 2  # noqa: E731
    assert shapes[:4] == [(local(4), 2, 17)] * 4  # 64-token steps until 256 >= 200
    assert shapes[4] == (local(4), 2, 33) and shapes[-1] == (local(8), 2, 33)


def ramp_config(tmp_path: Path, data_dir: Path, run: str, max_steps: int) -> Path:
    ramp = {"class_path": "callbacks.batch_ramp.BatchSizeRamp",
            "init_args": {"stages": [{"tokens": 0, "batch_tokens": 64, "seq_len": 16},
                                     {"tokens": 150, "batch_tokens": 128, "seq_len": 32}]}}
    return tiny_fit_config(tmp_path, data_dir, run, max_steps, [ramp], seed=3, checkpoint_every=2)


def test_ramp_training_resumes_exactly(tmp_path, data_dir):
    assert main(["fit", "--config", str(ramp_config(tmp_path, data_dir, "straight", 5))]) == 0
    cut = ramp_config(tmp_path, data_dir, "resumed", 2)
    assert main(["fit", "--config", str(cut)]) == 0
    assert main(["fit", "--config", str(cut), "--trainer.max_steps", "5", "--ckpt_path", "last"]) == 0
    a, b = read_scalars(tmp_path / "straight"), read_scalars(tmp_path / "resumed")
    # 64-token steps until 192 >= 150 tokens seen, then 128-token steps of 32-token sequences.
    assert [a["train/batch_tokens"][s] for s in range(5)] == [64, 64, 64, 128, 128]
    assert [a["train/seq_len"][s] for s in range(5)] == [16, 16, 16, 32, 32]
    for step in range(5):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6, rel=0), step
        assert b["train/batch_tokens"][step] == a["train/batch_tokens"][step]
