"""Bad input refused at the boundary, before any run directory exists: config values, config files.

Also checkpoints that hold no model capsnet can rebuild, splits of 0 samples that get past
the config (defence in depth), and the documented behaviour of a non-finite pixel in the
DFT convolution, which does not refuse it.
"""

from __future__ import annotations

import ast
import logging
import math

import pytest
import torch
from conftest import REPO, TINY

import capsnet.train.loop as loop
from capsnet import create_model, list_models
from capsnet.cli import main
from capsnet.data.base import Split
from capsnet.models.registry import _MODELS
from capsnet.train import (
    CheckpointError,
    TrainConfig,
    create_objective,
    evaluate,
    load_checkpoint,
    load_config,
    load_model,
    save_checkpoint,
    train,
)
from capsnet.validation import keyword_hints

SMOKE = str(REPO / "configs" / "mnist.py:smoke")


def _train(tmp_path, *overrides: str) -> int:
    sets = [a for o in ("figures=False", "max_steps=1", *overrides) for a in ("--set", o)]
    return main(["train", "--config", SMOKE, "--out", str(tmp_path / "run"), "--data", str(tmp_path), "--no-progress", *sets])


# --------------------------------------------------------------------------- model and objective keywords


@pytest.mark.parametrize(
    "override, key",
    [
        ("model_kwargs.routing_iterations=1.5", "model_kwargs.routing_iterations"),  # crashed at step 1
        ("model_kwargs.routing_iterations=True", "model_kwargs.routing_iterations"),  # trained with 1 iteration
        ("model_kwargs.conv_channels=16.5", "model_kwargs.conv_channels"),  # a message about groups
        ("model_kwargs.decoder_hidden=(32, 'a')", "model_kwargs.decoder_hidden"),
        ("objective_kwargs.recon_weight=-1", "objective_kwargs.recon_weight"),  # trained to enlarge the error
        ("objective_kwargs.recon_weight='nan'", "objective_kwargs.recon_weight"),  # TypeError mid-run
        ("objective_kwargs.recon_weight=1e999", "objective_kwargs.recon_weight"),
        ("objective_kwargs.m_pos=1.5", "objective_kwargs.m_pos"),
    ],
)
def test_model_and_objective_kwargs_of_a_wrong_type_or_range_are_refused_before_the_run(tmp_path, capsys, override, key):
    assert _train(tmp_path, override) == 2
    err = capsys.readouterr().err
    shown = repr(ast.literal_eval(override.partition("=")[2]))  # as --set parses it: 1e999 is inf
    assert f"config key '{key}' must be" in err and f"got {shown}" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", list_models())
def test_every_int_and_float_keyword_of_every_model_is_type_checked(model):
    # The check reads each builder's annotations (through **overrides to the class), so a new
    # model or keyword is covered without a table to update.
    hints = keyword_hints(_MODELS[model])
    assert hints, f"no keywords found for {model}"
    bad = {int: [2.5, True], float: [math.nan, math.inf, "0.1"], bool: [1, "yes"]}
    for key, hint in hints.items():
        for value in bad.get(hint, []):
            with pytest.raises(ValueError, match=rf"config key 'model_kwargs\.{key}' must be .*got {value!r}"):
                TrainConfig(model=model, model_kwargs={key: value})


def test_valid_keyword_values_still_pass():
    TrainConfig(model="capsnet_tiny", model_kwargs=dict(routing_iterations=1, decoder_hidden=[8, 8], leaky_routing=True))
    TrainConfig(model="em_tiny", model_kwargs=dict(schedule=[0.01, 0.01], final_lambda=None), objective="spread", objective_kwargs=dict(steps=10, start=0.2, end=0.9))
    TrainConfig(objective_kwargs=dict(recon_weight=0, m_pos=0.9, lam=0.5))  # an int where a float is annotated
    TrainConfig(model="cnn_mnist", model_kwargs=dict(channels=(4, 4, 4), pool=(True, False, False), dropout=0.0), objective="cross_entropy")


