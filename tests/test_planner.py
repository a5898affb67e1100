"""The capacity planner: Table 4's layouts fit on 80 GB, naive ones do not, and the parts scale as they must."""

import pytest

from recipe.cli import main, model_args_from_config
from recipe.planner import HARDWARE, Layout, estimate, in_flight

H100 = HARDWARE["h100-80gb"]
BATCH = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def llama405b():
    return model_args_from_config("configs/llama3_405b.yaml")


def fits_with_some_checkpointing(args, seq_len, **sizes) -> bool:
    return any(estimate(args, Layout(**sizes, activation_checkpointing=ac), seq_len, BATCH, 1, H100).fits
               for ac in ("none", "selective", "full"))


@pytest.mark.parametrize("seq_len, sizes", [
    (8192, dict(tp=8, cp=1, pp=16, dp=64, stages_per_rank=2, schedule="Interleaved1F1B")),
    (8192, dict(tp=8, cp=1, pp=16, dp=128, stages_per_rank=2, schedule="Interleaved1F1B")),
    (131072, dict(tp=8, cp=16, pp=16, dp=8, stages_per_rank=2, schedule="Interleaved1F1B")),
])
def test_table_4_layouts_fit_on_80gb(llama405b, seq_len, sizes):
    assert fits_with_some_checkpointing(llama405b, seq_len, **sizes)


@pytest.mark.parametrize("sizes", [dict(tp=1, cp=4, pp=1, dp=2048), dict(tp=1, cp=1, pp=1, dp=2048)])
def test_naive_405b_layouts_do_not_fit_without_full_recompute(llama405b, sizes):
    for ac in ("none", "selective"):
        est = estimate(llama405b, Layout(**sizes, activation_checkpointing=ac), 8192, BATCH, 1, H100)
        assert not est.fits and "GiB per GPU" in est.reason and "activations" in est.reason


def test_parts_scale_with_the_layout(llama405b):
    base = estimate(llama405b, Layout(tp=8, pp=16, dp=64, stages_per_rank=2, schedule="Interleaved1F1B"), 8192,
                    BATCH, 1, H100)
    wider = estimate(llama405b, Layout(tp=8, pp=16, dp=128, stages_per_rank=2, schedule="Interleaved1F1B"), 8192,
                     BATCH, 1, H100)
    key = "sharded params+grads+adam"
    assert wider.memory[key] == pytest.approx(base.memory[key] / 2)  # FSDP over twice the ranks
    assert wider.time["compute"] == pytest.approx(base.time["compute"] / 2)
    full = estimate(llama405b, Layout(tp=8, pp=16, dp=64, stages_per_rank=2, schedule="Interleaved1F1B",
                                      activation_checkpointing="full"), 8192, BATCH, 1, H100)
    assert full.memory["activations"] < base.memory["activations"] / 10 and full.time["recompute"] > 0


def test_micro_batches_in_flight():
    assert in_flight(Layout(pp=1), 8) == 1
    assert in_flight(Layout(pp=4, schedule="GPipe"), 8) == 8
    assert in_flight(Layout(pp=4), 8) == 4
    assert in_flight(Layout(pp=4, stages_per_rank=2, schedule="Interleaved1F1B"), 8) == pytest.approx(4 * (1 + 3 / 8))


def test_a_batch_that_does_not_split_is_explained(llama405b):
    est = estimate(llama405b, Layout(tp=1, pp=1, dp=8192), 8192, BATCH, 1, H100)
    assert not est.fits and "2048 sequences per step do not split over dp=8192" in est.reason


