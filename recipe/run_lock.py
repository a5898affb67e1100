"""One run per checkpoint folder: a lock file naming its holder's host and pid.

Two runs writing into one folder would interleave their checkpoints (or delete each
other's), so the second one stops before its first step with a one-line error. A lock
left by a run that died (same host, pid gone) is stale and taken over; one held on
another host cannot be checked from here, so the error says how to clear it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from recipe.errors import ConfigError

LOCK_NAME = ".run.lock"


class FolderInUseError(ConfigError):
    """Another live run holds the checkpoint folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # vanished, or half-written by a holder that died while writing


def acquire(folder: str | Path) -> Path:
    """Take ``folder``'s lock for this process (again, if it already holds it); its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or (holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))):
                path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                return path
            raise FolderInUseError(
                f"checkpoint folder {folder} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('since')}); give this run its own trainer.default_root_dir, "
                f"or delete {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        return path
    raise FolderInUseError(f"could not take the lock {path}: it keeps reappearing; is another run starting there?")


def release(path: Path | None) -> None:
    """Drop the lock if this process still holds it."""
    if path is None:
        return
    holder = _holder(path)
    if holder is not None and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
