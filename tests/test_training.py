"""End-to-end: `recipe fit` on real text, TensorBoard scalars, checkpoints, exact resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recipe.cli import main
from recipe.module import LlamaLightningModule
from recipe.config import LRSchedule
from cli_runs import read_scalars
from stdlib_corpus import DEFAULT_MODULES, stdlib_shards

SCALARS = ["train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_seen",
           "train/tokens_per_sec", "train/batch_tokens", "train/seq_len"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Token shards built from real text: a few standard-library modules."""
    return stdlib_shards(tmp_path_factory.mktemp("corpus"), [*DEFAULT_MODULES, "shlex.py", "glob.py", "heapq.py"], 0.2)


def write_config(tmp_path: Path, data_dir: Path, run: str, max_steps: int, **trainer) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "val_check_interval": 3,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path / run),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / run / "tb"), "name": "", "version": "v"}},
            "callbacks": [
                {"class_path": "callbacks.throughput.TokenThroughput"},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / run / "ckpt"), "every_n_train_steps": 3,
                               "save_last": True, "save_top_k": -1}},
            ],
            **trainer,
        },
        "model": {
            "arch": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
                     "ffn_dim_multiplier": None, "max_seq_len": 64},
            "optimizer": {"lr": 3e-3},
            "lr_schedule": {"warmup_steps": 2, "decay_steps": 12, "min_lr": 3e-5},
        },
        "data": {"data_dir": str(data_dir), "build_demo": False, "seq_len": 32,
                 "global_batch_size": 4, "micro_batch_size": 2, "val_batches": 2},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path



def test_fit_cli_writes_scalars_and_checkpoints(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, "smoke", max_steps=6)
    # The installed console script, as a user runs it.
    recipe = Path(sys.executable).parent / "recipe"
    result = subprocess.run([str(recipe), "fit", "--config", str(config)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(tmp_path / "smoke" / "tb")
    for tag in SCALARS:
        assert tag in scalars, f"missing TensorBoard scalar {tag}; have {sorted(scalars)}"
    assert sorted(scalars["train/loss"]) == list(range(6))
    assert scalars["train/tokens_seen"][5] == 6 * 4 * 32
    assert scalars["train/batch_tokens"][0] == 4 * 32 and scalars["train/seq_len"][0] == 32
    assert len(scalars["val/loss"]) == 2
    first_val, last_val = (scalars["val/loss"][s] for s in sorted(scalars["val/loss"]))
    assert last_val < first_val
    ckpts = sorted(p.name for p in (tmp_path / "smoke" / "ckpt").iterdir())
    assert "last.ckpt" in ckpts and any("step=6" in name for name in ckpts)


def test_resume_continues_exactly(tmp_path, data_dir):
    straight = write_config(tmp_path, data_dir, "straight", max_steps=6)
    assert main(["fit", "--config", str(straight)]) == 0
    first = write_config(tmp_path, data_dir, "resumed", max_steps=3)
    assert main(["fit", "--config", str(first)]) == 0
    assert main(["fit", "--config", str(first), "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    a = read_scalars(tmp_path / "straight" / "tb")
    b = read_scalars(tmp_path / "resumed" / "tb")
    assert sorted(b["train/loss"]) == list(range(6))
    for step in range(6):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-6, rel=0), step
        assert b["train/tokens_seen"][step] == a["train/tokens_seen"][step]
        assert b["train/lr"][step] == pytest.approx(a["train/lr"][step], rel=1e-9)
    ckpt = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["tokens_seen"] == 6 * 4 * 32


def test_micro_batch_count_does_not_change_the_step(data_dir):
    """Loss normalised by global tokens: 1 x 4 and 4 x 1 micro-batches give one gradient."""
    from recipe.data.stream import TokenStream

    batch = next(iter(TokenStream(data_dir / "train", seq_len=32, global_batch_size=4, micro_batch_size=4,
                                  dp_rank=0, dp_size=1, start_position=0)))
    tokens, docs = batch["tokens"], batch["doc_ids"]
    grads = []
    for shape in [(1, 4), (4, 1), (2, 2)]:
        module = LlamaLightningModule(
            arch=__import__("recipe.model", fromlist=["ModelArgs"]).ModelArgs(
                dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
                max_seq_len=64),
            lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=0.0),
        )
        module.configure_model()
        t, d = tokens.reshape(*shape, -1), docs.reshape(*shape, -1)
        for i in range(shape[0]):
            module.micro_batch_loss(t[i], d[i], float(t[..., 1:].numel())).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-7, rtol=1e-5)


def test_lr_schedule_shape():
    s = LRSchedule(warmup_steps=10, decay_steps=110, min_lr=1e-5)
    assert s.lr_at(0, 1e-3) == pytest.approx(1e-4)
    assert s.lr_at(9, 1e-3) == pytest.approx(1e-3)
    assert s.lr_at(60, 1e-3) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s.lr_at(110, 1e-3) == pytest.approx(1e-5) and s.lr_at(500, 1e-3) == pytest.approx(1e-5)


def test_info_prints_exact_count(capsys):
    assert main(["info", "--config", "configs/llama3_405b.yaml"]) == 0
    assert "405,853,388,800" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [(["info", "--config", "nope.yaml"], "config file not found"),
     (["fit", "--config", "configs/tiny.yaml", "--model.arch.n_heads", "5", "--trainer.max_steps", "1"],
      "not divisible"),
     (["fit", "--config", "configs/tiny.yaml", "--data.data_dir", "/nonexistent/shards",
       "--data.build_demo", "false"], "/nonexistent/shards")],
)
def test_bad_input_is_one_line(args, needle):
    result = subprocess.run([sys.executable, "-m", "recipe.cli", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "RECIPE_TRACEBACK": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]


def test_sequence_longer_than_model_is_rejected(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, data_dir, "long", max_steps=1)
    assert main(["fit", "--config", str(config), "--data.seq_len", "128"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


# Training configs only: configs/data and configs/scaling hold curation and sweep configs.
FIT_CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if p.parts[1] not in ("data", "scaling"))


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_config_parses(config, capsys):
    """Each shipped YAML validates against the CLI's signatures (class paths, keys, types)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out
