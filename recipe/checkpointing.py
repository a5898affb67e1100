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
* "the newest" is by the step in each manifest, over every name a checkpoint can have:
  published, or left by a crash mid-publish (``.partial``, ``.old-<pid>``), so a
  complete checkpoint always has a name that resume finds (``newest_intact``);
* a failed write (disk full, I/O error) removes what it wrote and raises
  ``CheckpointWriteError`` naming the folder, the space needed and the last good checkpoint;
* loads use ``torch.load(weights_only=True)`` with the recipe's own config classes
  allowed, so nothing in a checkpoint is unpickled blindly.
"""

from __future__ import annotations

import glob
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


# A checkpoint under its published name, or under a name a publish passes through: the
# temporary being written (``.partial``) and, for directories, the predecessor moved aside
# (``.old-<pid>``). After a crash between two renames the newest complete checkpoint may
# carry one of these, so resume looks at all of them.
CHECKPOINT_NAME = re.compile(r"^(?P<published>.+\.ckpt)(?P<transit>\.partial|\.old-\d+)?$")


def published_name(checkpoint: Path) -> str:
    """``last.ckpt`` for ``last.ckpt``, ``last.ckpt.partial`` and ``last.ckpt.old-12``."""
    found = CHECKPOINT_NAME.match(checkpoint.name)
    return found.group("published") if found else checkpoint.name


def manifest_path(checkpoint: Path) -> Path:
    """Where the manifest of ``checkpoint`` lives.

    A file's manifest sits beside it under its published name, so a completed temporary
    (``last.ckpt.partial``) is checked against the manifest written just before its rename.
    """
    if checkpoint.is_dir():
        return checkpoint / DIR_MANIFEST
    return checkpoint.with_name(published_name(checkpoint) + ".manifest.json")


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
    found = []
    for name in sorted(files) if names is None else names:
        entry = files[name]
        path = checkpoint / name if checkpoint.is_dir() else checkpoint.with_name(name)
        if not checkpoint.is_dir() and name == published_name(checkpoint):
            path = checkpoint  # a file's single entry, under whichever name the file has now
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


def candidates(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The checkpoints in ``folder`` with a manifest, newest (by global step, then time) first.

    Published names and the names of an interrupted publish alike (``CHECKPOINT_NAME``); at
    equal step and time a published name comes first.
    """
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = CHECKPOINT_NAME.match(path.name)
        if path == exclude or match is None:
            continue
        manifest = read_manifest(path)
        if manifest and isinstance(manifest.get("files"), dict):
            step = manifest.get("global_step")
            found.append((-1 if step is None else int(step), float(manifest.get("created") or 0.0),
                          match.group("transit") is None, path.name, path))
    return [item[-1] for item in sorted(found, key=lambda item: item[:4], reverse=True)]


def manifest_step(checkpoint: Path) -> int | None:
    """The global step a checkpoint's manifest records (None: no readable manifest)."""
    step = (read_manifest(checkpoint) or {}).get("global_step")
    return None if step is None else int(step)


def quick_problems(checkpoint: Path) -> list[str]:
    """``problems`` with hashes for a file, sizes alone for a (sharded, large) directory.

    A file must be hashed: the old ``last.ckpt`` and its successor usually have the same
    size. A directory carries its own manifest, and its hashes are checked when it is
    loaded, shared among the ranks (``resolve_intact``).
    """
    return problems(checkpoint, hash_files=not checkpoint.is_dir())


