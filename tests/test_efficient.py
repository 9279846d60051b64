"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021): its squash, self-attention routing and MNIST model.

The slow references below are explicit Python loops over float64 values, one line per formula
of the paper (labels SA-1..SA-4 as in ``capsnet/routing/self_attention.py``); the full
``(I, I)`` self-attention matrices are built here, never in the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from capsnet import SelfAttentionRoutingResult, create_model, margin_loss, reconstruction_loss, self_attention_routing, squash
from capsnet.models import CapsNetOutput

PNG = b"\x89PNG\r\n\x1a\n"
SHAPES = [(1, 1, 1, 1), (1, 3, 2, 4), (2, 5, 3, 4), (3, 16, 10, 16), (2, 12, 4, 2)]  # (B, I, J, D)


# --------------------------------------------------------------------------- slow references


def _squash_vector(s: list[float], kind: str) -> list[float]:
    """One vector: ``(1 - 1 / e^{|s|}) s / |s|`` (efficient) or ``|s|^2 / (1 + |s|^2) s / |s|`` (sabour)."""
    norm = math.sqrt(sum(x * x for x in s))
    if norm == 0.0:
        return [0.0 for _ in s]  # both limits at s -> 0 are the zero vector
    factor = (1.0 - 1.0 / math.exp(norm)) if kind == "efficient" else norm * norm / (1.0 + norm * norm)
    return [factor * x / norm for x in s]


def reference_squash(s: torch.Tensor, kind: str = "efficient") -> torch.Tensor:
    flat = s.detach().double().reshape(-1, s.shape[-1]).tolist()
    return torch.tensor([_squash_vector(v, kind) for v in flat], dtype=torch.float64).reshape(s.shape)


def reference_self_attention_routing(votes: torch.Tensor, prior=None, *, squash_kind: str = "efficient"):
    """Sample by sample, parent by parent: the full self-attention matrix and the formulas as written."""
    batch, n_in, n_out, dim = votes.shape
    u = votes.detach().double().tolist()  # u[b][i][j] is the vote u_hat_{j|i}
    b_prior = prior.detach().double().tolist() if prior is not None else [[0.0] * n_out for _ in range(n_in)]
    poses, couplings, all_logits = [], [], []
    for b in range(batch):
        logits = [[0.0] * n_out for _ in range(n_in)]
        for j in range(n_out):
            # SA-1: A_j[i][k] = u_hat_{j|i} . u_hat_{j|k} / sqrt(D)
            a = [[sum(u[b][i][j][d] * u[b][k][j][d] for d in range(dim)) / math.sqrt(dim) for k in range(n_in)] for i in range(n_in)]
            for i in range(n_in):
                logits[i][j] = sum(a[i][k] for k in range(n_in))
        coupling = []
        for i in range(n_in):  # SA-2: softmax over the parents
            top = max(logits[i])
            e = [math.exp(x - top) for x in logits[i]]
            coupling.append([x / sum(e) for x in e])
        v = []
        for j in range(n_out):  # SA-3: s_j = sum_i (c_ij + b_ij) u_hat_{j|i}; SA-4: squash
            s = [sum((coupling[i][j] + b_prior[i][j]) * u[b][i][j][d] for i in range(n_in)) for d in range(dim)]
            v.append(_squash_vector(s, squash_kind))
        poses.append(v)
        couplings.append(coupling)
        all_logits.append(logits)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_tensor(poses), as_tensor(couplings), as_tensor(all_logits)


def _votes(shape, *, seed=0, scale=1.0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype) * scale


# --------------------------------------------------------------------------- squash, kind="efficient"


@pytest.mark.parametrize("scale", [1e-3, 0.3, 1.0, 5.0, 40.0])
def test_efficient_squash_matches_reference(scale):
    s = _votes((7, 6), scale=scale)
    torch.testing.assert_close(squash(s, kind="efficient"), reference_squash(s), rtol=1e-10, atol=1e-12)


def test_efficient_squash_acts_along_dim():
    s = _votes((3, 5, 4))
    torch.testing.assert_close(squash(s, dim=1, kind="efficient"), squash(s.transpose(1, 2), kind="efficient").transpose(1, 2), rtol=0, atol=1e-15)


