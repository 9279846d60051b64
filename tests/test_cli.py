import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from capsnet.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
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


def test_em_smoke_with_a_decoder_writes_reconstructions_and_pose_perturbations(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "mnist_em.py:smoke"), "--out", str(out), "--data", str(tmp_path), "--no-progress",
            "--set", "max_steps=2", "--set", "model_kwargs.decoder=True", "--set", "objective_kwargs.recon_weight=0.0005"]
    assert main(args) == 0
    for name in ("reconstructions.png", "pose_perturbations.png"):
        assert (out / "figures" / name).read_bytes()[:8] == PNG, name


def test_train_resume_flag(tmp_path):
    args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(tmp_path), "--data", str(tmp_path), "--no-progress", "--set", "figures=False"]
    assert main(args + ["--set", "max_steps=3"]) == 0
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 8


def test_train_overwrite_flag_starts_the_run_again(tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(tmp_path / "run"), "--data", str(tmp_path), "--no-progress"]
    args += ["--set", "figures=False", "--set", "max_steps=2"]
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


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


def test_verbose_shows_the_traceback_of_a_refused_command(tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "mnist.py"), "--out", str(tmp_path / "r"), "--data", str(tmp_path)]
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "train-images-idx3-ubyte.gz is missing" in err


def test_train_loads_the_dataset_once_for_training_and_figures(tmp_path, monkeypatch):
    import capsnet.train.loop as loop

    calls = []
    load = loop.load_data
    monkeypatch.setattr(loop, "load_data", lambda *a, **k: calls.append(a) or load(*a, **k))
    args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(tmp_path / "run"), "--data", str(tmp_path)]
    assert main([*args, "--no-progress", "--set", "max_steps=1"]) == 0
    assert (tmp_path / "run" / "figures" / "reconstructions.png").exists() and len(calls) == 1


@pytest.mark.slow
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
@pytest.mark.slow
def test_every_smoke_variant_trains_evaluates_and_draws(config, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs" / config) + ":smoke", "--out", str(out), "--data", str(tmp_path), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] >= 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert (out / "best.pt").exists() and (out / "figures" / "training_curves.png").exists()


# --------------------------------------------------------------------------- checkpoints that hold no model


def _tiny_checkpoint(path, **change):
    """A capsnet checkpoint file of ``capsnet_tiny`` on synthetic data, without training; ``change`` edits its payload."""
    import torch
    from conftest import TINY

    from capsnet import create_model
    from capsnet.train import TrainConfig, save_checkpoint

    torch.manual_seed(0)
    payload = dict(config=TrainConfig(**TINY).to_dict(), model=create_model("capsnet_tiny").state_dict())
    payload.update(change)
    return save_checkpoint({k: v for k, v in payload.items() if v is not None}, path)


def _other_model_weights():
    from capsnet import create_model

    return create_model("capsnet_tiny", class_dim=4).state_dict()


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(config=None), "KeyError: 'config'"),
        (dict(model=None), "KeyError: 'model'"),
        (dict(config=[1, 2]), "TypeError"),
        (dict(model=_other_model_weights), "size mismatch for digits.weight"),  # weights of another model
    ],
    ids=["no_config", "no_model", "config_not_a_dict", "other_model"],
)
@pytest.mark.parametrize("command", ["eval", "viz"])
def test_checkpoint_without_a_rebuildable_model_is_a_checkpoint_error_naming_the_file(tmp_path, capsys, command, change, reason):
    change = {k: v() if callable(v) else v for k, v in change.items()}
    path = _tiny_checkpoint(tmp_path / "best.pt", **change)
    assert main([command, "--checkpoint", str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {path} holds no model capsnet can rebuild (" in err and reason in err, err
    assert "Traceback" not in err


def test_checkpoint_under_a_crafted_config_of_another_model_is_refused(tmp_path, capsys):
    from conftest import TINY

    from capsnet.train import TrainConfig

    path = _tiny_checkpoint(tmp_path / "best.pt", config=TrainConfig(**dict(TINY, model="em_tiny")).to_dict())
    assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path)]) == 2
    assert f"checkpoint {path} holds no model capsnet can rebuild (RuntimeError: Error(s) in loading state_dict for MatrixCapsNet" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval's JSON


