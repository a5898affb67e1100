"""The run plan as a pure function of the data position: ramp, context stages, mix, annealing,
the step index behind the LR, recorded stage starts, resume, and the layout check."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from callbacks.annealing import LRAnnealing
from callbacks.batch_ramp import BatchSizeRamp
from callbacks.context_stages import ContextLengthStages
from callbacks.data_mix import DataMixSchedule
from recipe.config import LRSchedule, ModelArgs, OptimizerConfig, RopeScaling
from recipe.errors import ConfigError
from recipe.parallel.mesh import ParallelDims
from recipe.plan import (AnnealSettings, ContextSettings, ContextStage, MixSettings, MixStage, RampSettings,
                         RampStage, RunPlan, build_run_plan)

SCHEDULE = LRSchedule(warmup_steps=3, decay_steps=40, min_lr=1e-5)
PEAK = 1e-3
M = 2**20


def plan(global_batch_size: int = 8, seq_len: int = 16, **kw) -> RunPlan:
    return RunPlan(lr_schedule=kw.pop("lr_schedule", SCHEDULE), peak_lr=PEAK, global_batch_size=global_batch_size,
                   seq_len=seq_len, micro_batch_size=kw.pop("micro_batch_size", 2), **kw)


def walk(p: RunPlan, steps: int, start: int = 0) -> list[int]:
    """Start positions of ``steps`` consecutive steps from ``start``, the way the data stream cuts them."""
    positions = [start]
    for _ in range(steps - 1):
        positions.append(p.next_position(positions[-1]))
    return positions


# ----------------------------------------------------------------------------- ramp


def test_paper_ramp_layouts():
    p = plan(ramp=RampSettings([RampStage(0, 4 * M, 4096), RampStage(252_000_000, 8 * M, 8192),
                                RampStage(2_870_000_000_000, 16 * M, 8192)]), max_seq_len=8192)
    assert p.layout_at(0) == p.layout_at(251_000_000) == (1024, 4096)
    assert p.layout_at(253_000_000) == p.layout_at(2_860_000_000_000) == (1024, 8192)
    assert p.layout_at(2_880_000_000_000) == (2048, 8192)
    shape = p.at(253_000_000)
    assert (shape.batch_size, shape.seq_len, shape.batch_tokens, shape.micro_batch_size) == (1024, 8192, 8 * M, 2)
    assert shape.mix is None and shape.context_stage == -1 and shape.phase == 0


def brute_step_index(p: RunPlan, position: int) -> int:
    starts, at = 0, 0
    while at < position:
        starts, at = starts + 1, p.next_position(at)
    return starts


@pytest.mark.parametrize("stages", [
    # thresholds that fall inside a step: the step that crosses one keeps its layout
    [RampStage(0, 64, 16), RampStage(100, 96, 32), RampStage(250, 256, 32)],
    # a short stage that no step starts in, then a smaller batch again
    [RampStage(0, 128, 16), RampStage(300, 1024, 32), RampStage(310, 64, 16), RampStage(1000, 192, 64)],
])
def test_step_index_across_ramp_boundaries_matches_a_brute_force_walk(stages):
    p = plan(ramp=RampSettings(stages))
    starts = walk(p, 60)
    assert [p.step_index(s) for s in starts] == list(range(60))
    assert [p.at(s).step_index for s in starts] == list(range(60))
    for position in range(0, starts[-1] + 50, 7):  # also between step starts: steps starting before it
        assert p.step_index(position) == brute_step_index(p, position), position
    assert p.at(starts[10]).lr == SCHEDULE.lr_at(10, PEAK)


def test_step_index_is_cheap_at_the_papers_scale():
    p = plan(ramp=RampSettings([RampStage(0, 4 * M, 4096), RampStage(252_000_000, 8 * M, 8192),
                                RampStage(2_870_000_000_000, 16 * M, 8192)]), max_seq_len=8192,
             lr_schedule=LRSchedule())
    position = 15_600_000_000_000
    began = time.perf_counter()
    index = p.step_index(position)
    assert time.perf_counter() - began < 0.05  # O(segments), not a walk over a million steps
    first = -(-252_000_000 // (4 * M))  # 4M-token steps until 252M tokens
    second = -(-(2_870_000_000_000 - first * 4 * M) // (8 * M))
    at = first * 4 * M + second * 8 * M
    assert index == first + second + -(-(position - at) // (16 * M))


# ----------------------------------------------------------------------------- context stages

UNGATED = ContextSettings([ContextStage(64, 1000), ContextStage(128, 2000, batch_tokens=1024)], start_tokens=500)


def test_ungated_stages_start_at_fixed_offsets():
    p = plan(8, 16, context=UNGATED, max_seq_len=128)
    assert p.stage_starts == [500, 1500]
    assert p.layout_at(0) == p.layout_at(499) == (8, 16)
    assert p.layout_at(500) == p.layout_at(1499) == (2, 64)  # the base's batch tokens at the stage's length
    assert p.layout_at(1500) == p.layout_at(10**12) == (8, 128)  # the last stage runs to the end
    assert [p.stage_at(x) for x in (0, 499, 500, 1500)] == [-1, -1, 0, 1]
    assert p.state_dict() == {"context_starts": [500, 1500]}
    with pytest.raises(ValueError, match="already starts at 1,500"):
        p.record_stage_start(1, 2000)
    p.record_stage_start(1, 1500)  # what the plan already says: nothing to do
    # Steps straddle the starts (128-token steps; 500 and 1500 fall inside steps).
    starts = walk(p, 30)
    assert [p.step_index(s) for s in starts] == list(range(30))


def test_rope_of_each_stage_is_the_last_one_set():
    scaling = RopeScaling(factor=8.0)
    context = ContextSettings([ContextStage(64, 10), ContextStage(128, 10, rope_theta=1e6),
                               ContextStage(256, 10, rope_scaling={"factor": 8.0})])
    p = plan(16, 16, context=context, rope_theta=5e5)
    assert [p.rope_at(k) for k in (-1, 0, 1, 2)] == [(5e5, None), (5e5, None), (1e6, None), (1e6, scaling)]
    shapes = [p.at(x) for x in (0, 10, 20)]
    assert [(s.context_stage, s.rope_theta, s.rope_scaling) for s in shapes] == [(0, 5e5, None), (1, 1e6, None),
                                                                               (2, 1e6, scaling)]


def gated(**kw) -> RunPlan:
    context = ContextSettings([ContextStage(64, 256, batch_tokens=128), ContextStage(128, 512, batch_tokens=256)],
                              start_tokens=128, gated=True, short_validation=True)
    return plan(4, 16, context=context, **kw)


def test_gated_stages_start_where_they_are_recorded():
    p = gated()
    assert p.stage_starts == [128] and p.short_seq_len == 16
    # 64-token steps to 128, then 128-token steps of 64: the stage stays until a start is recorded.
    assert walk(p, 6) == [0, 64, 128, 256, 384, 512]
    assert p.layout_at(10**9) == (2, 64)
    # The gates pass after the step ending at 384: the batch at 384 is already cut, so
    # the next stage starts where that step ends.
    start = p.next_position(384)
    assert start == 512
    p.record_stage_start(1, start)
    assert p.stage_starts == [128, 512]
    assert walk(p, 7) == [0, 64, 128, 256, 384, 512, 768]
    assert [p.at(x).context_stage for x in walk(p, 7)] == [-1, -1, 0, 0, 0, 1, 1]
    assert [p.at(x).step_index for x in walk(p, 7)] == list(range(7))
    p.record_stage_start(1, 512)  # recording the same start again is harmless
    with pytest.raises(ValueError, match="already starts"):
        p.record_stage_start(1, 640)


def test_gated_starts_are_recorded_in_order():
    p = gated()
    with pytest.raises(ValueError, match="before stage 0's start"):
        p.record_stage_start(1, 100)
    with pytest.raises(ValueError, match="cannot start next"):
        p.record_stage_start(2, 1000)
    with pytest.raises(ValueError, match="no context stages"):
        plan().record_stage_start(0, 0)


def test_state_round_trip_gives_identical_shapes():
    p = gated(domains=["a", "b"], mix=MixSettings([MixStage(0, {"a": 1.0}), MixStage(300, {"a": 0.5, "b": 0.5})],
                                                    anneal_weights={"b": 1.0}),
              annealing=AnnealSettings(total_tokens=2048, anneal_tokens=1024))
    p.record_stage_start(1, 512)
    saved = json.loads(json.dumps(p.state_dict()))  # survives a plain serialisation
    fresh = gated(domains=["a", "b"], mix=p.mix, annealing=p.annealing)
    assert fresh.stage_starts == [128]
    fresh.load_state_dict(saved)
    positions = walk(p, 11)
    assert positions == walk(fresh, 11) and positions[-1] < 2048
    assert [fresh.at(x) for x in positions] == [p.at(x) for x in positions]
    # Without gates the settings give the starts: a saved record is ignored.
    ungated = plan(8, 16, context=UNGATED, max_seq_len=128)
    ungated.load_state_dict({"context_starts": [500, 900]})
    assert ungated.stage_starts == [500, 1500]
    with pytest.raises(ConfigError, match="do not increase"):
        gated().load_state_dict({"context_starts": [128, 100]})
    with pytest.warns(UserWarning, match="config says 128"):
        gated().load_state_dict({"context_starts": [64, 512]})


def test_the_plan_pickles_for_loader_workers():
    p = gated()
    p.record_stage_start(1, 512)
    copy = pickle.loads(pickle.dumps(p))
    assert [copy.at(x) for x in walk(p, 8)] == [p.at(x) for x in walk(p, 8)]


# ----------------------------------------------------------------------------- mix and annealing


def test_mix_stages_then_the_annealing_mix_from_its_start():
    mix = MixSettings([MixStage(0, {"code": 1.0}), {"tokens": 100, "weights": {"math": 0.5, "prose": 0.5}}],
                      anneal_weights={"prose": 1.0})
    p = plan(4, 8, mix=mix, annealing=AnnealSettings(total_tokens=400, anneal_tokens=176),
             domains=["code", "math", "prose"])  # annealing from 224 on
    assert p.mix_at(99) == {"code": 1.0, "math": 0.0, "prose": 0.0}
    assert p.mix_at(100) == {"code": 0.0, "math": 0.5, "prose": 0.5}
    assert p.mix_at(223) == {"code": 0.0, "math": 0.5, "prose": 0.5}
    assert p.mix_at(224) == p.at(256).mix == {"code": 0.0, "math": 0.0, "prose": 1.0}
    assert plan().mix_at(0) is None and plan().at(0).mix is None  # the data's natural shares
    # Before the data is known the weights name only the domains the stages name.
    assert plan(mix=mix, annealing=AnnealSettings(400, 176)).mix_at(0) == {"code": 1.0}


def test_annealing_takes_the_lr_to_exactly_zero_from_the_main_schedule():
    # 64-token steps; annealing over the last 200 tokens of 640: from 440, inside the step at 384.
    p = plan(4, 16, annealing=AnnealSettings(total_tokens=640, anneal_tokens=200))
    starts = walk(p, 10)
    assert starts == list(range(0, 640, 64))
    first = starts.index(448)  # the first step starting at or after 440
    start_lr = SCHEDULE.lr_at(first, PEAK)
    assert p.anneal_start_lr() == start_lr
    shapes = [p.at(x) for x in starts]
    assert [s.phase for s in shapes] == [0] * first + [1] * (10 - first)
    assert [s.lr for s in shapes[:first]] == [SCHEDULE.lr_at(i, PEAK) for i in range(first)]
    assert [s.lr for s in shapes[first:]] == pytest.approx([start_lr * (640 - x) / 200 for x in starts[first:]])
    assert p.at(640).lr == 0.0 and p.at(700).lr == 0.0  # exactly zero at the end, and past it
    assert p.total_tokens == 640 and p.anneal_start == 440


def test_annealing_on_a_step_boundary_starts_at_the_schedules_lr():
    p = plan(4, 16, annealing=AnnealSettings(total_tokens=384, anneal_tokens=192))
    lrs = [p.at(x).lr for x in walk(p, 6)]
    assert lrs[:3] == [SCHEDULE.lr_at(i, PEAK) for i in range(3)]
    assert lrs[3:] == pytest.approx([lrs[3], lrs[3] * 2 / 3, lrs[3] / 3]) and lrs[3] == SCHEDULE.lr_at(3, PEAK)


def test_a_skipped_step_keeps_its_slot_on_the_one_clock():
    """The plan knows positions, not outcomes: a step the guard skips consumed its batch,
    so the step after it has the next step index (and LR), as if it had trained."""
    p = plan(4, 16, ramp=RampSettings([RampStage(0, 64, 16), RampStage(200, 128, 32)]),
             annealing=AnnealSettings(total_tokens=1024, anneal_tokens=512))
    positions = walk(p, 9)
    in_order = [p.at(x) for x in positions]
    shuffled = {x: p.at(x) for x in np.random.default_rng(0).permutation(positions).tolist()}
    assert [shuffled[x] for x in positions] == in_order  # pure: no state advanced by asking
    assert [s.step_index for s in in_order] == list(range(9))
    assert in_order[4].lr == SCHEDULE.lr_at(4, PEAK)  # whether or not step 3 was skipped


# ----------------------------------------------------------------------------- checks


def test_check_layout_names_the_offending_layout():
    p = plan(4, 16, context=ContextSettings([ContextStage(32, 100, batch_tokens=96)], start_tokens=64),
             val_batch_size=4, max_seq_len=64)
    calls = []
    p.check_layout(lambda b, s: calls.append((b, s)))
    assert calls == [(4, 16), (3, 32)]  # once per distinct layout; validation shares the data's
    with pytest.raises(ConfigError) as err:
        p.check_layout(lambda b, s: ParallelDims(dp_shard=2).check_batch(b, s, 1))
    assert str(err.value) == ("context stage 0: global_batch_size=3 is not divisible by the data-parallel size 2; "
                              "choose a global_batch_size that is a multiple of 2")
    layouts = gated().layouts()
    assert layouts == [(4, 16, "data"), (2, 64, "context stage 0"), (2, 128, "context stage 1"),
                       (4, 16, "validation"), (4, 16, "short-context validation")]


@pytest.mark.parametrize("kw, needle", [
    (dict(ramp=RampSettings([RampStage(0, 64, 16), RampStage(100, 256, 128)])),
     "ramp stage at 100 tokens uses seq_len=128, which exceeds model.arch.max_seq_len=64"),
    (dict(context=ContextSettings([ContextStage(32, 10), ContextStage(128, 10)])),
     "context stage 1 uses seq_len=128, which exceeds model.arch.max_seq_len=64"),
    (dict(seq_len=128), "data uses seq_len=128, which exceeds model.arch.max_seq_len=64"),
    (dict(context=ContextSettings([ContextStage(48, 10)])),
     "context stage 0: the batch schedule's 64 tokens per step are not a multiple of seq_len=48"),
    (dict(context=ContextSettings([ContextStage(32, 1000), ContextStage(64, 10)]),
          annealing=AnnealSettings(total_tokens=1000, anneal_tokens=500)),
     "the last context stage starts at 1,000 tokens, after annealing begins at 500"),
    (dict(mix=MixSettings([MixStage(0, {"a": 1.0})], anneal_weights={"a": 1.0})),
     "anneal_weights need the callbacks.annealing.LRAnnealing callback"),
])
def test_settings_that_cannot_run_are_refused_in_one_line(kw, needle):
    kw = {"global_batch_size": 4, "seq_len": 16, "max_seq_len": 64, **kw}
    with pytest.raises(ConfigError) as err:
        plan(**kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_build_run_plan_reads_the_callbacks_settings():
    module = SimpleNamespace(arch=ModelArgs(max_seq_len=256, rope_theta=1e4), lr_schedule=SCHEDULE,
                             optim_config=OptimizerConfig(lr=PEAK))
    data = SimpleNamespace(global_batch_size=4, seq_len=16, micro_batch_size=2, val_batch_size=2)
    callbacks = [BatchSizeRamp([RampStage(0, 64, 16), RampStage(256, 128, 32)]),
                 ContextLengthStages([ContextStage(64, 256), ContextStage(128, 512, rope_theta=1e6)],
                                     start_tokens=512, val_loss_tolerance=0.1, niah_min_accuracy=None),
                 DataMixSchedule([MixStage(0, {"a": 0.5, "b": 0.5})], anneal_weights={"b": 1.0}),
                 LRAnnealing(total_tokens=4096, anneal_tokens=1024), object()]
    p = build_run_plan(SimpleNamespace(callbacks=callbacks), module, data)
    assert (p.ramp, p.context, p.mix, p.annealing) == tuple(c.run_plan_settings for c in callbacks[:4])
    assert p.context.gated and p.stage_starts == [512] and p.short_seq_len == 32
    assert p.at(512).rope_theta == 1e4 and p.rope_at(1) == (1e6, None)
    assert p.layouts()[-2:] == [(2, 16, "validation"), (2, 32, "short-context validation")]
    assert p.mix_at(3072) == {"b": 1.0} and p.at(3072).phase == 1
    assert build_run_plan(SimpleNamespace(callbacks=[]), module, data).layouts() == [(4, 16, "data"),
                                                                                     (2, 16, "validation")]
    with pytest.raises(ConfigError, match="two callbacks .* keep one"):
        build_run_plan(SimpleNamespace(callbacks=[callbacks[0], BatchSizeRamp([RampStage(0, 64, 16)])]), module,
                       data)


def test_the_batch_layout_rule():
    assert ParallelDims(dp_shard=2).check_batch(8, 16, 2) == 2  # micro-batches per data-parallel rank
    assert ParallelDims(dp_shard=1).check_batch(3, 17, 1) == 3  # no sequence constraint without cp/tp
    with pytest.raises(ConfigError, match=r"global_batch_size=12 / dp_size=2 = 6 sequences per rank is not a "
                                          r"multiple of micro_batch_size=4"):
        ParallelDims(dp_shard=2).check_batch(12, 16, 4)
    with pytest.raises(ConfigError, match="must all be >= 1"):
        ParallelDims(dp_shard=1).check_batch(0, 16, 1)


def test_an_old_checkpoints_stage_starts_reach_the_plan():
    """Before the run plan the recorded starts lived in the ContextLengthStages state."""
    module = SimpleNamespace(arch=ModelArgs(max_seq_len=128), lr_schedule=SCHEDULE, optim_config=OptimizerConfig())
    data = SimpleNamespace(global_batch_size=4, seq_len=16, micro_batch_size=2)
    cb = ContextLengthStages([ContextStage(64, 256, batch_tokens=128), ContextStage(128, 512, batch_tokens=256)],
                             start_tokens=128, val_loss_tolerance=0.1, niah_min_accuracy=None)
    p = build_run_plan(SimpleNamespace(callbacks=[cb]), module, data)
    assert "starts" not in cb.state_dict()  # the starts are the plan's state now
    old = {"callbacks": {cb.state_key: {"starts": [128, 512], "reference": 7.0}}}
    cb.on_load_checkpoint(None, SimpleNamespace(run_plan=p), old)
    assert p.stage_starts == [128, 512] and p.layout_at(512) == (2, 128)
    newer = gated()  # a checkpoint with the plan's own record: the module loaded it, the callback keeps out
    cb.on_load_checkpoint(None, SimpleNamespace(run_plan=newer), {**old, "run_plan": {"context_starts": [128]}})
    assert newer.stage_starts == [128]


@pytest.mark.parametrize("config", ["configs/llama3_8b.yaml", "configs/llama3_70b.yaml", "configs/llama3_405b.yaml",
                                    "configs/llama3_405b_long_context.yaml"])
def test_every_layout_of_a_shipped_gpu_config_fits_its_mesh(config):
    """The GPU configs' plans (ramp, context stages, validation) against their own meshes."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule

    root = Path(__file__).resolve().parents[1]
    trainer = yaml.safe_load((root / config).read_text())["trainer"]
    world = trainer["devices"] * trainer.get("num_nodes", 1)
    # Parsed for the CPU (no GPU here); the mesh is resolved for the config's own world.
    cli = LightningCLI(LlamaLightningModule, TokenDataModule, run=False,
                       args=["--config", str(root / config), "--trainer.accelerator", "cpu",
                             "--trainer.devices", "1", "--trainer.num_nodes", "1"])
    strategy, data = cli.trainer.strategy, cli.datamodule
    dims = strategy.requested_dims.resolved(world)
    plan = build_run_plan(cli.trainer, cli.model, data)
    assert len(plan.layouts()) >= 2
    plan.check_layout(lambda batch, seq_len: dims.check_batch(batch, seq_len, data.micro_batch_size,
                                                              strategy.pp_schedule, strategy.pp_stages_per_rank))
