import json
import re
import subprocess
import sys

import pytest

from capsnet.cli import main

from conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def test_train_eval_viz_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(out), "--data", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 8 and 0.0 <= summary["test_accuracy"] <= 1.0
    for name in ("reconstructions.png", "pose_perturbations.png", "routing.png", "training_curves.png"):
        assert (out / "figures" / name).read_bytes()[:8] == PNG, name
    assert "metrics.json" in capsys.readouterr().out

    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["samples"] == 32 and result["accuracy"] == pytest.approx(summary["test_accuracy"])

    assert main(["viz", "--checkpoint", str(out / "best.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "pose_perturbations.png").exists()


def test_train_resume_flag(tmp_path):
    args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(tmp_path), "--data", str(tmp_path), "--no-progress", "--set", "figures=False"]
    assert main(args + ["--set", "max_steps=3"]) == 0
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 8


def test_eval_on_other_data_overrides_only_data_keys(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(out), "--data", str(tmp_path), "--no-progress"]
    assert main(["train", *args, "--set", "max_steps=2", "--set", "figures=False"]) == 0
    ckpt = ["--checkpoint", str(out / "best.pt"), "--data", str(tmp_path)]
    assert main(["eval", *ckpt, "--set", "dataset_kwargs.test_size=12", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["samples"] == 12
    capsys.readouterr()
    assert main(["eval", *ckpt, "--set", "model=capsnet_mnist"]) == 2
    assert "may only override dataset" in capsys.readouterr().err
    assert main(["eval", *ckpt, "--set", "dataset_kwargs.no_such_key=1"]) == 2
    assert "bad dataset_kwargs" in capsys.readouterr().err
    assert main(["eval", *ckpt, "--set", "dataset_kwargs.image_size=32"]) == 2
    assert "expects 1x28x28 images but dataset 'synthetic' gives 1x32x32" in capsys.readouterr().err


def test_bad_config_key_fails_before_training(tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(tmp_path / "x"), "--set", "learning_rate=0.1"])
    assert code == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs" / "mnist.py"), "--out", str(tmp_path / "r"), "--data", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz is missing" in err and "CAPSNET_DATA" in err


def test_module_entry_point_lists_models():
    result = subprocess.run([sys.executable, "-m", "capsnet", "models"], capture_output=True, text=True, check=True)
    assert "capsnet_mnist" in result.stdout.split()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_config_has_a_command_and_a_smoke_variant(config):
    from capsnet.train import load_config

    text = (REPO / "configs" / config).read_text()
    assert "capsnet train --config configs/" + config in text, "docstring holds the command"
    load_config(str(REPO / "configs" / config))
    load_config(str(REPO / "configs" / config) + ":smoke")
    for variant in set(re.findall(r"configs/" + re.escape(config) + r":(\w+)", text)):  # every documented variant
        load_config(str(REPO / "configs" / config) + ":" + variant)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_smoke_variant_trains_evaluates_and_draws(config, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs" / config) + ":smoke", "--out", str(out), "--data", str(tmp_path), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] >= 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert (out / "best.pt").exists() and (out / "figures" / "training_curves.png").exists()
