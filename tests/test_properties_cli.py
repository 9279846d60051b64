"""Property-based tests (hypothesis) of the command line's config checks at its edges; the contract and the shared
cases are in ``tests/property_cases.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import typing
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from property_cases import (
    FAST,
    _finite,
)

from capsnet.cli import main
from capsnet.train import TrainConfig, load_checkpoint

# Tiny tensors: one intra-op thread is ~50x faster than two on cores shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- CLI: the config is checked before training

SMOKE = str(REPO / "configs" / "mnist.py:smoke")
KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def _train_cli(*overrides: str) -> tuple[int, str, bool]:
    """``capsnet train`` on the smoke config, in-process: (exit code, stderr, whether the run directory exists)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        err = io.StringIO()
        args = ["train", "--config", SMOKE, "--out", str(out), "--data", tmp, "--no-progress", "--set", "figures=False"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args + [a for o in overrides for a in ("--set", o)])
        return code, err.getvalue(), out.exists()


def _refusal_problem(key: str, *overrides: str) -> str | None:
    """None when ``capsnet train`` exits 2 naming ``key`` and leaves no run directory; else what it did."""
    try:
        code, err, created = _train_cli(*overrides)
    except Exception as exc:  # noqa: BLE001 -- an exception escaping main() is the finding
        return f"{overrides}: {type(exc).__name__} escaped main(): {str(exc).splitlines()[0][:120]}"
    if code != 2:
        return f"{overrides}: exit code {code}, stderr {err[-300:]!r}"
    if f"'{key}'" not in err:
        return f"{overrides}: the message does not name {key!r}: {err.strip().splitlines()[-1][:200]!r}"
    if created:
        return f"{overrides}: refused, but only after creating the run directory"
    return None


@settings(FAST, max_examples=5)
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(lambda k: k not in KEYS))
def test_cli_refuses_an_unknown_config_key_by_name(key):
    assert _refusal_problem(key, f"{key}=1") is None


def _bad_literals(hint) -> list[str]:
    optional = typing.get_origin(hint) is typing.Union
    base = next(h for h in typing.get_args(hint) if h is not type(None)) if optional else hint
    bad = {
        int: ["'abc'", "1.5", "True", "[1]", "{}"],
        float: ["'fast'", "True", "[0.1]", "{}"],
        bool: ["1", "'yes'", "0.0", "[]"],
        str: ["3", "[1]", "{}", "1.5"],
        dict: ["3", "'x'", "[1]", "True"],
    }[typing.get_origin(base) or base]
    return bad if optional else [*bad, "None"]


@FAST
@given(data=st.data())
def test_cli_refuses_a_value_of_the_wrong_type_by_name(data):
    key = data.draw(st.sampled_from(sorted(KEYS)))
    text = data.draw(st.sampled_from(_bad_literals(HINTS[key])))
    assert _refusal_problem(key, f"{key}={text}") is None


_POSITIVE_INTS = [
    "batch_size", "eval_batch_size", "lr_decay_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "max_steps",
    "eval_every",
]


@st.composite
def _impossible_values(draw):
    negative = st.floats(min_value=-1e300, max_value=-1e-300)  # no subnormals: they may print as -0.0
    non_positive = st.one_of(st.just(0.0), negative)
    kind = draw(st.sampled_from(["int", "lr", "decay", "non-negative", "budget", "beta", "clip"]))
    if kind == "beta":  # Adam's decay rates lie in [0, 1)
        return draw(st.sampled_from(["adam_beta1", "adam_beta2"])), repr(draw(st.one_of(negative, st.floats(min_value=1.0, max_value=1e300))))
    if kind == "clip":
        return "grad_clip", repr(draw(non_positive))
    if kind == "int":
        return draw(st.sampled_from(_POSITIVE_INTS)), repr(draw(st.integers(-10**6, 0)))
    if kind == "lr":
        return "lr", repr(draw(non_positive))
    if kind == "decay":
        return "lr_decay_rate", repr(draw(st.one_of(non_positive, st.floats(min_value=1.0 + 1e-9, max_value=1e300))))
    if kind == "non-negative":
        return draw(st.sampled_from(["lr_min", "weight_decay"])), repr(draw(negative))
    return "time_budget_s", repr(draw(non_positive))


@FAST
@given(key_value=_impossible_values())
def test_cli_refuses_an_impossible_value_by_name(key_value):
    key, text = key_value
    assert _refusal_problem(key, f"{key}={text}") is None


def test_cli_refuses_an_infinite_learning_rate_or_weight_decay_by_name():
    problems = [p for key in ("lr", "lr_min", "weight_decay") if (p := _refusal_problem(key, f"{key}=1e999", "max_steps=1"))]
    assert not problems, "\n".join(problems)


def test_cli_refuses_bad_names_and_kwargs_before_creating_the_run():
    cases = [
        ("capsnet_nope", "model=capsnet_nope"),
        ("nope", "dataset=nope"),
        ("nope", "objective=nope"),
        ("routing_iterationz", "model_kwargs.routing_iterationz=3"),
        ("routing_iterations", "model_kwargs.routing_iterations=0"),
        ("nope", "dataset_kwargs.nope=1"),
        ("train_size", "dataset_kwargs.train_size=-1"),
        ("nope", "objective_kwargs.nope=1"),
        ("seed", "seed=99999999999999999999"),
    ]
    problems = [p for key, override in cases if (p := _refusal_problem(key, override, "max_steps=1"))]
    assert not problems, "\n".join(problems)


def test_cli_stops_a_diverging_run_with_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        err = io.StringIO()
        args = ["train", "--config", SMOKE, "--out", str(out), "--data", tmp, "--no-progress"]
        sets = ["figures=False", "lr=1e30", "max_steps=3", "checkpoint_every=1"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args + [a for s in sets for a in ("--set", s)])
        if (out / "last.pt").exists():
            weights = load_checkpoint(out / "last.pt")["model"]
            assert all(_finite(w) for w in weights.values()), "a checkpoint holds non-finite weights"
        assert code == 2 and "step" in err.getvalue()
