"""FLOPs per token against hand counts, and the throughput callback's arithmetic."""

import math

import pytest
import torch
import yaml

import callbacks.throughput as throughput_mod
from callbacks.throughput import TokenThroughput
from recipe.errors import ConfigError
from recipe.flops import (
    DEVICE_PEAK_FLOPS,
    attended_keys,
    flops_breakdown,
    flops_per_token,
    matmul_params,
    measured_peak_flops,
    model_flops_per_token_6n,
    non_embedding_params,
    peak_flops,
)
from recipe.model import ModelArgs, build_meta_model, count_parameters

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, max_seq_len=64)

# ----------------------------------------------------------------------------- FLOPs


def test_llama3_8b_hand_count():
    """Llama 3 8B at 8192 tokens, counted by hand from the published shape."""
    args = ModelArgs()  # dim 4096, 32 layers, 32 heads, 8 KV heads, vocab 128256, ffn 14336
    assert args.ffn_hidden_dim == 14336
    dim, layers, kv_dim, ffn, vocab, seq = 4096, 32, 8 * 128, 14336, 128256, 8192
    per_layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn  # wq+wo, wk+wv, w1+w2+w3
    assert per_layer == 218_103_808
    matmul = layers * per_layer + dim * vocab  # + output head; the embedding is a lookup
    assert matmul == 7_504_658_432
    # The published 8.03B: matmul weights + embedding + 2 norms per layer + final norm.
    assert count_parameters(build_meta_model(args)) == matmul + vocab * dim + (2 * layers + 1) * dim == 8_030_261_248

    # 6 x weights + attention: QK^T and AV, 2 FLOPs per MAC, x3 for training, half the keys.
    attention_full = 3 * 2 * 2 * layers * dim * seq
    assert flops_per_token(args, seq) == 6 * matmul + attention_full / 2
    assert flops_per_token(args, seq, causal=False) == 6 * matmul + attention_full
    assert flops_per_token(args, seq) == pytest.approx(5.147e10, rel=1e-3)

    # 6N: non-embedding parameters (norm gains and output head included), no attention.
    n = 8_030_261_248 - vocab * dim
    assert non_embedding_params(args) == n
    assert model_flops_per_token_6n(args) == 6 * n
    # torchtitan's 6N + 12 L H Q T equals the full-attention count up to the norm gains.
    assert flops_per_token(args, seq, causal=False) == 6 * n + 12 * layers * 32 * 128 * seq - 6 * (2 * layers + 1) * dim


def test_matmul_params_match_the_model():
    args = ModelArgs(**TINY)
    shapes = {name: p.numel() for name, p in build_meta_model(args).named_parameters()}

    def total(*suffixes):
        return sum(n for name, n in shapes.items() if name.endswith(suffixes))

    counts = matmul_params(args)
    assert counts["attention_q_o"] == total("wq.weight", "wo.weight")
    assert counts["attention_kv"] == total("wk.weight", "wv.weight")
    assert counts["mlp"] == total("w1.weight", "w2.weight", "w3.weight")
    assert counts["output"] == shapes["output.weight"]
    assert non_embedding_params(args) == sum(shapes.values()) - shapes["tok_embeddings.weight"]


def test_gqa_shrinks_only_the_kv_projections():
    mha = flops_breakdown(ModelArgs(n_kv_heads=32), 8192)
    gqa = flops_breakdown(ModelArgs(n_kv_heads=8), 8192)
    assert gqa["attention_kv"] == mha["attention_kv"] / 4  # 8 of 32 K/V heads
    assert gqa["attention_kv"] == 3 * 2 * 32 * 2 * 4096 * 1024
    for part in ("attention_q_o", "mlp", "output", "attention_scores"):  # query heads set attention
        assert gqa[part] == mha[part]
    assert gqa["total"] == mha["total"] - 0.75 * mha["attention_kv"]


