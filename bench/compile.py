"""torch.compile per block vs eager: steady-state step time, compile time and break-even.

The model and batch are ``bench/cpu_mfu.py``'s (~44M parameters, 4 x 512 tokens). Both
variants train the same steps from the same weights; the compiled one compiles its
blocks exactly as ``Parallel4DStrategy(compile=True)`` does (``recipe.parallel.compile``),
so its first step carries the compile time. Reported: eager / compiled step time (above
1 means compile is faster), the compile time, and the steps it takes to pay it back.
The strategy keeps eager as its default where the speed-up is not worth it.

    python bench/compile.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_mfu import ARCH, MICRO, SEQ_LEN  # noqa: E402
from recipe.module import LlamaLightningModule, OptimizerConfig  # noqa: E402
from recipe.parallel.compile import apply_compile  # noqa: E402
from recipe.schedule import LRSchedule  # noqa: E402


def training_step(compiled: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    module = LlamaLightningModule(arch=ARCH, optimizer=OptimizerConfig(lr=1e-3),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=100, min_lr=1e-4))
    module.configure_model()
    if compiled:
        apply_compile(module.model, "cpu")
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARCH.vocab_size, (MICRO, SEQ_LEN + 1), generator=generator)
    doc_ids = torch.zeros_like(tokens)

    def step() -> None:
        module.micro_batch_loss(tokens, doc_ids, MICRO * SEQ_LEN).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(compiled: bool, steps: int) -> dict[str, float]:
    step = training_step(compiled)
    first = timed(step)  # eager: warm-up; compiled: tracing and C++ compilation too
    times = [timed(step) for _ in range(steps)]
    steady = statistics.median(times)
    return {"first_step_s": first, "step_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    eager = measure(False, args.steps)
    compiled = measure(True, args.steps)
    speedup = eager["step_s"] / compiled["step_s"]
    compile_s = compiled["first_step_s"] - compiled["step_s"]
    saved = eager["step_s"] - compiled["step_s"]
    break_even = compile_s / saved if saved > 0 else float("inf")
    result = {"bench": "compile", "eager": eager, "compiled": compiled, "speedup": speedup,
              "compile_seconds": compile_s, "break_even_steps": break_even, "threads": torch.get_num_threads()}
    result["headline"] = [{"name": "compiled blocks / eager step speed", "value": speedup, "unit": "x",
                           "target": "informational (eager stays the default)", "met": None}]
    print(f"{'':<10}{'first step':>12}{'step':>10}\n"
          f"{'eager':<10}{eager['first_step_s']:>11.2f}s{eager['step_s']:>9.3f}s\n"
          f"{'compiled':<10}{compiled['first_step_s']:>11.2f}s{compiled['step_s']:>9.3f}s\n"
          f"compiled is {speedup:.2f}x eager's speed; compiling took {compile_s:.0f} s"
          + (f", paid back after {break_even:.0f} steps" if saved > 0 else ", never paid back"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
