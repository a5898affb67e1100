"""The main LR schedule at the paper's numbers: warm-up 8,000 steps, cosine 8e-5 -> 8e-7 over 1.2M."""

import pytest

from recipe.errors import ConfigError
from recipe.config import LRSchedule

PEAK = 8e-5


def test_paper_schedule():
    schedule = LRSchedule()  # the defaults are the 405B run's
    assert (schedule.warmup_steps, schedule.decay_steps, schedule.min_lr) == (8000, 1_200_000, 8e-7)
    assert schedule.lr_at(0, PEAK) == pytest.approx(PEAK / 8000)  # the first step already learns
    assert schedule.lr_at(3999, PEAK) == pytest.approx(PEAK / 2)
    assert schedule.lr_at(7999, PEAK) == pytest.approx(PEAK)  # linear warm-up reaches the peak...
    assert schedule.lr_at(8000, PEAK) == pytest.approx(PEAK)  # ...where the cosine starts
    assert schedule.lr_at(604_000, PEAK) == pytest.approx((PEAK + 8e-7) / 2)  # half-way down the cosine
    assert schedule.lr_at(1_200_000, PEAK) == pytest.approx(8e-7)
    assert schedule.lr_at(2_000_000, PEAK) == pytest.approx(8e-7)  # the floor holds after the decay


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="decay_steps > 0"):
        LRSchedule(decay_steps=0)
