"""Fused routing against the unfused reference, interleaved in one process (before/after ratios).

    python benchmarks/routing.py                      # batch 128, torch's default threads
    python benchmarks/routing.py --threads 1 --repeats 7

Three groups, each timed in round-robin so load drifting on a shared machine hits every
variant alike; medians of wall-clock and of process CPU time (user + system, all
threads) are printed with their ratio to the first row of the group:

* ``DenseCaps`` (1152 x 8 -> 10 x 16, 3 iterations) forward + backward, and forward alone;
* the whole ``capsnet_mnist`` training step (natural loss, Adam) next to the conv bound
  (the PrimaryCaps convolution, forward + backward), with ``DenseCaps.forward`` fused
  (the library) and unfused (``_bench.unfused_forward`` on that instance);
* the same for inference (no_grad) next to the forward bound.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from run import cpu_model  # noqa: E402

import capsnet  # noqa: E402
from capsnet.layers import DenseCaps  # noqa: E402


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall and CPU seconds per call of each function, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu, wall = _cpu_s(), time.perf_counter()
            fn()
            samples[name][0].append(time.perf_counter() - wall)
            samples[name][1].append(_cpu_s() - cpu)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in samples.items()}


def show(title: str, results: dict) -> None:
    print(f"\n{title}")
    base_wall, base_cpu = next(iter(results.values()))
    for name, (wall, cpu) in results.items():
        print(f"  {name:28s} wall {1e3 * wall:9.1f} ms (x{wall / base_wall:5.2f})   cpu {1e3 * cpu:9.1f} ms (x{cpu / base_cpu:5.2f})")


def dense_caps(batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    layer = DenseCaps(1152, 8, 10, 16)
    unfused = types.MethodType(_bench.unfused_forward, layer)
    u = torch.randn(batch, 1152, 8) * 0.1

    def train(forward):
        def step():
            x = u.detach().requires_grad_(True)
            poses = forward(x).poses
            poses.backward(torch.ones_like(poses))

        return step

    def infer(forward):
        def step():
            with torch.no_grad():
                forward(u)

        return step

    show(
        f"DenseCaps 1152x8 -> 10x16, 3 iterations, batch {batch}",
        interleaved(
            {
                "unfused forward+backward": train(unfused),
                "fused forward+backward": train(layer),
                "unfused forward (no_grad)": infer(unfused),
                "fused forward (no_grad)": infer(layer),
            },
            repeats,
        ),
    )


def whole_model(batch: int, repeats: int, mode: str) -> None:
    def make(fused: bool):
        torch.manual_seed(0)
        model = capsnet.create_model("capsnet_mnist")
        if not fused:
            model.digits.forward = types.MethodType(_bench.unfused_forward, model.digits)
        images, labels = _bench.synthetic_batch(model, batch, torch.device("cpu"))
        if mode == "infer":
            model.eval()

            def step():
                with torch.no_grad():
                    model(images)

            return step
        optimizer = torch.optim.Adam(model.parameters())

        def step():
            loss = _bench.natural_loss(model(images, labels), images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    c = _bench.PRIMARY_CONV
    conv = torch.nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], stride=c["stride"])
    x = torch.randn(batch, c["in_channels"], c["input_hw"], c["input_hw"], requires_grad=mode == "train")
    grad_out = torch.randn_like(conv(x)).detach()

    def bound():
        if mode == "infer":
            with torch.no_grad():
                conv(x)
            return
        x.grad = None
        conv.zero_grad(set_to_none=True)
        conv(x).backward(grad_out)

    name = "conv bound (fwd+bwd)" if mode == "train" else "forward bound (no_grad)"
    results = interleaved({name: bound, "capsnet_mnist fused": make(True), "capsnet_mnist unfused": make(False)}, repeats)
    show(f"capsnet_mnist {mode} step, batch {batch} (bound / step = the ratio to the bound)", results)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-model", action="store_true", help="only the DenseCaps layer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}")
    dense_caps(args.batch, args.repeats)
    if not args.skip_model:
        whole_model(args.batch, args.repeats, "train")
        whole_model(args.batch, args.repeats, "infer")


if __name__ == "__main__":
    main()
