"""Lightning data module over pre-built shards: the token stream of one DP rank.

Resume contract: ``self.position`` is the global token offset of the next step to
train, ``self.samples`` the global samples consumed and ``self.domain_positions`` the
offset reached in each domain's stream (``recipe.data.stream``). They advance in
``on_after_batch_transfer``, which Lightning calls when the training loop actually
takes a batch - not when the loader prefetches the next one - so a checkpoint never
skips a prefetched batch. ``state_dict`` holds only global state, so a run saved under
one data-parallel size resumes under another.

Note: Lightning calls only ONE ``on_after_batch_transfer``: when both the
LightningModule and this data module override it, this one runs (Lightning 2.6
warns about the pair), so the LightningModule's version would be ignored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from recipe.data.build import check_data_source, ensure_curated_data, ensure_demo_data, is_built
from recipe.data.shards import DEFAULT_DOMAIN, ShardSet, index_domains
from recipe.data.stream import TokenStream
from recipe.plan import choose_mix

if TYPE_CHECKING:
    from recipe.plan import MixSettings

__all__ = ["TokenDataModule"]


class TokenDataModule(L.LightningDataModule):
    """Step batches from ``<data_dir>/train`` and ``<data_dir>/val`` shard sets.

    The arguments are the YAML keys of the ``data:`` section (and ``--data.*`` options; the
    heading below is plain ``Args:`` so that ``recipe fit --help`` shows each one's text).

    Args:
        data_dir: folder with ``train/`` and ``val/`` shard sets.
        seq_len: tokens per sample fed to the model (each sample holds seq_len + 1).
        global_batch_size: sequences per optimizer step, over all data-parallel ranks.
        micro_batch_size: sequences per forward/backward on one rank.
        val_batches: validation steps per evaluation, always read from position 0 of val.
        val_batch_size: sequences per validation step (default: global_batch_size).
        tokenizer_path: tokenizer for the automatic demo build (None: Llama 3's).
        build_demo: build the demo corpus into ``data_dir`` if it is missing.
        curate_config: build a missing ``data_dir`` by running this curation config
            (``recipe data curate --config``; its ``output`` must be ``data_dir``) instead
            of the plain demo build.
        num_workers: DataLoader workers (0: read in the training process; the reads are
            memory-mapped slices, cheap enough for small models).
        mix: whether a ``DataMixSchedule`` callback applies. ``auto`` (default): yes, unless
            the data has a single domain and the mix names others (a corpus without a
            ``domain`` field), which then trains with the mix off and a one-line notice;
            ``false``: off, each domain sampled at its share of the tokens; ``true``: always
            (a domain the data lacks is an error).
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
        curate_config: str | None = None,
        num_workers: int = 0,
        mix: bool | Literal["auto"] = "auto",
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
        self.curate_config = curate_config
        self.num_workers = num_workers
        self.mix = mix
        self._mix_notice_shown = False
        self.position = 0  # global token offset of the next training step
        self.samples = 0  # global samples consumed (the data mix draws sample k's domain from k)
        self.domain_positions: dict[str, int] = {}  # token offset reached in each domain's stream
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Build the demo data on first use (Lightning runs this on one process per node)."""
        if is_built(self.data_dir):
            return
        # Raises the one-line "does not exist; build it with ..." error when nothing builds it.
        if check_data_source(self.data_dir, self.curate_config, self.build_demo) == "curate":
            ensure_curated_data(self.curate_config, self.data_dir)
        else:
            ensure_demo_data(self.data_dir, tokenizer_path=self.tokenizer_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if not is_built(self.data_dir) and (self.build_demo or self.curate_config) and self.trainer is None:
                self.prepare_data()  # used without a Trainer (scripts, tests)
            self.train_set = ShardSet(self.data_dir / "train")
            self.val_set = ShardSet(self.data_dir / "val")
        # The layouts are checked once, by the run plan against the parallel layout
        # (``recipe.plan.RunPlan.check_layout``); a stream checks its own when it is made.

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

    def _train_set(self) -> ShardSet:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self.train_set

    @property
    def domains(self) -> list[str]:
        """Domains of the training set, sorted."""
        return self._train_set().domains

    def active_mix(self, mix: MixSettings) -> MixSettings | None:
        """The data mix to train with: ``mix``, or None where the ``mix`` setting turns it off.

        The run plan (``recipe.plan.build_run_plan``) and ``DataMixSchedule`` ask here, so
        they agree; the launcher's config checks ask before the data is set up, so the
        domains come from the index then (unknown while the data is not built: the mix
        stays). A dropped mix is announced once, on rank 0.
        """
        if self.train_set is not None:
            domains: list[str] | None = self.train_set.domains
        elif is_built(self.data_dir):
            domains = index_domains(self.data_dir / "train")
        else:
            domains = None
        chosen, notice = choose_mix(mix, domains, self.mix, str(self.data_dir))
        if notice is not None and not self._mix_notice_shown:
            self._mix_notice_shown = True
            _notice(notice)
        return chosen

    @property
    def natural_weights(self) -> dict[str, float]:
        """Each domain's share of the training set's tokens (the mix without a schedule)."""
        train = self._train_set()
        return {d: n / train.num_tokens for d, n in train.domain_tokens.items()}

    # ------------------------------------------------------------ loaders
    def _loader(self, stream: TokenStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,  # the stream yields whole step batches
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    @property
    def run_plan(self) -> Any:
        """The run plan of the module being trained (``recipe.plan.RunPlan``), or None.

        The plan gives each step's layout and mix from its position; without one (a
        module of another kind, no trainer) the stream keeps the fixed layout and the
        data's natural mix.
        """
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(module, "run_plan", None)

    def train_stream(self) -> TokenStream:
        train = self._train_set()
        plan = self.run_plan
        return TokenStream(
            train, self.seq_len, self.global_batch_size, self.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, start_position=self.position,
            batch_schedule=plan.layout_at if plan is not None else None,
            mix_schedule=plan.mix_at if plan is not None and plan.mix is not None else None,
            start_samples=self.samples, start_domain_positions=self.domain_positions or None,
        )  # fmt: skip

    def val_stream(self, seq_len: int | None = None, batch_size: int | None = None,
                   num_batches: int | None = None) -> TokenStream:
        """The validation stream: natural domain mix, always from the start of ``val``.

        ``seq_len``, ``batch_size`` (sequences per step) and ``num_batches`` override the
        configured ``seq_len``, ``val_batch_size`` and ``val_batches``.
        """
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return TokenStream(
            self.val_set, seq_len or self.seq_len, batch_size or self.val_batch_size, self.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, start_position=0,
            num_steps=self.val_batches if num_batches is None else num_batches,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        if self.val_batches <= 0 or self.val_set is None or self.val_set.num_tokens == 0:
            return []  # no validation (e.g. a one-document corpus has an empty val split)
        return self._loader(self.val_stream())

    def test_dataloader(self) -> DataLoader | list:
        """``recipe test``'s held-out loss: the validation split (the shards have no test split)."""
        return self.val_dataloader()

    # ------------------------------------------------------------- resume
    # The stream's bookkeeping entries: scalars and per-domain counts read on the host.
    _HOST_ENTRIES = ("position", "next_position", "next_samples", "next_domain_positions", "domain_tokens")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Keep the bookkeeping on the host as Python ints: only token tensors go to the device,
        so reading a step's position never waits for the device."""
        if isinstance(batch, dict):
            for key in self._HOST_ENTRIES:
                if isinstance(batch.get(key), torch.Tensor):
                    batch[key] = batch[key].tolist()
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the batch to ``device`` except its document ids: attention plans are built
        from them on the host (``recipe/attention.py``), so no forward waits on the device."""
        if not isinstance(batch, dict) or "doc_ids" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        rest = {key: value for key, value in batch.items() if key != "doc_ids"}
        moved = super().transfer_batch_to_device(rest, device, dataloader_idx)
        moved["doc_ids"] = batch["doc_ids"]
        return moved

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "next_position" in batch:
            self._check_schedule(batch)
            self.position = int(batch["next_position"])
            if "next_samples" in batch:
                self.samples = int(batch["next_samples"])
                positions = batch["next_domain_positions"]  # a host list (on_before_batch_transfer)
                self.domain_positions = dict(zip(self._train_set().domains, positions))
        return batch

    def _check_schedule(self, batch: dict[str, Any]) -> None:
        """A batch cut ahead of time must still have the layout the run plan gives its position.

        The plan changes at run time only when a gated context stage records its start,
        which must lie past every position a loader has reached; this catches one that does not.
        """
        plan = self.run_plan
        if plan is None:
            return
        position, tokens = int(batch["position"]), batch["tokens"]
        expected = plan.layout_at(position)
        got = (int(batch["next_position"]) - position) // (tokens.shape[-1] - 1), tokens.shape[-1] - 1
        if got != tuple(expected):
            raise RuntimeError(
                f"the batch at token {position:,} was cut as {got[0]} x {got[1]} tokens but the run plan now says "
                f"{expected[0]} x {expected[1]}: a stage start was recorded for a batch already read"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": int(self.position),
            "samples": int(self.samples),
            "domain_positions": {d: int(p) for d, p in self.domain_positions.items()},
            "seq_len": int(self.seq_len),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Token offsets and a sample count, valid whatever the seq_len, batch size or DP
        # size of the resumed run.
        self.position = int(state_dict["position"])
        self.samples = int(state_dict.get("samples", 0))
        if "domain_positions" in state_dict:
            self.domain_positions = {str(d): int(p) for d, p in state_dict["domain_positions"].items()}
        else:  # saved before domains existed: one flat stream, i.e. the single "default" domain
            self.domain_positions = {DEFAULT_DOMAIN: self.position}


@rank_zero_only
def _notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)
