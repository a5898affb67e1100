"""The product's own training step on one GPU: LightningModule + Parallel4DStrategy + NCCL.

A one-rank mesh still runs every collective of the step path (the collectives module
never skips size-1 groups), so this reaches each call site that a multi-GPU run does:
token and loss sums over the data group, the pipeline-group sum of the gradient norm, the
DCP checkpoint's broadcasts and barriers. It trains a small Llama 3 (the real 128K
vocabulary) for a few steps on packed standard-library documents, bf16 FSDP, validates,
saves a checkpoint, and prints one line per step and a summary:

    gpu_step: NVIDIA H100 80GB HBM3 | nccl | 4 steps | loss 11.93 -> 9.87 | grad_norm 3.1 | 0.051 s/step | ok

    python bench/gpu_step.py [--steps 4] [--seq-len 2048] [--precision bf16]
    python bench/gpu_step.py --cpu          # the same script on the CPU (gloo, fp32): checks the script itself

Nothing is downloaded; it needs this repository and the Llama 3 tokenizer of ``llama-models``.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo, fp32) to check the script")
    args = parser.parse_args()

    import lightning as L
    import torch

    from callbacks.checkpoint import RecipeCheckpoint
    from recipe.config import LRSchedule, ModelArgs, OptimizerConfig
    from recipe.data.build import build_shards
    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.parallel.strategy import Parallel4DStrategy

    on_gpu = not args.cpu
    if on_gpu and not torch.cuda.is_available():
        sys.exit("gpu_step: no CUDA device; pass --cpu to check the script on the CPU")
    seq_len = args.seq_len if on_gpu else 128
    precision = args.precision if on_gpu else "fp32"
    root = Path(tempfile.mkdtemp(prefix="gpu_step_"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "argparse.py", "difflib.py"):
        (corpus / f"{name}.txt").write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    build_shards(corpus, root / "shards", val_fraction=0.1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")

    class StepLog(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[float, float, float]] = []
            self.start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            metrics = trainer.callback_metrics
            row = (float(metrics["train/loss"]), float(metrics["train/grad_norm"]), time.perf_counter() - self.start)
            self.rows.append(row)
            print(f"step {len(self.rows)}: loss {row[0]:.4f} grad_norm {row[1]:.4f} {row[2]:.3f} s", flush=True)

    log = StepLog()
    arch = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=256, max_seq_len=seq_len)
    module = LlamaLightningModule(arch=arch, optimizer=OptimizerConfig(lr=1e-3, fused=on_gpu or None),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=args.steps, min_lr=1e-4))
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1, max_steps=args.steps, logger=False,
        strategy=Parallel4DStrategy(dp_shard=1, precision=precision), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=args.steps,
        check_val_every_n_epoch=None, default_root_dir=str(root / "run"),
        callbacks=[log, RecipeCheckpoint(every_n_train_steps=args.steps)],
    )
    data = TokenDataModule(data_dir=str(root / "shards"), seq_len=seq_len, global_batch_size=4, micro_batch_size=2,
                           val_batches=1, build_demo=False)
    trainer.fit(module, datamodule=data)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    saved = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    losses = [r[0] for r in log.rows]
    timed = [r[2] for r in log.rows[1:]] or [log.rows[0][2]]
    ok = len(log.rows) == args.steps and all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and saved
    print(f"gpu_step: {device} | {backend} | {precision} | {len(log.rows)} steps | loss {losses[0]:.2f} -> "
          f"{losses[-1]:.2f} | grad_norm {log.rows[-1][1]:.3g} | {sum(timed) / len(timed):.3f} s/step | "
          f"val/loss {float(trainer.callback_metrics.get('val/loss', float('nan'))):.3f} | checkpoints {saved} | "
          f"{'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
