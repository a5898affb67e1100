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
