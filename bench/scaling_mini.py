"""The mini IsoFLOP sweep end to end on CPU: train, fit, forecast, plot - and time it.

Runs ``recipe scaling sweep``, ``fit`` and ``forecast`` on ``configs/scaling/mini.yaml``
(tiny Llama 3 models with the real 128K vocabulary on the demo corpus) and copies the
figures and the results table to ``docs/scaling/``. Finished runs are skipped, so an
interrupted benchmark resumes where it stopped; delete the config's ``out_dir`` for a
clean timing.

    python bench/scaling_mini.py [--config configs/scaling/mini.yaml] [--docs docs/scaling]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from recipe.cli import main as recipe
from recipe.scaling.plan import load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/scaling/mini.yaml")
    parser.add_argument("--docs", default="docs/scaling", help="where the PNGs and the table are copied")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    config = load_config(args.config)
    out, docs = Path(config.out_dir), Path(args.docs)
    target = f"{config.target_flops or 3.8e25:g}"
    timings = {}
    steps = [
        ("sweep", ["scaling", "sweep", "--config", args.config]),
        ("fit", ["scaling", "fit", "--config", args.config, "--bootstrap", str(args.bootstrap),
                 "--plots", str(docs)]),
        ("forecast", ["scaling", "forecast", "--config", args.config, "--flops", target, "--plots", str(docs)]),
    ]
    failed = 0
    for name, argv in steps:
        start = time.perf_counter()
        code = recipe(argv)
        timings[name] = time.perf_counter() - start
        if code != 0:
            print(f"`recipe {' '.join(argv)}` failed with exit code {code}")
            failed = code
            if name == "sweep":
                return code
    docs.mkdir(parents=True, exist_ok=True)
    for source, target_name in (("results.csv", "mini_results.csv"), ("fit.json", "mini_fit.json")):
        if (out / source).is_file():
            shutil.copy(out / source, docs / target_name)
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f} s")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