def newest_intact(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``folder`` that passes ``quick_problems``.

    Returns it (None when the folder holds no checkpoint) and the faults of the newer ones
    passed over; raises ``CheckpointCorruptError`` when checkpoints are there but none is
    intact. Each rank can call it before the process group exists.
    """
    passed: list[str] = []
    for path in candidates(folder):
        faults = quick_problems(path)
        if not faults:
            return path, passed
        passed.append(faults[0])
    if passed:
        raise CheckpointCorruptError(f"{folder} holds checkpoints but none is intact ({passed[0]}); move them "
                                     "aside to start over, or pass --ckpt_path with a checkpoint from elsewhere")
    return None, passed


def resolve_intact(path: Path, check: Callable[[Path], list[str]] = problems) -> Path:
    """``path`` if intact, else the newest intact sibling (with a warning naming the fault)."""
    faults = check(path)
    if not faults:
        return path
    if read_manifest(path) is None and path.exists():
        rank_zero_warn(f"{faults[0]}; loading it unverified")
        return path
    for other in candidates(path.parent, exclude=path):
        if not check(other):
            rank_zero_warn(f"checkpoint {path} is damaged ({faults[0]}); falling back to {other}")
            return other
    raise CheckpointCorruptError(f"checkpoint {path} is damaged ({faults[0]}) and no intact checkpoint is next to it; "
                                 "restart from an earlier checkpoint directory or from scratch")


def publish_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing an older one.

    A reader sees the old or the new checkpoint, never a mix: the old one is moved aside
    first. Between the two renames both exist complete, as ``<path>.old-<pid>`` and
    ``<path>.partial``, and resume considers both names (``CHECKPOINT_NAME``).
    """
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists() or path.is_symlink():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    remove_superseded(path)


def remove_superseded(path: Path) -> None:
    """Delete the ``<path>.old-<pid>`` directories that crashed publishes left behind ``path``."""
    for old in path.parent.glob(f"{glob.escape(path.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def finish_interrupted_publish(path: Path) -> None:
    """Publish a complete ``<path>.partial`` that a crash left between its renames.

    Called before ``path`` is written again: the new save starts by deleting the old
    temporary, which may be the newest complete checkpoint. Publishing it first means a
    complete checkpoint keeps a name at every moment of the new save.
    """
    tmp = path.with_name(path.name + PARTIAL)
    if not tmp.exists() or quick_problems(tmp):
        return
    newer = manifest_step(tmp)
    if path.exists() and not quick_problems(path) and (manifest_step(path) or -1) >= (newer or -1):
        return
    if tmp.is_dir():
        publish_dir(tmp, path)
    else:
        os.replace(tmp, path)


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


class CheckpointWriteError(RecipeError):
    """A checkpoint could not be written (disk full, I/O error); nothing of it is left behind.

    ``collective``: raised on every rank together (a sharded save), rather than on the one
    rank that writes a file checkpoint.
    """

    def __init__(self, message: str, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested checkpoint state (this rank's shards of a DTensor)."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_error_reason(err: BaseException, folder: Path, needed: int) -> str:
    """One line for a failed write: the OS's reason, or for torch's zip writer (which hides
    the errno) "no space left" when the folder has less free space than the write needs."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    free = free_bytes(folder)
    if free is not None and free < needed:
        return "No space left on device"
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    if n < 1024:
        return f"{n} B"
    power = min((n.bit_length() - 1) // 10, 4)  # exact: 1024 ** power <= n
    return f"{n / 1024 ** power:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[power - 1]}"


def failed_save_message(path: Path, reason: str, needed: int, free_before: int | None) -> str:
    """The one-line error of a failed save: the folder, the space needed, the last good checkpoint.

    ``free_before``: the folder's free space when the save began (a file system may not
    give back the space of the removed partial files at once).
    """
    folder = path.parent
    try:
        last, _ = newest_intact(folder)
    except CheckpointCorruptError:
        last = None
    last_text = f"{last} (step {manifest_step(last)})" if last is not None else "none"
    return (f"saving checkpoint {path.name} failed ({reason}); nothing of it was kept. {folder} had "
            f"{_size(free_before)} free when the save began and the checkpoint needs about {_size(needed)}; "
            f"the last good checkpoint is {last_text}. Free space (or set the checkpoint callback's dirpath to "
            "another disk), then resume with --ckpt_path last")


class AtomicCheckpointIO(TorchCheckpointIO):
    """File checkpoints (one process, DDP, full-state FSDP) written atomically with a manifest."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL)
        finish_interrupted_publish(path)  # a crash's complete leftover keeps a name
        free_before = free_bytes(path.parent)
        try:
            torch.save(checkpoint, tmp)
            _fsync(tmp)
            entry = file_entry(tmp)
            # The manifest goes first: a crash between the two writes leaves the previous
            # checkpoint under a manifest it fails and the new one complete as ``.partial``;
            # resume finds the latter (``candidates``) - never a silent mix.
            write_manifest(manifest_path(path), {path.name: entry}, checkpoint.get("global_step"))
        except Exception as err:  # disk full, I/O error: remove what was written, say what is needed
            needed = state_bytes(checkpoint)
            reason = write_error_reason(err, path.parent, needed)
            for leftover in (tmp, manifest_path(path).with_name(manifest_path(path).name + PARTIAL)):
                leftover.unlink(missing_ok=True)
            raise CheckpointWriteError(failed_save_message(path, reason, needed, free_before)) from err
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # ``weights_only`` is ignored: every load is weights-only, with the recipe's classes allowed.
        return load_trusted(resolve_intact(Path(path)), map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        remove(Path(path))
