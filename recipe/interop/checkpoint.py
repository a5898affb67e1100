"""Recipe checkpoints of every kind, read a bounded group of tensors at a time.

``open_weights(path)`` recognises:

* a Lightning ``.ckpt`` file (one process, or the 4D strategy with
  ``save_distributed_checkpoint: false``): ``state_dict`` entries ``model.<name>``; weight
  averages are full tensors in their callback's state;
* a Lightning DCP directory written by ``Parallel4DStrategy`` (``meta.pt`` beside the shard
  files): entries ``state_dict.model.<name>`` and ``state_dict.averaging.<average>.<name>``,
  sharded by whatever layout wrote them - DCP reassembles each tensor on read;
* a full state dict saved with ``torch.save`` (``PolyakAveraging(save_path=...)``);
* a weights directory written by ``recipe import``: a DCP checkpoint of the full-model state
  dict (plain parameter names) with ``model_args.json`` (``recipe.interop.weights``).

Files are memory-mapped and DCP is read per group of tensors, so host memory holds what the
caller asks for, not the checkpoint. As for resuming, pickles may hold only the recipe's own
classes, and a checkpoint with a manifest must match it.
"""

from __future__ import annotations

import ast
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recipe.config import ModelArgs
from recipe.interop import CheckpointError, InteropError
from recipe.interop.hf import HfSource
from recipe.interop.weights import (
    MODEL_ARGS_FILE,
    TensorInfo,
    WeightSource,
    load_model_args,
    model_args_from_dict,
    quiet_single_process,
)

_LIGHTNING_MODEL = "state_dict.model."
_LIGHTNING_AVERAGES = "state_dict.averaging."


def _as_model_args(value: Any, where: str) -> ModelArgs | None:
    """``hyper_parameters["arch"]`` as Lightning pickled it (a ModelArgs, a dict or a Namespace)."""
    if value is None or isinstance(value, ModelArgs):
        return value
    if isinstance(value, Mapping):
        return model_args_from_dict(value, where)
    if hasattr(value, "__dict__"):
        return model_args_from_dict(vars(value), where)
    return None


# ----------------------------------------------------------------------------- sources


class StateDictSource(WeightSource):
    """Tensors of a ``torch.load``-ed (memory-mapped) dict: pages load on first touch."""

    def __init__(self, path: Path, description: str, args: ModelArgs | None, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__(path, description, args)
        self.state = state

    def infos(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in self.state.items()}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: self.state[name] for name in names}


class DcpSource(WeightSource):
    """Tensors under ``prefix`` of a DCP checkpoint, whatever sharding wrote them."""

    def __init__(self, path: Path, description: str, args: ModelArgs | None, prefix: str,
                 stored: Mapping[str, TensorInfo]) -> None:
        super().__init__(path, description, args)
        self.prefix = prefix
        self._infos = {key[len(prefix):]: info for key, info in stored.items() if key.startswith(prefix)}

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        state = {self.prefix + n: torch.empty(self._infos[n].shape, dtype=self._infos[n].dtype) for n in names}
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(self.path), no_dist=True)
        return {n: state[self.prefix + n] for n in names}


