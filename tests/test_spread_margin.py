"""Spread-loss margin schedules (Hinton, Sabour & Frosst 2018, Sec. 4; Google's released code)."""

from __future__ import annotations

import math

import pytest

from capsnet.train.schedules import spread_margin


def test_linear_margin_runs_from_start_to_end_and_holds():
    assert spread_margin(0) == pytest.approx(0.2)
    assert spread_margin(500, steps=1000) == pytest.approx(0.55)
    assert spread_margin(1000, steps=1000) == pytest.approx(0.9)
    assert spread_margin(10**7, steps=1000) == pytest.approx(0.9)


def test_linear_margin_is_monotone():
    values = [spread_margin(s, steps=100) for s in range(0, 150, 7)]
    assert values == sorted(values)


def test_sigmoid_margin_matches_google_formula():
    def google(step):
        return 0.2 + 0.79 / (1.0 + math.exp(-min(10.0, step / 50000 - 4)))

    for step in (0, 50_000, 200_000, 700_000, 2_000_000):
        assert spread_margin(step, schedule="sigmoid", end=0.99) == pytest.approx(google(step))
    assert spread_margin(0, schedule="sigmoid", end=0.99) == pytest.approx(0.2142, abs=1e-4)
    assert spread_margin(200_000, schedule="sigmoid", end=0.99) == pytest.approx(0.595, abs=1e-3)
    assert spread_margin(700_000, schedule="sigmoid", end=0.99) == pytest.approx(0.99, abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=-1), "step"),
        (dict(step=0, steps=0), "steps"),
        (dict(step=0, start=0.9, end=0.2), "margins"),
        (dict(step=0, schedule="cosine"), "schedule"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=message):
        spread_margin(step, **kwargs)
