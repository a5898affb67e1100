"""Every collective of recipe/ and callbacks/ goes through recipe.parallel.collectives.

Two checks, because gloo (the CPU backend) accepts CPU tensors that NCCL refuses, so a
collective placed by hand can pass every CPU test and fail on the first GPU step:

* statically, no module but ``collectives.py`` calls a torch.distributed collective (by
  any import form) or a Lightning strategy's collective methods;
* at run time, in a 2-rank world training under the 4D strategy (context parallel,
  pipeline, validation, a distributed checkpoint), every torch.distributed collective
  that code of the recipe calls directly is called from ``collectives.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from ast_scan import dotted
from dist_harness import run_world
from recipe.parallel import collectives

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "recipe" / "parallel" / "collectives.py"
SCANNED = [ROOT / "recipe", ROOT / "callbacks"]

DIST_COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "all_gather_single_autograd", "all_reduce_coalesced", "all_gather_tensor",
    "all_gather_tensor_autograd", "reduce_scatter_tensor_autograd", "send_object_list", "recv_object_list",
}
DIST_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d", "torch.distributed._functional_collectives"}
LIGHTNING_COLLECTIVES = {"broadcast", "barrier", "reduce", "all_gather", "reduce_boolean_decision"}


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Collective calls made outside the collectives module, as ``file:line: call``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the torch.distributed module it stands for
    direct: set[str] = set()  # collectives imported by name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in DIST_MODULES:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in DIST_MODULES:
                    aliases[alias.asname or alias.name] = full
                elif node.module in DIST_MODULES and alias.name in DIST_COLLECTIVES:
                    direct.add(alias.asname or alias.name)
                    found.append(f"{filename}:{node.lineno}: imports {full}")
    strategy_classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                        and any("Strategy" in dotted(base) for base in node.bases)]
    in_strategy = {id(n) for cls in strategy_classes for n in ast.walk(cls)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in direct:
            found.append(f"{filename}:{node.lineno}: {func.id}(...)")
        if not isinstance(func, ast.Attribute):
            continue
        receiver = dotted(func.value)
        if func.attr in DIST_COLLECTIVES and (receiver in aliases or receiver in DIST_MODULES):
            found.append(f"{filename}:{node.lineno}: {receiver}.{func.attr}(...)")
        elif func.attr in LIGHTNING_COLLECTIVES and (
                receiver.endswith("strategy") or (receiver == "self" and id(node) in in_strategy)):
            found.append(f"{filename}:{node.lineno}: {receiver}.{func.attr}(...) (a Lightning strategy collective)")
    return found


def test_the_scanner_finds_collectives_in_every_form():
    source = """
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import all_gather_object
from lightning.pytorch.strategies import ModelParallelStrategy

def f(t, trainer):
    dist.all_reduce(t)
    funcol.all_gather_single_autograd(t, 0, "g")
    all_gather_object([None], 1)
    trainer.strategy.broadcast(1)
    dist.get_rank()  # not a collective

class S(ModelParallelStrategy):
    def save(self):
        self.barrier()
"""
    found = violations(source)
    assert len(found) == 6, found
    assert not violations("import torch.distributed as dist\nrank = dist.get_rank()\n")


def test_no_collective_outside_the_collectives_module():
    found = []
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            if path != HOME:
                found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "collectives called outside recipe/parallel/collectives.py:\n" + "\n".join(found)


def test_collectives_go_to_the_backends_device(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.group_device() == torch.device("cpu")


def test_without_a_process_group_collectives_are_the_identity():
    t = torch.arange(3.0)
    assert torch.equal(collectives.all_reduce(t), t) and collectives.all_reduce(t) is not t
    assert collectives.all_gather_object("x") == ["x"] and collectives.broadcast_object(5) == 5
    assert collectives.group_size() == 1


# ----------------------------------------------------------------------------- run time


def _record_callers() -> list[str]:
    """Wrap torch.distributed's collectives: note each direct caller inside the project."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    bad: list[str] = []

    def wrap(module, name):
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            inside = any(caller.is_relative_to(root) for root in SCANNED)
            if inside and caller != HOME:
                bad.append(f"{caller.relative_to(ROOT)}:{sys._getframe(1).f_lineno}: {name}")
            return original(*args, **kwargs)

        setattr(module, name, recorded)

    # Point-to-point ops stay unwrapped: torch's pipeline checks their identity (P2POp).
    for name in sorted(DIST_COLLECTIVES - {"send", "recv", "isend", "irecv", "batch_isend_irecv"}):
        if hasattr(dist, name):
            wrap(dist, name)
    wrap(funcol, "all_gather_single_autograd")
    return bad


def _train_and_record(data_dir: str, ckpt_dir: str) -> list[str]:
    import lightning as L

    from callbacks.checkpoint import RecipeCheckpoint
    from recipe.config import ModelArgs, OptimizerConfig
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.parallel.strategy import Parallel4DStrategy

    bad = _record_callers()
    arch = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None,
                     max_seq_len=32)
    for name, layout in {"cp2": dict(cp=2, dp_shard=1), "pp2": dict(pp=2, dp_shard=1)}.items():
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=Parallel4DStrategy(**layout), max_steps=2,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, val_check_interval=2, check_val_every_n_epoch=None,
                            callbacks=[RecipeCheckpoint(dirpath=f"{ckpt_dir}/{name}", every_n_train_steps=2)])
        module = LlamaLightningModule(arch=arch, optimizer=OptimizerConfig(lr=1e-3))
        data = TokenDataModule(data_dir=data_dir, seq_len=16, global_batch_size=4, micro_batch_size=2,
                               val_batches=1, build_demo=False)
        trainer.fit(module, datamodule=data)
    return bad


def test_a_training_run_calls_collectives_only_through_the_module(tmp_path):
    from recipe.data.build import build_shards
    from stdlib_corpus import stdlib_corpus

    corpus = stdlib_corpus(tmp_path / "corpus", ["textwrap.py", "colorsys.py"])
    build_shards(corpus, tmp_path / "shards", val_fraction=0.25)
    per_rank = run_world(_train_and_record, 2, init_pg=False, data_dir=str(tmp_path / "shards"),
                         ckpt_dir=str(tmp_path / "ckpt"))
    found = sorted({line for bad in per_rank for line in bad})
    assert not found, "collectives called outside recipe/parallel/collectives.py at run time:\n" + "\n".join(found)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
