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