def open_weights(path: str | os.PathLike, averaged: str | None = None) -> WeightSource:
    """The model weights (or, with ``averaged``, the named weight average) of any recipe checkpoint,
    or of a Hugging Face Llama directory.

    ``averaged`` matches an average's name case-insensitively, or its start ("polyak" finds
    ``PolyakAveraging``).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / ".metadata").is_file():
        if averaged is not None:
            raise InteropError(f"{path} is a Hugging Face checkpoint without averages; drop --averaged")
        return HfSource(path)
    if path.is_dir():
        return _open_dcp(path, averaged)
    if not path.is_file():
        raise InteropError(f"checkpoint {path} not found; pass a .ckpt file, a checkpoint directory, "
                           "a state dict file or a `recipe import` directory")
    return _open_torch_file(path, averaged)


def _dcp_tensors(path: Path) -> dict[str, TensorInfo]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").is_file():
        raise InteropError(f"{path} is a directory but not a DCP checkpoint (no .metadata); pass a checkpoint "
                           "directory written by the 4D strategy or by `recipe import`")
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key: TensorInfo(tuple(meta.size), meta.properties.dtype) for key, meta in stored.items()
            if isinstance(meta, TensorStorageMetadata)}


def _open_dcp(path: Path, averaged: str | None) -> WeightSource:
    stored = _dcp_tensors(path)
    lightning = (path / "meta.pt").is_file() or any(key.startswith("state_dict.") for key in stored)
    if not lightning:
        if averaged is not None:
            raise InteropError(f"{path} holds plain model weights without averages; drop --averaged")
        args_file = path / MODEL_ARGS_FILE
        args = load_model_args(args_file) if args_file.is_file() else None
        return DcpSource(path, str(path), args, "", stored)
    _check_intact(path)
    meta = _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    args = _as_model_args((meta.get("hyper_parameters") or {}).get("arch"), f"{path}/meta.pt")
    if averaged is None:
        return DcpSource(path, str(path), args, _LIGHTNING_MODEL, stored)
    names = sorted({key[len(_LIGHTNING_AVERAGES):].split(".", 1)[0] for key in stored
                    if key.startswith(_LIGHTNING_AVERAGES)})
    name = _pick_average(averaged, names, path)
    return DcpSource(path, f"{path} (average {name})", args, f"{_LIGHTNING_AVERAGES}{name}.", stored)


def _torch_load(path: Path) -> Any:
    """``torch.load`` memory-mapped, allowing only tensors, containers and the recipe's config classes."""
    from recipe.checkpointing import safe_globals

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise InteropError(f"{path} holds objects that a checkpoint of this recipe never does; it was not loaded "
                           "(load it yourself with torch.load(weights_only=False) only if you trust it)") from None
    except Exception as err:  # noqa: BLE001 - whatever torch cannot read is the same user error
        raise InteropError(f"{path} is not a checkpoint torch.load can read ({_first_line(err)}); "
                           "pass a .ckpt or torch.save file") from None


def _check_intact(path: Path) -> None:
    """Checkpoints written with a manifest must match it: a truncated file fails here, in one line.

    Sizes only - hashing every byte of a large checkpoint would cost more than the export.
    """
    from recipe.checkpointing import problems, read_manifest

    if read_manifest(path) is not None:
        faults = problems(path, hash_files=False)
        if faults:
            raise CheckpointError(f"checkpoint {path} is damaged ({faults[0]}); export an intact checkpoint")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _open_torch_file(path: Path, averaged: str | None) -> WeightSource:
    _check_intact(path)
    state = _torch_load(path)
    if not isinstance(state, Mapping):
        raise InteropError(f"{path} holds a {type(state).__name__}, not a state dict; pass a recipe checkpoint")
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        if averaged is not None:
            raise InteropError(f"{path} is a plain state dict (such as a saved Polyak average), not a training "
                               "checkpoint with averages; drop --averaged")
        if state and all(k.startswith("model.") for k in state):  # a LightningModule's state dict
            state = {k[len("model."):]: v for k, v in state.items()}
        return StateDictSource(path, str(path), None, state)
    if "state_dict" not in state:
        raise InteropError(f"{path} is neither a Lightning checkpoint nor a state dict; pass a recipe checkpoint")
    args = _as_model_args((state.get("hyper_parameters") or {}).get("arch"), str(path))
    if averaged is None:
        weights = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state["state_dict"].items()}
        return StateDictSource(path, str(path), args, weights)
    averages = {_callback_name(key): cb for key, cb in (state.get("callbacks") or {}).items()
                if isinstance(cb, Mapping) and "stored" in cb and "count" in cb}
    name = _pick_average(averaged, sorted(averages), path)
    callback = averages[name]
    if not callback.get("count") or callback.get("stored") != "state":
        raise InteropError(f"the {name} average in {path} is empty (no step was averaged before this checkpoint); "
                           "export a later checkpoint or drop --averaged")
    return StateDictSource(path, f"{path} (average {name})", args, callback["averages"])


def _callback_name(state_key: str) -> str:
    """``PolyakAveraging{'name': 'PolyakAveraging'}`` (Lightning's state key) -> its ``name``."""
    if "{" in state_key:
        try:
            return str(ast.literal_eval(state_key[state_key.index("{"):])["name"])
        except (ValueError, SyntaxError, KeyError, TypeError):
            pass
    return state_key


def _pick_average(requested: str, available: Sequence[str], where: Path) -> str:
    wanted = requested.lower()
    matches = [n for n in available if n.lower() == wanted] or [n for n in available if n.lower().startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if not available:
        raise InteropError(f"{where} holds no weight averages; drop --averaged, or train with a PolyakAveraging "
                           "callback")
    raise InteropError(f"--averaged {requested!r} matches {len(matches)} of the averages in {where} "
                       f"({', '.join(available)}); pass one of those names")
