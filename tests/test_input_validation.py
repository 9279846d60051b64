"""Bad input refused at the boundary, before any run directory exists: config values, config files.

Also the documented behaviour of a non-finite pixel in the DFT convolution, which does not refuse it.
"""

from __future__ import annotations

import ast
import math

import pytest
import torch

from capsnet import list_models
from capsnet.cli import main
from capsnet.models.registry import _MODELS
from capsnet.train import TrainConfig, load_config
from capsnet.validation import keyword_hints

from conftest import REPO, TINY

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
    # Documented in capsnet.layers.conv.Conv2d and capsnet.layers.dft: the transform mixes
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