def test_efficient_squash_gradcheck_float64():
    s = _votes((4, 5)).requires_grad_(True)
    assert gradcheck(lambda x: squash(x, kind="efficient"), (s,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_efficient_squash_of_zero_is_zero_with_the_identity_as_jacobian(dtype):
    # (1 - e^{-r}) / r -> 1 as r -> 0: near 0 the squash is v = s + O(|s|^2), so its Jacobian there is I
    # (not 0 as for Eq. 1 of Sabour et al., which is second order at 0), finite, not 0/0.
    zero = torch.zeros(4, dtype=dtype, requires_grad=True)
    v = squash(zero, kind="efficient")
    assert torch.equal(v, torch.zeros(4, dtype=dtype))
    jac = torch.autograd.functional.jacobian(lambda x: squash(x, kind="efficient"), zero)
    assert torch.equal(jac, torch.eye(4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_efficient_squash_of_a_zero_capsule_next_to_others_has_finite_gradients(dtype):
    s = torch.zeros(3, 5, dtype=dtype)
    s[1] = torch.arange(1.0, 6.0, dtype=dtype)
    s.requires_grad_(True)
    squash(s, kind="efficient").pow(2).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[0], torch.zeros(5, dtype=dtype))  # d|v|^2/ds = 2 v J = 0 at v = 0


@pytest.mark.parametrize(("dtype", "value"), [(torch.float32, 1e19), (torch.float32, 3e38), (torch.float64, 1e300)])
def test_efficient_squash_of_huge_norms_is_a_unit_vector_with_finite_gradients(dtype, value):
    s = torch.tensor([value, -value, 0.5 * value], dtype=dtype, requires_grad=True)
    v = squash(s, kind="efficient")
    assert torch.isfinite(v).all()
    torch.testing.assert_close(torch.linalg.vector_norm(v), torch.tensor(1.0, dtype=dtype))
    t = s.detach().double() / value  # the direction, computed where |t|^2 cannot overflow
    unit = t / torch.linalg.vector_norm(t)
    torch.testing.assert_close(v, unit.to(dtype))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_efficient_squash_of_tiny_norms_is_the_identity():
    s = torch.tensor([1e-30, -2e-30, 0.0], dtype=torch.float32)  # |s|^2 underflows to 0 in float32
    assert torch.equal(squash(s, kind="efficient"), s)


def test_efficient_squash_lengths_lie_below_one_and_grow_with_the_norm():
    norms = torch.tensor([0.0, 1e-3, 0.5, 1.0, 3.0, 30.0], dtype=torch.float64)
    s = norms[:, None] * torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    lengths = torch.linalg.vector_norm(squash(s, kind="efficient"), dim=-1)
    torch.testing.assert_close(lengths, 1 - torch.exp(-norms), rtol=1e-12, atol=0)
    assert (lengths[1:] > lengths[:-1]).all() and (lengths < 1).all()


def test_squash_default_is_sabour_and_bit_identical_to_kind_sabour():
    s = _votes((6, 8), dtype=torch.float32)
    assert torch.equal(squash(s), squash(s, kind="sabour"))


def test_squash_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="squash kind must be one of"):
        squash(torch.ones(3), kind="mazzia")


# --------------------------------------------------------------------------- self-attention routing


@pytest.mark.parametrize("with_prior", [False, True], ids=["no-prior", "prior"])
@pytest.mark.parametrize("squash_kind", ["efficient", "sabour"])
@pytest.mark.parametrize("shape", SHAPES)
def test_self_attention_routing_matches_reference(shape, squash_kind, with_prior):
    votes = _votes(shape, scale=0.5)
    prior = _votes(shape[1:3], seed=1, scale=0.1) if with_prior else None
    fast = self_attention_routing(votes, prior, squash_kind=squash_kind)
    poses, coupling, logits = reference_self_attention_routing(votes, prior, squash_kind=squash_kind)
    torch.testing.assert_close(fast.poses, poses, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.coupling, coupling, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.logits, logits, rtol=0, atol=1e-10)


def test_self_attention_routing_returns_the_routing_result_fields():
    out = self_attention_routing(_votes((2, 5, 3, 4)))
    assert isinstance(out, SelfAttentionRoutingResult)
    assert out._fields == ("poses", "coupling", "logits")
    assert out.poses.shape == (2, 3, 4) and out.coupling.shape == (2, 5, 3) and out.logits.shape == (2, 5, 3)


def test_self_attention_coupling_sums_to_one_over_parents():
    out = self_attention_routing(_votes((3, 7, 4, 5), scale=3.0))
    torch.testing.assert_close(out.coupling.sum(dim=2), torch.ones(3, 7, dtype=torch.float64), rtol=0, atol=1e-12)


def test_self_attention_scale_defaults_to_one_over_sqrt_d():
    votes = _votes((2, 4, 3, 9))
    torch.testing.assert_close(self_attention_routing(votes).logits, self_attention_routing(votes, scale=1 / 3).logits, rtol=0, atol=0)
    torch.testing.assert_close(self_attention_routing(votes, scale=2 / 3).logits, 2 * self_attention_routing(votes).logits, rtol=1e-14, atol=0)


def test_self_attention_routing_keeps_no_state_and_treats_samples_independently():
    votes = _votes((4, 6, 3, 5))
    first, again = self_attention_routing(votes), self_attention_routing(votes)
    assert torch.equal(first.poses, again.poses)
    alone = self_attention_routing(votes[2:3])
    torch.testing.assert_close(alone.poses, first.poses[2:3], rtol=0, atol=1e-14)


@pytest.mark.parametrize("with_prior", [False, True], ids=["no-prior", "prior"])
def test_self_attention_routing_gradcheck_float64(with_prior):
    votes = _votes((2, 4, 3, 5), scale=0.7).requires_grad_(True)
    prior = _votes((4, 3), seed=1, scale=0.1).requires_grad_(True)
    if with_prior:
        assert gradcheck(lambda v, b: self_attention_routing(v, b).poses, (votes, prior))
    else:
        assert gradcheck(lambda v: self_attention_routing(v).poses, (votes,))
    assert gradcheck(lambda v: self_attention_routing(v).coupling, (votes,))


def test_self_attention_routing_of_zero_and_huge_votes_is_finite():
    zero = torch.zeros(2, 4, 3, 5, requires_grad=True)
    out = self_attention_routing(zero)
    assert torch.equal(out.poses, torch.zeros(2, 3, 5))
    torch.testing.assert_close(out.coupling, torch.full((2, 4, 3), 1 / 3))
    out.poses.sum().backward()
    assert torch.isfinite(zero.grad).all()
    huge = _votes((2, 4, 3, 5), dtype=torch.float32, scale=1e3)  # logits of order 1e6: the softmax saturates
    out = self_attention_routing(huge)
    assert torch.isfinite(out.poses).all() and torch.isfinite(out.coupling).all()


@pytest.mark.parametrize(
    ("votes", "prior", "kwargs", "message"),
    [
        (torch.zeros(2, 3, 4), None, {}, r"votes must be \(B, I, J, D\)"),
        (torch.zeros(2, 0, 4, 5), None, {}, "at least one input capsule"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.long), None, {}, "floating tensor"),
        (torch.zeros(2, 3, 4, 5), torch.zeros(4, 3), {}, r"prior must be \(I, J\) = \(3, 4\)"),
        (torch.zeros(2, 3, 4, 5), torch.zeros(3, 4, dtype=torch.float64), {}, "prior must have the votes' dtype"),
        (torch.zeros(2, 3, 4, 5), None, {"scale": 0.0}, "scale must be a finite number > 0"),
        (torch.zeros(2, 3, 4, 5), None, {"squash_kind": "hinton"}, "squash_kind must be one of"),
    ],
)
def test_self_attention_routing_refuses_bad_input_with_informative_message(votes, prior, kwargs, message):
    with pytest.raises(ValueError, match=message):
        self_attention_routing(votes, prior, **kwargs)


# --------------------------------------------------------------------------- the MNIST model


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_efficient_capsnet_mnist_has_the_papers_parameter_count():
    # 161,824: the paper's Table 2 ("161 K", decoder not counted), exact from the authors' MNIST graph.
    model = create_model("efficient_capsnet_mnist")
    assert _n_params(model) - _n_params(model.decoder) == 161_824
    assert _n_params(create_model("efficient_capsnet_mnist", decoder=False)) == 161_824


def test_efficient_capsnet_mnist_with_decoder_adds_the_decoder_of_sabour_et_al():
    assert _n_params(create_model("efficient_capsnet_mnist")) == 161_824 + 1_411_344  # 160 -> 512 -> 1024 -> 784


def test_efficient_capsnet_output_is_a_capsnet_output_with_attention_as_coupling():
    model = create_model("efficient_capsnet_mnist").eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 28, 28))
    assert isinstance(out, CapsNetOutput)
    assert out.lengths.shape == (3, 10) and out.poses.shape == (3, 10, 16)
    assert out.reconstruction.shape == (3, 1, 28, 28)
    assert out.coupling.shape == (3, 16, 10) and out.primary.shape == (3, 16, 8)
    torch.testing.assert_close(out.coupling.sum(dim=2), torch.ones(3, 16))
    torch.testing.assert_close(out.lengths, torch.linalg.vector_norm(out.poses, dim=-1))
    assert (out.lengths < 1).all()


