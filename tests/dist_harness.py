"""Run a function on N CPU ranks (gloo) from inside pytest, cheaply.

Process start-up dominates multi-rank tests on a small machine (each rank importing
torch costs seconds), so a fresh *zygote* process is spawned once per world: it imports
torch and the test module, then forks the ranks. The zygote has run no OpenMP region, so
forking it is safe, and pytest's own process is never forked. Each rank gets the
torchelastic environment variables (RANK, WORLD_SIZE, ...), so both a plain
``init_process_group`` and a Lightning ``Trainer`` (which then does not launch
processes itself) work inside it.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, module: str, name: str, kwargs: dict, out: Path,
               init_pg: bool) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": f"test-{port}",
    })
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        fn = getattr(importlib.import_module(module), name)
        result = fn(**kwargs)
        if init_pg and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # report every failure, including SystemExit from a CLI
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(("error", traceback.format_exc())))
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _zygote(world: int, module: str, name: str, kwargs: dict, out: str, init_pg: bool, sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    import torch  # noqa: F401  (imported once, shared by the forked ranks)

    importlib.import_module(module)
    port = free_port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _rank_main(rank, world, port, module, name, kwargs, Path(out), init_pg)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)


def run_world(fn: Callable[..., Any], world: int, timeout: float = 600, init_pg: bool = True,
              **kwargs: Any) -> list[Any]:
    """Run ``fn(**kwargs)`` on ``world`` ranks; return the per-rank results (rank order).

    ``fn`` must be a module-level function of an importable module. A failure on any rank
    raises with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_zygote, args=(world, fn.__module__, fn.__name__, kwargs, out, init_pg,
                                                  list(sys.path)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish within {timeout} s")
        results, failures = [], []
        for rank in range(world):
            path = Path(out) / f"rank{rank}.pkl"
            if not path.exists():
                failures.append((rank, "died without a result"))
                continue
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                failures.append((rank, value))
            results.append(value)
        if failures:
            # Show the root cause first: the other ranks only see their peer's connection drop.
            failures.sort(key=lambda f: "Connection closed by peer" in f[1])
            rank, message = failures[0]
            raise RuntimeError(f"rank {rank} of {fn.__name__} failed ({len(failures)} of {world} ranks):\n{message}")
        return results
