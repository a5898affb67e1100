"""Checkpoints that are complete or invisible: atomic publication, manifests, verified loads.

A run that dies while saving must never leave a checkpoint that a restart trusts. So:

* every checkpoint is written under a temporary name and renamed into place only when
  complete (a file: ``os.replace``; a distributed checkpoint directory: after every rank
  has written its shards), so ``last.ckpt`` always names a finished checkpoint;
* a manifest lists each file with its size and SHA-256 - ``<name>.manifest.json`` next
  to a file checkpoint, ``MANIFEST.json`` inside a directory. Ranks hash the files they
  wrote themselves (in parallel), rank 0 writes the manifest;
* loading verifies the manifest first. A truncated or corrupted checkpoint is reported
  with a warning and the newest intact checkpoint of the same directory is loaded
  instead (``CheckpointCorruptError`` when there is none);
* loads use ``torch.load(weights_only=True)`` with the recipe's own config classes
  allowed, so nothing in a checkpoint is unpickled blindly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from recipe.errors import RecipeError

MANIFEST_FORMAT = "llama3-recipe-checkpoint"
DIR_MANIFEST = "MANIFEST.json"
PARTIAL = ".partial"
_CHUNK = 8 << 20


class CheckpointCorruptError(RecipeError):
    """A checkpoint fails its manifest and no intact one is there to fall back to."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def manifest_path(checkpoint: Path) -> Path:
    """Where the manifest of ``checkpoint`` lives."""
    return checkpoint / DIR_MANIFEST if checkpoint.is_dir() else checkpoint.with_name(checkpoint.name +
                                                                                       ".manifest.json")


def write_manifest(path: Path, files: dict[str, dict[str, Any]], global_step: int | None) -> None:
    """Write ``path`` (a manifest file) atomically."""
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "global_step": global_step, "created": time.time(),
                "files": files}
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    path = manifest_path(checkpoint)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"files": None}
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else {"files": None}


def problems(checkpoint: Path, names: Iterable[str] | None = None, hash_files: bool = True) -> list[str]:
    """What is wrong with ``checkpoint`` against its manifest ([] when intact).

    ``names`` restricts the check to some files (ranks split the hashing of a directory).
    """
    if not checkpoint.exists():
        return [f"{checkpoint} does not exist"]
    manifest = read_manifest(checkpoint)
    if manifest is None:
        return [f"{checkpoint} has no manifest (written before manifests, or not completed)"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"the manifest of {checkpoint} is unreadable"]
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    found = []
    for name in sorted(files) if names is None else names:
        entry, path = files[name], base / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif path.stat().st_size != entry["size"]:
            found.append(f"{path} has {path.stat().st_size:,} bytes, the manifest says {entry['size']:,} (truncated?)")
        elif hash_files and sha256_of(path) != entry["sha256"]:
            found.append(f"{path} does not match its SHA-256 in the manifest (corrupted)")
    return found


def manifest_files(checkpoint: Path) -> list[str]:
    manifest = read_manifest(checkpoint) or {}
    files = manifest.get("files")
    return sorted(files) if isinstance(files, dict) else []


def candidates(bad: Path) -> list[Path]:
    """Other checkpoints next to ``bad`` with a manifest, newest (by global step, then time) first."""
    found = []
    for path in bad.parent.iterdir():
        if path == bad or path.name.endswith((PARTIAL, ".manifest.json")) or ".old-" in path.name:
            continue
        manifest = read_manifest(path)
        if manifest and isinstance(manifest.get("files"), dict):
            found.append((manifest.get("global_step") or -1, manifest.get("created") or 0.0, path))
    return [path for _, _, path in sorted(found, key=lambda item: (item[0], item[1]), reverse=True)]


def resolve_intact(path: Path, check: Callable[[Path], list[str]] = problems) -> Path:
    """``path`` if intact, else the newest intact sibling (with a warning naming the fault)."""
    faults = check(path)
    if not faults:
        return path
    if read_manifest(path) is None and path.exists():
        rank_zero_warn(f"{faults[0]}; loading it unverified")
        return path
    for other in candidates(path):
        if not check(other):
            rank_zero_warn(f"checkpoint {path} is damaged ({faults[0]}); falling back to {other}")
            return other
    raise CheckpointCorruptError(f"checkpoint {path} is damaged ({faults[0]}) and no intact checkpoint is next to it; "
                                 "restart from an earlier checkpoint directory or from scratch")


def publish_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing an older one atomically enough:
    a reader sees the old or the new checkpoint, never a mix (the old one is moved aside first)."""
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists() or path.is_symlink():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def remove(path: Path) -> None:
    """Delete a checkpoint and its manifest."""
    sidecar = path.with_name(path.name + ".manifest.json")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if sidecar.exists():
        sidecar.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def safe_globals() -> list[Any]:
    """Classes a recipe checkpoint may hold besides tensors and plain containers."""
    from recipe.config import LRSchedule, ModelArgs, OptimizerConfig, RopeScaling
    from recipe.guard import StepGuard

    # Checkpoints written before the config classes moved to recipe.config name them by
    # their old modules: allow those names for the same classes.
    renamed = [(ModelArgs, "recipe.model.ModelArgs"), (RopeScaling, "recipe.model.RopeScaling"),
               (OptimizerConfig, "recipe.module.OptimizerConfig"), (LRSchedule, "recipe.schedule.LRSchedule")]
    return [ModelArgs, RopeScaling, OptimizerConfig, LRSchedule, StepGuard, deque, *renamed]


class UntrustedCheckpointError(RecipeError):
    """A checkpoint holds objects that a checkpoint of this recipe never does."""


def load_trusted(path: Path, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing the recipe's config classes.

    Nothing else is ever unpickled: a file naming any other global (a ``__reduce__``
    payload such as ``os.system``) is refused with ``UntrustedCheckpointError`` before
    anything in it runs.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"an object of class {found.group(1)}" if found else "objects outside the recipe's checkpoint format"
        raise UntrustedCheckpointError(
            f"{path} holds {what}, which a checkpoint of this recipe never does; it was not loaded - load it "
            "yourself with torch.load(weights_only=False) only if you trust its source"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """File checkpoints (one process, DDP, full-state FSDP) written atomically with a manifest."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL)
        torch.save(checkpoint, tmp)
        _fsync(tmp)
        entry = file_entry(tmp)
        # The manifest goes first: a crash between the two renames leaves the previous
        # checkpoint under a manifest it fails, which the loader detects - never a silent mix.
        write_manifest(manifest_path(path), {path.name: entry}, checkpoint.get("global_step"))
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # ``weights_only`` is ignored: every load is weights-only, with the recipe's classes allowed.
        return load_trusted(resolve_intact(Path(path)), map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        remove(Path(path))