def test_efficient_capsnet_primary_capsules_are_squashed_with_the_papers_squash():
    model = create_model("efficient_capsnet_mnist").eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        s = model.primary.conv(model.stem(x)).reshape(2, 16, 8)
        torch.testing.assert_close(model(x).primary, squash(s, kind="efficient"))


def _layer_by_layer(model, x):
    """The stem and primary convolution as written: conv, ReLU, batch norm, ... one module at a time."""
    return model.primary.conv(model.stem(x))


@pytest.mark.parametrize("name", ["efficient_capsnet_mnist", "efficient_capsnet_multimnist"])
def test_efficient_capsnet_eval_folds_the_batch_norms_into_the_convolutions_exactly_in_float64(name):
    # In inference, features() folds each batch norm's running scale and shift into the next
    # unpadded convolution: the same values as the modules one by one, with batch norms that
    # are not the identity.
    torch.manual_seed(0)
    model = create_model(name, decoder=False).double().eval()
    for m in model.stem[2::3]:
        torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        torch.nn.init.uniform_(m.bias, -0.2, 0.2)
        m.running_mean.uniform_(0.0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    size = model.image_size
    x = torch.rand(5, 1, size, size, dtype=torch.float64)
    with torch.no_grad():
        assert model._can_fold(x)
        torch.testing.assert_close(model.features(x), _layer_by_layer(model, x), rtol=1e-12, atol=1e-12)


def test_efficient_capsnet_takes_the_modules_when_folding_would_change_what_the_caller_sees():
    # Gradients in eval (saliency, frozen batch norms), one batch norm in train mode, forward
    # hooks on a stem module, training: the modules one by one, so gradients reach every
    # parameter and the input, batch statistics are used where asked, and hooks fire.
    torch.manual_seed(0)
    model = create_model("efficient_capsnet_mnist", decoder=False).eval()
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    assert not model._can_fold(x)  # gradients are enabled
    model(x).lengths.sum().backward()
    assert x.grad is not None and all(c.weight.grad is not None for c in model.stem[0::3])
    with torch.no_grad():
        assert model._can_fold(x)
        model.stem[2].train()
        assert not model._can_fold(x)
        torch.testing.assert_close(model.features(x), _layer_by_layer(model, x.contiguous(memory_format=torch.channels_last)))
        model.stem[2].eval()
        calls = []
        handle = model.stem[3].register_forward_hook(lambda *a: calls.append(1))
        assert not model._can_fold(x)
        model.features(x)
        assert calls == [1]
        handle.remove()
        assert model._can_fold(x)
        handle = model.primary.register_forward_hook(lambda *a: calls.append(2))  # the primary capsules' own hook
        model(x)
        assert calls == [1, 2]
        handle.remove()
        model.train()
        assert not model._can_fold(x)


def test_efficient_capsnet_eval_folding_matches_in_float32_and_keeps_the_modules_under_autocast():
    torch.manual_seed(0)
    model = create_model("efficient_capsnet_mnist").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), _layer_by_layer(model, x), rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations: the modules one by one, bit for bit
            assert torch.equal(model.features(x), _layer_by_layer(model, x.contiguous(memory_format=torch.channels_last)))


