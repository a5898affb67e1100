"""Callbacks that break a training run on purpose (used by the reliability tests through YAML)."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """SIGKILL this process (no cleanup, like a node failure) when ``step`` optimizer steps are done.

    With ``rank`` set, only that global rank dies.
    """

    def __init__(self, step: int, rank: int | None = None, sig: str = "SIGKILL") -> None:
        self.step, self.rank, self.sig = step, rank, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and (self.rank is None or trainer.global_rank == self.rank):
            os.kill(os.getpid(), self.sig)


class LossLog(L.Callback):
    """Append ``step loss`` to a file after every step, flushed to disk (survives a SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step - 1} {float(trainer.callback_metrics['train/loss'])!r}\n")
                f.flush()
                os.fsync(f.fileno())


def read_loss_log(path) -> dict[int, float]:
    """Step -> loss; a step logged twice (replayed after a crash) keeps its last value."""
    losses = {}
    for line in open(path):
        step, loss = line.split()
        losses[int(step)] = float(loss)
    return losses


class SlowSteps(L.Callback):
    """Sleep after every step, leaving time to send a signal mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


class KillWhileSaving(L.Callback):
    """SIGKILL this process halfway through writing checkpoint ``name`` of step ``step`` (a node dying mid-write).

    Half of the checkpoint's bytes are in ``<name>.partial`` when the process dies.
    """

    def __init__(self, step: int, name: str = "last.ckpt") -> None:
        self.step, self.name = step, name

    def on_train_start(self, trainer, pl_module) -> None:
        from io import BytesIO
        from pathlib import Path

        import torch

        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def dying_save(checkpoint, path, storage_options=None):
            if Path(path).name == self.name and checkpoint.get("global_step") == self.step:
                buffer = BytesIO()
                torch.save(checkpoint, buffer)
                Path(f"{path}.partial").write_bytes(buffer.getvalue()[: buffer.tell() // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return save(checkpoint, path, storage_options)

        io.save_checkpoint = dying_save


class DiskFull(L.Callback):
    """From ``step`` optimizer steps on (until ``until``), checkpoint writes fail like a full disk.

    ``torch.save`` to a file writes ``capacity`` bytes, then raises ``OSError(ENOSPC)``; a
    sharded (DCP) save fails the same way on rank ``rank``'s shard writes.
    """

    def __init__(self, step: int, until: int | None = None, capacity: int = 4096, rank: int | None = None) -> None:
        self.step, self.until, self.capacity, self.rank = step, until, capacity, rank
        self._originals: dict = {}

    def _full(self, path) -> OSError:
        import errno

        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def _install(self) -> None:
        import torch
        from torch.distributed.checkpoint import filesystem

        save = torch.save
        self._originals = {"save": save, "write_data": filesystem.FileSystemWriter.__dict__.get("write_data")}
        callback = self

        def full_save(obj, f, *args, **kwargs):
            if not isinstance(f, (str, os.PathLike)):
                return save(obj, f, *args, **kwargs)
            from io import BytesIO

            buffer = BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: callback.capacity])
            raise callback._full(f)

        def full_write_data(writer, plan, planner):
            raise callback._full(writer.path)

        torch.save = full_save
        if self.rank is None or int(os.environ.get("RANK", "0")) == self.rank:
            filesystem.FileSystemWriter.write_data = full_write_data

    def _uninstall(self) -> None:
        import torch
        from torch.distributed.checkpoint import filesystem

        if self._originals:
            torch.save = self._originals["save"]
            if self._originals["write_data"] is not None:
                filesystem.FileSystemWriter.write_data = self._originals["write_data"]
            elif "write_data" in filesystem.FileSystemWriter.__dict__:
                del filesystem.FileSystemWriter.write_data
            self._originals = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs before the checkpoint callback's hook of the same step (Lightning puts it last).
        full = trainer.global_step >= self.step and (self.until is None or trainer.global_step < self.until)
        if full and not self._originals:
            self._install()
        elif not full:
            self._uninstall()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()  # Lightning skips teardown after an exception
