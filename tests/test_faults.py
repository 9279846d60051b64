"""Faults that must leave a run recoverable (issue 14, section 2): each test does the fault to a real run."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, TINY

import capsnet.train.checkpoint as checkpoint_module
import capsnet.train.loop as loop
from capsnet.cli import main
from capsnet.train import CheckpointError, TrainConfig, load_checkpoint, train
from capsnet.train.checkpoint import load_latest, rotate_and_save
from capsnet.train.logs import MetricsLogger, read_metrics_csv


def _train(out, resume=False, final_test=False, **overrides):
    return train(TrainConfig(**dict(TINY, **overrides)), data_root=out.parent, out_dir=out, progress=False, final_test=final_test, resume=resume)


def _rows(out, tag):
    return [r["step"] for r in read_metrics_csv(out / "metrics.csv") if r["tag"] == tag]


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))


class Killed(Exception):
    """Stands for a SIGKILL: an exception the loop does not handle."""


def _kill_at_epoch(monkeypatch, epoch):
    """The run dies when it starts ``epoch`` (0-based), right after the previous epoch ended."""
    order = loop.epoch_order

    def dying(n, seed, e):
        if e == epoch:
            raise Killed(f"killed at the start of epoch {e}")
        return order(n, seed, e)

    monkeypatch.setattr(loop, "epoch_order", dying)


# --------------------------------------------------------------------------- disk full: metrics.csv


def test_torn_last_csv_line_is_dropped_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    _train(out, max_steps=3)
    with open(out / "metrics.csv", "a") as f:
        f.write("269,train/accuracy")  # what a full disk left behind
    with caplog.at_level(logging.WARNING, logger="capsnet"):
        rows = read_metrics_csv(out / "metrics.csv")
    assert rows[-1]["step"] == 3 and all(r["step"] != 269 for r in rows)
    assert any("269,train/accuracy" in r.getMessage() for r in caplog.records), "the warning shows the dropped line"
    _train(out, max_steps=6, resume=True)
    assert _rows(out, "train/loss") == [1, 2, 3, 4, 5, 6]


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from capsnet.train.logs import MetricsLogger
    out = Path(sys.argv[1])
    logger = MetricsLogger(out, resume_step=10**9)  # keeps the 2,000 rows already there
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
    size = (out / "metrics.csv").stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        for step in range(1, 100):
            logger.log(2000 + step, {"train/loss": 0.123456, "train/accuracy": 0.5, "train/lr": 0.001})
    except OSError as exc:
        print("stopped:", exc)
    """
)


@pytest.mark.slow
def test_a_log_write_that_runs_out_of_space_leaves_whole_lines(tmp_path):
    """The file system stops a write part way (here a file-size limit, as a full disk does): no torn row."""
    out = tmp_path / "run"
    out.mkdir()
    lines = ["step,tag,value,time"] + [f"{k},train/loss,0.5,1700000000.000" for k in range(2000)]
    (out / "metrics.csv").write_text("\r\n".join(lines) + "\r\n")
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert "stopped:" in result.stdout, result.stdout + result.stderr[-2000:]
    text = (out / "metrics.csv").read_text()
    assert text.endswith("\n"), f"torn last line: {text[-60:]!r}"
    rows = read_metrics_csv(out / "metrics.csv")
    assert len(rows) >= 2000 and (len(rows) - 2000) % 3 == 0, "each log call is written whole or not at all"