def test_efficient_capsnet_eval_fused_conv_relu_equals_the_two_steps(monkeypatch):
    import capsnet.models.efficient as efficient

    if not efficient._FUSED_CONV_RELU:
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    torch.manual_seed(0)
    model = create_model("efficient_capsnet_mnist").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        fused = model.features(x)
        monkeypatch.setattr(efficient, "_FUSED_CONV_RELU", False)
        torch.testing.assert_close(fused, model.features(x), rtol=1e-6, atol=1e-6)


def test_efficient_capsnet_every_parameter_gets_a_gradient_from_the_margin_and_reconstruction_loss():
    model = create_model("efficient_capsnet_mnist")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 3, 5, 7])
    out = model(x, y)
    (margin_loss(out.lengths, y) + reconstruction_loss(out.reconstruction, x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), name


def test_efficient_capsnet_in_eval_mode_treats_samples_independently():
    model = create_model("efficient_capsnet_mnist").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x[1:2]).lengths, model(x).lengths[1:2], rtol=1e-5, atol=1e-6)


def test_efficient_capsnet_overrides_reach_the_model():
    model = create_model("efficient_capsnet_mnist", squash_kind="sabour", class_dim=8, decoder=False)
    assert model.primary.squash_kind == "sabour" and model.digits.squash_kind == "sabour"
    assert model.decoder is None and model(torch.rand(2, 1, 28, 28)).poses.shape == (2, 10, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image_size=16), "too small"),
        (dict(stem_channels=(32, 64)), "of one length each"),
        (dict(primary_dim=0), "'primary_dim'=0"),
        (dict(stem_channels=(32, 64, 64, 100)), "divisible by primary_dim"),
        (dict(primary_stride=0), "'primary_stride'=0"),
    ],
)
def test_efficient_capsnet_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("efficient_capsnet_mnist", **kwargs)


def test_efficient_capsnet_refuses_images_of_the_wrong_size():
    with pytest.raises(ValueError):
        create_model("efficient_capsnet_mnist")(torch.rand(2, 1, 32, 32))
