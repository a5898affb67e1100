"""Every output of a run lives under ``trainer.default_root_dir``: TensorBoard logs, checkpoints,
averages and the rank heartbeats. The shipped configs name no other output path, so
``--trainer.default_root_dir DIR`` moves a whole run."""

from pathlib import Path

import pytest
import yaml

from callbacks.averaging import PolyakAveraging
from callbacks.checkpoint import RecipeCheckpoint
from callbacks.watchdog import RankWatchdog
from cli_runs import read_scalars
from recipe.cli import main
from stdlib_corpus import stdlib_domain_shards

REPO = Path(__file__).resolve().parents[1]
# Training configs only: configs/data and configs/scaling hold curation and sweep configs.
FIT_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                     if p.relative_to(REPO).parts[1] not in ("data", "scaling"))


def under(path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def walk(node, keys=()):
    """``(key path, value)`` of every leaf of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*keys, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*keys, i))
    else:
        yield keys, node


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_shipped_config_names_no_output_path_but_its_root(config):
    trainer = yaml.safe_load((REPO / config).read_text())["trainer"]
    assert str(trainer.get("default_root_dir", "")).startswith("runs/"), f"{config}: set trainer.default_root_dir"
    for keys, value in walk(trainer):
        key = keys[-1] if keys else None
        assert key not in ("save_dir", "dirpath"), f"{config}: {'.'.join(map(str, keys))} fixes an output path"
        if key == "save_path":
            assert not Path(value).is_absolute() and not str(value).startswith("runs/"), (config, value)


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_outputs_resolve_under_default_root_dir(config, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule

    monkeypatch.chdir(REPO)
    root = tmp_path / "elsewhere" / "run"
    args = ["--config", config, "--trainer.default_root_dir", str(root),
            "--data.data_dir", str(tmp_path / "data"), "--data.curate_config", "null"]
    if yaml.safe_load(Path(config).read_text())["trainer"].get("accelerator") == "gpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.num_nodes", "1"]  # the paths do not depend on it
    cli = LightningCLI(LlamaLightningModule, TokenDataModule, run=False, args=args)
    trainer = cli.trainer

    assert Path(trainer.default_root_dir).resolve() == root.resolve()
    assert len(trainer.loggers) == 1 and under(trainer.loggers[0].log_dir, root), trainer.loggers
    assert under(trainer.log_dir, root)  # where LightningCLI saves the run's config.yaml
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, RecipeCheckpoint)]
    assert checkpoints, f"{config} has no RecipeCheckpoint"
    for cb in checkpoints:
        cb.resolve_dirpath(trainer)
        assert Path(cb.dirpath) == Path(trainer.default_root_dir) / "checkpoints"
    for cb in trainer.callbacks:
        if isinstance(cb, PolyakAveraging) and cb.save_path is not None:
            assert under(cb.resolved_save_path(trainer), root), cb.resolved_save_path(trainer)
        if isinstance(cb, RankWatchdog):
            assert under(cb.ranks_dir(trainer), root)


def write_domain_shards(folder: Path) -> Path:
    """Token shards with the tiny config's three domains (code, prose, math), from stdlib modules."""
    domains = {"code": ["textwrap.py", "fnmatch.py", "bisect.py"], "prose": ["colorsys.py", "glob.py", "shlex.py"],
               "math": ["fractions.py", "statistics.py", "numbers.py"]}
    folder.mkdir(parents=True)
    return stdlib_domain_shards(folder, domains, val_fraction=0.3)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_tiny_run_writes_only_under_default_root_dir(tmp_path, monkeypatch):
    """Two short runs of the tiny config (the second resumes with ``--ckpt_path last``) from an
    empty working directory: everything they write is under ``--trainer.default_root_dir``."""
    data_dir = write_domain_shards(tmp_path / "data")
    config = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("PolyakAveraging"):
            callback["init_args"]["start_tokens"] = 0  # average from the first step
        if callback["class_path"].endswith("RecipeCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    config_path = tmp_path / "tiny.yaml"  # keeps default_root_dir: runs/tiny, overridden below
    config_path.write_text(yaml.safe_dump(config))
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    common = ["fit", "--config", str(config_path), "--trainer.default_root_dir", str(root),
              "--data.data_dir", str(data_dir), "--data.curate_config", "null", "--data.val_batches", "1",
              "--model.arch.n_layers", "2"]

    assert main([*common, "--trainer.max_steps", "2"]) == 0
    assert main([*common, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0

    assert files_under(cwd) == [], "written outside default_root_dir"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "lightning_logs", "polyak_average.pt"]
    written = files_under(root)
    for name in ("checkpoints/last.ckpt", "checkpoints/step=00000002.ckpt", "lightning_logs/version_0/config.yaml",
                 "lightning_logs/version_1/config.yaml"):
        assert name in written, written
    # The second run found the first one's last.ckpt under the root and continued from step 2.
    first, second = (read_scalars(root / "lightning_logs" / v)["train/loss"] for v in ("version_0", "version_1"))
    assert sorted(first) == [0, 1] and sorted(second) == [2], (first, second)
