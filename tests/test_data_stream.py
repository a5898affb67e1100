"""ShardSet.window, TokenStream packing semantics, and the resumable TokenDataModule."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recipe.data.datamodule import TokenDataModule
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet, ShardWriter
from recipe.data.stream import TokenStream

VOCAB, BOS, EOS = 100, 1, 2


def write_set(path: Path, seed: int, n_docs: int, shard_tokens: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Random documents -> shard set; return the flat tokens and each token's document index."""
    rng = np.random.default_rng(seed)
    flat, owner = [], []
    with ShardWriter(path, vocab_size=VOCAB, bos_id=BOS, eos_id=EOS, shard_tokens=shard_tokens) as w:
        for d in range(n_docs):
            doc = np.concatenate([[BOS], rng.integers(3, VOCAB, rng.integers(0, 30)), [EOS]])
            w.add(doc)
            flat.append(doc)
            owner.append(np.full(doc.size, d))
    return np.concatenate(flat), np.concatenate(owner)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    flat, owner = write_set(root / "train", seed=0, n_docs=23)
    write_set(root / "val", seed=1, n_docs=5)
    return SimpleNamespace(root=root, set=ShardSet(root / "train"), flat=flat, owner=owner, N=flat.size, D=23)


def ref(data, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference window: the flat stream repeated, ids unique per (epoch, document)."""
    o = np.arange(start, start + length)
    return data.flat[o % data.N], (o // data.N) * data.D + data.owner[o % data.N]


def test_window_any_offset(data):
    s = data.set
    assert len(s.shard_names) > 3  # windows really straddle shard boundaries
    assert s.num_tokens == data.N and s.num_documents == data.D
    rng = np.random.default_rng(1)
    cases = [(0, data.N), (0, 3 * data.N + 5), (data.N - 1, 2), (10**12 + 7, 100), (0, 0)]
    cases += [(int(rng.integers(0, 5 * data.N)), int(rng.integers(1, 2 * data.N))) for _ in range(50)]
    for start, length in cases:
        tokens, doc_ids = s.window(start, length)
        want_t, want_d = ref(data, start, length)
        assert tokens.dtype == np.int64 and doc_ids.dtype == np.int64
        np.testing.assert_array_equal(tokens, want_t)
        np.testing.assert_array_equal(doc_ids, want_d)
    for i in range(data.D):
        np.testing.assert_array_equal(s.document(i), data.flat[data.owner == i])


def collect(data, dp_size: int, steps: int, start: int = 0, seq_len: int = 7, gbs: int = 8, mbs: int = 2):
    """Global [steps, gbs, seq_len+1] tokens/doc ids assembled from all ranks, plus positions."""
    streams = [TokenStream(data.set, seq_len, gbs, mbs, dp_rank=r, dp_size=dp_size, start_position=start)
               for r in range(dp_size)]  # fmt: skip
    toks, docs, pos = [], [], []
    for batches in itertools.islice(zip(*streams), steps):
        for b in batches:
            assert b["tokens"].shape == (gbs // dp_size // mbs, mbs, seq_len + 1) and b["tokens"].dtype == torch.long
            assert b["doc_ids"].shape == b["tokens"].shape
            assert int(b["position"]) == int(batches[0]["position"])
        toks.append(torch.cat([b["tokens"].reshape(-1, seq_len + 1) for b in batches]))
        docs.append(torch.cat([b["doc_ids"].reshape(-1, seq_len + 1) for b in batches]))
        pos.append((int(batches[0]["position"]), int(batches[0]["next_position"])))
    return torch.stack(toks).numpy(), torch.stack(docs).numpy(), pos


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_packing_loses_and_duplicates_nothing(data, dp_size):
    L, G = 7, 8
    steps = math.ceil(2.5 * data.N / (G * L))  # more than two epochs
    toks, docs, pos = collect(data, dp_size, steps)
    assert pos == [(s * G * L, (s + 1) * G * L) for s in range(steps)]
    # every token is an input exactly once, in order, across shard and epoch boundaries
    inputs = toks[:, :, :-1].reshape(-1)
    want_t, want_d = ref(data, 0, steps * G * L + 1)
    np.testing.assert_array_equal(inputs, want_t[:-1])
    # targets are the inputs shifted by one (the last target is the next step's first input)
    np.testing.assert_array_equal(toks[:, :, 1:].reshape(-1), want_t[1:])
    in_docs = docs[:, :, :-1].reshape(-1)
    np.testing.assert_array_equal(in_docs, want_d[:-1])
    # document ids change exactly where a document starts (in every epoch)
    changes = np.flatnonzero(np.diff(in_docs)) + 1
    starts = np.arange(1, in_docs.size)[np.isin(np.arange(1, in_docs.size) % data.N, data.set.doc_starts)]
    np.testing.assert_array_equal(changes, starts)
    # the same document in two epochs gets two different ids
    assert in_docs[0] != in_docs[data.N] and inputs[0] == inputs[data.N]


def test_union_of_ranks_equals_single_rank(data):
    one, one_d, _ = collect(data, 1, 9)
    for dp in (2, 4):
        many, many_d, _ = collect(data, dp, 9)
        np.testing.assert_array_equal(one, many)
        np.testing.assert_array_equal(one_d, many_d)


def test_restart_from_any_position(data):
    L, G = 7, 8
    full, full_d, full_pos = collect(data, 1, 12)
    tail, tail_d, tail_pos = collect(data, 1, 7, start=5 * G * L)
    np.testing.assert_array_equal(tail, full[5:])
    np.testing.assert_array_equal(tail_d, full_d[5:])
    assert tail_pos == full_pos[5:]
    # an arbitrary (non-step-aligned) position works too
    odd, _, _ = collect(data, 1, 3, start=1234)
    want, _ = ref(data, 1234, 3 * G * L)
    np.testing.assert_array_equal(odd[:, :, :-1].reshape(-1), want)


def test_resume_under_another_dp_size(data):
    a, _, pos = collect(data, 2, 4)
    b, _, _ = collect(data, 1, 4, start=pos[-1][1])  # "checkpoint" saved under dp=2, resumed under dp=1
    full, _, _ = collect(data, 4, 8)
    np.testing.assert_array_equal(np.concatenate([a, b]), full)


def test_finite_stream_and_workers(data):
    stream = TokenStream(data.set, 5, 4, 2, num_steps=5)
    plain = [b["position"].item() for b in stream]
    assert plain == [i * 20 for i in range(5)]
    loader = DataLoader(TokenStream(data.root / "train", 5, 4, 2, num_steps=5), batch_size=None, num_workers=2)
    got = list(loader)
    assert [b["position"].item() for b in got] == plain
    for b, s in zip(got, stream):
        assert torch.equal(b["tokens"], s["tokens"])


def test_layout_errors(data):
    with pytest.raises(DataError, match="not divisible by the data-parallel size 3"):
        TokenStream(data.set, 8, 16, 2, dp_size=3)
    with pytest.raises(DataError) as e:
        TokenStream(data.set, 8, 12, 4, dp_size=2)
    msg = str(e.value)
    assert "global_batch_size=12" in msg and "micro_batch_size=4" in msg and "dp_size=2" in msg and "multiple of" in msg
    with pytest.raises(DataError, match="dp_rank"):
        TokenStream(data.set, 8, 4, 2, dp_rank=2, dp_size=2)


def test_window_is_vectorised(tmp_path):
    """A 1M-token window over a 4M-token set is a few slices, not a Python loop per token."""
    import time

    toks = np.random.default_rng(0).integers(3, 50_000, 4_000_000).astype(np.uint32)
    toks[::1000] = BOS
    toks[999::1000] = EOS
    with ShardWriter(tmp_path / "big", vocab_size=50_000, bos_id=BOS, eos_id=EOS, shard_tokens=1 << 20) as w:
        for doc in np.split(toks, 4000):
            w.add(doc)
    s = ShardSet(tmp_path / "big")
    t0 = time.perf_counter()
    tokens, doc_ids = s.window(3_500_000, 1_000_000)  # straddles shards and the epoch end
    assert time.perf_counter() - t0 < 1.0
    assert doc_ids[0] == 3500 and doc_ids[-1] == 4000 + 499 and tokens[600_000] == toks[100_000]


# ---------------------------------------------------------------- datamodule


def make_dm(data, **kw) -> TokenDataModule:
    args = dict(
        data_dir=str(data.root), seq_len=8, global_batch_size=4, micro_batch_size=2, val_batches=2, build_demo=False
    )
    return TokenDataModule(**{**args, **kw})


def test_datamodule_missing_data_names_the_command(tmp_path):
    dm = TokenDataModule(data_dir=str(tmp_path / "none"), build_demo=False)
    with pytest.raises(DataError, match="recipe data build <corpus>"):
        dm.prepare_data()


def test_datamodule_state_and_prefetch(data):
    dm = make_dm(data)
    dm.trainer = SimpleNamespace(training=True, strategy=object(), global_rank=0, world_size=1)
    dm.setup("fit")
    assert dm.vocab_size == VOCAB
    it = iter(dm.train_dataloader())
    first = next(it)
    second = next(it)  # Lightning prefetches one batch ahead ...
    assert dm.position == 0  # ... which must not move the position
    dm.on_after_batch_transfer(first, 0)  # the loop takes the first batch
    assert dm.position == 32
    assert dm.state_dict() == {"position": 32, "samples": 4, "domain_positions": {"default": 32}, "seq_len": 8}

    dm2 = make_dm(data)  # resume from the "checkpoint"
    dm2.load_state_dict(dm.state_dict())
    resumed = next(iter(dm2.train_dataloader()))
    assert torch.equal(resumed["tokens"], second["tokens"]) and int(resumed["position"]) == 32

    dm.trainer.training = False  # validation batches never move the training position
    dm.on_after_batch_transfer(second, 0)
    assert dm.position == 32
    val = list(dm.val_dataloader())
    assert len(val) == 2 and [int(b["position"]) for b in val] == [0, 32]


def test_datamodule_uses_strategy_dp_attributes(data):
    dm = make_dm(data, global_batch_size=8)
    dm.trainer = SimpleNamespace(training=True, strategy=SimpleNamespace(data_parallel_rank=1, data_parallel_size=2),
                                 global_rank=3, world_size=8)  # fmt: skip
    dm.setup("fit")
    assert (dm.dp_rank, dm.dp_size) == (1, 2)
    batch = next(iter(dm.train_dataloader()))
    want, _ = ref(data, 4 * 8, 4 * 8 + 1)  # rank 1 owns samples 4..7
    np.testing.assert_array_equal(batch["tokens"].reshape(-1, 9)[:, :-1].reshape(-1), want[:-1])


def test_lightning_fit_resume_continues_the_stream(data, tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(int(batch["position"]))
            return self.emb(batch["tokens"][0][:, :-1]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(max_steps):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip

    dm, model = make_dm(data), Tiny()
    t = trainer(3)
    t.fit(model, datamodule=dm)
    tps = 4 * 8
    assert model.seen == [0, tps, 2 * tps] and dm.position == 3 * tps
    t.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["TokenDataModule"]
    assert saved == {"position": 3 * tps, "samples": 3 * 4, "domain_positions": {"default": 3 * tps}, "seq_len": 8}

    dm2, model2 = make_dm(data), Tiny()
    trainer(5).fit(model2, datamodule=dm2, ckpt_path=tmp_path / "c.ckpt")
    assert model2.seen == [3 * tps, 4 * tps] and dm2.position == 5 * tps
