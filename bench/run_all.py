"""Run every CPU benchmark, one after another, and print one table of their headline figures.

Each bench runs as its own process (sequentially, so they never compete for the cores)
with ``--json`` into the output directory; its output is streamed and saved to
``<name>.log`` there. At the end one table lists every headline figure (bench, metric,
value, target, met) and ``summary.json`` collects them with each bench's wall time and
the machine's description. A bench that fails is shown as failed (exit code and last
stderr line), the others still run, and the runner then exits with status 1.

    python bench/run_all.py [--quick] [--only pipeline_bubble,dataloader] [--skip minhash] [--out DIR]

Not run here: ``bench/gpu_train.py`` (and ``bench/gpu_check.py``, which runs its throughput
phase), ``bench/gpu_step.py`` and ``bench/gpu_memory.py`` need an NVIDIA GPU (run them on
one by hand), and ``bench/scaling_mini.py`` is a several-minute end-to-end scaling
sweep of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
DEMO_DATA = Path("data/demo")  # relative to the repository root, where the benches run
DEMO_CORPUS = DEMO_DATA / "corpus" / "demo.jsonl"


@dataclass
class Bench:
    name: str
    script: str
    quick: list[str] = field(default_factory=list)  # used when the script has no --quick of its own
    needs_demo_corpus: bool = False
    needs_modules: tuple[str, ...] = ()


# In run order.
KNOWN: tuple[Bench, ...] = (
    Bench("overhead", "overhead.py", ["--steps", "2", "--repeats", "1", "--warmup", "1"]),
    Bench("cpu_mfu", "cpu_mfu.py", ["--steps", "2"]),
    Bench("memory", "memory.py"),
    Bench("attention", "attention.py"),
    Bench("pipeline_bubble", "pipeline_bubble.py"),
    Bench("dataloader", "dataloader.py", ["--steps", "2"]),
    Bench("minhash", "minhash.py", ["--docs", "1500", "--dups", "500"], needs_demo_corpus=True,
          needs_modules=("datasketch",)),
    Bench("tokenize_pack", "tokenize_pack.py", ["--repeats", "1"], needs_demo_corpus=True),
    Bench("curate_ray", "curate_ray.py", needs_modules=("ray",)),
    Bench("curate_datatrove", "curate_datatrove.py",
          needs_modules=("datatrove", "orjson", "spacy", "tldextract", "fasteners", "ahocorasick")),
    Bench("compile", "compile.py", ["--steps", "2"]),
)


def discover() -> list[Bench]:
    """The benches whose scripts exist."""
    return [b for b in KNOWN if (BENCH_DIR / b.script).is_file()]


def bench_argv(bench: Bench, json_path: Path, quick: bool) -> list[str]:
    source = (BENCH_DIR / bench.script).read_text(encoding="utf-8")
    argv = [sys.executable, str(BENCH_DIR / bench.script)]
    if '"--json"' in source:
        argv += ["--json", str(json_path)]
    if quick:
        argv += ["--quick"] if '"--quick"' in source else bench.quick
    return argv


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": os.getloadavg()[0],
    }


def _pump(stream: TextIO, log: TextIO, lock: threading.Lock, prefix: str, echo: bool, tail: list[str]) -> None:
    for line in stream:
        with lock:  # stdout and stderr share one log
            log.write(line)
        if echo:
            sys.stdout.write(prefix + line.rstrip("\r\n").rsplit("\r", 1)[-1] + "\n")
            sys.stdout.flush()
        if line.strip():
            tail[:] = [line.strip().rsplit("\r", 1)[-1]]


def run_bench(argv: list[str], log_path: Path, prefix: str, echo: bool, timeout: float) -> tuple[int, str]:
    """(exit code, last non-empty stderr line); -9 after a timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        # Own process group: a timeout must also stop the ranks a bench forked.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True)
        out_tail: list[str] = []
        err_tail: list[str] = []
        lock = threading.Lock()
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, log, lock, prefix, echo, out_tail)),
                 threading.Thread(target=_pump, args=(proc.stderr, log, lock, prefix, echo, err_tail))]
        for t in pumps:
            t.start()
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out, code = True, -9
        except BaseException:  # Ctrl-C reaches only this process: the bench is in its own session
            _kill_group(proc.pid)
            raise
        # Also after a normal exit: a stray child still holding the pipes would keep the
        # readers below waiting forever.
        _kill_group(proc.pid)
        proc.wait()
        for t in pumps:
            t.join()
    if timed_out:
        return code, f"timed out after {timeout:.0f} s"
    return code, (err_tail or out_tail or [""])[0]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ensure_demo_corpus(echo: bool, out: Path) -> str | None:
    """Build the demo corpus if a bench needs it and it is missing; a note if it still is."""
    if (ROOT / DEMO_CORPUS).is_file():
        return None
    print(f"{DEMO_CORPUS} is missing: building it with `recipe data demo` (a few minutes) ...", flush=True)
    argv = [sys.executable, "-c", "import sys; from recipe.cli import main; sys.exit(main(['data', 'demo']))"]
    code, last = run_bench(argv, out / "demo_data.log", "[demo data] ", echo, timeout=3600)
    if (ROOT / DEMO_CORPUS).is_file():
        return None
    return (f"could not build {DEMO_CORPUS} (`recipe data demo` exit {code}: {last}); the benches that need it "
            f"build a temporary copy themselves - or run `recipe data demo --overwrite`")