def test_spread_objective_keywords_are_those_of_its_margin_schedule():
    with pytest.raises(ValueError, match=r"'objective_kwargs\.steps' must be an int >= 1 .*got 2\.5"):
        TrainConfig(model="em_tiny", objective="spread", objective_kwargs=dict(steps=2.5))
    with pytest.raises(ValueError, match=r"'objective_kwargs\.start' must be a finite number >= 0 .*got -0\.1"):
        TrainConfig(model="em_tiny", objective="spread", objective_kwargs=dict(start=-0.1))


# --------------------------------------------------------------------------- empty splits


@pytest.mark.parametrize(
    "override, why",
    [
        ("dataset_kwargs.val_size=0", "needs a validation split"),  # best.pt froze at the first check
        ("dataset_kwargs.test_size=0", "accuracy of no samples"),  # "accuracy 0.0 on 0 samples"
        ("dataset_kwargs.limit_eval=0", "both need samples"),
        ("dataset_kwargs.limit_eval=-1", "both need samples"),  # sliced the last sample off, silently
    ],
)
def test_empty_validation_or_test_split_is_refused_before_the_run(tmp_path, capsys, override, why):
    assert _train(tmp_path, override) == 2
    err = capsys.readouterr().err
    key, _, value = override.partition("=")
    assert f"config key '{key}' must be an int >= 1 (or left out), got {value}" in err and why in err, err
    assert not (tmp_path / "run").exists()


def test_eval_refuses_an_empty_split_by_config_too():
    with pytest.raises(ValueError, match="test_size"):
        TrainConfig.from_dict(dict(TINY, dataset_kwargs=dict(TINY["dataset_kwargs"], test_size=0)))


def _emptied(monkeypatch, split):
    """``load_data``, as train() and the CLI call it, with ``split`` cut to 0 samples: data a config cannot ask for."""
    load = loop.load_data

    def emptied(*args, **kwargs):
        data = load(*args, **kwargs)
        whole = data.splits[split]
        data.splits[split] = Split(whole.images[:0], whole.labels[:0])
        return data

    monkeypatch.setattr(loop, "load_data", emptied)


def test_evaluate_of_an_empty_split_reports_no_accuracy_or_loss(monkeypatch, tmp_path, caplog):
    _emptied(monkeypatch, "test")
    cfg = TrainConfig(**TINY)
    data = loop.load_data(cfg, tmp_path, False)
    with caplog.at_level(logging.WARNING, logger="capsnet"):
        result = evaluate(create_model("capsnet_tiny"), data, "test", create_objective(cfg.objective, **cfg.objective_kwargs))
    assert result == {"accuracy": None, "loss": None, "samples": 0}  # was accuracy 0.0 on 0 samples
    assert "the test split has 0 samples" in caplog.text


