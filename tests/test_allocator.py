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
from capsnet.allocator import apply_policy

def faults_of_fresh_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        x = torch.empty(10_000_000)  # 40 MB: above glibc's largest mmap threshold
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

system = faults_of_fresh_tensors()
applied = apply_policy() == "keep"  # CAPSNET_MALLOC, as the command line
# The heap grows to its steady size first: small objects made between the big blocks can sit
# above a freed one, so how many rounds that takes depends on what was imported before (one
# to three here); a training step reaches it after its first few steps.
for _ in range(3):
    faults_of_fresh_tensors()
kept = faults_of_fresh_tensors()
print(json.dumps({"applied": applied, "again": apply_policy() == "keep", "system": system, "kept": kept}))
"""


def _run_child(**env):
    env = {**os.environ, **env}
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # huge pages fault once per 2 MiB: the counts below assume 4 KiB
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
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


_POLICY_CHILD = r"""
import ctypes, json, os
import torch
from capsnet import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_mb():  # bytes in blocks that malloc mapped with mmap
    return libc.mallinfo2().hblkhd / 2**20

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def huge_mb():
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) / 1024

policy = allocator.apply_policy()
# glibc's own threshold rises to the size of a freed mapped block (16 MB here), so a 4 MB block
# after it comes from the heap unless the threshold is fixed.
x = torch.ones(4_000_000); del x
before = mapped_mb()
y = torch.ones(1_000_000)
mapped = mapped_mb() - before
del y
huge = huge_mb(); z = torch.ones(8_000_000); huge = huge_mb() - huge; del z  # 32 MB
before = resident_mb()
x = torch.ones(50_000_000)  # 200 MB, touched
held = resident_mb() - before
del x
kept = resident_mb() - before
other = "keep" if policy != "keep" else "compact"
try:
    allocator.apply_policy(other)
    conflict = None
except RuntimeError as exc:
    conflict = str(exc)
print(json.dumps({"policy": policy, "mapped": mapped, "huge": huge, "held": held, "kept": kept, "conflict": conflict,
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def _run_policy_child(policy):
    env = {**os.environ, "CAPSNET_MALLOC": policy}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    done = subprocess.run([sys.executable, "-c", _POLICY_CHILD], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _thp_possible():
    try:
        return "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["compact", "keep", "system"])
def test_each_policy_places_blocks_as_documented(policy):
    out = _run_policy_child(policy)
    assert out["policy"] == policy
    assert f"already runs under the malloc policy '{policy}'" in out["conflict"]
    assert out["held"] > 100  # the 200 MB tensor was resident (less the 52 MB freed before it, at most)
    if policy == "compact":
        assert out["thp"] == "1"
        assert out["mapped"] > 3.5  # a 4 MB block is mapped, whatever was freed before ...
        assert out["kept"] < 20  # ... and a freed one goes back to the system
        if _thp_possible():
            assert out["huge"] > 16  # PyTorch backs large tensors by huge pages
    else:
        assert out["thp"] is None
        assert out["mapped"] == 0  # keep: no mmap at all; system: glibc raised its threshold to 16 MB
    if policy == "keep":
        assert out["kept"] > 100  # kept for the next step


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