def test_causal_halves_the_attention_term_only():
    args = ModelArgs(**TINY)
    causal, full = flops_breakdown(args, 64, causal=True), flops_breakdown(args, 64, causal=False)
    assert causal["attention_scores"] == full["attention_scores"] / 2
    assert full["attention_scores"] == 3 * 2 * 2 * 2 * 4 * 8 * 64
    assert all(causal[k] == full[k] for k in ("attention_q_o", "attention_kv", "mlp", "output"))
    # Linear in the sequence length; the weight part does not depend on it.
    assert flops_per_token(args, 64) - flops_per_token(args, 32) == causal["attention_scores"] / 2
    assert sum(v for k, v in causal.items() if k != "total") == causal["total"]


def test_document_masking_counts_useful_attention():
    args = ModelArgs(**TINY)
    assert attended_keys(64, causal=False) == 64 and attended_keys(64) == 32
    assert flops_per_token(args, 64, doc_lengths=[64]) == flops_per_token(args, 64)
    # Two documents of 32: each token sees 32 keys (full) -> half the attention of one row.
    two = flops_breakdown(args, 64, causal=False, doc_lengths=[32, 32])
    assert two["attention_scores"] == flops_breakdown(args, 64, causal=False)["attention_scores"] / 2
    assert attended_keys(64, causal=False, doc_lengths=[48, 16]) == (48 ** 2 + 16 ** 2) / 64
    assert flops_per_token(args, 64, mean_doc_len=16) == flops_per_token(args, 64, doc_lengths=[16] * 4)
    assert flops_per_token(args, 64, mean_doc_len=1000) == flops_per_token(args, 64)  # capped at the row
    for bad in (dict(doc_lengths=[65]), dict(doc_lengths=[]), dict(mean_doc_len=0),
                dict(doc_lengths=[8], mean_doc_len=8)):
        with pytest.raises(ConfigError):
            attended_keys(64, **bad)


def test_peaks():
    assert DEVICE_PEAK_FLOPS["h100-sxm"] == 989e12 and DEVICE_PEAK_FLOPS["h100-pcie"] == 756e12
    assert DEVICE_PEAK_FLOPS["h200"] == 989e12 and DEVICE_PEAK_FLOPS["a100"] == 312e12
    assert peak_flops("H100-SXM") == 989e12
    with pytest.raises(ConfigError, match="known"):
        peak_flops("tpu-v9")
    rate = measured_peak_flops(torch.float32, size=128, repeats=2)
    assert math.isfinite(rate) and rate > 0
    with pytest.raises(ConfigError):
        measured_peak_flops(size=0)


# ----------------------------------------------------------------------------- callback


class FakeTrainer:
    def __init__(self, world_size):
        self.world_size = world_size
        self.training = True


class FakeModule:
    def __init__(self, arch):
        self.arch = arch
        self.tokens_seen = 0
        self.logged: dict[str, list[float]] = {}

    def log(self, name, value, **kwargs):
        self.logged.setdefault(name, []).append(float(value))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(throughput_mod.time, "perf_counter", c)
    return c


def batch_of(n_micro, micro, seq_len):
    return {"tokens": torch.zeros(n_micro, micro, seq_len + 1, dtype=torch.long)}


def run_steps(cb, trainer, module, clock, steps, global_tokens, seq_len, seconds):
    for i in range(steps):
        clock.now += seconds
        module.tokens_seen += global_tokens
        # This rank's share of the batch: its shape only tells the sequence length.
        cb.on_train_batch_end(trainer, module, None, batch_of(2, 1, seq_len), i)


