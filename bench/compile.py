"""torch.compile per block vs eager: steady-state step time, compile time and break-even.

The model, batch and step are ``bench/cpu_mfu.py``'s (58.7M parameters, 4 x 512 tokens). Both
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

from cpu_mfu import training_step  # noqa: E402


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(compiled: bool, steps: int) -> dict[str, float]:
    step, _ = training_step(compiled)
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
