import errno
import hashlib
import logging
import math
import os
import pickle
import sys

import pytest
import torch
from conftest import REPO, TINY

from capsnet.train import CheckpointError, TrainConfig, load_checkpoint, load_config, save_checkpoint, train
from capsnet.train.checkpoint import MAGIC, load_latest, rotate_and_save
from capsnet.train.logs import read_events, read_metrics_csv


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize(
    "optimizer", [{}, {"lr_scale": {"*.bias": 3.0, "conv1.*": 0.5}, "adam_beta2": 0.99, "grad_clip": 0.05}], ids=["plain", "lr-groups-clipped"]
)
def test_resume_is_bit_identical(tmp_path, optimizer):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: same weights, optimizer and RNG."""
    straight = TrainConfig(**TINY, **optimizer, max_steps=8)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    train(TrainConfig(**TINY, **optimizer, max_steps=4), data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a["rng"]["augment"], b["rng"]["augment"])
    groups = a["optimizer"]["param_groups"]
    assert len(groups) == (3 if optimizer else 1) and {g["betas"][1] for g in groups} == {optimizer.get("adam_beta2", 0.999)}
    if optimizer:  # the factors hold through the schedule: bias 3x, conv1.weight 0.5x the rest
        smallest = min(g["lr"] for g in groups)
        assert sorted(round(g["lr"] / smallest, 6) for g in groups) == [1.0, 2.0, 6.0]  # 0.5 : 1 : 3


def test_resume_crosses_an_epoch_boundary(tmp_path):
    """3 steps per epoch: stopping at step 4 resumes in the middle of epoch 2 with its own order."""
    straight = TrainConfig(**TINY, max_steps=7)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    train(TrainConfig(**TINY, max_steps=4), data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_csv_after_resume_holds_one_history(tmp_path):
    cfg = TrainConfig(**TINY, max_steps=6)
    train(TrainConfig(**TINY, max_steps=3), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    train(cfg, data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False, resume=True)
    steps = [r["step"] for r in read_metrics_csv(tmp_path / "metrics.csv") if r["tag"] == "train/loss"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_learns_the_synthetic_task(tmp_path):
    cfg = TrainConfig(**dict(TINY, epochs=8, checkpoint_every=50, dataset_kwargs=dict(train_size=96, val_size=64, test_size=64)), lr=3e-3)
    summary = train(cfg, data_root=tmp_path, out_dir=tmp_path, progress=False)
    assert summary["best_val_accuracy"] > 0.8
    assert summary["test_samples"] == 64 and summary["test_accuracy"] > 0.8


def test_best_checkpoint_is_chosen_on_validation(tmp_path):
    summary = train(TrainConfig(**TINY), data_root=tmp_path, out_dir=tmp_path, progress=False)
    vals = [r for r in read_metrics_csv(tmp_path / "metrics.csv") if r["tag"] == "val/accuracy"]
    best = max(vals, key=lambda r: r["value"])
    assert summary["best_val_accuracy"] == pytest.approx(best["value"], abs=1e-6)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == summary["best_step"]


def test_tensorboard_events_hold_the_csv_scalars(tmp_path):
    train(TrainConfig(**dict(TINY, epochs=1)), data_root=tmp_path, out_dir=tmp_path, progress=False)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = read_events(events)
    csv_rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert len(scalars) == len(csv_rows)
    assert {(s, t) for s, t, _ in scalars} == {(r["step"], r["tag"]) for r in csv_rows}


def test_tensorboard_reads_our_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(TrainConfig(**dict(TINY, epochs=1)), data_root=tmp_path, out_dir=tmp_path, progress=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"x": torch.ones(3)}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file left behind"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_code_is_refused_even_with_a_valid_checksum(tmp_path, monkeypatch):
    """A crafted pickle behind a correct header and SHA-256 still never runs: weights_only=True."""
    monkeypatch.chdir(tmp_path)
    body = pickle.dumps({"model": _Evil()})
    path = tmp_path / "evil.pt"
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(CheckpointError, match="evil.pt cannot be loaded"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError, match="plain.pt cannot be loaded.*not a capsnet checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.pt cannot be loaded: its SHA-256 does not match"):
        load_checkpoint(path)


def test_bit_flip_is_detected(tmp_path):
    path = tmp_path / "flip.pt"
    save_checkpoint({"w": torch.randn(100)}, path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(path)


def test_rotation_keeps_the_last_k(tmp_path):
    for step in range(5):
        rotate_and_save({"step": step}, tmp_path / "last.pt", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.1.pt", "last.2.pt", "last.pt"]
    assert [load_checkpoint(tmp_path / n)["step"] for n in ("last.pt", "last.1.pt", "last.2.pt")] == [4, 3, 2]


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    for step in range(3):
        rotate_and_save({"step": step}, tmp_path / "last.pt", keep=2)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:50])
    ckpt, path = load_latest(tmp_path / "last.pt")
    assert ckpt["step"] == 1 and path.name == "last.1.pt"


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    save_checkpoint({"step": 0}, tmp_path / "last.pt")
    (tmp_path / "last.pt").write_bytes(b"CAPSNET1" + b"x" * 40)
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_latest(tmp_path / "last.pt")


def test_training_resumes_past_a_corrupt_checkpoint(tmp_path):
    """Newest checkpoint corrupted: training falls back to the older one and still ends identical."""
    cfg = TrainConfig(**dict(TINY, keep_checkpoints=3), max_steps=8)
    train(cfg, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    b = tmp_path / "b"
    train(TrainConfig(**dict(TINY, keep_checkpoints=3), max_steps=5), data_root=tmp_path, out_dir=b, progress=False, final_test=False)
    raw = bytearray((b / "last.pt").read_bytes())
    raw[-10] ^= 0xFF
    (b / "last.pt").write_bytes(bytes(raw))
    train(cfg, data_root=tmp_path, out_dir=b, progress=False, final_test=False, resume=True)
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(b / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_unknown_config_key_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown config key 'batchsize'.*'batch_size'"):
        TrainConfig.from_dict({"batchsize": 3})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"batch_size": "128"}, "'batch_size' must be of type int"),
        ({"lr": True}, "'lr' must be of type float"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"lr": -1.0}, "'lr' must be > 0"),
        ({"lr_decay_rate": 1.5}, "lr_decay_rate"),
        ({"max_steps": 0}, "'max_steps' must be >= 1"),
    ],
)
def test_bad_config_values_are_rejected_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_an_lr_scale_pattern_that_matches_no_parameter_is_refused_before_the_run_directory(tmp_path):
    with pytest.raises(ValueError, match=r"lr_scale pattern\(s\) \['classes\.\*'\] match no parameter of CapsNet"):
        train(TrainConfig(**TINY, lr_scale={"classes.*": 2.0}), data_root=tmp_path, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_warns_about_changed_keys_only_not_about_keys_added_since_the_checkpoint(tmp_path, caplog):
    train(TrainConfig(**TINY, max_steps=2), data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)
    for path in (tmp_path / "run").glob("last*.pt"):  # as written before the optimiser keys existed
        ckpt = load_checkpoint(path)
        ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("adam_beta1", "adam_beta2", "lr_scale", "grad_clip")}
        save_checkpoint(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="capsnet.train.loop"):
        train(TrainConfig(**TINY, max_steps=2), data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False, resume=True)
    assert "changed config" not in caplog.text  # the four keys the checkpoint lacks hold their defaults
    with caplog.at_level(logging.WARNING, logger="capsnet.train.loop"):
        train(TrainConfig(**TINY, max_steps=4, grad_clip=1.0), data_root=tmp_path, out_dir=tmp_path / "run", progress=False,
              final_test=False, resume=True)
    assert "keys that differ: grad_clip, max_steps" in caplog.text


def test_resuming_with_other_lr_factors_is_refused_and_train_lr_is_the_schedules(tmp_path):
    scaled = dict(TINY, lr_scale={"conv1.*": 0.5, "*.bias": 2.0}, log_every=1)
    train(TrainConfig(**scaled, max_steps=2), data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)
    train(TrainConfig(**{**scaled, "lr_scale": {}}, max_steps=2), data_root=tmp_path, out_dir=tmp_path / "plain", progress=False,
          final_test=False)
    lrs = [[r["value"] for r in read_metrics_csv(tmp_path / d / "metrics.csv") if r["tag"] == "train/lr"] for d in ("run", "plain")]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 2  # conv1.weight's group (x0.5) comes first; the log is the unscaled lr
    for other in ({"conv1.*": 0.5}, {"*.bias": 2.0, "conv1.*": 0.5}, {}):  # another factor set, another order, none
        with pytest.raises(CheckpointError, match=r"was trained with lr_scale=\{'conv1.\*': 0.5, '\*.bias': 2.0\}"):
            train(TrainConfig(**{**scaled, "lr_scale": other}, max_steps=4), data_root=tmp_path, out_dir=tmp_path / "run",
                  progress=False, final_test=False, resume=True)
    train(TrainConfig(**scaled, max_steps=4), data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False, resume=True)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["step"] == 4


def test_gradient_clipping_clips_logs_the_norm_and_is_exact_when_it_does_not_bite(tmp_path):
    runs = {"none": None, "loose": 1e9, "tight": 1e-3}
    for name, clip in runs.items():
        train(TrainConfig(**{**TINY, "log_every": 1}, max_steps=4, grad_clip=clip), data_root=tmp_path, out_dir=tmp_path / name,
              progress=False, final_test=False)
    w = {name: _weights(tmp_path / name / "last.pt") for name in runs}
    assert all(torch.equal(w["none"][k], w["loose"][k]) for k in w["none"]), "a norm below the limit is multiplied by exactly 1"
    assert not all(torch.equal(w["none"][k], w["tight"][k]) for k in w["none"])
    norms = [float(r["value"]) for r in read_metrics_csv(tmp_path / "tight" / "metrics.csv") if r["tag"] == "train/grad_norm"]
    assert len(norms) == 4 and all(n > 1e-3 and math.isfinite(n) for n in norms), norms  # before clipping
    assert not [r for r in read_metrics_csv(tmp_path / "none" / "metrics.csv") if r["tag"] == "train/grad_norm"]


def test_config_file_overrides_reach_nested_keys():
    cfg = load_config(str(REPO / "configs" / "mnist.py"), ("model_kwargs.routing_iterations=1", "batch_size=64", "dataset=fashion_mnist"))
    assert cfg.model_kwargs["routing_iterations"] == 1 and cfg.batch_size == 64 and cfg.dataset == "fashion_mnist"


def test_paper_recipe_in_the_mnist_config():
    cfg = load_config(str(REPO / "configs" / "mnist.py"))
    assert (cfg.lr, cfg.lr_decay_rate, cfg.lr_decay_steps, cfg.batch_size) == (1e-3, 0.96, 2000, 128)
    assert cfg.model_kwargs["routing_iterations"] == 3 and cfg.objective_kwargs["recon_weight"] == 0.0005


def test_learning_rate_decays_continuously(tmp_path):
    from capsnet.train.loop import lr_factor

    factor = lr_factor(TrainConfig())
    assert factor(0) == 1.0 and factor(2000) == pytest.approx(0.96) and factor(1000) == pytest.approx(0.96**0.5)
    assert factor(10**9) == pytest.approx(1e-6 / 1e-3), "floored at lr_min"


def test_cosine_schedule_with_warmup():
    from capsnet.train.loop import lr_factor

    factor = lr_factor(TrainConfig(lr=2e-3, lr_min=2e-6, lr_schedule="cosine", lr_decay_steps=100, lr_warmup_steps=10))
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0]), "linear warm-up over 10 steps"
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5 + 0.5e-3), "half way down the cosine"
    assert factor(110) == pytest.approx(1e-3) and factor(10**6) == pytest.approx(1e-3), "held at lr_min after the end"
    warm = lr_factor(TrainConfig(lr_warmup_steps=4))  # exponential: the decay starts after the warm-up
    assert [warm(s) for s in (0, 3, 2004)] == pytest.approx([0.25, 1.0, 0.96])
    rest = lr_factor(TrainConfig(lr_schedule="cosine", lr_decay_steps=None, lr_warmup_steps=10), total_steps=110)
    assert rest(10) == pytest.approx(1.0) and rest(60) == pytest.approx(0.5 + 0.5e-3) and rest(110) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="'lr_min' .* must not exceed 'lr'"):
        TrainConfig(lr=1e-3, lr_min=1e-2)
    with pytest.raises(ValueError, match="'lr_schedule' must be one of"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="'lr_warmup_steps' must be >= 0"):
        TrainConfig(lr_warmup_steps=-1)


def test_model_and_data_shapes_must_agree(tmp_path):
    cfg = TrainConfig(**dict(TINY, dataset_kwargs=dict(image_size=32)))
    with pytest.raises(ValueError, match="expects 1x28x28 images but dataset 'synthetic' gives 1x32x32"):
        train(cfg, data_root=tmp_path, out_dir=tmp_path, progress=False)


def test_kwargs_errors_name_the_key_or_the_values(tmp_path):
    """A misspelt kwarg names its key, a trainer-owned one says so, a wrongly typed value is refused by the config by name."""
    cases = [
        ("model_kwargs", dict(routing_iteratons=2), r"bad model_kwargs for model 'capsnet_tiny'.*routing_iteratons.*fix that key"),
        ("model_kwargs", dict(conv_channels="16"), r"config key 'model_kwargs.conv_channels' must be an int \(capsnet_tiny takes conv_channels: int\)"),
        ("dataset_kwargs", dict(trian_size=8), r"bad dataset_kwargs for dataset 'synthetic'.*trian_size"),
        ("dataset_kwargs", dict(seed=1), r"'seed' is set by the trainer; remove it from dataset_kwargs"),
    ]
    for k, (key, kwargs, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(**dict(TINY, **{key: kwargs})), data_root=tmp_path, out_dir=tmp_path / str(k), progress=False)
        assert not (tmp_path / str(k)).exists(), "a refused config leaves no run directory"


def test_log_lines_are_not_glued_onto_the_progress_bar(tmp_path, capsys):
    """A log record emitted while the bar is drawn starts on a line of its own (the bar's writer prints it)."""
    handler = logging.StreamHandler(sys.stderr)  # stderr as pytest captures it, where the bar draws too
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root, capsnet_log = logging.getLogger(), logging.getLogger("capsnet")
    level = capsnet_log.level
    root.addHandler(handler)
    capsnet_log.setLevel(logging.INFO)
    try:
        train(TrainConfig(**TINY), data_root=tmp_path, out_dir=tmp_path, progress=True, final_test=False)
    finally:
        root.removeHandler(handler)
        capsnet_log.setLevel(level)
    err = capsys.readouterr().err
    starts = [err[max(0, k - 1)] for k in range(len(err)) if err.startswith("LOG ", k)]
    assert len(starts) >= 3, err
    assert set(starts) <= {"\n", "\r"}, f"a log line glued onto the bar: {err!r}"


def test_progress_bar_is_throttled_when_not_a_terminal(tmp_path, capsys):
    """Written to a file or a pipe, the bar is not redrawn at every step (no log full of carriage returns)."""
    train(TrainConfig(**dict(TINY, epochs=4)), data_root=tmp_path, out_dir=tmp_path, progress=True, final_test=False)
    err = capsys.readouterr().err
    assert "12/12" in err
    assert err.count("\r") <= 4, f"{err.count(chr(13))} redraws for 12 steps: {err!r}"


def test_model_training_metrics_are_logged_at_each_log_step(tmp_path, monkeypatch):
    """A model's ``training_metrics()`` is called after the optimizer step, gradients still there, and logged."""
    import capsnet.train.loop as loop

    build, grads_seen = loop.build_model, []

    def with_metrics(cfg, data):
        model = build(cfg, data)

        def training_metrics():
            grads_seen.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))
            return {"routing/caps1/it2/entropy": 0.25 * len(grads_seen)}

        model.training_metrics = training_metrics
        return model

    monkeypatch.setattr(loop, "build_model", with_metrics)
    train(TrainConfig(**dict(TINY, log_every=2)), data_root=tmp_path, out_dir=tmp_path, progress=False, final_test=False)
    rows = [(r["step"], r["value"]) for r in read_metrics_csv(tmp_path / "metrics.csv") if r["tag"] == "routing/caps1/it2/entropy"]
    loss_steps = [r["step"] for r in read_metrics_csv(tmp_path / "metrics.csv") if r["tag"] == "train/loss"]
    assert [s for s, _ in rows] == loss_steps == [2, 4, 6, 8, 9]
    assert [v for _, v in rows] == [0.25, 0.5, 0.75, 1.0, 1.25]
    assert grads_seen == [True] * 5
