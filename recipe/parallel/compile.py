"""``torch.compile`` per transformer block.

Blocks are compiled one by one rather than the whole model: every block runs the same
code, so one compiled graph serves them all (nn modules are inlined, their parameters
become graph inputs), compile time does not grow with depth, and the FSDP units, the
pipeline split and activation checkpointing keep working on block boundaries.
``Module.compile`` compiles in place, so parameter names (and with them checkpoints)
are unchanged. Apply after TP, CP and activation checkpointing, before FSDP.

Attention stays outside the graphs (``recipe.attention.attend`` is ``compiler.disable``d):
its per-batch document runs are host data that a graph would specialise on, and every
backend calls a fused kernel of its own. So a block compiles into two graphs, before and
after attention, which is why ``fullgraph`` is off.

On CPU the graphs go through inductor's C++ backend (a C++ compiler must be installed);
whether that beats eager depends on the machine - ``bench/compile.py`` measures it.
"""

from __future__ import annotations

import shutil

from recipe.errors import ConfigError
from recipe.model import Transformer


def check_compile_layout(tp: int) -> None:
    """One-line error for a layout that compiled blocks cannot train under."""
    if tp > 1:
        # Compiled blocks whose residual stream is a sequence-sharded DTensor fail in
        # backward (a plain-tensor gradient reaches DTensor's redistribute) in this torch.
        raise ConfigError(f"compile: true with tp={tp} is not supported (compiled tensor-parallel blocks fail "
                          "in backward); use compile with fsdp/cp/pp only, or set compile: false")


def apply_compile(model: Transformer, device_type: str = "cpu", tp: int = 1, fullgraph: bool = False) -> int:
    """Compile each block of ``model`` in place; returns the number of blocks compiled."""
    check_compile_layout(tp)
    if device_type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        raise ConfigError("compile: true needs a C++ compiler for inductor's CPU backend; install g++ "
                          "or set the strategy's compile: false")
    for block in model.layers.values():
        block.compile(fullgraph=fullgraph)
    return len(model.layers)
