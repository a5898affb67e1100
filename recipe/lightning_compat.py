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

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.device_mesh import DeviceMesh

LIGHTNING_VERSION_CHECKED = "2.6.6"

__all__ = [
    "LIGHTNING_VERSION_CHECKED",
    "ResolvedDirCheckpoint",
    "attached_trainer",
    "callback_state_key",
    "mark_sigterm_received",
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
    """A ``ModelCheckpoint`` that chooses its ``dirpath`` itself when none is given.

    Subclasses implement ``resolve_dirpath(trainer)``. It runs in ``setup`` and also when
    Lightning looks for ``ckpt_path="last"``, which happens before any callback hook, so
    ``--ckpt_path last`` finds the checkpoints where they are written.
    """

    def resolve_dirpath(self, trainer: L.Trainer) -> None:
        """Set ``self.dirpath`` if it is None (the default keeps Lightning's rule)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self.resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)