def test_callback_tokens_tflops_and_mfu(clock, monkeypatch):
    """8 processes (e.g. tp2 x pp2 x dp2): global tokens, FLOPs split over every process."""
    args = ModelArgs(**TINY)
    trainer, module = FakeTrainer(world_size=8), FakeModule(args)
    monkeypatch.setattr(throughput_mod, "measured_peak_flops", lambda: pytest.fail("a given peak is never measured"))
    cb = TokenThroughput(window=3, peak_flops_per_device=2e9)
    cb.on_train_start(trainer, module)
    run_steps(cb, trainer, module, clock, steps=5, global_tokens=256, seq_len=32, seconds=0.5)

    tps = module.logged["train/tokens_per_sec"]
    assert len(tps) == 5 and tps == pytest.approx([512.0] * 5)
    fpt = flops_per_token(args, 32)
    expected = 512.0 * fpt / 8 / 1e12
    assert module.logged["train/tflops_per_device"] == pytest.approx([expected] * 5, rel=1e-12)
    assert module.logged["train/mfu"] == pytest.approx([expected * 1e12 / 2e9] * 5, rel=1e-12)
    assert module.logged["train/peak_tflops"][-1] == pytest.approx(2e9 / 1e12)


def test_callback_without_peak_logs_no_mfu(clock):
    trainer, module = FakeTrainer(world_size=1), FakeModule(ModelArgs(**TINY))
    cb = TokenThroughput(window=2)
    cb.on_train_start(trainer, module)
    run_steps(cb, trainer, module, clock, steps=3, global_tokens=128, seq_len=32, seconds=0.25)
    assert module.logged["train/tflops_per_device"][-1] == pytest.approx(512 * flops_per_token(module.arch, 32) / 1e12)
    assert "train/mfu" not in module.logged and "train/peak_tflops" not in module.logged
    # A module without a model shape still gets tokens/s.
    plain = FakeModule(None)
    cb = TokenThroughput(window=2)
    cb.on_train_start(trainer, plain)
    run_steps(cb, trainer, plain, clock, steps=2, global_tokens=100, seq_len=32, seconds=1.0)
    assert plain.logged == {"train/tokens_per_sec": [100.0, 100.0]}


def test_callback_window_spanning_a_sequence_length_change(clock):
    args = ModelArgs(**TINY)
    trainer, module = FakeTrainer(world_size=2), FakeModule(args)
    cb = TokenThroughput(window=4)
    cb.on_train_start(trainer, module)
    run_steps(cb, trainer, module, clock, steps=2, global_tokens=128, seq_len=32, seconds=1.0)
    run_steps(cb, trainer, module, clock, steps=2, global_tokens=128, seq_len=64, seconds=1.0)
    flops = 2 * 128 * flops_per_token(args, 32) + 2 * 128 * flops_per_token(args, 64)
    assert module.logged["train/tokens_per_sec"][-1] == pytest.approx(128.0)
    assert module.logged["train/tflops_per_device"][-1] == pytest.approx(flops / 4.0 / 2 / 1e12, rel=1e-12)


def test_callback_pauses_over_validation(clock):
    args = ModelArgs(**TINY)
    trainer, module = FakeTrainer(world_size=1), FakeModule(args)
    cb = TokenThroughput(window=10, peak_flops_per_device="h100-sxm")
    assert cb.peak == 989e12
    cb.on_train_start(trainer, module)
    run_steps(cb, trainer, module, clock, steps=3, global_tokens=100, seq_len=32, seconds=1.0)
    clock.now += 500.0  # validation
    cb.on_validation_end(trainer, module)
    run_steps(cb, trainer, module, clock, steps=3, global_tokens=100, seq_len=32, seconds=1.0)
    assert module.logged["train/tokens_per_sec"] == pytest.approx([100.0] * 6)
    tflops = module.logged["train/tflops_per_device"]
    assert tflops == pytest.approx([100 * flops_per_token(args, 32) / 1e12] * 6)
    assert module.logged["train/mfu"][-1] == pytest.approx(tflops[-1] * 1e12 / 989e12)


