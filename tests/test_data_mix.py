"""Data domains in the shards, the mixed token stream and the DataMixSchedule callback."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.annealing import LRAnnealing
from callbacks.batch_ramp import BatchSizeRamp, RampStage
from callbacks.data_mix import DataMixSchedule, MixStage
from cli_runs import read_scalars, tiny_fit_config
from recipe.data.datamodule import TokenDataModule
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet, ShardWriter
from recipe.data.stream import StreamState, TokenStream
from recipe.config import LRSchedule
from recipe.errors import ConfigError
from recipe.plan import MixSettings, RunPlan

VOCAB, BOS, EOS = 100, 1, 2
# Each domain draws its tokens from its own id range, so a row shows which domain it came from.
RANGES = {"code": (3, 33), "math": (33, 66), "prose": (66, 100)}
DOCS = {"code": 14, "math": 9, "prose": 21}


def write_domains(path: Path, seed: int, docs: dict[str, int], shard_tokens: int = 48) -> dict[str, np.ndarray]:
    """Interleaved documents of several domains -> shard set; return each domain's flat tokens."""
    rng = np.random.default_rng(seed)
    flat: dict[str, list[np.ndarray]] = {d: [] for d in docs}
    with ShardWriter(path, vocab_size=VOCAB, bos_id=BOS, eos_id=EOS, shard_tokens=shard_tokens) as w:
        for i in range(max(docs.values())):
            for d in sorted(docs):
                if i < docs[d]:
                    lo, hi = RANGES.get(d, (3, VOCAB))
                    doc = np.concatenate([[BOS], rng.integers(lo, hi, rng.integers(1, 25)), [EOS]])
                    w.add(doc, domain=d)
                    flat[d].append(doc)
    return {d: np.concatenate(v) for d, v in flat.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    flat = write_domains(root / "train", 0, DOCS)
    write_domains(root / "val", 1, {"code": 3, "math": 2, "prose": 4})
    return SimpleNamespace(root=root, set=ShardSet(root / "train"), flat=flat)


def domain_of_rows(tokens: np.ndarray) -> np.ndarray:
    """Domain name of each row [.., L+1] from its token ids (rows never mix domains)."""
    inner = np.where(tokens < 3, -1, tokens)
    out = []
    for row in inner.reshape(-1, tokens.shape[-1]):
        found = {d for d, (lo, hi) in RANGES.items() if np.any((row >= lo) & (row < hi))}
        assert len(found) == 1, row
        out.append(found.pop())
    return np.array(out)


# ------------------------------------------------------------------ storage


def test_writer_keeps_domains_in_their_own_shards(data):
    s = data.set
    index = json.loads((data.root / "train" / "index.json").read_text())
    for shard in index["shards"]:
        tokens = np.load(data.root / "train" / f"{shard['name']}.tokens.npy")
        assert set(domain_of_rows(tokens[tokens > 2][None, :]).tolist()) == {shard["domain"]}
    assert s.domains == ["code", "math", "prose"]
    assert s.domain_tokens == {d: data.flat[d].size for d in s.domains}
    assert s.domain_documents == DOCS
    assert s.num_tokens == sum(f.size for f in data.flat.values())  # the flat view still spans everything
    for d in s.domains:
        view = s.domain(d)
        n, flat = view.num_tokens, data.flat[d]
        assert view.domains == [d] and view.num_documents == DOCS[d] and view.domain(d) is view
        tokens, ids = view.window(n - 5, 2 * n + 9)  # across the epoch end, twice
        np.testing.assert_array_equal(tokens, flat[np.arange(n - 5, 3 * n + 4) % n])
        starts = np.flatnonzero(flat == BOS)
        owner = np.searchsorted(starts, np.arange(n), side="right") - 1
        o = np.arange(n - 5, 3 * n + 4)
        np.testing.assert_array_equal(ids, (o // n) * DOCS[d] + owner[o % n])
        for i in range(DOCS[d]):
            np.testing.assert_array_equal(view.document(i), flat[starts[i] : (list(starts) + [n])[i + 1]])
        assert pickle.loads(pickle.dumps(view)).window(0, 7)[0].tolist() == flat[:7].tolist()
    with pytest.raises(DataError, match="no domain 'web'; choose one of its domains: code, math, prose"):
        s.domain("web")


def test_index_without_domains_is_one_default_domain(tmp_path):
    with ShardWriter(tmp_path / "s", vocab_size=10, bos_id=1, eos_id=2, shard_tokens=4) as w:
        w.add([1, 5, 2])
        w.add([1, 6, 6, 2])
    index_path = tmp_path / "s" / "index.json"
    index = json.loads(index_path.read_text())
    assert [sh["domain"] for sh in index["shards"]] == ["default", "default"]
    for sh in index["shards"]:
        del sh["domain"]  # an index written before shards carried a domain
    index_path.write_text(json.dumps(index))
    s = ShardSet(tmp_path / "s")
    assert s.domains == ["default"] and s.domain_tokens == {"default": 7}
    assert s.domain("default").window(0, 9)[0].tolist() == s.window(0, 9)[0].tolist()


# ------------------------------------------------------------------- stream


def collect(data, dp_size: int, steps: int, state: StreamState | None = None, **kw):
    """Global [B, L+1] tokens / doc ids of each step assembled from all ranks, plus the batches of rank 0."""
    state = state or StreamState()
    kw = {"seq_len": 8, "global_batch_size": 8, "micro_batch_size": 2, **kw}
    streams = [TokenStream(data.set, dp_rank=r, dp_size=dp_size, start_position=state.position,
                           start_samples=state.samples, start_domain_positions=state.domain_positions or None, **kw)
               for r in range(dp_size)]  # fmt: skip
    out = []
    for parts in itertools.islice(zip(*streams), steps):
        L = parts[0]["tokens"].shape[-1]
        for key in ("position", "next_position", "next_samples", "next_domain_positions", "domain_tokens"):
            assert all(torch.equal(p[key], parts[0][key]) for p in parts)
        out.append(SimpleNamespace(
            tokens=torch.cat([p["tokens"].reshape(-1, L) for p in parts]).numpy(),
            doc_ids=torch.cat([p["doc_ids"].reshape(-1, L) for p in parts]).numpy(),
            batch=parts[0],
        ))  # fmt: skip
    return out


def ramp(position: int) -> tuple[int, int]:
    return (8, 8) if position < 200 else (16, 16)


@pytest.mark.parametrize("dp_size,schedule", [(1, None), (2, None), (4, None), (2, ramp), (4, ramp)])
def test_each_domain_consumed_once_in_order(data, dp_size, schedule):
    steps = 60  # several epochs of every domain
    got = collect(data, dp_size, steps, batch_schedule=schedule)
    n = len(data.set.domains)
    per_domain = {d: [] for d in data.set.domains}
    ids_per_domain = {d: [] for d in data.set.domains}
    positions = dict.fromkeys(data.set.domains, 0)
    position = samples = 0
    for step in got:
        rows = domain_of_rows(step.tokens)
        # doc ids carry the domain (id % n), so two domains never share an id
        np.testing.assert_array_equal(np.array(data.set.domains)[step.doc_ids[:, 0] % n], rows)
        B, L = step.tokens.shape[0], step.tokens.shape[1] - 1
        assert int(step.batch["position"]) == position and (B, L) == (ramp(position) if schedule else (8, 8))
        for i, d in enumerate(data.set.domains):
            mine = rows == d
            per_domain[d].append(step.tokens[mine][:, :-1].reshape(-1))
            ids_per_domain[d].append(step.doc_ids[mine][:, :-1].reshape(-1) // n)
            # targets are the inputs shifted by one inside the domain's stream
            view = data.set.domain(d)
            if mine.any():
                want, _ = view.window(positions[d], int(mine.sum()) * L + 1)
                np.testing.assert_array_equal(step.tokens[mine][:, 1:].reshape(-1), want[1:])
            positions[d] += int(mine.sum()) * L
            assert int(step.batch["domain_tokens"][i]) == int(mine.sum()) * L
        position, samples = position + B * L, samples + B
        assert int(step.batch["next_position"]) == position and int(step.batch["next_samples"]) == samples
        assert step.batch["next_domain_positions"].tolist() == [positions[d] for d in data.set.domains]
    for d in data.set.domains:
        view = data.set.domain(d)
        inputs = np.concatenate(per_domain[d])
        assert inputs.size > 2 * view.num_tokens  # more than two epochs of this domain
        want, want_ids = view.window(0, inputs.size)
        np.testing.assert_array_equal(inputs, want)
        np.testing.assert_array_equal(np.concatenate(ids_per_domain[d]), want_ids)
    if dp_size > 1:  # the union of the ranks is the single-rank stream
        one = collect(data, 1, steps, batch_schedule=schedule)
        for a, b in zip(one, got):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.doc_ids, b.doc_ids)


def test_realized_mix_matches_the_weights(data):
    weights = {"code": 0.5, "math": 0.3, "prose": 0.2}
    got = collect(data, 1, 125, mix_schedule=lambda p: weights)  # 1000 samples
    rows = np.concatenate([domain_of_rows(s.tokens) for s in got])
    for d, w in weights.items():
        assert abs(np.mean(rows == d) - w) < 5 / rows.size, d
        # even one 8-sample step is within two samples of the weights
        assert all(abs(int(np.sum(domain_of_rows(s.tokens) == d)) - 8 * w) < 2 for s in got), d
    stream = TokenStream(data.set, 8, 8, 2, mix_schedule=lambda p: weights)
    assert stream.weights_at(0) == pytest.approx(weights)
    # a zero weight is never drawn; missing domains are zero
    got = collect(data, 1, 50, mix_schedule=lambda p: {"math": 1.0, "code": 0.0})
    assert set(np.concatenate([domain_of_rows(s.tokens) for s in got]).tolist()) == {"math"}
    # the default is each domain's share of the tokens
    natural = TokenStream(data.set, 8, 8, 2)
    total = data.set.num_tokens
    assert natural.natural_weights == {d: n / total for d, n in data.set.domain_tokens.items()}
    rows = np.concatenate([domain_of_rows(s.tokens) for s in collect(data, 1, 125)])
    for d, n in data.set.domain_tokens.items():
        assert abs(np.mean(rows == d) - n / total) < 5 / rows.size


def fake_trainer(dm: TokenDataModule | None = None, callbacks: list | None = None, plan: RunPlan | None = None,
                 ) -> SimpleNamespace:
    return SimpleNamespace(datamodule=dm, callbacks=callbacks or [], training=True, strategy=object(), global_rank=0,
                           world_size=1, lightning_module=SimpleNamespace(run_plan=plan))  # fmt: skip


def test_schedule_thresholds_and_annealing(data):
    mix = DataMixSchedule([MixStage(0, {"code": 1.0}), {"tokens": 100, "weights": {"math": 0.5, "prose": 0.5}}],
                          anneal_weights={"prose": 1.0})  # fmt: skip
    dm = make_dm(data)
    annealing = LRAnnealing(total_tokens=400, anneal_tokens=176)  # annealing from 224 tokens on
    mix.setup(fake_trainer(dm, [annealing]), None, "fit")
    assert mix.anneal_start == 224
    assert mix.weights_at(99) == {"code": 1.0, "math": 0.0, "prose": 0.0}
    assert mix.weights_at(100) == {"code": 0.0, "math": 0.5, "prose": 0.5}
    assert mix.weights_at(224) == {"code": 0.0, "math": 0.0, "prose": 1.0}
    got = collect(data, 1, 9, seq_len=8, global_batch_size=4, micro_batch_size=2, mix_schedule=mix.weights_at)
    by_step = [(int(s.batch["position"]), sorted(set(domain_of_rows(s.tokens).tolist()))) for s in got]
    # 32-token steps: the one starting at 96 (< 100) keeps the first mix, 128 is the first after it
    assert by_step[:4] == [(0, ["code"]), (32, ["code"]), (64, ["code"]), (96, ["code"])]
    assert [p for p, _ in by_step[4:7]] == [128, 160, 192]
    assert all(set(doms) <= {"math", "prose"} for _, doms in by_step[4:7])
    assert set().union(*(doms for _, doms in by_step[4:7])) == {"math", "prose"}
    assert by_step[7:] == [(224, ["prose"]), (256, ["prose"])]


def test_resume_from_a_saved_state_under_any_dp_size(data):
    kw = dict(batch_schedule=ramp, mix_schedule=lambda p: {"code": 0.2, "math": 0.3, "prose": 0.5})
    full = collect(data, 2, 14, **kw)
    saved = full[5].batch  # the checkpoint after 6 steps: the data module's state
    domains = data.set.domains
    state = StreamState(int(saved["next_position"]), int(saved["next_samples"]),
                        dict(zip(domains, saved["next_domain_positions"].tolist())))
    stream = TokenStream(data.set, 8, 8, 2, batch_schedule=ramp)
    assert stream.state_of_step(6).position == state.position
    for dp in (1, 4):
        tail = collect(data, dp, 8, state=state, **kw)
        for a, b in zip(full[6:], tail):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.doc_ids, b.doc_ids)
    mixed = TokenStream(data.set, 8, 8, 2, **kw)
    assert mixed.state_of_step(6) == state
    with pytest.raises(DataError, match="start_domain_positions"):
        TokenStream(data.set, 8, 8, 2, start_position=64)
    with pytest.raises(DataError, match="domain.s. web .*lacks"):
        TokenStream(data.set, 8, 8, 2, start_domain_positions={"web": 3})
    with pytest.raises(DataError, match="names domain.s. web"):
        next(iter(TokenStream(data.set, 8, 8, 2, mix_schedule=lambda p: {"web": 1.0})))


def test_workers_cut_the_same_batches(data):
    mix = DataMixSchedule([MixStage(0, {"code": 0.6, "math": 0.4}), MixStage(150, {"prose": 0.7, "math": 0.3})])
    ramp_cb = BatchSizeRamp([RampStage(0, 32, 8), RampStage(100, 64, 16)])

    def make() -> TokenStream:
        return TokenStream(data.root / "train", 8, 4, 2, num_steps=7, batch_schedule=ramp_cb.layout_at,
                           mix_schedule=mix.weights_at)

    plain = list(make())
    got = list(DataLoader(make(), batch_size=None, num_workers=2))
    assert len(got) == len(plain) == 7
    for a, b in zip(plain, got):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------- datamodule


def make_dm(data, root: Path | None = None, **kw) -> TokenDataModule:
    args = dict(data_dir=str(root or data.root), seq_len=8, global_batch_size=4, micro_batch_size=2, val_batches=2,
                build_demo=False)  # fmt: skip
    return TokenDataModule(**{**args, **kw})


def test_datamodule_state_round_trips(data):
    dm = make_dm(data)
    # The data module reads the layout and mix of each step from the module's run plan.
    plan = RunPlan(LRSchedule(), 1e-3, dm.global_batch_size, dm.seq_len,
                   mix=MixSettings([MixStage(0, {"code": 0.25, "math": 0.25, "prose": 0.5})]))
    dm.trainer = fake_trainer(dm, plan=plan)
    assert dm.train_stream().mix_schedule == plan.mix_at and dm.train_stream().batch_schedule == plan.layout_at
    assert dm.domains == ["code", "math", "prose"]
    assert dm.natural_weights == pytest.approx({d: n / data.set.num_tokens for d, n in data.set.domain_tokens.items()})
    it = iter(dm.train_dataloader())
    for _ in range(3):
        dm.on_after_batch_transfer(next(it), 0)
    following = next(it)
    state = dm.state_dict()
    assert state["position"] == 96 and state["samples"] == 12 and state["seq_len"] == 8
    assert sum(state["domain_positions"].values()) == 96 and set(state["domain_positions"]) == set(dm.domains)
    dm2 = make_dm(data)
    dm2.trainer = fake_trainer(dm2, plan=plan)
    dm2.load_state_dict(json.loads(json.dumps(state)))  # survives a plain serialisation
    assert dm2.state_dict() == state
    resumed = next(iter(dm2.train_dataloader()))
    for key in following:
        assert torch.equal(resumed[key], following[key]), key
    # validation: natural mix from the zero state, sizes overridable
    val = list(dm.val_dataloader())
    assert len(val) == 2 and int(val[0]["position"]) == 0
    longer = list(dm.val_stream(seq_len=16, batch_size=2, num_batches=3))
    assert len(longer) == 3 and longer[0]["tokens"].shape == (1, 2, 17)


def test_datamodule_loads_the_old_state_format(data, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # no domain given: the single domain "default"
        with ShardWriter(tmp_path / split, vocab_size=VOCAB, bos_id=BOS, eos_id=EOS, shard_tokens=40) as w:
            for _ in range(12):
                w.add(np.concatenate([[BOS], rng.integers(3, VOCAB, rng.integers(1, 25)), [EOS]]))
    dm = make_dm(data, root=tmp_path)
    dm.load_state_dict({"position": 64, "seq_len": 8})
    assert dm.state_dict() == {"position": 64, "samples": 0, "domain_positions": {"default": 64}, "seq_len": 8}
    batch = next(iter(dm.train_dataloader()))
    flat = ShardSet(tmp_path / "train")
    np.testing.assert_array_equal(batch["tokens"].reshape(-1, 9)[:, :-1].reshape(-1), flat.window(64, 32)[0])
    multi = make_dm(data)
    multi.load_state_dict({"position": 64, "seq_len": 8})
    with pytest.raises(DataError, match="domain.s. default that .* lacks .*resume with the data"):
        multi.train_dataloader()


# ------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,needle", [
    (dict(stages=[]), "at least one stage"),
    (dict(stages=[MixStage(5, {"code": 1.0})]), "must start at tokens=0, got 5"),
    (dict(stages=[MixStage(0, {"code": 1.0}), MixStage(0, {"math": 1.0})]), "thresholds must increase"),
    (dict(stages=[MixStage(0, {"code": 1.2, "math": -0.2})]), "weight of 'math' is -0.2; weights must be numbers >= 0"),
    (dict(stages=[MixStage(0, {"code": 0.5, "math": 0.4})]), "weights sum to 0.9, not 1"),
    (dict(stages=[MixStage(0, {"code": 1.0})], anneal_weights={"code": 0.5}), "anneal_weights: weights sum to 0.5"),
])  # fmt: skip
def test_bad_schedules(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        DataMixSchedule(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_schedules_at_setup(data):
    dm = make_dm(data)
    with pytest.raises(ConfigError) as err:
        DataMixSchedule([MixStage(0, {"code": 0.5, "web": 0.5})]).setup(fake_trainer(dm), None, "fit")
    assert str(err.value) == ("data-mix stage at 0 tokens names domain(s) 'web' that the data lacks; use its domains: "
                              "code, math, prose")  # fmt: skip
    with pytest.raises(ConfigError, match="anneal_weights need the callbacks.annealing.LRAnnealing callback"):
        DataMixSchedule([MixStage(0, {"code": 1.0})], {"math": 1.0}).setup(fake_trainer(dm), None, "fit")
    with pytest.raises(ConfigError, match="TokenDataModule"):
        DataMixSchedule([MixStage(0, {"code": 1.0})]).setup(fake_trainer(None), None, "fit")


def test_resume_with_a_changed_schedule_warns():
    mix = DataMixSchedule([MixStage(0, {"code": 1.0})])
    other = DataMixSchedule([MixStage(0, {"math": 1.0})])
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        other.load_state_dict(mix.state_dict())
    mix.load_state_dict(mix.state_dict())


# ---------------------------------------------------------------------- fit


def test_fit_logs_the_scheduled_mix(tmp_path, data):
    callbacks = [
        {"class_path": "callbacks.data_mix.DataMixSchedule",
         "init_args": {"stages": [{"tokens": 0, "weights": {"code": 0.5, "math": 0.5}},
                                  {"tokens": 128, "weights": {"prose": 0.75, "math": 0.25}}],
                       "anneal_weights": {"code": 1.0}}},
        {"class_path": "callbacks.annealing.LRAnnealing", "init_args": {"total_tokens": 256, "anneal_tokens": 64}},
    ]  # fmt: skip
    from recipe.cli import main

    config = tiny_fit_config(tmp_path, data.root, "mix", 4, callbacks, seed=0, checkpoint_every=4)
    assert main(["fit", "--config", str(config)]) == 0
    scalars = read_scalars(tmp_path / "mix")
    # 64-token steps at 0, 64 (first stage), 128 (second), 192 (annealing from 256 - 64)
    assert [scalars["train/mix/code"][s] for s in range(4)] == [0.5, 0.5, 0.0, 1.0]
    assert [scalars["train/mix/math"][s] for s in range(4)] == [0.5, 0.5, 0.25, 0.0]
    assert [scalars["train/mix/prose"][s] for s in range(4)] == [0.0, 0.0, 0.75, 0.0]
    state = torch.load(tmp_path / "mix" / "ckpt" / "last.ckpt", weights_only=False)["TokenDataModule"]
    assert state["position"] == 256 and state["samples"] == 16
    # samples k = 0..7 alternate math/code, 8..11 draw math once and prose three times, 12..15 are code
    assert state["domain_positions"] == {"code": 8 * 16, "math": 5 * 16, "prose": 3 * 16}
