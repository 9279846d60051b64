"""Multi-process training (torchrun, gloo) and surviving killed processes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO

from capsnet.train import TrainConfig, load_checkpoint, train
from capsnet.train.checkpoint import CheckpointError, load_latest

SMOKE = str(REPO / "configs" / "mnist.py:smoke")
# amp=None: float32 on every CPU (amp="auto" is bf16 with AMX-BF16; these runs are compared to 1e-5).
COMMON = ["--no-progress", "--set", "figures=False", "--set", "checkpoint_every=1", "--set", "amp=None"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    env.pop("WORLD_SIZE", None)
    return env


def _capsnet(*args, nproc=None, extra=(), check=True):
    if nproc is None:
        cmd = [sys.executable, "-m", "capsnet", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, "-m", "capsnet", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=check, timeout=240)


def _weights(run):
    return load_checkpoint(run / "last.pt")["model"]


def _assert_close(a, b, atol):
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name}: max diff {(a[name] - b[name]).abs().max()}"


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """DDP averages the two half-batch gradients: equal to the full-batch gradient up to float rounding.

    With the weights' moving average (``ema_decay``) on: every rank keeps its own, and rank 0's is saved.
    """
    ema = ("--set", "ema_decay=0.5")
    _capsnet("train", "--config", SMOKE, "--out", str(tmp_path / "one"), "--data", str(tmp_path), *COMMON, *ema)
    _capsnet("train", "--config", SMOKE, "--out", str(tmp_path / "two"), "--data", str(tmp_path), *COMMON, *ema, nproc=2)
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert two["progress"]["step"] == 8 and two["ema"]["updates"] == 8
    _assert_close(one["model"], two["model"], atol=1e-5)
    _assert_close(one["ema"]["module"], two["ema"]["module"], atol=1e-5)
    best = load_checkpoint(tmp_path / "two" / "best.pt")
    if best["step"] == 8:  # validated at the end of each of the two epochs; the last may not be the best
        _assert_close(best["model"], two["ema"]["module"], atol=0)  # best.pt holds the average


@pytest.mark.slow
def test_resume_with_a_different_number_of_processes(tmp_path):
    _capsnet("train", "--config", SMOKE, "--out", str(tmp_path / "one"), "--data", str(tmp_path), *COMMON)
    mixed = tmp_path / "mixed"
    _capsnet("train", "--config", SMOKE, "--out", str(mixed), "--data", str(tmp_path), *COMMON, "--set", "max_steps=4", nproc=2)
    _capsnet("train", "--config", SMOKE, "--out", str(mixed), "--data", str(tmp_path), *COMMON, "--resume")
    _assert_close(_weights(tmp_path / "one"), _weights(mixed), atol=1e-5)


TINY = dict(
    model="capsnet_tiny",
    dataset="synthetic",
    dataset_kwargs=dict(train_size=256, val_size=16, test_size=16),
    batch_size=8,
    epochs=2,
    checkpoint_every=1,
    log_every=1,
    figures=False,
    max_steps=60,
    amp=None,  # float32 on every CPU, as COMMON
)

KILLABLE = textwrap.dedent(
    """
    import sys
    from capsnet.train import TrainConfig, train
    train(TrainConfig(**{cfg!r}), data_root=sys.argv[1], out_dir=sys.argv[1], progress=False, final_test=False, resume=True)
    """
)


def _saved_step(run) -> int:
    """The step of the newest complete checkpoint in ``run`` (-1 when there is none yet).

    The trainer may be writing or rotating at this very moment, so a file can vanish between
    listing and reading: that counts as "not yet"."""
    try:
        found = load_latest(run / "last.pt")
    except (FileNotFoundError, CheckpointError):
        return -1
    return -1 if found is None else found[0]["progress"]["step"]


def _train_in_child(out, *, threads="1"):
    """Train TINY in a fresh process under ``threads`` OpenMP threads (resuming from ``out`` if it holds a run)."""
    out.mkdir(exist_ok=True)
    env = dict(_env(), OMP_NUM_THREADS=threads)
    subprocess.run([sys.executable, "-c", KILLABLE.format(cfg=TINY), str(out)], env=env, check=True, timeout=240)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    # Both runs in child processes under the same thread count: on AVX-512 CPUs one and two
    # threads round differently, so a run compared with one trained under pytest's own thread
    # count would differ for that reason alone (docs/reliability.md, "Resume").
    straight = tmp_path / "straight"
    _train_in_child(straight)

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE.format(cfg=TINY), str(killed)], env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if _saved_step(killed) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = _saved_step(killed)  # the kill may land mid-rotation: last.pt or last.1.pt holds it
    assert 5 <= stopped_at < 60

    _train_in_child(killed)
    a, b = _weights(straight), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_resume_under_another_thread_count_warns(tmp_path, caplog):
    """A checkpoint records the numerics it was made under; resuming under others says so."""
    cfg = TrainConfig(**dict(TINY, max_steps=4))
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(cfg, data_root=tmp_path, out_dir=out, progress=False, final_test=False)
        assert load_checkpoint(out / "last.pt")["numerics"]["threads"] == 1
        torch.set_num_threads(2)
        with caplog.at_level("WARNING", logger="capsnet"):
            train(TrainConfig(**dict(TINY, max_steps=6)), data_root=tmp_path, out_dir=out, progress=False, final_test=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert any("threads 1 -> 2" in r.getMessage() and "not bit-identically" in r.getMessage() for r in caplog.records)


WORKER_THAT_DIES_ONCE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    out = Path(sys.argv[1])
    marker = out / "died-once"
    if not marker.exists():
        marker.write_text("x")
        def kill_after_first_checkpoint():
            while not (out / "last.pt").exists():
                time.sleep(0.01)
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    from capsnet.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_torchrun_max_restarts_continues_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER_THAT_DIES_ONCE)
    args = ["train", "--config", SMOKE, "--out", str(out), "--data", str(tmp_path), *COMMON, "--set", "epochs=40", "--resume"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1", str(script), str(out), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "died-once").exists()
    assert "resumed from" in result.stderr, "the restarted worker continued from the checkpoint"
    straight = tmp_path / "straight"
    _capsnet("train", "--config", SMOKE, "--out", str(straight), "--data", str(tmp_path), *COMMON, "--set", "epochs=40")
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_launcher_the_command_line_stays_one_process():
    from capsnet.train.distributed import Dist

    dist, device = Dist.launch("cpu", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (dist.enabled, dist.rank, dist.world, dist.is_main, device) == (False, 0, 1, True, "cpu")
    dist.close()  # no group: nothing to leave
