"""A watchdog that ends the run in bounded time, naming the culprit, when a rank dies or stalls.

When one rank of a distributed run dies, the others wait in their next collective -
for gloo or NCCL that can be until the collective timeout (30 minutes by default), or
forever for a rank that hangs outside a collective. Each rank here registers itself
(host, pid) in ``<default_root_dir>/.ranks/<run id>/`` and leaves a heartbeat there after
every step; a daemon thread on each rank then checks, every ``poll_seconds``:

* a rank on the same host whose process is gone -> it died: stop now;
* no step finished on this rank for ``stall_seconds`` -> stalled: stop, naming the rank
  whose heartbeat is oldest (the likely culprit: the others wait for it).

Stopping means printing one line naming the rank and exiting the process with status 1
(a thread cannot interrupt a collective, so the process ends itself), which a scheduler
counts as a failed job. A stalled culprit on the same host is killed first, so no stopped
or hung rank stays behind holding its memory; one on another node ends with the job. A finished rank
marks itself done, so the end of training is never mistaken for a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L

from recipe.errors import ConfigError
from recipe.parallel import collectives


class RankWatchdog(L.Callback):
    def __init__(self, poll_seconds: float = 1.0, stall_seconds: float = 1800.0) -> None:
        """
        Args:
            poll_seconds: how often each rank checks the others.
            stall_seconds: a rank that finishes no step for this long stops the run (set it
                above the longest legitimate pause: a checkpoint save, a validation run).
        """
        if poll_seconds <= 0 or stall_seconds <= poll_seconds:
            raise ConfigError(f"RankWatchdog needs 0 < poll_seconds < stall_seconds, got {poll_seconds} and "
                              f"{stall_seconds}")
        self.poll_seconds = poll_seconds
        self.stall_seconds = stall_seconds
        self.folder: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_step = time.monotonic()
        self._rank = 0

    @staticmethod
    def ranks_dir(trainer: L.Trainer) -> Path:
        """Where the runs of ``trainer`` register their ranks: ``<default_root_dir>/.ranks``."""
        return Path(trainer.default_root_dir) / ".ranks"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size == 1:
            return
        run_id = collectives.broadcast_object(uuid.uuid4().hex if trainer.is_global_zero else None)
        self.folder = self.ranks_dir(trainer) / run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rank = trainer.global_rank
        info = {"rank": self._rank, "pid": os.getpid(), "host": socket.gethostname()}
        (self.folder / f"rank{self._rank}.json").write_text(json.dumps(info))
        self._beat()
        collectives.barrier()  # every rank is registered before anyone watches
        self._thread = threading.Thread(target=self._watch, name="rank-watchdog", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        assert self.folder is not None
        self._last_step = time.monotonic()
        (self.folder / f"rank{self._rank}.beat").write_text(str(time.time()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.folder is not None:
            self._beat()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.folder is not None:
            (self.folder / f"rank{self._rank}.done").touch()
            self._stop.set()

    # ------------------------------------------------------------------ the watching thread

    def _peers(self) -> list[dict[str, Any]]:
        assert self.folder is not None
        peers = []
        for path in sorted(self.folder.glob("rank*.json")):
            info = json.loads(path.read_text())
            if info["rank"] != self._rank and not (self.folder / f"rank{info['rank']}.done").exists():
                peers.append(info)
        return peers

    def _heartbeat_age(self, rank: int) -> float:
        assert self.folder is not None
        try:
            return time.time() - float((self.folder / f"rank{rank}.beat").read_text())
        except (OSError, ValueError):
            return float("inf")

    def _watch(self) -> None:
        host = socket.gethostname()
        while not self._stop.wait(self.poll_seconds):
            for peer in self._peers():
                if peer["host"] == host and not _alive(peer["pid"]):
                    if (self.folder / f"rank{peer['rank']}.done").exists():
                        continue  # it finished between the two checks
                    self._abort(f"rank {peer['rank']} (pid {peer['pid']} on {host}) died")
            idle = time.monotonic() - self._last_step
            if idle > self.stall_seconds:
                peers = {p["rank"]: p for p in self._peers()}
                ages = {rank: self._heartbeat_age(rank) for rank in peers}
                culprit = max(ages, key=ages.get) if ages else self._rank
                ended = self._end(peers[culprit], host) if culprit in peers else ""
                self._abort(f"no step finished for {idle:.0f} s; rank {culprit} reported last "
                            f"{ages.get(culprit, idle):.0f} s ago (stalled){ended}")

    @staticmethod
    def _end(peer: dict[str, Any], host: str) -> str:
        """End a stalled rank on this host (a stopped or hung process would stay behind holding
        its memory once the others exit); one on another host ends when the job fails."""
        if peer["host"] != host:
            return f"; it runs on {peer['host']}, where the scheduler ends it with this failed job"
        try:
            os.kill(peer["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return ""
        return f"; ended it (pid {peer['pid']})"

    def _abort(self, reason: str) -> None:
        print(f"error: {reason}; stopping rank {self._rank} - resume from the last checkpoint with --ckpt_path last",
              file=sys.stderr, flush=True)
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) still answers signal 0.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