def test_training_with_an_empty_validation_split_keeps_the_last_step_as_best(monkeypatch, tmp_path):
    _emptied(monkeypatch, "val")
    summary = train(TrainConfig(**TINY), data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    assert summary["best_step"] == summary["steps"] == 9  # was frozen at the first validation (step 3)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 9 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_training_with_an_empty_test_split_reports_no_test_accuracy(monkeypatch, tmp_path):
    _emptied(monkeypatch, "test")
    summary = train(TrainConfig(**TINY), data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    assert summary["test_accuracy"] is None and summary["test_error"] is None and summary["test_samples"] == 0


# --------------------------------------------------------------------------- checkpoints that hold no model


def _tiny_checkpoint(path, **change):
    """A capsnet checkpoint of an untrained ``capsnet_tiny``; ``change`` edits its payload (None drops a key)."""
    payload = dict(config=TrainConfig(**TINY).to_dict(), model=create_model("capsnet_tiny").state_dict())
    payload.update(change)
    return save_checkpoint({k: v for k, v in payload.items() if v is not None}, path)


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(config=None), "KeyError: 'config'"),
        (dict(model=None), "KeyError: 'model'"),
        (dict(config=[1, 2]), "TypeError"),
        (dict(model=[1, 2]), "TypeError"),
        (dict(config=dict(TrainConfig(**TINY).to_dict(), model="capsnet_nope")), "ValueError: unknown model 'capsnet_nope'"),
        (dict(model=lambda: create_model("capsnet_tiny", class_dim=4).state_dict()), "size mismatch for digits.weight"),
        (dict(config=lambda: TrainConfig(**dict(TINY, model="em_tiny")).to_dict()), "Error(s) in loading state_dict for MatrixCapsNet"),
    ],
    ids=["no_config", "no_model", "config_not_a_dict", "model_not_a_dict", "unknown_model", "other_weights", "crafted_config"],
)
def test_load_model_of_a_checkpoint_without_a_rebuildable_model_raises_checkpoint_error(tmp_path, change, reason):
    path = _tiny_checkpoint(tmp_path / "best.pt", **{k: v() if callable(v) else v for k, v in change.items()})
    with pytest.raises(CheckpointError) as refused:  # was KeyError, TypeError, ValueError or RuntimeError
        load_model(path)
    assert f"checkpoint {path} holds no model capsnet can rebuild (" in str(refused.value) and reason in str(refused.value)


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("syntax.py", "def get_config(variant)\n    return {}\n", "is not valid Python: expected ':' (line 1)"),
        ("none.py", "def get_config(variant):\n    pass\n", "get_config('default') returned NoneType, expected a dict"),
        ("list.py", "def get_config(variant):\n    return [1]\n", "get_config('default') returned list, expected a dict"),
        ("not_callable.py", "get_config = {}\n", "defines no get_config(variant) function"),
        ("config.txt", "def get_config(variant):\n    return {}\n", "is not a .py file"),
        ("config", "def get_config(variant):\n    return {}\n", "is not a .py file"),
    ],
)
def test_bad_config_file_exits_2_naming_the_file_and_the_reason(tmp_path, capsys, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}" in err and reason in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_config_file_errors_of_the_python_api_are_value_errors(tmp_path):
    path = tmp_path / "none.py"
    path.write_text("def get_config(variant):\n    return None\n")
    with pytest.raises(ValueError, match="returned NoneType"):
        load_config(str(path))


# --------------------------------------------------------------------------- non-finite pixels in the convolutions


def test_dft_convolution_spreads_a_non_finite_pixel_over_its_image_direct_keeps_it_local():
    # Documented in capsnet.ops.conv.Conv2d and capsnet.ops.dft: the transform mixes
    # every pixel into every frequency, so one NaN / inf pixel makes that image's whole
    # output NaN; the direct convolution spoils only the outputs whose window holds it.
    # Other images of the batch stay finite either way. The CLI and the models refuse
    # non-finite images before any convolution.
    from capsnet.layers import Conv2d

    torch.manual_seed(0)
    x = torch.randn(3, 4, 12, 12)
    x[1, 2, 6, 6] = math.inf
    outputs = {}
    for algorithm in ("dft", "direct"):
        conv = Conv2d(4, 5, 3, algorithm=algorithm)
        torch.manual_seed(1)
        conv.reset_parameters()
        outputs[algorithm] = conv(x).detach()
    for out in outputs.values():
        assert torch.isfinite(out[[0, 2]]).all(), "another image of the batch was touched"
    assert not torch.isfinite(outputs["dft"][1]).any(), "DFT: every output of that image is non-finite"
    spoiled = ~torch.isfinite(outputs["direct"][1])
    assert spoiled.sum() == 5 * 3 * 3, "direct: the 3x3 windows that hold the pixel, in each of 5 channels"
    assert spoiled[:, 4:7, 4:7].all()
