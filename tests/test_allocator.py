"""capsnet.allocator: glibc keeps freed memory, in a child process (the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import json, resource, time
import torch
from capsnet.allocator import keep_freed_memory

def faults_of_fresh_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        x = torch.empty(10_000_000)  # 40 MB: above glibc's largest mmap threshold
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

system = faults_of_fresh_tensors()
applied = keep_freed_memory()
# The heap grows to its steady size first: small objects made between the big blocks can sit
# above a freed one, so how many rounds that takes depends on what was imported before (one
# to three here); a training step reaches it after its first few steps.
for _ in range(3):
    faults_of_fresh_tensors()
kept = faults_of_fresh_tensors()
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "system": system, "kept": kept}))
"""


def _run_child(**env):
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.slow
def test_freed_tensors_are_reused_without_page_faults():
    out = _run_child(CAPSNET_MALLOC="")
    assert out["applied"] and out["again"]
    # 4 x 40 MB fresh from mmap: about 40,000 faults; kept on the heap: next to none.
    assert out["system"] > 20_000
    assert out["kept"] < out["system"] / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.slow
def test_capsnet_malloc_system_keeps_the_defaults():
    out = _run_child(CAPSNET_MALLOC="system")
    assert not out["applied"] and not out["again"]
    assert out["kept"] > 20_000


_COMPACT_CHILD = r"""
import json, os
import torch
from capsnet import allocator

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

policy = allocator.apply_policy()
before = resident_mb()
x = torch.ones(50_000_000)  # 200 MB, touched
held = resident_mb()
del x
after = resident_mb()
try:
    allocator.keep_freed_memory() if policy == "compact" else allocator.compact_memory()
    conflict = None
except RuntimeError as exc:
    conflict = str(exc)
print(json.dumps({"policy": policy, "before": before, "held": held, "after": after, "conflict": conflict,
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def _run_compact_child(policy):
    env = {**os.environ, "CAPSNET_MALLOC": policy}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    done = subprocess.run([sys.executable, "-c", _COMPACT_CHILD], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.slow
def test_compact_returns_freed_blocks_and_keep_does_not():
    compact = _run_compact_child("compact")
    assert compact["policy"] == "compact" and compact["thp"] == "1"
    assert compact["held"] - compact["before"] > 150  # the tensor was resident ...
    assert compact["after"] - compact["before"] < 20  # ... and went back to the system with del
    assert "already runs under the malloc policy 'compact'" in compact["conflict"]
    keep = _run_compact_child("keep")
    assert keep["policy"] == "keep" and keep["thp"] is None
    assert keep["after"] - keep["before"] > 150  # kept for the next step
    assert "already runs under the malloc policy 'keep'" in keep["conflict"]


def test_unknown_policy_is_refused_with_the_variable_named(monkeypatch):
    from capsnet import allocator

    monkeypatch.setenv("CAPSNET_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"CAPSNET_MALLOC='jemalloc' is not a malloc policy: expected one of keep, compact, system"):
        allocator.apply_policy()
    with pytest.raises(ValueError, match="expected one of keep, compact, system"):
        allocator.apply_policy("fast")


def test_cli_refuses_an_unknown_policy(monkeypatch, capsys, tmp_path):
    from capsnet.cli import main

    monkeypatch.setenv("CAPSNET_MALLOC", "jemalloc")
    assert main(["train", "--config", "configs/mnist.py:smoke", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "CAPSNET_MALLOC='jemalloc' is not a malloc policy" in err
    assert not (tmp_path / "run").exists()
