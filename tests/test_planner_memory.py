"""The planner's memory estimate against the measured peak of real CPU training steps.

One process and one 2-rank world (gloo) train a small fp32 Llama under each layout -
FSDP (also with bf16 compute), TP, CP, and PP with 1F1B and GPipe - with the recipe's
own Trainer path, on rows of one document and on packed rows of three (segmented
attention, and the dense-mask reference in one process); the second step is measured
with ``recipe.memory.LiveTensorMemory`` (live tensor bytes, the CPU's
``max_memory_allocated``). On every rank the planner's estimate for that rank must be
within 10% of its measured peak. The model is chosen so that parameter state and
activations are both a sizeable part of every peak: a planner that miscounts either one
fails.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from memory_runs import ARGS, SINGLE, TWO_RANKS, measure_in_world
from recipe.memory import LiveTensorMemory, measure

TOLERANCE = 0.10
CASES = {**SINGLE, **TWO_RANKS}


@pytest.fixture(scope="module")
def measured() -> dict[str, list[dict]]:
    # The one-rank world starts while the 2-rank world starts up and runs: start-up is
    # mostly one core's import work, so the two overlap well.
    with ThreadPoolExecutor(1) as pool:
        single = pool.submit(measure_in_world, {n: (ARGS, c) for n, c in SINGLE.items()}, 1)
        two = measure_in_world({n: (ARGS, c) for n, c in TWO_RANKS.items()}, 2)
        return {**single.result(), **two}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_is_within_10_percent_of_the_measured_peak(measured, name):
    case = CASES[name]
    assert len(measured[name]) == case.world
    for rank, result in enumerate(measured[name]):
        peak = result["peak"]["cpu"]
        est = case.estimate(ARGS, rank).memory_total
        assert abs(est / peak - 1) <= TOLERANCE, (
            f"{name} rank {rank}: estimated {est / 2**20:.2f} MiB, measured {peak / 2**20:.2f} MiB "
            f"(at {result['peak_op']['cpu']}; by phase {result['at_peak']['cpu']})")


@pytest.mark.parametrize("name", list(CASES))
def test_the_peaks_hold_both_state_and_activations(measured, name):
    # The step starts with parameters and AdamW state only; the forward's saved tensors make
    # up a good part of the peak too. Either share under 15% would let a wrong term hide.
    for result in measured[name]:
        peak, parts = result["peak"]["cpu"], result["at_peak"]["cpu"]
        assert parts["state"] >= 0.15 * peak and parts["forward"] >= 0.15 * peak, (name, parts, peak)


def test_tracker_counts_live_storages_once():
    gc.collect()
    with LiveTensorMemory() as tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        view = a[10:]  # the same storage: no new bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        assert tracker.current["cpu"] - tracker.result.start["cpu"] == 8000
        del a, view, b
        c = torch.empty(250, dtype=torch.float32)  # freed storages no longer count
        assert tracker.current["cpu"] - tracker.result.start["cpu"] == 1000
        storage = c.untyped_storage()
        storage.resize_(0)  # FSDP frees its unsharded parameters this way
        storage.resize_(3000)
        assert tracker.current["cpu"] - tracker.result.start["cpu"] == 3000
        del c, storage
    assert tracker.result.peak["cpu"] - tracker.result.start["cpu"] == 8000


def test_tracker_sees_what_autograd_saves_and_frees():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB, alive before: "state"

    def step() -> None:
        y = (x * 2).sin()  # the product is saved for sin's backward: one more 256 KiB
        y.sum().backward()

    _, result = measure(step)
    # Peak: x, the saved product, sin's output and, in the backward, x's gradient and the
    # cos(product) * grad temporaries; every one of them 256 KiB.
    assert result.at_peak["cpu"]["state"] >= 256 * 1024
    assert 0 <= result.at_peak["cpu"]["forward"] - 2 * 256 * 1024 < 64  # x * 2, sin(x * 2) and scalars
    assert result.peak["cpu"] - result.start["cpu"] >= 4 * 256 * 1024
    assert result.phase_peaks["cpu"]["backward"] == result.peak["cpu"]


def test_gradients_are_not_activations():
    x = torch.randn(256, 256, requires_grad=True)
    # The gradient of a sum is an expanded scalar: autograd stores a 256 KiB copy as x.grad.
    _, result = measure(lambda: x.sum().backward(), params=[x])
    assert result.at_peak["cpu"]["gradient"] == 256 * 1024
    assert result.activations["cpu"] < 1024
