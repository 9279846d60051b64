"""Measurements for ``benchmarks/run.py``; each one runs inside a fresh worker process.

A worker takes one JSON spec on the command line, measures, and prints one JSON line.
Speeds are images per second from the median of timed repeats after warm-up; a
repeat times a block of steps long enough (``MIN_SAMPLE_S``) for the clock. Peak memory
is ``ru_maxrss`` of the worker (CPU) or ``max_memory_allocated`` (CUDA), read right
after the model's own steps, before anything else runs in the process.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import capsnet
import capsnet.allocator
import capsnet.train.optim
from capsnet._shapes import conv_output_size
from capsnet.data import random_shift, to_float

#: Shortest timed sample; fast steps are grouped into blocks of at least this length.
MIN_SAMPLE_S = 0.2

#: The PrimaryCaps convolution of Sabour et al. 2017 (MNIST): 256 -> 32 x 8 channels,
#: 9x9, stride 2, on the 20x20 output of Conv1.
PRIMARY_CONV = dict(in_channels=256, out_channels=256, kernel_size=9, stride=2, input_hw=20)

#: Side of the square fp32 matmul that measures the GEMM peak.
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], *, device: torch.device, warmup: int, repeats: int, cpu: Optional[list] = None) -> list[float]:
    """Seconds per step, one value per repeat (each the mean over a block of >= MIN_SAMPLE_S).

    ``cpu``: a list that receives the process's CPU seconds per step of the same blocks
    (``time.process_time``). At one thread that is the step's time without the waits a loaded
    machine adds, so ratios of CPU times hold where wall-clock ratios drift with the load
    (docs/performance.md: the machine is shared); at more threads it sums over them.
    """
    block, elapsed = 1, 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        step()
        _sync(device)
        elapsed = time.perf_counter() - start
    block = max(1, math.ceil(MIN_SAMPLE_S / max(elapsed, 1e-6)))
    samples = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(block):
            step()
        _sync(device)
        samples.append((time.perf_counter() - start) / block)
        if cpu is not None:
            cpu.append((time.process_time() - start_cpu) / block)
    return samples


def _speed(batch: int, samples: list[float], cpu: Optional[list] = None) -> dict:
    median = statistics.median(samples)
    result = {"images_per_s": batch / median, "step_s_median": median, "step_s": samples}
    if cpu:
        result.update(cpu_images_per_s=batch / statistics.median(cpu), cpu_step_s=cpu)
    return result


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- models


def natural_loss(output, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a model of this output type trains with (see docs/performance.md)."""
    if hasattr(output, "lengths"):
        loss = capsnet.margin_loss(output.lengths, labels)
        if getattr(output, "reconstruction", None) is not None:
            loss = loss + capsnet.reconstruction_loss(output.reconstruction, images)
        return loss
    if hasattr(output, "activations"):
        return capsnet.spread_loss(output.activations, labels, margin=0.2)
    return F.cross_entropy(output.logits, labels)


def unfused_forward(self, u):
    """``DenseCaps.forward`` before the fusion: einsum votes, then autograd through Procedure 1.

    ``capsnet.routing.dynamic`` keeps that routing as ``_dynamic_routing_autograd``, so
    "before" and "after" can run in one benchmark run on the same machine state.
    """
    from capsnet.routing.dynamic import _dynamic_routing_autograd

    return _dynamic_routing_autograd(
        self.votes(u).transpose(1, 2), self.iterations, detach_intermediate=self.detach_intermediate, leaky=self.leaky
    )


def use_reference_routing() -> None:
    """Make every ``DenseCaps`` in this process use :func:`unfused_forward`."""
    from capsnet.layers import dense

    dense.DenseCaps.forward = unfused_forward


def synthetic_batch(model, batch: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, model.in_channels, model.image_size, model.image_size)
    images = torch.rand(shape, generator=gen).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return images, labels


def _autocast(spec: dict) -> torch.autocast:
    """bf16 autocast for ``precision="bf16"`` (as ``amp="bf16"`` trains), off otherwise."""
    bf16 = spec.get("precision", "fp32") == "bf16"
    return torch.autocast(torch.device(spec["device"]).type, dtype=torch.bfloat16, enabled=bf16)


