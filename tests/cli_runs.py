"""Helpers for tests that drive `recipe fit` end to end: a tiny config, and its TensorBoard scalars."""

from pathlib import Path

import yaml


def tiny_fit_config(tmp_path: Path, data_dir: Path, run: str, max_steps: int, callbacks: list[dict],
                    seed: int, checkpoint_every: int, lr_schedule: dict | None = None) -> Path:
    """A YAML config for a 2-layer model on ``data_dir``: logs to ``tmp_path/run``, checkpoints to its ``ckpt``."""
    model = {"arch": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
                      "ffn_dim_multiplier": None, "max_seq_len": 64},
             "optimizer": {"lr": 3e-3}}
    if lr_schedule is not None:
        model["lr_schedule"] = lr_schedule
    config = {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "val_check_interval": 100,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / run), "name": "", "version": "v"}},
            "callbacks": [
                *callbacks,
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / run / "ckpt"), "every_n_train_steps": checkpoint_every,
                               "save_last": True, "save_top_k": -1}},
            ],
        },
        "model": model,
        "data": {"data_dir": str(data_dir), "build_demo": False, "seq_len": 16, "global_batch_size": 4,
                 "micro_batch_size": 2, "val_batches": 1},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar under ``logdir``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                values.setdefault(tag, {})[event.step] = event.value
    return values
