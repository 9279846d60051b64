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
        (dict(warmup_iterations=2, warmup_iterations_steps=-1), ">= 1"),
        (dict(warmup_iterations=2, warmup_iterations_steps=0), "go together"),
    ],
)
def test_bad_warmup_keys_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**TINY, **kwargs)


def test_a_warm_up_the_model_cannot_route_with_is_refused_before_the_run_directory(tmp_path):
    """No routed layer (a CNN), or an EM layer with an explicit lambda per iteration of another length: refused, nothing deleted."""
    train(TrainConfig(**TINY, max_steps=1), data_root=tmp_path, out_dir=tmp_path / "kept", progress=False, final_test=False)
    cnn = TrainConfig(**{**TINY, "model": "cnn_mnist"}, warmup_iterations=1, warmup_iterations_steps=2)
    with pytest.raises(ValueError, match="has no routed layer"):
        train(cnn, data_root=tmp_path, out_dir=tmp_path / "new", progress=False, final_test=False)
    with pytest.raises(ValueError, match="has no routed layer"):
        train(cnn, data_root=tmp_path, out_dir=tmp_path / "kept", progress=False, final_test=False, overwrite=True)
    schedule = ("model_kwargs.schedule=(0.01, 0.02, 0.03)", "model_kwargs.final_lambda=None")
    em = load_config(str(REPO / "configs" / "mnist_em.py") + ":smoke", (*schedule, "warmup_iterations=2", "warmup_iterations_steps=1"))
    with pytest.raises(ValueError, match="explicit lambda schedule of 3 values"):
        train(em, data_root=tmp_path, out_dir=tmp_path / "new", progress=False, final_test=False)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "kept" / "last.pt").exists()  # --overwrite deleted nothing
    em = load_config(str(REPO / "configs" / "mnist_em.py") + ":smoke", (*schedule, "warmup_iterations=3", "warmup_iterations_steps=1", "max_steps=1"))
    train(em, data_root=tmp_path, out_dir=tmp_path / "same_length", progress=False, final_test=False)  # one lambda per iteration: fine


@pytest.mark.parametrize("ema", [None, 0.9])
@pytest.mark.parametrize("config", ["tiny", "em"])
def test_training_steps_of_the_warm_up_route_with_fewer_iterations_and_evaluation_never_does(tmp_path, config, ema):
    """Steps 0-1 train with 1 iteration, the later ones with each layer's own; validation after every step, inside the
    warm-up too, and the test route with each layer's own (with and without the weights' average, which validation uses)."""
    if config == "tiny":  # dynamic routing: one DenseCaps layer with 3 iterations, 3 steps per epoch
        cfg = TrainConfig(**TINY, max_steps=6, eval_every=1, ema_decay=ema, warmup_iterations=1, warmup_iterations_steps=2)
        own = [("DenseCaps", 3)]
    else:  # EM routing with per-layer iterations (ConvCaps1, ConvCaps2, ClassCaps): the smoke config, 4 steps per epoch
        sets = ("epochs=2", "max_steps=6", "eval_every=1", f"ema_decay={ema}", "model_kwargs.iterations=(2, 2, 3)", "warmup_iterations=1",
                "warmup_iterations_steps=2")
        cfg = load_config(str(REPO / "configs" / "mnist_em.py") + ":smoke", sets)
        own = [("ConvMatCaps", 2), ("ConvMatCaps", 2), ("ClassMatCaps", 3)]
    with _Record() as record:
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    trained = [(name, iterations) for name, training, iterations in record.calls if training]
    evaluated = [(name, iterations) for name, training, iterations in record.calls if not training]
    warm = [(name, 1) for name, _ in own]
    assert trained == warm * 2 + own * 4  # one forward per layer and step
    assert len(evaluated) >= 7 * len(own) and len(evaluated) % len(own) == 0  # six validations and the test, at least
    assert evaluated == own * (len(evaluated) // len(own))
    assert load_checkpoint(tmp_path / "run" / "best.pt")["val"]["accuracy"] is not None


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