def fmt_value(value: Any, unit: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:#.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return text + (unit if unit in ("x", "%") else f" {unit}" if unit and unit != "fraction" else "")


def print_table(records: list[dict]) -> None:
    rows = [("bench", "metric", "value", "target", "met")]
    for rec in records:
        if rec["status"] != "ok":
            reason = f"exit {rec['exit_code']}: {rec['error']}" if rec["exit_code"] is not None else rec["error"]
            rows.append((rec["name"], rec["status"].upper(), "", reason[:100], "-"))
            continue
        if not rec["headline"]:
            what = "(no headline in its JSON)" if Path(rec["json"]).is_file() else "(wrote no JSON)"
            rows.append((rec["name"], what, "", "", "-"))
        for h in rec["headline"]:
            met = {True: "yes", False: "NO", None: "-"}.get(h.get("met"), str(h.get("met")))
            rows.append((rec["name"], str(h.get("name", "")), fmt_value(h.get("value"), h.get("unit", "")),
                         str(h.get("target", "")), met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  ---")


def parse_names(text: str | None, known: list[str], flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    absent = [n for n in names if n not in known and any(b.name == n for b in KNOWN)]
    if absent:
        scripts = ", ".join(f"bench/{b.script}" for b in KNOWN if b.name in absent)
        raise SystemExit(f"run_all: {flag} names {', '.join(absent)} but {scripts} does not exist here")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"run_all: unknown bench {', '.join(unknown)} in {flag}; available: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated benches to run (default: all found)")
    parser.add_argument("--skip", default=None, help="comma-separated benches to leave out")
    parser.add_argument("--quick", action="store_true", help="pass each bench its short options")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: runs/bench/<timestamp>)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per bench before it is stopped")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not stream the benches' output")
    parser.add_argument("--list", action="store_true", help="list the benches found and exit")
    args = parser.parse_args(argv)

    benches = discover()
    names = [b.name for b in benches]
    if args.list:
        for b in benches:
            print(f"{b.name:<16} bench/{b.script}")
        return 0
    only, skip = parse_names(args.only, names, "--only"), parse_names(args.skip, names, "--skip")
    selected = [b for b in benches if (not only or b.name in only) and b.name not in skip]
    if not selected:
        raise SystemExit("run_all: nothing to run after --only/--skip")

    started = dt.datetime.now()
    out = (args.out or ROOT / "runs" / "bench" / started.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"benches: {', '.join(b.name for b in selected)}{' (quick)' if args.quick else ''}; output in {out}; "
          f"{machine['cpus_usable']} CPUs, torch {machine['torch']}, load average {machine['load_average_start']:.2f}",
          flush=True)

    if machine["load_average_start"] > 0.5 * machine["cpus_usable"]:
        print(f"warning: the machine is busy (load average {machine['load_average_start']:.2f} on "
              f"{machine['cpus_usable']} CPUs); timings will be noisy", flush=True)

    demo_note = ensure_demo_corpus(not args.quiet, out) if any(b.needs_demo_corpus for b in selected) else None
    if demo_note:
        print("note: " + demo_note, flush=True)

    records: list[dict] = []
    total_start = time.perf_counter()
    for bench in selected:
        json_path = out / f"{bench.name}.json"
        cmd = bench_argv(bench, json_path, args.quick)
        rec: dict[str, Any] = {"name": bench.name, "script": f"bench/{bench.script}", "argv": cmd[1:],
                               "status": "ok", "exit_code": 0, "error": None, "wall_s": 0.0, "headline": [],
                               "json": str(json_path), "log": str(out / f"{bench.name}.log")}
        records.append(rec)
        missing = [m for m in bench.needs_modules if importlib.util.find_spec(m) is None]
        if missing:
            rec.update(status="failed", exit_code=None,
                       error=f"needs {', '.join(missing)}: pip install -e \".[bench]\"")
            print(f"== {bench.name}: not run, {rec['error']}", flush=True)
            continue
        print(f"\n== {bench.name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code, last = run_bench(cmd, out / f"{bench.name}.log", f"[{bench.name}] ", not args.quiet, args.timeout)
        rec["wall_s"] = round(time.perf_counter() - start, 1)
        if code != 0:
            rec.update(status="failed", exit_code=code, error=last)
        elif json_path.is_file():
            try:
                rec["headline"] = json.loads(json_path.read_text()).get("headline", [])
            except (json.JSONDecodeError, AttributeError) as err:
                rec.update(status="failed", exit_code=code, error=f"unreadable {json_path.name}: {err}")
        print(f"== {bench.name}: {rec['status']} in {rec['wall_s']:.0f} s", flush=True)

    total = time.perf_counter() - total_start
    machine["load_average_end"] = os.getloadavg()[0]
    failed = [r["name"] for r in records if r["status"] != "ok"]
    headlines = [h for r in records for h in r["headline"]]
    judged = [h for h in headlines if h.get("met") is not None]
    summary = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "out_dir": str(out),
               "total_wall_s": round(total, 1), "machine": machine, "demo_corpus_note": demo_note,
               "failed": failed, "targets_met": sum(bool(h["met"]) for h in judged), "targets_judged": len(judged),
               "benches": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print()
    print_table(records)
    print(f"\n{len(records) - len(failed)} of {len(records)} benches ran; {summary['targets_met']} of {len(judged)} "
          f"targets met; {total:.0f} s in all; summary in {out / 'summary.json'}")
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