def test_interrupted_csv_rewrite_on_resume_keeps_the_old_file(tmp_path, monkeypatch):
    """A kill while resume rewrites metrics.csv (simulated by a row that fails to format) loses no row."""
    out = tmp_path / "run"
    _train(out, max_steps=6)
    before = (out / "metrics.csv").read_bytes()

    class Unprintable(float):
        def __str__(self):
            raise Killed("killed while rewriting metrics.csv")

        __repr__ = __format__ = lambda self, *a: str(self)

    def rows_with_a_bad_one(path):
        rows = read(path)
        rows[len(rows) // 2]["value"] = Unprintable(1.0)
        return rows

    read = read_metrics_csv
    monkeypatch.setattr("capsnet.train.logs.read_metrics_csv", rows_with_a_bad_one)
    with pytest.raises(Killed):
        MetricsLogger(out, resume_step=4)
    assert (out / "metrics.csv").read_bytes() == before
    assert not [p.name for p in out.glob(".metrics.csv*")], "no temporary file left behind"


# --------------------------------------------------------------------------- one run per directory


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_is_refused(tmp_path):
    """While another process holds the run directory, train() refuses; once it dies, the lock is gone."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{out}.*in use by another training run"):
            _train(out, max_steps=2, resume=True)
        assert not (out / "last.pt").exists() and not (out / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    _train(out, max_steps=2, resume=True)  # the dead holder's lock was released by the OS
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2


def test_a_new_run_on_an_existing_run_is_refused(tmp_path):
    out = tmp_path / "run"
    _train(out, max_steps=2)
    before = (out / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match=rf"{out} already holds a run.*--resume.*--out.*--overwrite"):
        _train(out, max_steps=3, seed=1)
    assert (out / "metrics.csv").read_bytes() == before
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2


def test_overwrite_replaces_the_old_run(tmp_path):
    out = tmp_path / "run"
    _train(out, max_steps=4, keep_checkpoints=3)
    train(TrainConfig(**dict(TINY, max_steps=2, seed=1)), data_root=tmp_path, out_dir=out, progress=False, final_test=False, overwrite=True)
    _train(tmp_path / "fresh", max_steps=2, seed=1)
    assert sorted(p.name for p in out.glob("last*.pt")) == ["last.1.pt", "last.pt"], "no checkpoint of the old run is left"
    assert _rows(out, "train/loss") == [1, 2]
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(tmp_path / "fresh" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- damaged files at resume


def test_damaged_best_checkpoint_is_reselected_at_resume(tmp_path, caplog):
    out = tmp_path / "run"
    _train(out, max_steps=4)
    assert load_checkpoint(out / "best.pt")["step"] == 3
    _corrupt(out / "best.pt")
    with caplog.at_level(logging.WARNING, logger="capsnet"):
        summary = _train(out, max_steps=6, resume=True, final_test=True)
    assert any("best.pt" in r.getMessage() and "next validation" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(out / "best.pt")["step"] == summary["best_step"] == 6
    assert summary["test_samples"] == 16
    assert (out / "best.pt.damaged").exists(), "the damaged file is kept aside, not deleted"


def test_rotation_after_a_fallback_never_replaces_the_good_checkpoint(tmp_path):
    """Resumed from last.1.pt past a damaged last.pt: the next save must not rotate the damaged file over it."""
    out = tmp_path / "run"
    _train(out, max_steps=5)
    good = load_checkpoint(out / "last.1.pt")["progress"]["step"]
    _corrupt(out / "last.pt")
    _train(out, max_steps=good + 1, resume=True, checkpoint_every=1000)  # exactly one save after the resume
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == good + 1
    assert load_checkpoint(out / "last.1.pt")["progress"]["step"] == good, "the checkpoint it resumed from is kept"
    assert (out / "last.pt.damaged").exists()


def test_intact_checkpoint_that_fails_to_load_is_not_called_damaged(tmp_path, monkeypatch):
    """Out of memory after the SHA-256 matched: a clear error, no fall-back to an older file, no advice to delete."""
    for step in range(2):
        rotate_and_save({"step": step}, tmp_path / "last.pt", keep=2)
    load = torch.load

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(checkpoint_module.torch, "load", load)
        raise MemoryError()

    monkeypatch.setattr(checkpoint_module.torch, "load", out_of_memory)
    with pytest.raises(CheckpointError, match=r"last.pt cannot be loaded \(MemoryError.*intact.*not damaged") as info:
        load_latest(tmp_path / "last.pt")
    assert "earlier checkpoint" not in str(info.value) and "delete" not in str(info.value)


def test_orphan_temporary_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    _train(out, max_steps=2)
    orphans = [out / "..last.pt.new.k3j4h5.tmp", out / ".best.pt.x8y9z0.tmp", out / ".metrics.csv.a1b2c3.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 1000)  # what a kill during a checkpoint write leaves
    _train(out, max_steps=3, resume=True)
    assert not [p.name for p in orphans if p.exists()]


# --------------------------------------------------------------------------- checkpoints at epoch ends, resume without repeats


def test_a_checkpoint_is_written_at_each_epoch_end(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _kill_at_epoch(monkeypatch, 1)
    with pytest.raises(Killed):
        _train(out, checkpoint_every=1000)
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3, "epoch 0 (3 steps) is kept"


def test_resume_from_an_epoch_end_checkpoint_validates_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_at_epoch(m, 1)
        with pytest.raises(Killed):
            _train(out, max_steps=6)
    _train(out, max_steps=6, resume=True)
    assert _rows(out, "val/accuracy") == [3, 6]


def test_resume_of_a_finished_run_adds_no_rows(tmp_path, caplog):
    out = tmp_path / "run"
    first = _train(out, max_steps=3, final_test=True)
    before = (out / "metrics.csv").read_bytes()
    with caplog.at_level(logging.INFO, logger="capsnet"):
        again = _train(out, max_steps=3, final_test=True, resume=True)
    assert (out / "metrics.csv").read_bytes() == before
    assert again == first
    assert any("already finished" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_writes_a_resumable_checkpoint(tmp_path, monkeypatch):
    """KeyboardInterrupt inside step 5: last.pt holds step 4, and the resumed run ends bit-identical."""
    cfg = dict(checkpoint_every=1000, max_steps=8)
    _train(tmp_path / "straight", **cfg)
    make = loop.create_objective

    def interrupting(*args, **kwargs):
        objective = make(*args, **kwargs)
        loss = objective.loss

        def loss_or_ctrl_c(output, images, labels, step):
            if step == 4:  # the forward of step 5 (no validation falls on step 4)
                raise KeyboardInterrupt
            return loss(output, images, labels, step)

        objective.loss = loss_or_ctrl_c
        return objective

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(loop, "create_objective", interrupting)
        with pytest.raises(KeyboardInterrupt, match="step 4.*--resume"):
            _train(out, **cfg)
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 4
    _train(out, resume=True, **cfg)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt")["model"], load_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


#: ``capsnet`` (the CLI) whose training waits in the forward of step 5, after last.pt got step 4, for a signal.
WAIT_AT_STEP_5 = textwrap.dedent(
    """
    import signal, sys, time
    import capsnet.train.loop as loop
    from capsnet.cli import main

    # A shell that starts a job in the background without job control (`cmd &` in a script, nohup) starts
    # it with SIGINT ignored, and Python keeps that: the test sends SIGINT as a terminal's Ctrl-C would.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    make = loop.create_objective

    def waiting(*args, **kwargs):
        objective = make(*args, **kwargs)
        loss = objective.loss

        def loss_or_wait(output, images, labels, step):
            if step == 4:
                print("waiting", flush=True)
                time.sleep(120)
            return loss(output, images, labels, step)

        objective.loss = loss_or_wait
        return objective

    loop.create_objective = waiting
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_sigint_to_the_cli_exits_130_naming_the_step_and_resume_finishes(tmp_path):
    """A real SIGINT to ``capsnet train``: exit status 130, one line on stderr and no traceback; ``--resume`` ends the run."""
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "mnist.py") + ":smoke", "--out", str(out), "--data", str(tmp_path)]
    args += ["--no-progress", "--set", "figures=False"]  # smoke: 4 steps per epoch, last.pt every 2 steps
    with open(tmp_path / "stderr", "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", WAIT_AT_STEP_5, *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        try:
            assert child.stdout.readline().strip() == "waiting"
            child.send_signal(signal.SIGINT)
            code = child.wait(timeout=60)
        finally:
            child.kill()
            child.wait()
    err = (tmp_path / "stderr").read_text()
    assert code == 130 and "Traceback" not in err, err  # was a KeyboardInterrupt traceback, killed by SIGINT
    assert err.strip().splitlines()[-1] == (
        f"capsnet train: training interrupted at step 4: {out / 'last.pt'} holds step 4; rerun with --resume to continue"
    )
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
