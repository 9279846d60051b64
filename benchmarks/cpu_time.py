"""Training speed of models in images per CPU-second, alternating in fresh processes.

    python benchmarks/cpu_time.py --models capsnet_mnist,em_small --rounds 3

Each measurement is a fresh process (one thread by default, capsnet's ``keep`` allocator
policy) that trains the model at ``--batch`` on random data with its paper loss (margin +
0.0005 x reconstruction for models with ``lengths``, spread loss otherwise) and Adam, and
reports ``batch`` over the median CPU time (``time.process_time``) of 5 steps after 2 untimed
ones. On a machine that other processes load, the wall clock also counts the time they hold
the core; CPU time mostly does not, so this compares models there where ``benchmarks/run.py``
cannot. It is not the issue's ratio (``run.py``'s wall clock on an idle machine, its thread
count): the models' scaling to more threads differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

_CHILD = r"""
import sys, time, torch, capsnet
from capsnet.allocator import keep_freed_memory
from capsnet.functional import margin_loss, reconstruction_loss, spread_loss
keep_freed_memory(); torch.manual_seed(0)
name, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = capsnet.create_model(name)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(batch, model.in_channels, model.image_size, model.image_size)
y = torch.randint(0, model.num_classes, (batch,))

def loss_of(out):
    if getattr(out, "lengths", None) is not None:
        loss = margin_loss(out.lengths, y)
        return loss if out.reconstruction is None else loss + reconstruction_loss(out.reconstruction, x)
    return spread_loss(out.activations, y, margin=0.2)

times = []
for _ in range(7):
    start = time.process_time()
    loss = loss_of(model(x, y))
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.process_time() - start)
times = sorted(times[2:])
print(batch / times[len(times) // 2])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="capsnet_mnist,em_small", help="comma-separated model names")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    models = args.models.split(",")
    result = {"machine": platform.processor() or platform.machine(), "batch": args.batch, "threads": args.threads,
              "images_per_cpu_s": {m: [] for m in models}}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for _ in range(args.rounds):
        for model in models:
            done = subprocess.run([sys.executable, "-c", _CHILD, model, str(args.batch), str(args.threads)],
                                  env=env, capture_output=True, text=True, check=True)
            result["images_per_cpu_s"][model].append(round(float(done.stdout.strip()), 2))
    result["median"] = {m: statistics.median(v) for m, v in result["images_per_cpu_s"].items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
