"""Mixed precision (``torch.autocast``): routing stays float32, training runs and resumes.

Run on CPU autocast here (bfloat16 and float16); ``tests/test_cuda.py`` repeats the
training step on a GPU when one is present. On a CPU without bf16 units bfloat16 is
emulated (correct, slow), so the tensors stay tiny. No timings are asserted.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY

import capsnet.precision
from capsnet import dynamic_routing
from capsnet.cli import main
from capsnet.layers import Conv2d, DenseCaps
from capsnet.layers.matrix import ConvMatCaps, PrimaryMatCaps
from capsnet.models import create_model
from capsnet.ops.conv import _input_grad_phases
from capsnet.train import TrainConfig, train
from capsnet.train.checkpoint import load_checkpoint

LOW = [torch.bfloat16, torch.float16]
#: The detector itself: conftest replaces it in every test (``auto`` is float32 in tests).
REAL_DETECTOR = capsnet.precision.cpu_bf16_units


@pytest.mark.parametrize("dtype", LOW)
def test_dense_caps_routes_in_float32_under_autocast(dtype):
    """Same float32 input: the layer's result under autocast is its float32 result, bit for bit."""
    layer = DenseCaps(12, 4, 3, 5)
    u = torch.randn(2, 12, 4)
    expected = layer(u)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(u)
        low = layer(u.to(dtype))  # a half-precision input (a layer below under autocast) is widened
    assert got.poses.dtype == got.coupling.dtype == low.poses.dtype == torch.float32
    assert torch.equal(got.poses, expected.poses) and torch.equal(got.coupling, expected.coupling)
    torch.testing.assert_close(low.poses, layer(u.to(dtype).float()).poses, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_dynamic_routing_function_under_autocast(dtype):
    votes = torch.randn(2, 6, 3, 4)
    with torch.autocast("cpu", dtype=dtype):
        got = dynamic_routing(votes.to(dtype))
    assert got.poses.dtype == torch.float32
    torch.testing.assert_close(got.poses, dynamic_routing(votes.to(dtype).float()).poses, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_matrix_capsules_route_in_float32_under_autocast(dtype):
    primary, caps = PrimaryMatCaps(8, 4), ConvMatCaps(4, 3, kernel_size=3, stride=1)
    x = torch.randn(2, 8, 5, 5)
    inputs = primary(x)
    expected = caps(inputs.poses, inputs.activations)
    with torch.autocast("cpu", dtype=dtype):
        got = caps(inputs.poses, inputs.activations)
        low = caps(inputs.poses.to(dtype), inputs.activations.to(dtype))
    assert got.poses.dtype == got.activations.dtype == low.poses.dtype == torch.float32
    assert torch.equal(got.poses, expected.poses) and torch.equal(got.activations, expected.activations)
    assert torch.isfinite(low.poses).all() and torch.isfinite(low.activations).all()


def test_whole_models_give_float32_outputs_and_finite_gradients_under_bf16():
    for name, kwargs in (("capsnet_tiny", {}), ("em_tiny", {})):
        model = create_model(name, **kwargs)
        size = model.image_size
        x = torch.rand(3, model.in_channels, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.tensor([0, 1, 2]))
        head = out.lengths if name == "capsnet_tiny" else out.activations
        assert head.dtype == torch.float32, name
        head.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_resumes_bit_identically(tmp_path, amp):
    """With amp (and fp16's loss scaler) a resumed run equals the straight one."""
    straight = TrainConfig(**TINY, amp=amp, max_steps=6)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    train(TrainConfig(**TINY, amp=amp, max_steps=3), data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, b["model"][name]), name
    if amp == "fp16":
        assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
    else:
        assert a["scaler"] == {}, "no loss scaling for bfloat16"


def test_amp_config_is_checked():
    with pytest.raises(ValueError, match="'amp' must be one of"):
        TrainConfig(amp="fp32")
    assert TrainConfig().amp == "auto"


# --------------------------------------------------------------------------- amp="auto"


@pytest.mark.parametrize(
    "unit, device, expected",
    [("amx_bf16", "cpu", "bf16"), ("avx512_bf16", "cpu", None), (None, "cpu", None), ("amx_bf16", "cuda", None), ("amx_bf16", "meta", None)],
)
def test_auto_is_bf16_only_on_cpus_with_amx(monkeypatch, unit, device, expected):
    monkeypatch.setattr(capsnet.precision, "cpu_bf16_units", lambda: unit)
    assert capsnet.precision.resolve_amp("auto", device) == expected
    for fixed in (None, "bf16", "fp16"):  # explicit values are kept on any machine
        assert capsnet.precision.resolve_amp(fixed, device) == fixed


def test_cpu_bf16_units_reads_the_cpu_flags(monkeypatch):
    assert REAL_DETECTOR() in (None, "amx_bf16", "avx512_bf16")
    for flags, unit in (({"amx_bf16": True, "avx512_bf16": True}, "amx_bf16"), ({"avx512_bf16": True}, "avx512_bf16"), ({"avx2": True}, None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags)
        assert REAL_DETECTOR() == unit, flags


@pytest.mark.parametrize("unit, precision", [("amx_bf16", "bf16"), (None, "fp32")])
def test_auto_training_runs_in_the_detected_precision(tmp_path, monkeypatch, unit, precision):
    """Both branches of the detection, forced: the run, its summary and its checkpoint's numerics say which."""
    monkeypatch.setattr(capsnet.precision, "cpu_bf16_units", lambda: unit)
    seen = []
    autocast = torch.autocast

    def spy(device_type, *args, **kwargs):
        if kwargs.get("enabled", True):  # the layers' own autocast(enabled=False) regions aside
            seen.append(kwargs.get("dtype"))
        return autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    summary = train(TrainConfig(**TINY, max_steps=2), data_root=tmp_path, out_dir=tmp_path, progress=False)
    assert summary["precision"] == precision
    assert load_checkpoint(tmp_path / "last.pt")["numerics"]["amp"] == precision
    # Two training steps, then validation and the test (one batch each) under the same autocast.
    assert seen == ([torch.bfloat16] * 4 if unit else []), seen


def test_resume_under_another_precision_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(capsnet.precision, "cpu_bf16_units", lambda: "amx_bf16")
    train(TrainConfig(**TINY, max_steps=2), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    monkeypatch.setattr(capsnet.precision, "cpu_bf16_units", lambda: None)
    with caplog.at_level("WARNING", logger="capsnet"):
        train(TrainConfig(**TINY, max_steps=4), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False, resume=True)
    assert any("amp bf16 -> fp32" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- CPU bf16 training and inference


def test_cli_trains_in_bf16_and_learns(tmp_path):
    """``--set amp=bf16`` on the smoke config's synthetic task: training runs and learns (chance is 1/10)."""
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "mnist.py:smoke"), "--out", str(out), "--data", str(tmp_path), "--no-progress"]
    args += ["--set", "amp=bf16", "--set", "figures=False", "--set", "epochs=8", "--set", "lr=0.003"]
    args += ["--set", "dataset_kwargs.train_size=96", "--set", "dataset_kwargs.val_size=64", "--set", "dataset_kwargs.test_size=64"]
    assert main(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["precision"] == "bf16"
    assert summary["best_val_accuracy"] > 0.8 and summary["test_accuracy"] > 0.8  # as float32 in tests/test_train.py


def test_bf16_training_keeps_float32_weights_and_optimizer_state(tmp_path):
    train(TrainConfig(**TINY, amp="bf16", max_steps=3), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    state = [t for s in ckpt["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    assert state and all(t.dtype == torch.float32 for t in state)


def test_capsnet_routes_and_reports_float32_under_bf16():
    """Under autocast the convolutions and the decoder run in bf16; routing, lengths and the losses' inputs stay float32."""
    model = create_model("capsnet_tiny")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert out.primary.dtype == torch.bfloat16, "PrimaryCaps convolved in bf16"
    assert out.poses.dtype == out.lengths.dtype == out.coupling.dtype == torch.float32


def test_bf16_inference_is_close_to_float32():
    """Class-capsule lengths in bf16 within 0.02 of float32's (bf16 keeps 8 significant bits, ~0.4% per rounding)."""
    model = create_model("capsnet_tiny", routing_iterations=3).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).lengths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).lengths
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02)


@pytest.mark.parametrize("algorithm", ["auto", "direct", "dft"])
@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 0), (2, 1)])
def test_conv2d_under_bf16_autocast_matches_nn_conv2d(algorithm, stride, padding):
    """Values and gradients of the fast Conv2d under bf16 autocast against autocast's own nn.Conv2d, to bf16's rounding."""
    conv = Conv2d(6, 5, 5, stride=stride, padding=padding, algorithm=algorithm)
    ref = torch.nn.Conv2d(6, 5, 5, stride=stride, padding=padding)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(3, 6, 11, 11, requires_grad=True)
    results = []
    for layer in (conv, ref):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        results.append((y.float(), x.grad, layer.weight.grad, layer.bias.grad))
    assert results[0][0].dtype == torch.float32
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("batch, dft", [(32, False), (48, False), (64, True), (128, True)])
def test_primary_caps_under_bf16_takes_the_dft_only_where_it_is_measured_faster(batch, dft):
    """The choice alone (shapes only): under bf16 autocast the DFT from batch 64, in float32 from batch 25."""
    conv = Conv2d(256, 256, 9, stride=2)
    x = torch.empty(batch, 256, 20, 20, device="meta")
    assert conv._use_dft(x, autocast=True) == dft
    assert conv._use_dft(x) and conv._use_dft(x.to(torch.bfloat16), autocast=True) == dft
    assert not conv._use_dft(x.to(torch.bfloat16)), "bf16 tensors without autocast keep the direct algorithm"


def test_conv2d_under_bf16_autocast_leaves_float64_and_float16_autocast_to_nn_conv2d():
    conv = Conv2d(3, 4, 5, stride=2).double()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.float64  # autocast does not cast float64; neither does the layer
    conv, ref = conv.float(), torch.nn.Conv2d(3, 4, 5, stride=2)
    ref.load_state_dict(conv.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):  # float16 autocast: exactly nn.Conv2d's
        assert torch.equal(conv(x.float()), ref(x.float()))


@pytest.mark.parametrize("kernel, stride, padding, size", [(9, 2, 0, 20), (3, 2, 1, 7), (5, 3, 2, 11), (4, 2, 0, 9), (1, 2, 0, 6)])
def test_polyphase_input_gradient_equals_the_convolutions(kernel, stride, padding, size):
    """The bf16 path's input gradient (one stride-1 convolution per phase) is the exact gradient, in float64."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64)
    y = F.conv2d(x, w, stride=stride, padding=padding)
    grad_y = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_y)
    got = _input_grad_phases(grad_y, x.shape, w, (stride, stride), (padding, padding))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
