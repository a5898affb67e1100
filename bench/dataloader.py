"""Data-loader headroom: tokens/s the token stream delivers over tokens/s training consumes.

The stream must never be what a step waits for. Both rates are measured in this run on
the same shards and the same layout (the tiny config's: 2,048-token steps of 256-token
sequences over the three demo domains with a data mix): the loader alone (the stream's
batches, as the DataLoader hands them to the trainer), then the tiny model's training
steps. Target: a ratio of at least 10.

    python bench/dataloader.py [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.data.build import build_shards  # noqa: E402
from recipe.data.stream import TokenStream  # noqa: E402
from recipe.model import ModelArgs  # noqa: E402
from recipe.module import LlamaLightningModule  # noqa: E402
from recipe.config import OptimizerConfig  # noqa: E402
from recipe.config import LRSchedule  # noqa: E402

SEQ_LEN, BATCH, MICRO = 256, 8, 2
MIX = {"a": 0.5, "b": 0.3, "c": 0.2}


def build_data(root: Path) -> Path:
    """Three domains of standard-library source, so the stream mixes domains as in training."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i, path in enumerate(sorted(stdlib.glob("*.py"))[:90]):
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace"),
                                "domain": "abc"[i % 3]}) + "\n")
    build_shards(corpus, root / "shards", val_fraction=0.05, log=lambda s: None)
    return root / "shards"


def loader_rate(data_dir: Path, steps: int) -> float:
    stream = TokenStream(data_dir / "train", SEQ_LEN, BATCH, MICRO, mix_schedule=lambda position: MIX)
    batches = iter(stream)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - start)


def training_rate(data_dir: Path, steps: int) -> float:
    arch = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                     max_seq_len=1024)
    module = LlamaLightningModule(arch=arch, optimizer=OptimizerConfig(lr=3e-3),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=100, min_lr=1e-4))
    module.configure_model()
    optimizer = module.configure_optimizers()
    stream = iter(TokenStream(data_dir / "train", SEQ_LEN, BATCH, MICRO, mix_schedule=lambda position: MIX))
    normalizer = BATCH * SEQ_LEN

    def step(batch: dict) -> None:
        for micro in range(batch["tokens"].shape[0]):
            module.micro_batch_loss(batch["tokens"][micro], batch["doc_ids"][micro], normalizer).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(next(stream))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step(next(stream))
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = build_data(Path(tmp))
        loader = loader_rate(data_dir, max(50, 10 * args.steps))
        training = training_rate(data_dir, args.steps)
    result = {"bench": "dataloader", "loader_tokens_per_s": loader, "training_tokens_per_s": training,
              "ratio": loader / training, "target": ">= 10",
              "headline": [{"name": "loader / training tokens/s", "value": loader / training, "unit": "x",
                            "target": ">= 10", "met": loader / training >= 10}]}
    print(f"loader {loader:,.0f} tok/s, training {training:,.0f} tok/s: headroom {loader / training:,.1f}x "
          f"(target >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
