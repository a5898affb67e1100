"""The private Lightning names this project relies on, each behind one small function.

Checked against lightning 2.6.6 (``pyproject.toml`` allows 2.5 to 2.6). Lightning has no
public API for any of these; where it has one, the code calls it directly instead:
``LightningModule.device_mesh`` and ``ModelParallelStrategy.device_mesh`` (reading the
mesh), ``LightningOptimizer.optimizer`` (the wrapped optimizer), ``Trainer.received_sigterm``
(reading the stop request) and ``Trainer.default_root_dir``.

After a Lightning upgrade, check each function here against the new sources; no other
module touches a private Lightning name (``tests/test_layering.py`` enforces it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.device_mesh import DeviceMesh

LIGHTNING_VERSION_CHECKED = "2.6.6"

__all__ = [
    "LIGHTNING_VERSION_CHECKED",
    "CommandLineSettingsCLI",
    "ResolvedDirCheckpoint",
    "attached_trainer",
    "callback_state_key",
    "mark_sigterm_received",
    "quiet_lightning_notices",
    "saves_distributed_checkpoint",
    "set_device_mesh",
    "setup_distributed",
]


# ---------------------------------------------------------------------------- trainer and module


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when detached)."""
    return module._trainer


def mark_sigterm_received(trainer: L.Trainer) -> None:
    """Stop at the next step boundary exactly as Lightning does on SIGTERM (every rank raises ``SIGTERMException``)."""
    trainer._signal_connector.received_sigterm = True


# ---------------------------------------------------------------------------- strategy


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """Whether ``strategy`` writes sharded (DCP) checkpoints: a ``ModelParallelStrategy`` with
    ``save_distributed_checkpoint=True``."""
    return isinstance(strategy, ModelParallelStrategy) and bool(strategy._save_distributed_checkpoint)


def setup_distributed(strategy: ModelParallelStrategy) -> None:
    """``ModelParallelStrategy``'s process-group start-up (cluster environment, ``init_process_group``)."""
    strategy._setup_distributed()


def set_device_mesh(strategy: ModelParallelStrategy, module: L.LightningModule | None, mesh: DeviceMesh) -> None:
    """Install ``mesh`` as the strategy's and the module's ``device_mesh`` (both properties are read-only)."""
    strategy._device_mesh = mesh
    if module is not None:
        module._device_mesh = mesh


# ---------------------------------------------------------------------------- callbacks


def callback_state_key(callback: L.Callback, **kwargs: Any) -> str:
    """A ``state_key`` made of the callback's class name and ``kwargs`` (Lightning's own format)."""
    return callback._generate_state_key(**kwargs)


class ResolvedDirCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that chooses its ``dirpath`` and its ``last`` checkpoint itself,
    and can wrap each save.

    Subclasses implement ``resolve_dirpath(trainer)``. It runs in ``setup`` and also when
    Lightning looks for ``ckpt_path="last"``, which happens before any callback hook, so
    ``--ckpt_path last`` finds the checkpoints where they are written. ``last_checkpoints``
    is what ``ckpt_path="last"`` chooses among, ``guarded_save`` runs each save.
    """

    def resolve_dirpath(self, trainer: L.Trainer) -> None:
        """Set ``self.dirpath`` if it is None (the default keeps Lightning's rule)."""

    def last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """The paths ``ckpt_path="last"`` picks the newest of (default: Lightning's ``last*.ckpt``)."""
        return super()._find_last_checkpoints(trainer)

    def guarded_save(self, trainer: L.Trainer, save: Callable[[], None]) -> None:
        """Run ``save``, Lightning's save of one checkpoint (default: as it is)."""
        save()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self.resolve_dirpath(trainer)
        return self.last_checkpoints(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.guarded_save(trainer, lambda: ModelCheckpoint._save_checkpoint(self, trainer, filepath))


# ---------------------------------------------------------------------------- command line


class CommandLineSettingsCLI(LightningCLI):
    """``LightningCLI`` that never replaces the command line's settings with a checkpoint's.

    Given ``--ckpt_path FILE``, LightningCLI re-parses the config with the hyperparameters
    saved in the checkpoint, so ``--model.arch.dim 128`` or a new learning rate is silently
    dropped (with ``--ckpt_path last``, which is no file, it is not). The recipe compares
    the two when the checkpoint is loaded instead (``recipe.resume``): settings that must
    match stop the run, the others are applied and listed.
    """

    def _parse_ckpt_path(self) -> None:
        return None


# ---------------------------------------------------------------------------- console


class _HideTips:
    """A logging filter that drops Lightning's advertising ("💡 Tip: ... try installing litlogger")."""

    def filter(self, record: object) -> bool:
        return not str(getattr(record, "msg", "")).startswith("💡 Tip:")


def quiet_lightning_notices() -> None:
    """Keep two of Lightning's messages that say nothing about the run off the console.

    - The "💡 Tip" lines advertising ``litlogger`` and ``litmodels``, which ``Trainer``
      logs through ``rank_zero_info`` (logger ``lightning.pytorch.utilities.rank_zero``)
      whenever neither is in use; Lightning has no setting to turn them off.
    - torch >= 2.10's ``FutureWarning`` that ``LeafSpec`` is deprecated: Lightning's own
      ``utilities/_pytree._tree_flatten`` constructs ``LeafSpec()`` for every
      ``CombinedLoader``, so every ``fit``/``validate``/``test`` raises it whatever the data
      module returns (Lightning issue 21326). Only that message from that module is ignored.

    Safe to call more than once.
    """
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideTips) for f in logger.filters):
            logger.addFilter(_HideTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
