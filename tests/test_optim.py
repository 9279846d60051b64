"""``capsnet.train.optim.adam``: Adam with its state made up front trains exactly like torch's lazy Adam."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import capsnet
import capsnet.train.optim
from capsnet.train.optim import adam


def _trajectory(make_optimizer, steps=3):
    torch.manual_seed(0)
    model = capsnet.create_model("capsnet_tiny")
    optimizer = make_optimizer(model.parameters())
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    for _ in range(steps):
        out = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        (out.lengths.sum() + out.reconstruction.sum()).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer


@pytest.mark.parametrize("dynamo_loaded", [False, True], ids=["undecorated", "torchs-methods"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_same_trajectory_and_state_as_torchs_adam(weight_decay, dynamo_loaded, monkeypatch):
    # adam()'s methods skip torch's dynamo wrappers while torch._dynamo is not loaded: both branches.
    monkeypatch.setattr(capsnet.train.optim, "_dynamo_loaded", lambda: dynamo_loaded)
    eager, eager_opt = _trajectory(lambda ps: adam(ps, lr=1e-3, weight_decay=weight_decay))
    lazy, lazy_opt = _trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=weight_decay, fused=True))
    for a, b in zip(eager, lazy):
        assert torch.equal(a, b)
    assert eager_opt.param_groups[0]["fused"]
    mine, theirs = eager_opt.state_dict()["state"], lazy_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index in theirs:
        for key, value in theirs[index].items():
            assert torch.equal(mine[index][key], value), (index, key)
            assert mine[index][key].dtype == value.dtype and mine[index][key].device == value.device


def test_state_exists_before_the_first_step_and_resumes():
    model = torch.nn.Linear(3, 2)
    optimizer = adam(model.parameters())
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    assert all(float(optimizer.state[p]["step"]) == 0 for p in model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    again = adam(model.parameters())
    again.load_state_dict(optimizer.state_dict())  # as a resumed run does
    assert all(float(again.state[p]["step"]) == 1 for p in model.parameters())


def test_frozen_parameters_get_no_state_and_groups_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    optimizer = adam(model.parameters())
    assert model[1].weight not in optimizer.state and model[0].weight in optimizer.state
    assert not adam(model.parameters(), make_state=False).state
    with pytest.raises(TypeError, match="not parameter groups"):
        adam([{"params": list(model.parameters())}])


def test_step_hooks_run_once_whichever_adam_was_made_first():
    """torch wraps Adam.step in a hook runner at the first instance; adam() must not run its hooks twice."""
    script = """
import torch
model = torch.nn.Linear(2, 2)
torch.optim.Adam(model.parameters())  # torch's Adam first: its class step is now the hooked wrapper
from capsnet.train.optim import adam
optimizer = adam(model.parameters())
calls = []
optimizer.register_step_pre_hook(lambda *a: calls.append("pre"))
optimizer.register_step_post_hook(lambda *a: calls.append("post"))
model(torch.rand(3, 2)).sum().backward()
optimizer.step()
print(" ".join(calls))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pre", "post"]


def test_a_training_step_does_not_import_dynamo():
    """Eager training with adam() leaves torch._dynamo (~70 MB with sympy) unloaded; torch's Adam would load it."""
    script = """
import sys, torch, capsnet
from capsnet.train.optim import adam
model = capsnet.create_model("capsnet_tiny")
optimizer = adam(model.parameters())
out = model(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
optimizer.zero_grad(set_to_none=True)
(out.lengths.sum() + out.reconstruction.sum()).backward()
optimizer.step()
optimizer.load_state_dict(optimizer.state_dict())
assert isinstance(optimizer, torch.optim.Adam)
print("torch._dynamo" in sys.modules)
torch.optim.Adam(model.parameters()).step()
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_lr_scales_make_groups_that_train_like_torchs_adam_with_those_groups():
    """Factors per parameter become groups of equal factor: the same trajectory and state as torch's grouped Adam."""
    scales = [2.0, 1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 0.5, 1.0]  # capsnet_tiny's 9 parameters, mixed order

    def torchs(ps):
        ps = list(ps)
        groups = {}
        for p, s in zip(ps, scales):
            groups.setdefault(s, []).append(p)
        return torch.optim.Adam([{"params": g, "lr": 1e-3 * s} for s, g in groups.items()], lr=1e-3, betas=(0.8, 0.99), fused=True)

    mine, mine_opt = _trajectory(lambda ps: adam(ps, lr=1e-3, betas=(0.8, 0.99), lr_scales=scales))
    theirs, theirs_opt = _trajectory(torchs)
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
    assert [g["lr"] for g in mine_opt.param_groups] == [2e-3, 1e-3, 5e-4]
    assert all(g["betas"] == (0.8, 0.99) for g in mine_opt.param_groups)
    a, b = mine_opt.state_dict()["state"], theirs_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in b:
        assert all(torch.equal(a[index][k], b[index][k]) for k in b[index]), index
    # A different lr really moves differently: without the factors the trajectory differs.
    plain, _ = _trajectory(lambda ps: adam(ps, lr=1e-3, betas=(0.8, 0.99)))
    assert not torch.equal(plain[0], mine[0])


def test_lr_scales_match_names_and_refuse_patterns_that_match_nothing():
    model = capsnet.create_model("capsnet_tiny")
    names = [n for n, _ in model.named_parameters()]
    scales = capsnet.train.optim.lr_scales(model, {"*.bias": 3.0, "conv1.*": 0.5})
    expected = [3.0 if n.endswith(".bias") else 0.5 if n.startswith("conv1.") else 1.0 for n in names]
    assert scales == expected and scales[names.index("conv1.bias")] == 3.0  # the first pattern wins
    assert capsnet.train.optim.lr_scales(model, {}) is None
    with pytest.raises(ValueError, match=r"\['\*.beta_a'\] match no parameter of CapsNet.*conv1.weight"):
        capsnet.train.optim.lr_scales(model, {"*.beta_a": 2.0})
    one = adam(model.parameters(), lr=1e-3, lr_scales=[0.5] * len(names))  # a single factor is still applied
    assert [g["lr"] for g in one.param_groups] == [5e-4]
    assert capsnet.train.optim.lr_scales(model, {"*": 0.5}) == [0.5] * len(names)
    with pytest.raises(ValueError, match="one factor per parameter"):
        adam(model.parameters(), lr_scales=[1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        adam(model.parameters(), lr_scales=[0.0] * len(names))


@pytest.mark.parametrize(
    "key, value, match",
    [("adam_beta2", 1.0, "'adam_beta2' must lie in"), ("adam_beta1", -0.1, "'adam_beta1' must lie in"),
     ("lr_scale", {"*": 0.0}, "finite factor > 0"), ("lr_scale", {"*": "x"}, "maps name patterns"),
     ("lr_scale", {3: 1.0}, "maps name patterns"), ("grad_clip", 0.0, "'grad_clip' must be a finite norm"),
     ("grad_clip", float("inf"), "'grad_clip' must be a finite norm")],
)  # fmt: skip
def test_optimizer_config_keys_are_checked(key, value, match):
    from capsnet.train import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**{key: value})
