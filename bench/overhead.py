"""Overhead of the recipe's training path against a bare PyTorch loop.

Both train the same model from the same initial weights on the same batches (the
recipe's token stream over real text), with the same micro-batching, loss
normalisation, clipping and AdamW. The recipe side is the real thing: Trainer,
LlamaLightningModule, TokenDataModule, progress bar, TensorBoard logging and the
throughput callback. Runs alternate (bare, recipe, bare, recipe, ...) and the best
steady-state rate of each is compared, so machine noise hits both alike.

    python bench/overhead.py [--steps 6] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from callbacks.progress import RecipeProgressBar
from callbacks.throughput import TokenThroughput
from recipe.data.build import build_shards
from recipe.data.datamodule import TokenDataModule
from recipe.data.stream import TokenStream
from recipe.model import ModelArgs, Transformer
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule

ARCH = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                 max_seq_len=1024)
OPTIM = OptimizerConfig(lr=3e-3)
SCHEDULE = LRSchedule(warmup_steps=2, decay_steps=100, min_lr=3e-5)


def build_data(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:60]:
        (corpus / f"{path.name}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    out = root / "shards"
    build_shards(corpus, out, val_fraction=0.05)
    return out


class StepClock(L.Callback):
    """Wall time between the end of warm-up and the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def run_recipe(data_dir: Path, seq_len: int, batch: int, micro: int, warmup: int, steps: int, logdir: Path) -> float:
    clock = StepClock(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, logger=L.pytorch.loggers.TensorBoardLogger(logdir),
        callbacks=[TokenThroughput(), RecipeProgressBar(), clock], enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=1, enable_model_summary=False,
    )
    module = LlamaLightningModule(arch=ARCH, optimizer=OPTIM, lr_schedule=SCHEDULE, init_seed=0)
    data = TokenDataModule(data_dir=str(data_dir), seq_len=seq_len, global_batch_size=batch,
                           micro_batch_size=micro, build_demo=False)
    trainer.fit(module, datamodule=data)
    return steps * batch * seq_len / (clock.end - clock.start)


def run_bare(data_dir: Path, seq_len: int, batch: int, micro: int, warmup: int, steps: int) -> float:
    with torch.device("meta"):
        model = Transformer(ARCH)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.init_weights(buffer_device=torch.device("cpu"))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps)
    stream = iter(TokenStream(data_dir / "train", seq_len=seq_len, global_batch_size=batch, micro_batch_size=micro,
                              dp_rank=0, dp_size=1, start_position=0))
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        item = next(stream)
        tokens, docs = item["tokens"], item["doc_ids"]
        n = tokens[..., 1:].numel()
        for group in opt.param_groups:
            group["lr"] = SCHEDULE.lr_at(step, OPTIM.lr)
        for i in range(tokens.shape[0]):
            logits = model(tokens[i, :, :-1], docs[i, :, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[i, :, 1:].flatten(), reduction="sum") / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = build_data(root)
        shape = (data_dir, args.seq_len, args.batch, args.micro, args.warmup, args.steps)
        bare, recipe = [], []
        for i in range(args.repeats):
            bare.append(run_bare(*shape))
            recipe.append(run_recipe(*shape, logdir=root / f"tb{i}"))
            print(f"repeat {i}: bare {bare[-1]:.1f} tok/s, recipe {recipe[-1]:.1f} tok/s", flush=True)

    result = {"bare_tokens_per_sec": max(bare), "recipe_tokens_per_sec": max(recipe),
              "ratio": max(recipe) / max(bare), "target": 0.95, "model_parameters": None,
              "tokens_per_step": args.batch * args.seq_len, "steps": args.steps, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads()}
    with torch.device("meta"):
        result["model_parameters"] = sum(p.numel() for p in Transformer(ARCH).parameters())
    result["headline"] = [{"name": "recipe / bare loop", "value": result["ratio"], "unit": "x", "target": ">= 0.95",
                           "met": result["ratio"] >= 0.95}]
    print(f"\n{'path':<10}{'tokens/s':>12}\n{'bare':<10}{result['bare_tokens_per_sec']:>12.1f}\n"
          f"{'recipe':<10}{result['recipe_tokens_per_sec']:>12.1f}\n"
          f"ratio recipe / bare = {result['ratio']:.3f} (target >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
