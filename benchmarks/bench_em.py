"""Training speed and peak memory of the EM-capsule models against the dynamic-routing CapsNet.

Run:
    python benchmarks/bench_em.py                        # prints JSON, ~5 minutes on 2 CPU cores
    python benchmarks/bench_em.py --threads 1 --out bench_em.json
    python benchmarks/bench_em.py --system-malloc        # glibc's malloc defaults (see below)
    python benchmarks/bench_em.py --omp-passive          # OpenMP threads sleep instead of spinning (see below)
    python benchmarks/bench_em.py --threads 1 --clock cpu   # images per CPU-second (see below)

Every measurement runs in a fresh subprocess: speed is training images per second (forward,
loss, backward, Adam step) at batch 32 on random data, the median and best of ``--steps``
timed steps after ``--warmup`` untimed ones; memory is the peak resident set size
(``resource.getrusage(...).ru_maxrss``) of a process that builds the model and runs two training
steps (em_small at batch 128, em_full at batch 32). Targets (issue 5): em_small at least as
fast as capsnet_mnist, em_full at least a quarter as fast; peak RSS <= 1.5 GB and <= 3 GB.

The workers call :func:`capsnet.allocator.keep_freed_memory` first, as ``capsnet train`` does:
glibc then reuses freed heap memory instead of mapping (and faulting in) fresh pages for every
large tensor of every step. ``--system-malloc`` keeps glibc's defaults.

``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` for the workers. On a machine whose cores
other processes also use, spinning OpenMP threads wait for a descheduled partner at every
parallel region; EM routing runs thousands of small operations per step, so with two threads
its steps then take 10x longer and vary wildly (one thread, or passive waiting, avoids it).

``--clock cpu`` times each step's CPU time (``time.process_time``) instead of the wall clock:
on a machine that other processes load, the wall clock also counts the time they hold the core,
CPU time mostly not. With one thread it compares the models there; it is not the issue's
ratio, which is the wall clock of an idle machine (the models scale differently to more threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SPEED = [("capsnet_mnist", 32), ("em_small", 32), ("em_full", 32)]
MEMORY = [("em_small", 128), ("em_full", 32)]


def _worker(model_name: str, batch: int, steps: int, warmup: int, threads: int | None, malloc: str, clock: str = "wall") -> dict:
    import torch

    from capsnet.allocator import keep_freed_memory

    if malloc == "kept":
        keep_freed_memory()

    from capsnet import create_model
    from capsnet.cli import kernel_settings
    from capsnet.functional import margin_loss, spread_loss
    from capsnet.ops import kernels

    kernels.configure(**kernel_settings(os.environ))  # CAPSNET_KERNELS=0: the eager vote reads, as the CLI

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, model.in_channels, model.image_size, model.image_size)
    y = torch.randint(0, model.num_classes, (batch,))

    now = time.process_time if clock == "cpu" else time.perf_counter

    def step() -> float:
        start = now()
        out = model(x, y)
        if hasattr(out, "activations"):
            loss = spread_loss(out.activations, y, margin=0.2)
        else:
            loss = margin_loss(out.lengths, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return now() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    return {
        "model": model_name,
        "batch": batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "step_s_median": statistics.median(times),
        "step_s_best": min(times),
        "images_per_s_median": batch / statistics.median(times),
        "images_per_s_best": batch / min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def _spawn(args: argparse.Namespace, model_name: str, batch: int, steps: int, warmup: int) -> dict:
    env = dict(os.environ)
    if args.omp_passive:
        env.update(OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "--worker", model_name, str(batch), str(steps), str(warmup), _malloc(args)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--clock", args.clock]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _malloc(args: argparse.Namespace) -> str:
    return "system" if args.system_malloc else "kept"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the workers (default: torch's choice)")
    parser.add_argument("--system-malloc", action="store_true", help="glibc's malloc defaults (default: keep freed memory, as the CLI)")
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE in the workers")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time the wall clock (default) or the worker's CPU time")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:  # CPU time sums every thread's, OpenMP's spinning included
        parser.error("--clock cpu needs --threads 1")
    if args.worker:
        name, batch, steps, warmup, malloc = args.worker
        print(json.dumps(_worker(name, int(batch), int(steps), int(warmup), args.threads, malloc, args.clock)))
        return
    speed = {name: _spawn(args, name, batch, args.steps, args.warmup) for name, batch in SPEED}
    memory = {f"{name}@{batch}": _spawn(args, name, batch, 2, 0)["peak_rss_mb"] for name, batch in MEMORY}
    base = speed["capsnet_mnist"]["images_per_s_median"]
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "malloc": _malloc(args),
        "omp_passive": args.omp_passive,
        "clock": args.clock,
        "speed": speed,
        "speed_ratio_vs_capsnet_mnist": {n: speed[n]["images_per_s_median"] / base for n in ("em_small", "em_full")},
        "targets": {"em_small_ratio": 1.0, "em_full_ratio": 0.25, "em_small@128_rss_mb": 1536, "em_full@32_rss_mb": 3072},
        "peak_rss_mb": memory,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