def test_eval_writes_a_non_finite_loss_as_null_with_a_warning(tmp_path, capsys, caplog):
    import torch

    from capsnet import create_model

    weights = create_model("capsnet_tiny").state_dict()
    weights["decoder.net.0.weight"] = torch.full_like(weights["decoder.net.0.weight"], float("nan"))
    path = _tiny_checkpoint(tmp_path / "best.pt", model=weights)
    assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "e" / "r.json")]) == 0
    printed = capsys.readouterr().out

    def strict(constant):  # json.loads accepts bare NaN / Infinity unless told otherwise
        raise AssertionError(f"{constant} is not JSON")

    for text in (printed, (tmp_path / "e" / "r.json").read_text()):
        result = json.loads(text, parse_constant=strict)
        assert result["loss"] is None and result["samples"] == 16 and 0.0 <= result["accuracy"] <= 1.0
    assert "loss is nan" in caplog.text and "written as null" in caplog.text


def test_eval_of_an_empty_split_writes_null_accuracy_and_error(tmp_path, capsys, monkeypatch):
    import capsnet.train.loop as loop
    from capsnet.data.base import Split

    load = loop.load_data

    def test_split_emptied(*args, **kwargs):  # a config cannot ask for this (TrainConfig refuses test_size=0)
        data = load(*args, **kwargs)
        data.splits["test"] = Split(data.splits["test"].images[:0], data.splits["test"].labels[:0])
        return data

    monkeypatch.setattr(loop, "load_data", test_split_emptied)
    assert main(["eval", "--checkpoint", str(_tiny_checkpoint(tmp_path / "best.pt")), "--data", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 0 and result["accuracy"] is None and result["error"] is None  # was 0.0 and 1.0


@pytest.mark.parametrize("command, where", [("eval", "capsnet.train.evaluate"), ("viz", "capsnet.viz.write_figures")])
def test_ctrl_c_in_eval_or_viz_exits_130_saying_interrupted(tmp_path, capsys, monkeypatch, command, where):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, ctrl_c)
    try:
        code = main([command, "--checkpoint", str(_tiny_checkpoint(tmp_path / "best.pt")), "--data", str(tmp_path)])
    except KeyboardInterrupt:  # left uncaught, it would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped capsnet.cli.main (a traceback for the user)")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip().endswith(f"capsnet {command}: interrupted") and "Traceback" not in err, err


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("threads", ["-3", "0", "two"])
def test_threads_below_one_exit_2_with_a_message(capsys, threads):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--checkpoint", "x.pt", "--threads", threads])
    assert stop.value.code == 2
    assert f"argument --threads: must be an integer >= 1, got '{threads}'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "bogus"])
def test_a_device_this_torch_cannot_use_exits_2_before_the_run(tmp_path, capsys, device):
    import torch

    if device != "bogus" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("that device exists here")
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(out), "--data", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"error: --device {device}" in err or f"error: --device {device!r}" in err, err
    assert not out.exists()


def _read_only_dir(tmp_path):
    """A directory nobody may create files in: chmod 555, or for root (whom permissions do not stop) sysfs."""
    import os

    if os.geteuid() != 0:
        path = tmp_path / "read_only"
        path.mkdir(mode=0o555)
        return path
    if os.path.isdir("/sys/kernel"):
        return Path("/sys")  # sysfs refuses mkdir even to root (EPERM), though access() allows it
    pytest.skip("no read-only directory for root here")


@pytest.mark.parametrize("command", ["train", "eval", "viz"])
def test_out_on_a_read_only_path_exits_2_with_a_message(tmp_path, capsys, command):
    read_only = _read_only_dir(tmp_path)
    out = read_only / "capsnet-test-run"
    if command == "train":
        args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--set", "figures=False", "--set", "max_steps=1", "--no-progress"]
    else:
        args = [command, "--checkpoint", str(_tiny_checkpoint(tmp_path / "best.pt"))]
        out = read_only / "capsnet-test-result.json" if command == "eval" else out
    assert main([*args, "--out", str(out), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"capsnet {command}: error:" in err and str(read_only) in err and "Traceback" not in err, err
    assert not out.exists()


def test_out_under_a_file_exits_2_with_a_message(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert main(["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(out), "--data", str(tmp_path)]) == 2
    assert f"--out {out}: {tmp_path / 'file'} is a file" in capsys.readouterr().err


def test_version_is_the_one_pyproject_declares(capsys):
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"capsnet {declared}"


def test_version_is_0_unknown_when_the_package_is_not_installed(monkeypatch):
    import importlib
    import importlib.metadata

    import capsnet

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    try:
        with monkeypatch.context() as m:
            m.setattr(importlib.metadata, "version", not_installed)
            assert importlib.reload(capsnet).__version__ == "0+unknown"  # was a second copy of pyproject's version
    finally:
        importlib.reload(capsnet)
    assert capsnet.__version__ == importlib.metadata.version("capsnet")


@pytest.mark.parametrize("command", ["eval", "viz"])
def test_checkpoint_option_has_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert re.search(r"--checkpoint CHECKPOINT\s+checkpoint written by capsnet train", capsys.readouterr().out)
