"""A/B training speed of the EM models between two source trees, alternating, in fresh processes.

    git worktree add /tmp/before <commit>
    python benchmarks/em_ab.py /tmp/before/src src --rounds 3 --out em_ab.json

Each measurement is a fresh process (``PYTHONPATH`` = the tree's ``src``, one thread, capsnet's
allocator setting) that trains ``em_small`` or ``em_full`` at batch 32 on random data with the
spread loss and Adam, and reports images/s as the median of 5 timed steps after 2 untimed ones.
The two trees alternate round by round, so load from other processes falls on both alike:
compare the two columns of one run, never numbers of different runs or machines. ``--clock cpu``
times the process's CPU time instead of the wall clock (images per CPU-second): on a loaded
machine the wall clock also counts the time other processes hold the core, CPU time mostly not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

_CHILD = r"""
import os, sys, time, torch, capsnet
from capsnet.allocator import keep_freed_memory
try:  # trees before capsnet.ops.kernels (session 7) read CAPSNET_KERNELS themselves
    from capsnet.cli import kernel_settings
    from capsnet.ops import kernels
    kernels.configure(**kernel_settings(os.environ))
except ImportError:
    pass
keep_freed_memory(); torch.manual_seed(0); torch.set_num_threads(1)
name, batch, clock = sys.argv[1], int(sys.argv[2]), sys.argv[3]
now = time.process_time if clock == "cpu" else time.perf_counter
model = capsnet.create_model(name)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(batch, model.in_channels, model.image_size, model.image_size)
y = torch.randint(0, model.num_classes, (batch,))
times = []
for _ in range(7):
    start = now()
    loss = capsnet.spread_loss(model(x).activations, y, margin=0.2)
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(now() - start)
times = sorted(times[2:])
print(batch / times[len(times) // 2])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="src folder of the first tree")
    parser.add_argument("after", help="src folder of the second tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="em_small,em_full")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time the wall clock (default) or the process's CPU time")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {"machine": platform.processor() or platform.machine(), "before": args.before, "after": args.after, "clock": args.clock, "images_per_s": {}}
    for _ in range(args.rounds):
        for model in args.models.split(","):
            for tag, src in (("before", args.before), ("after", args.after)):
                env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
                done = subprocess.run([sys.executable, "-c", _CHILD, model, "32", args.clock], env=env, capture_output=True, text=True, check=True)
                result["images_per_s"].setdefault(f"{model}/{tag}", []).append(round(float(done.stdout.strip()), 2))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