def test_plan_command(capsys, llama405b):
    assert main(["plan", "--config", "configs/llama3_405b.yaml", "--gpus", "16384", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "tp8 cp1 pp16 x2 Interleaved1F1B dp128 ac=full: fits" in out and "layouts fit; the fastest" in out
    # Every-other-block checkpointing does not fit in this recipe: DTensor's sequence
    # parallelism keeps the all-gathered inputs of the projections for the backward pass,
    # and FSDP accumulates the stage's gradients unsharded in fp32 under PP (both measured
    # on CPU by tests/test_planner_memory.py).
    selective = Layout(tp=8, pp=16, dp=128, stages_per_rank=2, schedule="Interleaved1F1B",
                       activation_checkpointing="selective")
    est = estimate(llama405b, selective, 8192, BATCH, 1, H100)
    assert not est.fits and "the largest part is activations" in est.reason


@pytest.mark.parametrize("config", ["configs/llama3_8b.yaml", "configs/llama3_70b.yaml", "configs/llama3_405b.yaml",
                                    "configs/llama3_405b_long_context.yaml"])
def test_shipped_gpu_configs_fit_on_80gb(config, capsys):
    assert main(["plan", "--config", config, "--top", "1"]) == 0
    assert ": fits" in capsys.readouterr().out.split("the config's layout")[1].splitlines()[1]


def test_long_context_config_fits_on_80gb_at_every_stage():
    """The 405B long-context layout (Table 4: TP 8, CP 16, PP 16, DP 8) at each of its lengths.

    ``recipe plan`` plans the last and longest stage, 128K tokens; every earlier stage is
    checked too, with the batch the config gives it. Each rank keeps its 8K-token shard's
    activations and the whole sequence's K/V at 8 heads per layer; no mask exists.
    """
    import yaml

    from recipe.planner import config_layout

    path = "configs/llama3_405b_long_context.yaml"
    args = model_args_from_config(path)
    config = yaml.safe_load(open(path))
    layout, seq_len, batch_tokens, micro, precision = config_layout(config)
    assert (layout.tp, layout.cp, layout.pp, layout.dp, seq_len) == (8, 16, 16, 8, 131072)
    assert precision == "bf16" and args.attention == "auto"
    stages = next(cb["init_args"]["stages"] for cb in config["trainer"]["callbacks"]
                  if cb["class_path"].endswith("ContextLengthStages"))
    for stage in stages:
        est = estimate(args, layout, stage["seq_len"], stage.get("batch_tokens", batch_tokens), micro, H100, precision)
        assert est.fits, (stage, est.reason)
        assert est.memory_total < 0.95 * 80e9, (stage, est.memory_total)
    longest = estimate(args, layout, seq_len, batch_tokens, micro, H100, precision)
    assert longest.memory_total < 0.95 * H100.memory_bytes and longest.memory_total < 80e9
    assert "attention masks" not in longest.memory


def test_attention_memory_has_no_mask_but_for_the_dense_backend(llama405b):
    """K/V at n_kv_heads (the gathered sequence under CP), the output once more where calls
    are concatenated, and a seq x seq float bias only for the dense reference."""
    from dataclasses import replace

    from recipe.planner import layer_activation_bytes

    layout, cp16 = Layout(tp=8), Layout(tp=8, cp=16)
    c, kv = 2, llama405b.n_kv_heads * llama405b.head_dim
    varlen = layer_activation_bytes(llama405b, layout, c, 131072, "varlen")
    varlen_cp = layer_activation_bytes(llama405b, cp16, c, 131072, "varlen")
    assert varlen_cp - varlen == pytest.approx((2 * kv * c * 15 + llama405b.dim * c) / 8)
    assert layer_activation_bytes(llama405b, layout, c, 131072, "flex") == varlen  # one call, no mask
    # One autograd node writes every document's run into one output: kept once.
    assert layer_activation_bytes(llama405b, layout, c, 131072, "segmented") == varlen
    dense = layer_activation_bytes(llama405b, layout, c, 131072, "dense")
    assert dense - varlen == 131072 * c  # SDPA's float bias, every key per query, not sharded by TP
    base = estimate(llama405b, Layout(tp=8, pp=16, dp=64, stages_per_rank=2, schedule="Interleaved1F1B"), 8192,
                    BATCH, 1, H100)
    masked = estimate(replace(llama405b, attention="dense"), Layout(tp=8, pp=16, dp=64, stages_per_rank=2,
                      schedule="Interleaved1F1B"), 8192, BATCH, 1, H100)
    assert masked.memory["activations"] > base.memory["activations"]


def test_gpu_check_script_runs(tmp_path):
    """bench/gpu_check.py's own code path, on a tiny CPU shape (its real run needs an NVIDIA GPU)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "MASTER_PORT": "29631"}
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("gpu_check: cpu (smoke) | 2 layers x dim 64, seq 128") and "s/step" in done.stdout


def test_gpu_memory_script_runs():
    """bench/gpu_memory.py's own code path on a tiny CPU shape (its real run needs an NVIDIA GPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_memory.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MASTER_PORT": "29632"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("gpu_memory: ")]
    assert len(lines) == 2 and "recipe" in lines[0] and "gpu_check" in lines[1] and "MiB | planner" in lines[0]


def test_reducing_every_micro_batch_trades_unsharded_gradients_for_traffic():
    args = model_args_from_config("configs/llama3_8b.yaml")
    once = estimate(args, Layout(dp=8), 8192, 4 * 1024 * 1024, 1, H100)
    every = estimate(args, Layout(dp=8, reduce_every_micro_batch=True), 8192, 4 * 1024 * 1024, 1, H100)
    assert once.memory["unsharded grads"] == pytest.approx(4 * 8_030_261_248, rel=1e-6)
    assert "unsharded grads" not in every.memory
    # The 30 GiB of unsharded fp32 gradients become a 3.7 GiB gradient shard.
    assert every.memory_total < once.memory_total - 25 * 1024**3
    assert str(every.layout).endswith("reduce=every-micro-batch")
