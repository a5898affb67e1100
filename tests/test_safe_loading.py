"""No load path can execute code.

* The recipe's code never unpickles blindly: no ``weights_only=False``, no
  ``pickle.load(s)``, no ``yaml.load`` without a safe Loader (an ``ast`` walk).
* Each entry point that reads a checkpoint refuses a crafted one - a pickle whose
  ``__reduce__`` would run ``os.system`` - with a one-line ``RecipeError``, and the payload
  never runs.
* A Hugging Face index cannot point the import outside the checkpoint's folder.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from ast_scan import dotted
from recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("recipe", "callbacks", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


# ----------------------------------------------------------------------------- the walker


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line: what`` for every load in ``source`` that could unpickle or construct arbitrary objects."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    # Names bound by ``from pickle import load`` / ``from yaml import load``.
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        for kw in node.keywords:
            if kw.arg == "weights_only" and any(isinstance(v, ast.Constant) and v.value is False
                                                for v in ast.walk(kw.value)):  # also ``False if x else None``
                found.append(f"{where}: weights_only=False")
        name = dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        module, _, func = full.rpartition(".")
        if module.split(".")[0] in PICKLE_MODULES and func in ("load", "loads", "Unpickler"):
            found.append(f"{where}: {full}")
        if module == "yaml" and func in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
            found.append(f"{where}: {full}")
        if module == "yaml" and func in ("load", "load_all"):
            loader = next((kw.value for kw in node.keywords if kw.arg == "Loader"),
                          node.args[1] if len(node.args) > 1 else None)
            if loader is None or dotted(loader).rpartition(".")[2] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: {full} without a safe Loader")
    return found


def test_the_walker_finds_each_form():
    snippet = """
import pickle
import pickle as pk
import yaml
from pickle import loads
from yaml import load as yload
torch.load(p, weights_only=False)
trainer.fit(m, ckpt_path=p, weights_only=False if resume else None)
pickle.load(f)
pk.loads(b)
loads(b)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yload(text, yaml.FullLoader)
yaml.unsafe_load(text)
"""
    found = unsafe_loads(snippet)
    assert len(found) == 9, found
    for what in ("weights_only=False", "pickle.load", "pickle.loads", "yaml.load without", "yaml.unsafe_load"):
        assert any(what in f for f in found), (what, found)
    safe = """
import yaml, json, torch
torch.load(p, weights_only=True)
torch.load(p)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.load(text, yaml.CSafeLoader)
json.loads(text)
"""
    assert unsafe_loads(safe) == []


def test_no_unsafe_load_in_the_code():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            found += unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "loads that can run code:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- crafted checkpoints


class _Payload:
    """Unpickling this runs a shell command that creates ``marker`` (the same command on any OS)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f'"{sys.executable}" -c "open(r\'{self.marker}\', \'w\').close()"',)


def _crafted(path: Path, marker: Path, raw: bool = False) -> Path:
    """A file that looks like a Lightning checkpoint and runs the payload when unpickled."""
    state = {"state_dict": {"model.tok_embeddings.weight": torch.zeros(4, 2)}, "global_step": 1,
             "hyper_parameters": {}, "datamodule_hyper_parameters": {}, "evil": _Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw:  # a plain pickle, not torch's zip format
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    return path


def _refused(call, marker: Path) -> str:
    with pytest.raises(RecipeError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert not marker.exists(), "the payload ran"
    return message


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_resume_load_refuses_a_crafted_checkpoint(tmp_path, raw):
    from recipe.checkpointing import AtomicCheckpointIO, UntrustedCheckpointError

    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "last.ckpt", marker, raw)
    # The control: the file really does run its payload when loaded blindly.
    if not raw:
        torch.load(path, weights_only=False)  # noqa: S614 - the point of the control
        assert marker.exists()
        marker.unlink()
    for weights_only in (None, True, False):  # Lightning passes what trainer.fit got: still weights-only
        message = _refused(lambda: AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only), marker)
    assert "posix.system" in message or "os.system" in message or "objects outside" in message
    with pytest.raises(UntrustedCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)


def test_anneal_probe_refuses_a_crafted_checkpoint(tmp_path):
    from recipe.scaling.anneal_probe import read_checkpoint

    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "final.ckpt", marker)
    _refused(lambda: read_checkpoint(path), marker)


def test_sweep_resume_refuses_a_crafted_checkpoint(tmp_path):
    from test_scaling import tiny_sweep

    from recipe.scaling import sweep
    from recipe.scaling.plan import parse_config, plan_sweep

    config = parse_config({**tiny_sweep(tmp_path), "checkpoint_every": 1})
    spec = plan_sweep(config).runs[0]
    marker = tmp_path / "ran"
    _crafted(sweep.run_dir(config, spec) / "checkpoints" / "last.ckpt", marker)
    _refused(lambda: sweep.train_run(config, spec), marker)


def test_interop_loaders_refuse_a_crafted_checkpoint(tmp_path, capsys):
    from recipe.cli import main
    from recipe.interop.checkpoint import open_weights
    from recipe.interop.generate import load_model
    from recipe.interop.meta import import_meta

    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "evil.ckpt", marker)
    _refused(lambda: open_weights(path), marker)  # export and generate open checkpoints here
    _refused(lambda: load_model(path), marker)

    # A distributed checkpoint's meta.pt (what the 4D strategy's resume reads too).
    dcp_dir = tmp_path / "dcp"
    import torch.distributed.checkpoint as dcp

    from recipe.interop.weights import quiet_single_process

    with quiet_single_process():
        dcp.save({"state_dict.model.w": torch.zeros(2)}, checkpoint_id=str(dcp_dir), no_dist=True)
    _crafted(dcp_dir / "meta.pt", marker)
    _refused(lambda: open_weights(dcp_dir), marker)

    # A Meta release whose shard carries the payload.
    release = tmp_path / "release"
    release.mkdir()
    (release / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 16}))
    _crafted(release / "consolidated.00.pth", marker)
    _refused(lambda: import_meta(release, tmp_path / "imported"), marker)

    # Through the command line: one line on stderr, exit status 2, nothing run.
    for argv in (["export", str(path), str(tmp_path / "hf")],
                 ["import", "meta", str(release), str(tmp_path / "imported2")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not marker.exists()


# ----------------------------------------------------------------------------- index paths


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                    "..\\outside.safetensors"])
def test_hf_index_cannot_point_outside_its_folder(tmp_path, target):
    from safetensors.torch import save_file

    from recipe.interop import CheckpointError
    from recipe.interop.hf import _weight_files

    save_file({"x": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    src = tmp_path / "ckpt"
    src.mkdir()
    save_file({"model.norm.weight": torch.zeros(2)}, str(src / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors", "lm_head.weight": target}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        _weight_files(src)
    assert "outside the checkpoint's folder" in str(info.value) and "\n" not in str(info.value)

    index["weight_map"]["lm_head.weight"] = "model-00001-of-00001.safetensors"  # the same folder: fine
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(_weight_files(src)) == {"model.norm.weight", "lm_head.weight"}
