"""The weights' moving average (``ema_decay``): the formula, what validation and best.pt use, exact resume."""

import logging

import pytest
import torch
from conftest import REPO, TINY

from capsnet import create_model
from capsnet.precision import resolve_amp
from capsnet.train import TrainConfig, load_checkpoint, load_config, train
from capsnet.train.ema import WeightAverage
from capsnet.train.evaluation import evaluate
from capsnet.train.loop import load_data
from capsnet.train.objectives import create_objective
from capsnet.train.restore import build_model, load_model


def test_the_average_follows_the_formula_with_its_warm_up():
    """avg_t = d_t avg_{t-1} + (1 - d_t) theta_t with d_t = min(decay, (1 + t) / (10 + t)), by hand in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
    average = WeightAverage(model, decay=0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    rates = []
    for t in range(1, 11):  # from t = 9 on, (1 + t) / (10 + t) > 0.5
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, dtype=torch.float64))  # moves the batch-norm statistics
        d = min(0.5, (1 + t) / (10 + t))
        rates.append(d)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        average.update(model)
        for e, a in zip(expected, average.module.parameters()):
            torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-14)
        for kept, buffer in zip(average.module.buffers(), model.buffers()):
            assert torch.equal(kept, buffer)  # copied, not averaged
    assert rates[:3] == [2 / 11, 3 / 12, 4 / 13] and rates[-1] == 0.5  # the warm-up, then the decay
    assert not any(p.requires_grad for p in average.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, float("nan"), True])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(torch.nn.Linear(2, 2), decay)
    if not isinstance(decay, bool):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig(**TINY, ema_decay=decay)


def test_validation_best_and_test_use_the_average(tmp_path):
    """best.pt holds the average (not the trained weights), and last.pt both."""
    cfg = TrainConfig(**TINY, max_steps=3, ema_decay=0.9)  # one epoch: validated once, at step 3
    summary = train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    last, best = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == 3 and last["ema"]["updates"] == 3
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, last["ema"]["module"][name]), name
    differs = [name for name, tensor in last["model"].items() if tensor.is_floating_point() and not torch.equal(tensor, best["model"][name])]
    assert differs  # the average is not the trained weights
    # Scored on the average: validation's and the test's numbers are best.pt's own.
    model, _, _ = load_model(tmp_path / "run" / "best.pt")
    data = load_data(cfg, tmp_path, download=False)
    objective, amp = create_objective(cfg.objective, **cfg.objective_kwargs), resolve_amp(cfg.amp, "cpu")
    assert evaluate(model, data, "val", objective, amp=amp)["accuracy"] == best["val"]["accuracy"]
    assert evaluate(model, data, "test", objective, amp=amp)["accuracy"] == summary["test_accuracy"]
    trained = build_model(cfg, data)
    trained.load_state_dict(last["model"])
    assert evaluate(model, data, "val", objective, amp=amp)["loss"] == best["val"]["loss"]
    assert evaluate(trained, data, "val", objective, amp=amp)["loss"] != best["val"]["loss"]  # the trained weights score otherwise
    # Without the option nothing changes: no average in the checkpoint, best.pt holds the trained weights.
    train(TrainConfig(**TINY, max_steps=3), data_root=tmp_path, out_dir=tmp_path / "plain", progress=False, final_test=False)
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert plain["ema"] is None
    assert all(torch.equal(t, load_checkpoint(tmp_path / "plain" / "best.pt")["model"][k]) for k, t in plain["model"].items())


def test_resume_with_the_average_is_bit_identical(tmp_path):
    # decay 0.3: the warm-up (1 + t) / (10 + t) passes it at t = 4, so the config's decay is in play before and after the resume
    straight = TrainConfig(**TINY, max_steps=8, ema_decay=0.3)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    train(TrainConfig(**TINY, max_steps=4, ema_decay=0.3), data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 8
    for name, tensor in a["ema"]["module"].items():
        assert torch.equal(tensor, b["ema"]["module"][name]), name
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_resume_uses_the_configs_decay_and_dropping_the_average_warns(tmp_path, caplog):
    train(TrainConfig(**TINY, max_steps=6, ema_decay=0.3), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    before = load_checkpoint(tmp_path / "last.pt")
    train(TrainConfig(**TINY, max_steps=7, ema_decay=0.1), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False, resume=True)
    after = load_checkpoint(tmp_path / "last.pt")
    assert after["ema"]["updates"] == 7 and after["ema"]["decay"] == 0.1
    for name, _ in create_model(TINY["model"]).named_parameters():  # the new decay: 0.1, not 0.3
        torch.testing.assert_close(after["ema"]["module"][name], 0.1 * before["ema"]["module"][name] + 0.9 * after["model"][name])
    with caplog.at_level(logging.WARNING, logger="capsnet"):
        train(TrainConfig(**TINY, max_steps=8), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False, resume=True)
    assert "holds a weight average (ema_decay=0.1) that this config drops" in caplog.text
    assert load_checkpoint(tmp_path / "last.pt")["ema"] is None


def test_turning_the_average_on_at_resume_starts_it_from_the_checkpoint(tmp_path, caplog):
    train(TrainConfig(**TINY, max_steps=3), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    weights = load_checkpoint(tmp_path / "last.pt")["model"]
    with caplog.at_level(logging.WARNING, logger="capsnet"):
        train(TrainConfig(**TINY, max_steps=4, ema_decay=0.5), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False, resume=True)
    assert "holds no weight average" in caplog.text
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["ema"]["updates"] == 1
    d = min(0.5, 2 / 11)  # the first update's rate: from the checkpoint's weights toward step 4's
    parameters = {name for name, _ in create_model(TINY["model"]).named_parameters()}
    assert parameters
    for name, start in weights.items():
        if name in parameters:  # buffers are copied, not averaged
            torch.testing.assert_close(last["ema"]["module"][name], d * start + (1 - d) * last["model"][name])


def test_the_em_model_trains_with_the_average(tmp_path):
    """A model with training_metrics and compiled routing copies and averages (the EM smoke config)."""
    cfg = load_config(str(REPO / "configs" / "mnist_em.py") + ":smoke", ("max_steps=3", "ema_decay=0.9", "figures=False"))
    summary = train(cfg, data_root=tmp_path, out_dir=tmp_path / "em", progress=False)
    assert summary["steps"] == 3 and load_checkpoint(tmp_path / "em" / "last.pt")["ema"]["updates"] == 3
