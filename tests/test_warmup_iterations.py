"""``warmup_iterations``: fewer routing iterations in the first training steps, the model's own elsewhere."""

import pytest
import torch
from conftest import REPO, TINY

from capsnet.train import TrainConfig, load_checkpoint, load_config, train


class _Record:
    """Every forward of a routed layer (a module with an int ``iterations``): (layer type, training?, iterations)."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, args):
        if type(getattr(module, "iterations", None)) is int:
            self.calls.append((type(module).__name__, module.training, module.iterations))

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_iterations=2), "go together"),
        (dict(warmup_iterations_steps=5), "go together"),
        (dict(warmup_iterations=0, warmup_iterations_steps=5), ">= 1"),
        (dict(warmup_iterations=2, warmup_iterations_steps=-1), "go together|>= 0"),
    ],
)
def test_bad_warmup_keys_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**TINY, **kwargs)


def test_a_model_without_routing_is_refused(tmp_path):
    cfg = TrainConfig(**{**TINY, "model": "cnn_mnist"}, warmup_iterations=1, warmup_iterations_steps=2)
    with pytest.raises(ValueError, match="has no routed layer"):
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)


@pytest.mark.parametrize("config", ["tiny", "em"])
def test_training_steps_of_the_warm_up_route_with_fewer_iterations_and_evaluation_never_does(tmp_path, config):
    """Steps 0-1 train with 1 iteration, steps 2-5 with the model's 3; every validation and the test route with 3."""
    if config == "tiny":  # dynamic routing (DenseCaps), 3 steps per epoch: validated at steps 3 and 6
        cfg = TrainConfig(**TINY, max_steps=6, warmup_iterations=1, warmup_iterations_steps=2)
    else:  # EM routing (ConvMatCaps, ClassMatCaps): the smoke config, 4 steps per epoch, validated at each end
        cfg = load_config(str(REPO / "configs" / "mnist_em.py") + ":smoke", ("epochs=2", "max_steps=6", "warmup_iterations=1", "warmup_iterations_steps=2"))
    with _Record() as record:
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    layers = 1 if config == "tiny" else 3  # DenseCaps; ConvCaps1, ConvCaps2, ClassCaps
    trained = [iterations for _, training, iterations in record.calls if training]
    evaluated = {iterations for _, training, iterations in record.calls if not training}
    assert len(trained) == 6 * layers  # one forward per layer and step
    assert trained == [1] * (2 * layers) + [3] * (4 * layers)
    assert evaluated == {3}


def test_the_warm_up_changes_training_and_a_warm_up_at_the_models_own_count_does_not(tmp_path):
    def weights(name, **kwargs):
        train(TrainConfig(**TINY, max_steps=4, **kwargs), data_root=tmp_path, out_dir=tmp_path / name, progress=False, final_test=False)
        return load_checkpoint(tmp_path / name / "last.pt")["model"]

    plain = weights("plain")
    same = weights("same", warmup_iterations=3, warmup_iterations_steps=2)  # capsnet_tiny routes with 3 anyway
    fewer = weights("fewer", warmup_iterations=1, warmup_iterations_steps=2)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert any(t.is_floating_point() and not torch.equal(t, fewer[k]) for k, t in plain.items())


def test_resume_across_the_switch_is_bit_identical(tmp_path):
    """Stopped inside the warm-up and resumed past its end: the same weights and optimizer state as one straight run."""
    straight = TrainConfig(**TINY, max_steps=6, warmup_iterations=1, warmup_iterations_steps=3)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    stopped = TrainConfig(**TINY, max_steps=2, warmup_iterations=1, warmup_iterations_steps=3)
    train(stopped, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (i, sa), (j, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert i == j and all(torch.equal(sa[k], sb[k]) for k in sa)
