"""Fault injection: kill, corrupt, pre-empt - the run restarts from an intact checkpoint and repeats itself exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.checkpoint import RecipeCheckpoint
from cli_runs import tiny_fit_config
from fault_injection import read_loss_log
from recipe.checkpointing import (
    AtomicCheckpointIO,
    CheckpointCorruptError,
    UntrustedCheckpointError,
    load_trusted,
    manifest_path,
    newest_intact,
    problems,
)
from recipe.cli import main
from recipe.model import ModelArgs
from stdlib_corpus import stdlib_shards

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]


def corrupt(path: Path, offset_fraction: float = 0.5) -> None:
    """Flip one byte in the middle of a file (or of the largest file of a directory)."""
    if path.is_dir():
        path = max((p for p in path.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- units


def test_atomic_save_writes_a_manifest_and_verifies_on_load(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.arange(10.0), "arch": ModelArgs(dim=64)}, tmp_path / "a.ckpt")
    assert manifest_path(tmp_path / "a.ckpt").is_file() and not list(tmp_path.glob("*.partial"))
    assert problems(tmp_path / "a.ckpt") == []
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")  # weights_only, with the recipe's classes allowed
    assert torch.equal(loaded["w"], torch.arange(10.0)) and loaded["arch"].dim == 64

    io.save_checkpoint({"global_step": 2, "w": torch.ones(10)}, tmp_path / "b.ckpt")
    corrupt(tmp_path / "b.ckpt")
    assert "corrupted" in problems(tmp_path / "b.ckpt")[0]
    with pytest.warns(UserWarning, match="b.ckpt is damaged .* falling back to .*a.ckpt"):
        assert torch.equal(io.load_checkpoint(tmp_path / "b.ckpt")["w"], torch.arange(10.0))

    with open(tmp_path / "a.ckpt", "r+b") as f:
        f.truncate(100)
    assert "truncated" in problems(tmp_path / "a.ckpt")[0]
    with pytest.raises(CheckpointCorruptError, match="no intact checkpoint is next to it"):
        io.load_checkpoint(tmp_path / "b.ckpt")


def test_the_newest_intact_checkpoint_is_found_whatever_its_name(tmp_path):
    io = AtomicCheckpointIO()
    for step, name in ((1, "step=00000001.ckpt"), (2, "last.ckpt"), (3, "step=00000003.ckpt")):
        io.save_checkpoint({"global_step": step, "w": torch.full((4,), float(step))}, tmp_path / name)
    assert newest_intact(tmp_path) == (tmp_path / "step=00000003.ckpt", [])
    # Killed between the manifest and the rename of last.ckpt at step 4: the complete file
    # is still ``last.ckpt.partial``, and the old last.ckpt fails the new manifest.
    (tmp_path / "last.ckpt").rename(tmp_path / "old")
    io.save_checkpoint({"global_step": 4, "w": torch.full((4,), 4.0)}, tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").rename(tmp_path / "last.ckpt.partial")
    (tmp_path / "old").rename(tmp_path / "last.ckpt")
    path, passed = newest_intact(tmp_path)
    assert path == tmp_path / "last.ckpt.partial" and len(passed) == 1 and "last.ckpt does not match" in passed[0]
    assert torch.equal(io.load_checkpoint(path)["w"], torch.full((4,), 4.0))
    # The next save of last.ckpt first publishes the complete leftover, then writes.
    io.save_checkpoint({"global_step": 5, "w": torch.full((4,), 5.0)}, tmp_path / "last.ckpt")
    assert newest_intact(tmp_path) == (tmp_path / "last.ckpt", []) and not list(tmp_path.glob("*.partial"))
    for name in ("last.ckpt", "step=00000001.ckpt", "step=00000003.ckpt"):
        corrupt(tmp_path / name)
    with pytest.raises(CheckpointCorruptError, match="holds checkpoints but none is intact"):
        newest_intact(tmp_path)
    assert newest_intact(tmp_path / "empty") == (None, [])


def test_untrusted_objects_are_not_unpickled(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"global_step": 0, "payload": os.system}, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedCheckpointError, match="holds an object of class .*system, which a checkpoint"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    callback = RecipeCheckpoint(dirpath=str(tmp_path), keep_last=2, keep_every=4)
    for step in range(1, 10):
        AtomicCheckpointIO().save_checkpoint({"global_step": step}, tmp_path / f"step={step:08d}.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    removed = callback.prune()
    assert [s for s, _ in callback.step_checkpoints()] == [4, 8, 9] and len(removed) == 6
    assert (tmp_path / "last.ckpt").exists() and not (tmp_path / "step=00000005.ckpt.manifest.json").exists()
    with pytest.raises(Exception, match="keep_last must be >= 1"):
        RecipeCheckpoint(dirpath=str(tmp_path), keep_last=0)


# ----------------------------------------------------------------------------- runs


def test_asynchronous_saves_are_complete_and_verified(tmp_path, data_dir, straight):
    cfg = config(tmp_path, data_dir, "async")
    spec = yaml.safe_load(cfg.read_text())
    spec["trainer"]["callbacks"][-1]["init_args"]["async_save"] = True
    cfg.write_text(yaml.safe_dump(spec))
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "3"]) == 0
    ckpt = tmp_path / "async" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == [
        "last.ckpt", "step=00000001.ckpt", "step=00000002.ckpt", "step=00000003.ckpt"]
    assert all(problems(p) == [] for p in ckpt.glob("*.ckpt"))
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    assert read_loss_log(tmp_path / "async.losses") == straight


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return stdlib_shards(tmp_path_factory.mktemp("faults"))


def config(tmp_path: Path, data_dir: Path, run: str, extra: list[dict] | None = None) -> Path:
    """A 6-step run checkpointing every step (RecipeCheckpoint) and logging losses to ``<run>.losses``."""
    log = {"class_path": "fault_injection.LossLog", "init_args": {"path": str(tmp_path / f"{run}.losses")}}
    path = tiny_fit_config(tmp_path, data_dir, run, STEPS, [log, *(extra or [])], seed=11, checkpoint_every=1,
                           lr_schedule={"warmup_steps": 1, "decay_steps": 20, "min_lr": 1e-4})
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"][-1] = {"class_path": "callbacks.checkpoint.RecipeCheckpoint",
                                       "init_args": {"dirpath": str(tmp_path / run / "ckpt"),
                                                     "every_n_train_steps": 1, "keep_last": 3}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "recipe.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("straight")
    assert main(["fit", "--config", str(config(tmp, data_dir, "straight"))]) == 0
    losses = read_loss_log(tmp / "straight.losses")
    assert sorted(losses) == list(range(STEPS))
    return losses


def test_sigkill_at_a_random_step_then_resume_repeats_the_run(tmp_path, data_dir, straight):
    step = random.Random(7).randint(1, STEPS - 1)  # a seeded "random" step
    kill = {"class_path": "fault_injection.KillAt", "init_args": {"step": step}}
    cfg = config(tmp_path, data_dir, "killed", [kill])
    proc = run_cli(["fit", "--config", str(cfg)])
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    before = read_loss_log(tmp_path / "killed.losses")
    assert max(before) == step - 1  # it died after `step` steps, before saving the last one
    # The same config without the kill, resumed from whatever the dead run left.
    assert main(["fit", "--config", str(config(tmp_path, data_dir, "killed")), "--ckpt_path", "last"]) == 0
    after = read_loss_log(tmp_path / "killed.losses")
    assert sorted(after) == list(range(STEPS))
    assert after == straight  # bit for bit, the replayed step included


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, straight, recwarn):
    cfg = config(tmp_path, data_dir, "corrupt")
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "4"]) == 0
    ckpt = tmp_path / "corrupt" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == [
        "last.ckpt", "step=00000002.ckpt", "step=00000003.ckpt", "step=00000004.ckpt"]  # keep_last=3
    corrupt(ckpt / "last.ckpt")
    with open(ckpt / "step=00000004.ckpt", "r+b") as f:  # and the step checkpoint of the same state, truncated
        f.truncate(1000)
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    messages = [str(w.message) for w in recwarn]
    assert any("resuming from" in m and "step=00000003.ckpt (step 3)" in m and "last.ckpt does not match" in m
               and "step=00000004.ckpt has 1,000 bytes" in m for m in messages), messages
    assert read_loss_log(tmp_path / "corrupt.losses") == straight  # step 3 onwards replayed exactly


def test_sigterm_saves_at_the_next_step_boundary_and_resumes(tmp_path, data_dir, straight):
    slow = {"class_path": "fault_injection.SlowSteps", "init_args": {"seconds": 0.5}}
    cfg = config(tmp_path, data_dir, "preempted", [slow])
    proc = run_cli(["fit", "--config", str(cfg)])
    losses = tmp_path / "preempted.losses"
    deadline = time.monotonic() + 240
    while (not losses.exists() or len(losses.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by a termination signal" in err, err[-2000:]
    saved = torch.load(tmp_path / "preempted" / "ckpt" / "last.ckpt", weights_only=True)
    done = read_loss_log(losses)
    assert saved["global_step"] == max(done) + 1 < STEPS  # the state after the last finished step
    assert main(["fit", "--config", str(config(tmp_path, data_dir, "preempted")), "--ckpt_path", "last"]) == 0
    assert read_loss_log(losses) == straight


def _sharded_runs(data_dir: str, root: str) -> dict:
    """fsdp2: 4 straight steps; then 3 steps, damage the newest checkpoints, resume to 4."""
    import lightning as L

    from fault_injection import LossLog
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.parallel.strategy import Parallel4DStrategy

    arch = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
                     max_seq_len=32)

    def fit(run: str, steps: int, ckpt_path: str | None = None) -> None:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=Parallel4DStrategy(dp_shard=2), max_steps=steps,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[LossLog(f"{root}/{run}.losses"),
                                       RecipeCheckpoint(dirpath=f"{root}/{run}", every_n_train_steps=1)])
        data = TokenDataModule(data_dir=data_dir, seq_len=16, global_batch_size=4, micro_batch_size=2,
                               val_batches=0, build_demo=False)
        trainer.fit(LlamaLightningModule(arch=arch), datamodule=data, ckpt_path=ckpt_path)

    fit("straight", 4)
    fit("damaged", 3)
    if int(os.environ["RANK"]) == 0:
        corrupt(Path(root) / "damaged" / "last.ckpt")
        corrupt(Path(root) / "damaged" / "step=00000003.ckpt")
    torch.distributed.barrier()
    import warnings

    with warnings.catch_warnings(record=True) as warned:  # rank 0 warns
        warnings.simplefilter("always")
        fit("damaged", 4, ckpt_path=f"{root}/damaged/last.ckpt")
    return {"warnings": [str(w.message) for w in warned if "damaged" in str(w.message)]}


def test_a_damaged_sharded_checkpoint_falls_back_under_fsdp(tmp_path, data_dir):
    from dist_harness import run_world

    results = run_world(_sharded_runs, 2, data_dir=str(data_dir), root=str(tmp_path))
    assert any("step=00000002.ckpt" in m for m in results[0]["warnings"]), results[0]
    assert read_loss_log(tmp_path / "damaged.losses") == read_loss_log(tmp_path / "straight.losses")
    assert (tmp_path / "damaged" / "last.ckpt" / "MANIFEST.json").is_file()


def test_when_one_rank_of_four_dies_the_others_exit_naming_it_and_the_run_resumes(tmp_path, data_dir, straight):
    kill = {"class_path": "fault_injection.KillAt", "init_args": {"step": 2, "rank": 2}}
    watchdog = {"class_path": "callbacks.watchdog.RankWatchdog", "init_args": {"poll_seconds": 0.5}}
    cfg = config(tmp_path, data_dir, "rank_dies", [kill, watchdog])
    # FSDP over 4 ranks, one sequence each: the single-process run's batches.
    strategy = ["--trainer.devices", "4", "--trainer.strategy", "recipe.parallel.strategy.Parallel4DStrategy",
                "--trainer.strategy.dp_shard", "4", "--data.micro_batch_size", "1",
                "--trainer.default_root_dir", str(tmp_path / "rank_dies")]
    proc = run_cli(["fit", "--config", str(cfg), *strategy])
    losses = tmp_path / "rank_dies.losses"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # wait for the kill (rank 0 logs step 1)
        if losses.exists() and len(losses.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    died = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - died < 60
    assert proc.returncode != 0 and "rank 2 (pid" in err and "died" in err, err[-3000:]
    ranks = list((tmp_path / "rank_dies" / ".ranks").glob("*/rank*.json"))
    assert len(ranks) == 4
    time.sleep(2)
    for info in ranks:  # no rank left behind
        pid = json.loads(info.read_text())["pid"]
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:4]
    # Restarted on all four ranks from the last intact checkpoint: the run goes on as if never stopped.
    resumed = run_cli(["fit", "--config", str(config(tmp_path, data_dir, "rank_dies", [watchdog])), *strategy,
                       "--ckpt_path", "last"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    losses = read_loss_log(tmp_path / "rank_dies.losses")
    assert sorted(losses) == list(range(STEPS))
    assert [losses[s] for s in range(STEPS)] == pytest.approx([straight[s] for s in range(STEPS)], abs=1e-5)


def test_a_stalled_rank_is_ended_by_the_others_and_nothing_stays_behind(tmp_path, data_dir):
    stop = {"class_path": "fault_injection.KillAt", "init_args": {"step": 2, "rank": 1, "sig": "SIGSTOP"}}
    watchdog = {"class_path": "callbacks.watchdog.RankWatchdog", "init_args": {"poll_seconds": 0.5,
                                                                               "stall_seconds": 5}}
    cfg = config(tmp_path, data_dir, "rank_stalls", [stop, watchdog])
    strategy = ["--trainer.devices", "2", "--trainer.strategy", "recipe.parallel.strategy.Parallel4DStrategy",
                "--trainer.strategy.dp_shard", "2", "--data.micro_batch_size", "2",
                "--trainer.default_root_dir", str(tmp_path / "rank_stalls")]
    proc = run_cli(["fit", "--config", str(cfg), *strategy])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "rank 1 reported last" in err and "(stalled); ended it (pid" in err, err[-3000:]
    ranks = list((tmp_path / "rank_stalls" / ".ranks").glob("*/rank*.json"))
    assert len(ranks) == 2
    time.sleep(2)
    for info in ranks:  # the stopped rank did not stay behind
        pid = json.loads(info.read_text())["pid"]
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:4]


# ----------------------------------------------------------------------------- resume finds, saves fail cleanly


def test_sigkill_during_the_first_last_ckpt_write_resumes_from_the_step_checkpoint(tmp_path, data_dir, straight):
    kill = {"class_path": "fault_injection.KillWhileSaving", "init_args": {"step": 1}}
    proc = run_cli(["fit", "--config", str(config(tmp_path, data_dir, "mid_write", [kill]))])
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpt = tmp_path / "mid_write" / "ckpt"
    # The first publish of last.ckpt never happened: half of it lies in last.ckpt.partial.
    assert not (ckpt / "last.ckpt").exists() and (ckpt / "last.ckpt.partial").is_file()
    assert (ckpt / "step=00000001.ckpt").is_file()
    resumed = run_cli(["fit", "--config", str(config(tmp_path, data_dir, "mid_write")), "--ckpt_path", "last"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err and "step=00000001.ckpt (step 1)" in err, err[-3000:]
    assert read_loss_log(tmp_path / "mid_write.losses") == straight
    assert not list(ckpt.glob("*.partial"))


def test_a_full_disk_stops_the_run_cleanly_and_the_resume_continues_exactly(tmp_path, data_dir, straight, capsys):
    full = {"class_path": "fault_injection.DiskFull", "init_args": {"step": 3}}
    cfg = config(tmp_path, data_dir, "disk_full", [full])
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    ckpt = tmp_path / "disk_full" / "ckpt"
    assert "saving checkpoint step=00000003.ckpt failed (No space left on device)" in line, line
    assert f"{ckpt} had " in line and " free when the save began and the checkpoint needs about " in line, line
    assert f"the last good checkpoint is {ckpt / 'last.ckpt'} (step 2)" in line, line
    assert sorted(p.name for p in ckpt.iterdir() if "manifest" not in p.name) == [
        "last.ckpt", "step=00000001.ckpt", "step=00000002.ckpt"]  # nothing half-written stays
    assert main(["fit", "--config", str(config(tmp_path, data_dir, "disk_full")), "--ckpt_path", "last"]) == 0, \
        capsys.readouterr().err[-3000:]
    assert read_loss_log(tmp_path / "disk_full.losses") == straight


def test_with_on_save_error_continue_a_failed_save_warns_and_the_next_one_succeeds(tmp_path, data_dir, straight):
    full = {"class_path": "fault_injection.DiskFull", "init_args": {"step": 3, "until": 5}}
    cfg = config(tmp_path, data_dir, "save_retried", [full])
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"][-1]["init_args"]["on_save_error"] = "continue"
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.warns(UserWarning, match=r"saving checkpoint step=00000003.ckpt failed .*next save tries again"):
        assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "save_retried" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["last.ckpt", "step=00000002.ckpt", "step=00000005.ckpt",
                                                           "step=00000006.ckpt"]
    assert read_loss_log(tmp_path / "save_retried.losses") == straight
    assert load_trusted(ckpt / "last.ckpt")["global_step"] == STEPS


# ----------------------------------------------------------------------------- settings against the checkpoint


@pytest.mark.parametrize("ckpt_path", ["file", "last"])
def test_a_changed_architecture_on_resume_stops_with_one_line(tmp_path, data_dir, capsys, ckpt_path):
    cfg = config(tmp_path, data_dir, "arch")
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "2"]) == 0
    path = str(tmp_path / "arch" / "ckpt" / "last.ckpt") if ckpt_path == "file" else "last"
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--ckpt_path", path, "--model.arch.dim", "64",
                 "--model.arch.n_kv_heads", "4"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and "size mismatch" not in err, err[-3000:]
    assert "must match to resume it: model.arch.dim 32 -> 64; model.arch.n_kv_heads 2 -> 4" in errors[0], errors


def test_changed_training_settings_are_applied_and_listed_on_resume(tmp_path, data_dir, caplog):
    cfg = config(tmp_path, data_dir, "changed")
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "2"]) == 0
    caplog.clear()
    # No --ckpt_path: `recipe fit` resumes from the run's newest checkpoint by default.
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--model.optimizer.lr", "1e-3",
                 "--model.optimizer.betas", "[0.8, 0.9]"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("resuming from" in m and "last.ckpt (step 2)" in m and "resumes by default" in m for m in lines), lines
    changed = next(m for m in lines if "with changed settings" in m)
    for item in ("model.optimizer.lr 0.003 -> 0.001", "model.optimizer.betas [0.9, 0.95] -> [0.8, 0.9]",
                 "trainer.max_steps 2 -> 3"):
        assert item in changed, changed
    saved = load_trusted(tmp_path / "changed" / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 3
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.8, 0.9)] * 2  # the restored state's betas were replaced
    assert saved["run_settings"]["model.optimizer.lr"] == 1e-3


def _sharded_resume_faults(data_dir: str, root: str) -> dict:
    """Under fsdp2 (DCP checkpoints): a crash between the renames of a publish, a full disk, a changed shape."""
    import shutil

    import lightning as L

    from fault_injection import DiskFull, LossLog
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.parallel.strategy import Parallel4DStrategy

    rank = int(os.environ["RANK"])
    arch = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, max_seq_len=32)

    def fit(run: str, steps: int, ckpt_path: str | None = None, extra: list | None = None, dim: int = 32) -> None:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=Parallel4DStrategy(dp_shard=2), max_steps=steps,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[LossLog(f"{root}/{run}.losses"), *(extra or []),
                                       RecipeCheckpoint(dirpath=f"{root}/{run}", every_n_train_steps=1)])
        data = TokenDataModule(data_dir=data_dir, seq_len=16, global_batch_size=4, micro_batch_size=2,
                               val_batches=0, build_demo=False)
        trainer.fit(LlamaLightningModule(arch=ModelArgs(**{**arch, "dim": dim})), datamodule=data, ckpt_path=ckpt_path)

    def failure(fn) -> str:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the test reports whatever was raised
            return f"{type(err).__name__}: {err}"
        return "no error"

    out: dict = {}
    fit("straight", 4)
    # 1. Killed between the two renames of publishing last.ckpt at step 3: the step-2 last.ckpt
    # moved aside, the complete step-3 one still under its temporary name (and, as after a
    # pre-emption save, which writes last.ckpt alone, no step=3 checkpoint).
    fit("renames", 3)
    run = Path(root) / "renames"
    if rank == 0:
        shutil.copytree(run / "step=00000002.ckpt", run / "last.ckpt.old-12345")
        os.replace(run / "last.ckpt", run / "last.ckpt.partial")
        shutil.rmtree(run / "step=00000003.ckpt")
    torch.distributed.barrier()
    fit("renames", 4, ckpt_path="last")
    out["renames"] = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    # 2. The disk fills up while rank 1 writes its shards of step 2.
    out["full"] = failure(lambda: fit("full", 3, extra=[DiskFull(step=2, rank=1)]))
    out["full_files"] = sorted(p.name for p in (Path(root) / "full").iterdir() if not p.name.startswith("."))
    # 3. Resumed with another model width: stopped before any shard is read.
    out["dim"] = failure(lambda: fit("full", 3, ckpt_path="last", dim=64))
    return out


def test_sharded_checkpoints_survive_a_crash_between_renames_and_a_full_disk(tmp_path, data_dir):
    from dist_harness import run_world

    results = run_world(_sharded_resume_faults, 2, data_dir=str(data_dir), root=str(tmp_path))
    # The complete .partial was resumed from, published by the next save, and the leftovers cleared.
    assert read_loss_log(tmp_path / "renames.losses") == read_loss_log(tmp_path / "straight.losses")
    assert results[0]["renames"] == ["last.ckpt", "step=00000001.ckpt", "step=00000002.ckpt", "step=00000004.ckpt"]
    assert load_trusted(tmp_path / "renames" / "last.ckpt" / "meta.pt")["global_step"] == 4
    for rank in (0, 1):  # every rank stops with the same one-line error
        full = results[rank]["full"]
        assert full.startswith("CheckpointWriteError: saving checkpoint step=00000002.ckpt failed (rank 1: No space "
                               "left on device)"), full
        assert f"the last good checkpoint is {tmp_path / 'full' / 'last.ckpt'} (step 1)" in full, full
        assert "SettingsMismatchError" in results[rank]["dim"] and "model.arch.dim 32 -> 64" in results[rank]["dim"]
    assert results[0]["full_files"] == ["last.ckpt", "step=00000001.ckpt"]  # no half-written directory