def test_callback_measures_the_peak_once_and_keeps_it(clock, monkeypatch):
    calls, barriers = [], []
    monkeypatch.setattr(throughput_mod, "measured_peak_flops", lambda: calls.append(1) or 1e11)
    from recipe.parallel import collectives

    monkeypatch.setattr(collectives, "barrier", lambda group=None: barriers.append(1))
    trainer, module = FakeTrainer(world_size=1), FakeModule(ModelArgs(**TINY))
    cb = TokenThroughput(window=2, measure_peak=True)
    cb.on_train_start(trainer, module)
    cb.on_train_start(trainer, module)  # a second fit on the same callback
    assert calls == [1] and cb.peak == 1e11 and barriers == [1]  # every rank measures at once
    run_steps(cb, trainer, module, clock, steps=2, global_tokens=64, seq_len=32, seconds=1.0)
    assert module.logged["train/peak_tflops"][-1] == pytest.approx(0.1)
    assert module.logged["train/mfu"][-1] == pytest.approx(64 * flops_per_token(module.arch, 32) / 1e11)

    # Resume: the saved peak is restored, nothing is measured again.
    state = cb.state_dict()
    monkeypatch.setattr(throughput_mod, "measured_peak_flops", lambda: pytest.fail("measured again"))
    resumed = TokenThroughput(window=2, measure_peak=True)
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, module)
    assert resumed.peak == 1e11
    # A given peak wins over a measured one.
    assert TokenThroughput(peak_flops_per_device=5e10, measure_peak=True).peak == 5e10


def test_callback_arguments():
    assert TokenThroughput(peak_flops_per_device="989e12").peak == 989e12
    for bad in (dict(window=0), dict(peak_flops_per_device=-1.0), dict(peak_flops_per_device="tpu-v9")):
        with pytest.raises(ConfigError):
            TokenThroughput(**bad)


# ----------------------------------------------------------------------------- real fit


def test_fit_logs_consistent_tflops_and_mfu(tmp_path, monkeypatch):
    """A 3-step fit of a tiny model with a measured peak: the logged scalars agree."""
    from recipe.cli import main
    from recipe.data.build import build_shards

    real = throughput_mod.measured_peak_flops
    monkeypatch.setattr(throughput_mod, "measured_peak_flops", lambda: real(size=256, repeats=2))  # quick
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast and suffers less from a busy machine
    try:
        _fit_and_check(tmp_path, main, build_shards)
    finally:
        torch.set_num_threads(threads)


def _fit_and_check(tmp_path, main, build_shards):
    from cli_runs import read_scalars
    from stdlib_corpus import stdlib_corpus

    build_shards(stdlib_corpus(tmp_path / "text"), tmp_path / "shards", val_fraction=0.2)
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 3,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "tb"), "name": "", "version": "v"}},
            "callbacks": [
                {"class_path": "callbacks.throughput.TokenThroughput",
                 "init_args": {"window": 2, "measure_peak": True}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 3, "save_last": True}},
            ],
        },
        "model": {"arch": TINY, "optimizer": {"lr": 3e-3},
                  "lr_schedule": {"warmup_steps": 2, "decay_steps": 8, "min_lr": 3e-5}},
        "data": {"data_dir": str(tmp_path / "shards"), "build_demo": False, "seq_len": 32,
                 "global_batch_size": 4, "micro_batch_size": 2, "val_batches": 1},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0

    scalars = read_scalars(tmp_path / "tb")
    fpt = flops_per_token(ModelArgs(**TINY), 32)
    steps = sorted(scalars["train/tflops_per_device"])
    assert steps == sorted(scalars["train/tokens_per_sec"]) == [0, 1, 2]
    for step in steps:
        tps, tflops = scalars["train/tokens_per_sec"][step], scalars["train/tflops_per_device"][step]
        assert tps > 0
        assert tflops == pytest.approx(tps * fpt / 1 / 1e12, rel=1e-5)  # world size 1
        assert scalars["train/mfu"][step] == pytest.approx(tflops / scalars["train/peak_tflops"][step], rel=1e-5)
    assert len(set(scalars["train/peak_tflops"].values())) == 1  # measured once
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved = [v for k, v in ckpt["callbacks"].items() if k.startswith("TokenThroughput")]
    assert saved and saved[0]["measured_peak"] == pytest.approx(scalars["train/peak_tflops"][steps[0]] * 1e12, rel=1e-5)
