"""A newcomer's first commands: a missing ``--config`` or a mistyped key stops with one line that
names the fix, a config error leaves no empty log folder behind, and a short run of the tiny
config prints no advertising, no deprecation warning of ours, real FLOPs and bars with totals."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipe.cli import main
from stdlib_corpus import stdlib_domain_shards

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# ---------------------------------------------------------------------------- shared data and run


def domain_shards(folder: Path) -> Path:
    """Token shards with the tiny config's domains (code, prose, math) from standard-library modules."""
    if (folder / "shards").exists():
        return folder / "shards"
    return stdlib_domain_shards(folder, {"code": ["textwrap.py", "fnmatch.py"], "prose": ["colorsys.py", "glob.py"],
                                         "math": ["fractions.py", "bisect.py"]}, val_fraction=0.4)


_RUNS: dict[str, tuple[Path, Path, str]] = {}


def tiny_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One 4-step ``recipe fit --config configs/tiny.yaml`` in a subprocess from an empty folder, made
    once per test session: ``(its default_root_dir, the folder it ran in, its console output)``.

    Validation runs after steps 2 and 4; ``-W default::DeprecationWarning`` shows the deprecation
    warnings Python hides outside ``__main__``, so that ours would be seen.
    """
    base = str(tmp_path_factory.getbasetemp())
    if base not in _RUNS:
        folder = tmp_path_factory.mktemp("tiny_fit")
        shards = domain_shards(folder / "data")
        cwd, root = folder / "cwd", folder / "run"
        cwd.mkdir()
        done = subprocess.run(
            [sys.executable, "-W", "default::DeprecationWarning", "-m", "recipe.cli", "fit", "--config", str(TINY),
             "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(root),
             "--data.data_dir", str(shards), "--data.curate_config", "null", "--data.val_batches", "1",
             "--model.arch.n_layers", "2"],
            cwd=cwd, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        _RUNS[base] = (root, cwd, output)
    return _RUNS[base]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_fit(tmp_path_factory)


# ---------------------------------------------------------------------------- no config


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "usage:" not in err
    return err


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_a_lightning_command_without_config_names_the_shipped_configs(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([command]) == 2
    err = one_error_line(capsys)
    assert f"`recipe {command}` needs --config" in err
    found = re.search(r"start with `recipe \w+ --config ([^`\s]+)", err)
    assert found and Path(found.group(1)).resolve() == TINY, err
    folder, names = re.search(r"shipped configs in (\S+)/: (.*)\)$", err).groups()
    assert names.split(", ")[0] == "tiny.yaml" and "llama3_8b.yaml" in names
    for name in names.split(", "):
        assert list(Path(folder).glob(name)), f"{folder}/{name} named but absent"
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/, no demo corpus in the current folder


# ---------------------------------------------------------------------------- typos


def config_with(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rename_optimizer(config: dict) -> None:
    config["model"]["optimzer"] = config["model"].pop("optimizer")


def rename_ramp_stages(config: dict) -> None:
    ramp = config["trainer"]["callbacks"][0]
    assert ramp["class_path"].endswith("BatchSizeRamp")
    ramp["init_args"]["stagez"] = ramp["init_args"].pop("stages")


@pytest.mark.parametrize("args, edit, expected", [
    (["--model.optimzer.lr", "1e-3"], None,
     "unknown option --model.optimzer.lr; did you mean `--model.optimizer.lr`?"),
    (["--model.arch.dimm=96"], None, "unknown option --model.arch.dimm; did you mean `--model.arch.dim`?"),
    (["--trainer.max_stepz", "3", "--data.seq_lne", "64"], None,
     "unknown options --trainer.max_stepz (did you mean `--trainer.max_steps`?), "
     "--data.seq_lne (did you mean `--data.seq_len`?)"),
    ([], rename_optimizer, "in the config; did you mean `model.optimizer."),
    ([], rename_ramp_stages, "callbacks.batch_ramp.BatchSizeRamp has no parameter 'stagez'; did you mean 'stages'?"),
])
def test_a_mistyped_key_is_one_line_naming_the_nearest_valid_one(args, edit, expected, tmp_path, capsys):
    config = config_with(tmp_path, edit) if edit else TINY
    assert main(["fit", "--config", str(config), *args]) == 2
    err = one_error_line(capsys)
    assert expected in err, err


def test_a_bad_value_is_one_line_naming_the_key(capsys):
    assert main(["fit", "--config", str(TINY), "--trainer.max_steps", "many"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: trainer.max_steps: ") and "many" in err and "recipe fit --help" in err


# ---------------------------------------------------------------------------- log folders


def test_a_run_stopped_by_a_config_error_leaves_no_empty_log_folder(tmp_path, capsys):
    """The loggers start before the checkpoint is read: the failed start's version folder (its
    config.yaml and an empty event file) is removed, an earlier run's folder is kept."""
    from lightning.pytorch.loggers import TensorBoardLogger

    shards = domain_shards(tmp_path / "data")
    root = tmp_path / "run"
    earlier = TensorBoardLogger(str(root))  # lightning_logs/version_0 of an earlier run, with a value
    earlier.log_metrics({"train/loss": 1.0}, step=0)
    earlier.finalize("success")
    args = ["validate", "--config", str(TINY), "--trainer.default_root_dir", str(root), "--data.data_dir", str(shards),
            "--data.curate_config", "null", "--data.val_batches", "1", "--ckpt_path", str(tmp_path / "missing.ckpt")]
    assert main(args) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert any((root / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------- a quiet terminal


def test_a_tiny_run_prints_no_noise(tiny_run):
    root, cwd, output = tiny_run
    assert list(cwd.iterdir()) == []  # everything under default_root_dir
    for noise in ("Tip:", "litlogger", "litmodels", "LeafSpec", "FLOPs 0", "FLOPs: 0", "No seed found",
                  "max_epochs was not set"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"
    ours = [line for line in output.splitlines()
            if re.match(r"\s*(\S+\.py):\d+: \w*(Deprecation|Future)Warning", line)
            and Path(line.split(":")[0].strip()).resolve().is_relative_to(REPO)]
    assert not ours, ours


def test_the_model_summary_counts_flops(tiny_run):
    _, _, output = tiny_run
    flops = re.search(r"training FLOPs per token: (\S+) at seq_len 128", output)
    assert flops, output[-3000:]
    from recipe.config import ModelArgs
    from recipe.flops import flops_per_token

    arch = yaml.safe_load(TINY.read_text())["model"]["arch"]
    expected = flops_per_token(ModelArgs(**{**arch, "n_layers": 2}), 128)
    assert float(flops.group(1)) == pytest.approx(expected, rel=1e-2)
    assert re.search(r"model: Llama 3, 2 layers, dim 64, .* parameters", output)


def test_validation_bars_show_their_total(tiny_run):
    _, _, output = tiny_run
    bars = [part for part in re.split(r"[\r\n]", output) if part.lstrip().startswith("Validation")]
    assert bars, output[-3000:]
    for bar in bars:
        assert re.search(r"\| 1/1 \[|\| 0/1 \[", bar), bar
        assert "/?" not in bar, bar


def test_recipe_test_reports_the_held_out_loss_of_a_checkpoint(tiny_run, capsys):
    root, _, output = tiny_run
    data = next((root.parent / "data").glob("**/train")).parent
    assert main(["test", "--config", str(TINY), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
                 "--trainer.default_root_dir", str(root), "--data.data_dir", str(data),
                 "--data.curate_config", "null", "--data.val_batches", "1", "--model.arch.n_layers", "2"]) == 0
    out = capsys.readouterr()
    assert re.search(r"test/loss\s+│?\s*\d+\.\d+", out.out + out.err), (out.out + out.err)[-3000:]
