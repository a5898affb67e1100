"""One run per checkpoint folder: a live holder stops the second run in one line; a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_runs import tiny_fit_config
from recipe import run_lock
from recipe.cli import main
from stdlib_corpus import stdlib_shards


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / run_lock.LOCK_NAME
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "since": "earlier"}))
    return path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, live_pid):
    write_lock(tmp_path / "live", live_pid)
    with pytest.raises(run_lock.FolderInUseError, match=rf"in use by another run \(host .*, pid {live_pid}"):
        run_lock.acquire(tmp_path / "live")
    write_lock(tmp_path / "remote", 1, host="another-node")
    with pytest.raises(run_lock.FolderInUseError, match="host another-node"):
        run_lock.acquire(tmp_path / "remote")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = write_lock(tmp_path / "dead", dead.pid)
    assert run_lock.acquire(tmp_path / "dead") == path
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert run_lock.acquire(tmp_path / "dead") == path  # the holder again: no refusal
    run_lock.release(path)
    assert not path.exists()
    path.write_text("{")  # half-written by a holder that died while writing
    assert run_lock.acquire(tmp_path / "dead") == path


def test_a_second_fit_into_a_used_folder_stops_in_one_line(tmp_path, live_pid, capsys):
    data_dir = stdlib_shards(tmp_path / "data")
    config = tiny_fit_config(tmp_path, data_dir, "run", 2, [], seed=3, checkpoint_every=1)
    cfg = yaml.safe_load(config.read_text())
    ckpt = tmp_path / "run" / "ckpt"
    cfg["trainer"]["callbacks"][-1] = {"class_path": "callbacks.checkpoint.RecipeCheckpoint",
                                       "init_args": {"dirpath": str(ckpt), "every_n_train_steps": 1}}
    config.write_text(yaml.safe_dump(cfg))
    write_lock(ckpt, live_pid)  # another run is training into this folder
    capsys.readouterr()
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err  # Lightning's INFO lines, then the error
    assert f"pid {live_pid}" in err[-1] and "trainer.default_root_dir" in err[-1], err
    assert not list(ckpt.glob("*.ckpt"))  # it stopped before its first step
    # Once that run is gone the folder is free, and the lock is released at the end.
    os.kill(live_pid, 9)
    os.waitpid(live_pid, 0)
    assert main(["fit", "--config", str(config)]) == 0
    assert (ckpt / "last.ckpt").exists() and not (ckpt / run_lock.LOCK_NAME).exists()
