"""CUDA against CPU: the same models give the same numbers on a GPU (skipped without one).

TF32 is switched off for these comparisons (PyTorch enables it for cuDNN convolutions by
default, which alone moves results by about 1e-3); the tolerances are float32 rounding
across different kernels and summation orders.
"""

from __future__ import annotations

import copy

import pytest
import torch

from capsnet import dynamic_routing
from capsnet.models import create_model
from capsnet.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _forward_backward(model, x, y, head):
    model.zero_grad(set_to_none=True)
    out = model(x, y)
    values = getattr(out, head)
    (values * torch.linspace(0.5, 1.5, values.shape[-1], device=values.device)).sum().backward()
    return values.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("name", "head"), [("capsnet_mnist", "lengths"), ("capsnet_tiny", "lengths"), ("em_tiny", "activations")])
def test_model_on_cuda_matches_cpu(name, head):
    torch.manual_seed(0)
    cpu = create_model(name)
    gpu = copy.deepcopy(cpu).cuda()
    size = cpu.image_size
    x = torch.rand(4, cpu.in_channels, size, size)
    y = torch.arange(4) % cpu.num_classes
    values_cpu, grads_cpu = _forward_backward(cpu, x, y, head)
    values_gpu, grads_gpu = _forward_backward(gpu, x.cuda(), y.cuda(), head)
    torch.testing.assert_close(values_gpu, values_cpu, **TOL)
    assert grads_cpu.keys() == grads_gpu.keys()
    for key in grads_cpu:
        torch.testing.assert_close(grads_gpu[key], grads_cpu[key], rtol=1e-3, atol=1e-5, msg=key)


def test_dynamic_routing_on_cuda_matches_cpu():
    votes = torch.randn(3, 40, 10, 16)
    expected = dynamic_routing(votes)
    got = dynamic_routing(votes.cuda())
    torch.testing.assert_close(got.poses.cpu(), expected.poses, **TOL)
    torch.testing.assert_close(got.coupling.cpu(), expected.coupling, **TOL)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_training_runs_on_cuda(tmp_path, amp):
    cfg = TrainConfig(
        model="capsnet_tiny", dataset="synthetic", dataset_kwargs=dict(train_size=64, val_size=16, test_size=16),
        batch_size=16, epochs=1, checkpoint_every=2, figures=False, amp=amp,
    )  # fmt: skip
    summary = train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, device="cuda")
    assert summary["steps"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_training_step_does_not_synchronise_with_the_host():
    """Forward, loss, backward and the optimizer step of the paper model queue work without waiting."""
    from capsnet.functional import margin_loss, reconstruction_loss

    model = create_model("capsnet_mnist").cuda()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    x = torch.rand(8, 1, 28, 28, device="cuda")
    y = torch.arange(8, device="cuda") % 10

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, y)
            loss = margin_loss(out.lengths, y) + reconstruction_loss(out.reconstruction, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
