"""Checkpoints for long runs: atomic and verified, a retention policy, a final save on pre-emption.

``RecipeCheckpoint`` is Lightning's ``ModelCheckpoint`` with what a run that is killed
hundreds of times needs:

* every save is atomic and carries a manifest (``recipe.checkpointing``), also for a
  single process, and a damaged checkpoint is skipped at load in favour of the newest
  intact one;
* retention: step checkpoints (``step=00001000.ckpt``) keep the newest ``keep_last``
  plus every ``keep_every``-th step; ``last.ckpt`` is always kept;
* one training run per folder: a second one stops before its first step with a one-line
  error naming the holder's host and pid (``recipe.run_lock``; a dead holder's lock is
  taken over);
* SIGTERM (and SIGUSR1, which SLURM sends ahead of a pre-emption) ask for a stop: at the
  next step boundary - never inside a collective - every rank saves ``last.ckpt``
  together, and the run exits so that ``--ckpt_path last`` continues it;
* ``ckpt_path="last"`` means the newest intact checkpoint of the folder, whatever its name
  (``recipe.checkpointing.newest_intact``), not just ``last.ckpt``;
* a save that fails (disk full, I/O error) leaves nothing behind and stops every rank at
  this step boundary with one line naming the folder, the space needed and the last good
  checkpoint - or, with ``on_save_error: continue``, warns and tries again at the next save.

Without a ``dirpath`` the checkpoints go to ``<trainer.default_root_dir>/checkpoints``,
with the run's other outputs. (Lightning's ``ModelCheckpoint`` would use the logger's
``version_<n>`` folder, which changes at every restart, so a resumed run would neither
find nor continue its own ``last.ckpt``.)
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from recipe import run_lock
from recipe.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    newest_intact,
    remove,
)
from recipe.errors import ConfigError
from recipe.lightning_compat import ResolvedDirCheckpoint, mark_sigterm_received
from recipe.parallel import collectives

_STEP = re.compile(r"^step=(\d+)\.ckpt$")


class RecipeCheckpoint(ResolvedDirCheckpoint):
    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000, keep_last: int = 3,
                 keep_every: int | None = None, save_on_preemption: bool = True, async_save: bool = False,
                 on_save_error: Literal["stop", "continue"] = "stop", filename: str = "step={step:08d}",
                 auto_insert_metric_name: bool = False, enable_version_counter: bool = False,
                 **kwargs: Any) -> None:
        """
        Args:
            dirpath: folder of the checkpoints (``last.ckpt`` and ``step=<n>.ckpt``); default
                ``<trainer.default_root_dir>/checkpoints``.
            every_n_train_steps: optimizer steps between checkpoints.
            keep_last: step checkpoints kept besides ``last.ckpt`` (the newest ones).
            keep_every: also keep every checkpoint whose step is a multiple of this.
            save_on_preemption: on SIGTERM/SIGUSR1 save ``last.ckpt`` at the next step
                boundary, then exit.
            async_save: write file checkpoints (one process, DDP) in a background thread from
                a copy of the state, so training goes on during the write. Sharded (DCP)
                checkpoints of the 4D strategy are always written synchronously.
            on_save_error: when a save fails (disk full, I/O error), "stop" the run at this
                step boundary, or "continue" training and try again at the next save.
        """
        if keep_last < 1:
            raise ConfigError(f"RecipeCheckpoint keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ConfigError(f"RecipeCheckpoint keep_every must be >= 1 or null, got {keep_every}")
        for fixed in ("save_last", "save_top_k"):
            if kwargs.pop(fixed, None) not in (None, True, -1):
                raise ConfigError(f"RecipeCheckpoint sets {fixed} itself (use keep_last / keep_every); remove it")
        # Without the version counter a resumed run overwrites its own last.ckpt.
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_last=True, save_top_k=-1,
                         filename=filename, auto_insert_metric_name=auto_insert_metric_name,
                         enable_version_counter=enable_version_counter, **kwargs)
        if on_save_error not in ("stop", "continue"):
            raise ConfigError(f"RecipeCheckpoint on_save_error must be 'stop' or 'continue', got {on_save_error!r}")
        self.on_save_error = on_save_error
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.save_on_preemption = save_on_preemption
        self.async_save = async_save
        self._previous_sigusr1: Any = None
        self._lock: Path | None = None

    def resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._lock_folder(trainer)
        strategy = trainer.strategy
        # Plain file saves (one process, DDP) become atomic with a manifest; the 4D
        # strategy does the same for its distributed checkpoints itself.
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.async_save and isinstance(strategy.checkpoint_io, AtomicCheckpointIO):
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            # It clones the state's tensors before handing them to its writer thread.
            strategy.checkpoint_io = AsyncCheckpointIO(strategy.checkpoint_io)

    def _lock_folder(self, trainer: L.Trainer) -> None:
        """One training run per checkpoint folder (``recipe.run_lock``); every rank stops alike."""
        refusal = None
        if trainer.is_global_zero:
            try:
                self._lock = run_lock.acquire(self.dirpath)
            except run_lock.FolderInUseError as err:
                refusal = str(err)
        refusal = collectives.broadcast_object(refusal)
        if refusal:
            raise run_lock.FolderInUseError(refusal)

    # ------------------------------------------------------------------ resume and failed saves

    def last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """``{the newest intact checkpoint}`` of the folder, whatever its name (empty: none yet)."""
        path, _ = newest_intact(Path(self.dirpath))
        return set() if path is None else {str(path)}

    def guarded_save(self, trainer: L.Trainer, save: Callable[[], None]) -> None:
        error: CheckpointWriteError | None = None
        try:
            save()
        except CheckpointWriteError as err:
            error = err
            if not err.collective and trainer.world_size > 1:
                # Only this rank wrote, and it left before the trainer's barrier after the
                # save, where the other ranks wait: meet them there.
                collectives.barrier()
        message = str(error) if error is not None else None
        if trainer.world_size > 1:
            message = next((m for m in collectives.all_gather_object(message) if m), None)
        if message is None:
            return
        if self.on_save_error == "continue":
            rank_zero_warn(f"{message} (on_save_error: continue - training goes on, the next save tries again)")
            return
        raise CheckpointWriteError(message)

    # ------------------------------------------------------------------ retention

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the step checkpoints in ``dirpath``, oldest first."""
        if self.dirpath is None:  # not resolved yet: no trainer has set this callback up
            return []
        folder = Path(self.dirpath)
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name))]
        return sorted(found)

    def prune(self) -> list[Path]:
        """Delete the step checkpoints the policy does not keep; return them."""
        found = self.step_checkpoints()
        newest = {step for step, _ in found[-self.keep_last:]}
        doomed = [p for step, p in found
                  if step not in newest and not (self.keep_every and step % self.keep_every == 0)]
        for path in doomed:
            remove(path)
        return doomed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.is_global_zero:
            self.prune()

    # ------------------------------------------------------------------ pre-emption

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_on_preemption and hasattr(signal, "SIGUSR1"):
            # Lightning turns SIGTERM into a stop at the next step boundary; SIGUSR1 (the
            # SLURM warning signal) joins the same path unless a handler is already set.
            current = signal.getsignal(signal.SIGUSR1)
            if current in (signal.SIG_DFL, None):
                self._previous_sigusr1 = current
                signal.signal(signal.SIGUSR1, lambda *_: mark_sigterm_received(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            if self.save_on_preemption and isinstance(exception, SIGTERMException):
                # Every rank raised at the same step boundary, so the collective save is safe.
                path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
                trainer.save_checkpoint(str(path))
                rank_zero_info(f"stopped by a termination signal after step {trainer.global_step}; saved {path} - "
                               "resume with --ckpt_path last")
        finally:
            # Lightning skips the teardown hooks after an exception: the run is over either way.
            self._release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        """Give back the folder's lock and the SIGUSR1 handler."""
        run_lock.release(self._lock)
        self._lock = None
        if self._previous_sigusr1 is not None and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