def measure_model(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if spec.get("reference_routing"):
        use_reference_routing()
    torch.manual_seed(0)
    model = capsnet.create_model(spec["model"]).to(device)
    images, labels = synthetic_batch(model, spec["batch"], device)
    rss_idle = _peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["mode"] == "train":
        model.train()
        optimizer = capsnet.train.optim.adam(model.parameters())  # as capsnet.train builds it

        def step():
            with _autocast(spec):
                loss = natural_loss(model(images, labels), images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def step():
            with torch.no_grad(), _autocast(spec):
                model(images)

    cpu = [] if device.type == "cpu" else None
    samples = time_steps(step, device=device, warmup=spec["warmup"], repeats=spec["repeats"], cpu=cpu)
    result = {
        **_speed(spec["batch"], samples, cpu),
        "peak_memory_mb": _peak_memory_mb(device),
        "memory_before_steps_mb": rss_idle,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    # The bound of the same mode, right after, in the same process: a ratio from
    # measurements seconds apart, robust to the load of a shared machine drifting.
    del model, images, labels, step
    bound = measure_conv_bound({**spec, "mode": spec["mode"], "precision": "fp32"})  # the fp32 bound, whatever the model ran in
    result["bound"] = {k: bound[k] for k in ("images_per_s", "step_s_median", "step_s", "cpu_images_per_s") if k in bound}
    result["ratio_to_bound"] = result["images_per_s"] / bound["images_per_s"]
    if "cpu_images_per_s" in result and "cpu_images_per_s" in bound:
        result["cpu_ratio_to_bound"] = result["cpu_images_per_s"] / bound["cpu_images_per_s"]
    return result


# --------------------------------------------------------------------------- bounds


def measure_conv_bound(spec: dict) -> dict:
    """The PrimaryCaps convolution alone: forward + backward (train) or forward under no_grad (infer);
    ``nn.Conv2d`` under bf16 autocast for ``precision="bf16"``."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    c = PRIMARY_CONV
    conv = torch.nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], stride=c["stride"]).to(device)
    x = torch.randn(spec["batch"], c["in_channels"], c["input_hw"], c["input_hw"], device=device)
    if spec["mode"] == "train":
        # The input needs its gradient too: inside the model, Conv1 lies below.
        x.requires_grad_(True)
        grad_out = torch.randn_like(conv(x)).detach()

        def step():
            x.grad = None
            conv.zero_grad(set_to_none=True)
            with _autocast(spec):
                y = conv(x)
            y.backward(grad_out.to(y.dtype))

    else:

        def step():
            with torch.no_grad(), _autocast(spec):
                conv(x)

    cpu = [] if device.type == "cpu" else None
    samples = time_steps(step, device=device, warmup=spec["warmup"], repeats=spec["repeats"], cpu=cpu)
    out_hw = conv_output_size(c["input_hw"], c["kernel_size"], c["stride"])
    flops_fwd = 2 * spec["batch"] * out_hw**2 * c["out_channels"] * c["in_channels"] * c["kernel_size"] ** 2
    flops = flops_fwd * (3 if spec["mode"] == "train" else 1)  # backward: grad input + grad weight
    result = _speed(spec["batch"], samples, cpu)
    result["gflops"] = flops / result["step_s_median"] / 1e9
    result["peak_memory_mb"] = _peak_memory_mb(device)
    return result


def measure_gemm(spec: dict) -> dict:
    """fp32 GFLOP/s of a large square matmul (median and best of the repeats)."""
    device = torch.device(spec["device"])
    n = GEMM_SIZE.get(device.type, 4096)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    samples = time_steps(lambda: torch.mm(a, b, out=out), device=device, warmup=spec["warmup"], repeats=spec["repeats"])
    flops = 2 * n**3
    return {
        "size": n,
        "gflops": flops / statistics.median(samples) / 1e9,
        "gflops_best": flops / min(samples) / 1e9,
        "step_s": samples,
    }


def measure_data(spec: dict) -> dict:
    """Input pipeline alone: uint8 -> float, random 2-pixel shift, batches from an in-memory tensor.

    Synthetic uint8 images of MNIST's shape stand in for the dataset (no files needed);
    the work per batch is the training loop's: index a shuffled batch, decode, augment.
    """
    device = torch.device(spec["device"])
    batch, n_images = spec["batch"], 60_000
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n_images,), generator=gen)
    order = torch.randperm(n_images, generator=gen)
    position = [0]

    def step():
        start = position[0] % (n_images - batch)
        index = order[start : start + batch]
        position[0] += batch
        x = random_shift(to_float(images[index]), 2, generator=gen)
        y = labels[index]
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    samples = time_steps(step, device=device, warmup=spec["warmup"], repeats=spec["repeats"])
    return _speed(batch, samples)


MEASUREMENTS = {"model": measure_model, "bound": measure_conv_bound, "gemm": measure_gemm, "data": measure_data}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    # What the CLI does (keep; "kept" in reports before session 12), or the policy asked for; the
    # bound runs under the same allocator.
    policy = {"kept": "keep"}.get(spec.get("malloc"), spec.get("malloc"))
    if policy in ("keep", "compact"):
        capsnet.allocator.apply_policy(policy)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = MEASUREMENTS[spec["kind"]](spec)
    result["threads"] = torch.get_num_threads()
    result["loadavg_after"] = os.getloadavg()[0]
    sys.stdout.write(json.dumps(result) + "\n")
