"""Lightning data module over pre-built shards: the token stream of one DP rank.

Resume contract: ``self.position`` is the global token offset of the next step to
train. It advances in ``on_after_batch_transfer``, which Lightning calls when the
training loop actually takes a batch - not when the loader prefetches the next one -
so a checkpoint never skips a prefetched batch. ``state_dict`` holds only global
state, so a run saved under one data-parallel size resumes under another.

Note: Lightning calls only ONE ``on_after_batch_transfer``: when both the
LightningModule and this data module override it, this one runs (Lightning 2.6
warns about the pair), so the LightningModule's version would be ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from recipe.data.build import ensure_demo_data, is_built
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet
from recipe.data.stream import TokenStream, check_batch_layout

__all__ = ["TokenDataModule"]


class TokenDataModule(L.LightningDataModule):
    """Step batches from ``<data_dir>/train`` and ``<data_dir>/val`` shard sets.

    Args (YAML keys of the ``data:`` section):
        data_dir: folder with ``train/`` and ``val/`` shard sets.
        seq_len: tokens per sample fed to the model (each sample holds seq_len + 1).
        global_batch_size: sequences per optimizer step, over all data-parallel ranks.
        micro_batch_size: sequences per forward/backward on one rank.
        val_batches: validation steps per evaluation, always read from position 0 of val.
        val_batch_size: sequences per validation step (default: global_batch_size).
        tokenizer_path: tokenizer for the automatic demo build (None: Llama 3's).
        build_demo: build the demo corpus into ``data_dir`` if it is missing.
        num_workers: DataLoader workers (0: read in the training process; the reads are
            memory-mapped slices, cheap enough for small models).
    """

    def __init__(
        self,
        data_dir: str = "data/demo",
        seq_len: int = 256,
        global_batch_size: int = 16,
        micro_batch_size: int = 4,
        val_batches: int = 8,
        val_batch_size: int | None = None,
        tokenizer_path: str | None = None,
        build_demo: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.val_batches = val_batches
        self.val_batch_size = val_batch_size or global_batch_size
        self.tokenizer_path = tokenizer_path
        self.build_demo = build_demo
        self.num_workers = num_workers
        self.position = 0  # global token offset of the next training step
        # Set by a batch-size ramp / context-length callback: position -> (global batch, seq_len).
        self.batch_schedule = None
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Build the demo data on first use (Lightning runs this on one process per node)."""
        if is_built(self.data_dir):
            return
        if not self.build_demo:
            raise DataError(
                f"{self.data_dir} has no complete train/val shard sets; build them with "
                f"`recipe data build <corpus> {self.data_dir}` (or `recipe data demo --out {self.data_dir}`)"
            )
        ensure_demo_data(self.data_dir, tokenizer_path=self.tokenizer_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if not is_built(self.data_dir) and self.build_demo and self.trainer is None:
                self.prepare_data()  # used without a Trainer (scripts, tests)
            self.train_set = ShardSet(self.data_dir / "train")
            self.val_set = ShardSet(self.data_dir / "val")
        # Fail at setup, not at the first batch, on a layout that cannot be split.
        check_batch_layout(self.global_batch_size, self.micro_batch_size, self.dp_size)
        check_batch_layout(self.val_batch_size, self.micro_batch_size, self.dp_size)

    @property
    def dp_rank(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(getattr(trainer.strategy, "data_parallel_rank", trainer.global_rank))

    @property
    def dp_size(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 1
        return int(getattr(trainer.strategy, "data_parallel_size", trainer.world_size))

    @property
    def vocab_size(self) -> int:
        """Vocabulary size the shards were built with (check it against the model's)."""
        if self.train_set is not None:
            return self.train_set.vocab_size
        index = self.data_dir / "train" / "index.json"
        if index.is_file():
            return int(json.loads(index.read_text())["vocab_size"])
        from recipe.tokenizer import Tokenizer  # not built yet: the tokenizer it will be built with

        return Tokenizer(self.tokenizer_path).n_words

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    # ------------------------------------------------------------ loaders
    def _loader(self, stream: TokenStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,  # the stream yields whole step batches
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def train_stream(self) -> TokenStream:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return TokenStream(
            self.train_set, self.seq_len, self.global_batch_size, self.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, start_position=self.position,
            batch_schedule=self.batch_schedule,
        )  # fmt: skip

    def val_stream(self) -> TokenStream:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return TokenStream(
            self.val_set, self.seq_len, self.val_batch_size, self.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, start_position=0, num_steps=self.val_batches,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        if self.val_batches <= 0 or self.val_set is None or self.val_set.num_tokens == 0:
            return []  # no validation (e.g. a one-document corpus has an empty val split)
        return self._loader(self.val_stream())

    # ------------------------------------------------------------- resume
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "next_position" in batch:
            self.position = int(batch["next_position"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": int(self.position), "seq_len": int(self.seq_len)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The position is a token offset, valid whatever the seq_len, batch size or DP
        # size of the resumed run.
        self.position = int(state_dict["position"])
