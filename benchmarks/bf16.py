"""What each fast path of ``capsnet_mnist`` should do under CPU bf16 autocast: speed and accuracy.

    python benchmarks/bf16.py --threads 1                 # batch 128
    python benchmarks/bf16.py --threads 1 --batch 32

Timed round-robin in one process (as ``routing.py``; medians of wall-clock and CPU time):

* PrimaryCaps (256 -> 256, 9x9, stride 2), forward + backward with the input gradient, and
  forward under ``no_grad``: ``nn.Conv2d`` and the DFT in fp32 (today's fp32 path), and in
  bf16 ``nn.Conv2d`` under autocast (oneDNN), ``capsnet.layers.Conv2d`` under autocast with
  ``algorithm="direct"`` (the bf16 direct convolution with the faster weight and input
  gradients) and the DFT on bf16 tensors (bf16 transforms and products), in slabs of
  channels (as in fp32: the sums over slabs in bf16) and in one slab (every channel sum
  inside one matmul, which accumulates in float32 and rounds once: what ``Conv2d`` runs under
  autocast from batch 64). Beside each: the relative error (Frobenius norm) of the output and
  both gradients against float64.
* Conv1 (1 -> 256, 9x9; the images need no gradient): ``Conv2d`` in fp32 and under autocast,
  ``nn.Conv2d`` under autocast.
* DigitCaps (the fused routing, float32 under autocast by design) and the decoder, fp32 and
  under autocast; the whole training step and the inference forward, fp32, bf16 (what
  ``amp="bf16"`` runs) and bf16 with PrimaryCaps' direct algorithm.

Prints a table and writes ``benchmarks/results/<date>-<host>-bf16.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from routing import interleaved  # noqa: E402
from run import cpu_model  # noqa: E402

import capsnet  # noqa: E402
import capsnet.allocator  # noqa: E402
import capsnet.train.optim  # noqa: E402
from capsnet.layers import Conv2d, DenseCaps  # noqa: E402
from capsnet.layers.decoder import CapsuleDecoder  # noqa: E402
from capsnet.ops import dft  # noqa: E402
from capsnet.ops.dft import dft_conv2d  # noqa: E402
from capsnet.precision import cpu_bf16_units  # noqa: E402

BF16 = torch.bfloat16


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=BF16, enabled=on)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b).norm() / b.norm())


def primary_caps(batch: int, repeats: int) -> list[dict]:
    """PrimaryCaps options, fp32 and bf16: seconds and errors against float64."""
    torch.manual_seed(0)
    x = torch.randn(batch, 256, 20, 20)
    layer = torch.nn.Conv2d(256, 256, 9, stride=2)
    fast_direct = Conv2d(256, 256, 9, stride=2, algorithm="direct")
    fast_direct.load_state_dict(layer.state_dict())
    dft_layer = Conv2d(256, 256, 9, stride=2, algorithm="dft")
    dft_layer.load_state_dict(layer.state_dict())
    grad_y = torch.randn(batch, 256, 6, 6)

    def bf16_dft(xi, w, b):  # the DFT's transforms and products on bf16 tensors (one slab: capsnet's choice)
        return dft_conv2d(xi.to(BF16), w.to(BF16), b.to(BF16), 2)

    def bf16_dft_slabs(xi, w, b):  # the same in fp32's slabs: the sums over slabs add in bf16
        with _fp32_slabs():
            y = _SlabbedDFT.apply(xi.to(BF16), w.to(BF16), b.to(BF16))
        return y

    options = {  # name: (forward of (x, layer), layer, autocast)
        "fp32 nn.Conv2d": (lambda xi, m: m(xi), layer, False),
        "fp32 DFT (fp32 default)": (lambda xi, m: m(xi), dft_layer, False),
        "bf16 nn.Conv2d (autocast)": (lambda xi, m: m(xi), layer, True),
        "bf16 Conv2d direct": (lambda xi, m: m(xi), fast_direct, True),
        "bf16 DFT in slabs (bf16 sums)": (lambda xi, m: bf16_dft_slabs(xi, m.weight, m.bias), layer, False),
        "bf16 DFT, one slab (Conv2d, from batch 64)": (lambda xi, m: bf16_dft(xi, m.weight, m.bias), layer, False),
    }
    # float64 reference: values, input and weight gradients
    x64 = x.double().requires_grad_(True)
    w64 = layer.weight.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.conv2d(x64, w64, layer.bias.detach().double(), 2)
    y64.backward(grad_y.double())
    rows, train_steps, infer_steps = [], {}, {}
    for name, (forward, module, cast) in options.items():
        xg = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        with _autocast(cast):
            y = forward(xg, module)
        y.backward(grad_y.to(y.dtype))
        weight_grad = module.weight.grad
        rows.append({"layer": "PrimaryCaps", "option": name, "error_out": _rel(y, y64.detach()), "error_grad_x": _rel(xg.grad, x64.grad),
                     "error_grad_w": _rel(weight_grad, w64.grad)})  # fmt: skip

        def train(forward=forward, module=module, cast=cast, xg=xg):
            xg.grad = None
            module.zero_grad(set_to_none=True)
            with _autocast(cast):
                y = forward(xg, module)
            y.backward(grad_y.to(y.dtype))

        def infer(forward=forward, module=module, cast=cast):
            with torch.no_grad(), _autocast(cast):
                forward(x, module)

        train_steps[name], infer_steps[name] = train, infer
    for mode, steps in (("train", train_steps), ("infer", infer_steps)):
        for name, (wall, _cpu) in interleaved(steps, repeats).items():
            next(r for r in rows if r["option"] == name)[f"{mode}_ms"] = 1e3 * wall
    return rows


@contextlib.contextmanager
def _fp32_slabs():
    """``capsnet.ops.dft`` with float32's slabs of channels for every dtype."""
    slabs = dft._slabs
    dft._slabs = lambda channels, p, out_channels, dtype: slabs(channels, p, out_channels, torch.float32)
    try:
        yield
    finally:
        dft._slabs = slabs


class _SlabbedDFT(torch.autograd.Function):
    """PrimaryCaps by the DFT in float32's slabs, forward and backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return dft._forward(x, w, b, dft._plan_for(x.shape, w.shape, (2, 2), (0, 0)), (0, 0))

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        with _fp32_slabs():
            grad_x, grad_w = dft._backward(grad_y.contiguous(), x, w, dft._plan_for(x.shape, w.shape, (2, 2), (0, 0)), (0, 0), True, True)
        return grad_x, grad_w, grad_y.sum((0, 2, 3))


def conv1(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 28, 28)
    layer, fast = torch.nn.Conv2d(1, 256, 9), Conv2d(1, 256, 9)
    fast.load_state_dict(layer.state_dict())
    options = {"fp32 Conv2d (im2col)": (fast, False), "bf16 nn.Conv2d (autocast)": (layer, True), "bf16 Conv2d im2col (amp=bf16)": (fast, True)}
    return _time_layer("Conv1", options, lambda m: m(x).float().sum(), repeats)


def digit_caps(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    u = torch.randn(batch, 1152, 8, requires_grad=True)
    layer = DenseCaps(1152, 8, 10, 16)
    options = {"fp32 fused routing": (layer, False), "under autocast (routes in fp32)": (layer, True)}
    # Under autocast the layer's input is PrimaryCaps' bf16 output; the layer widens it.
    return _time_layer("DigitCaps", options, lambda m: m(u.to(BF16) if torch.is_autocast_enabled("cpu") else u).poses.sum(), repeats)


def decoder(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    poses, labels = torch.randn(batch, 10, 16, requires_grad=True), torch.randint(0, 10, (batch,))
    layer = CapsuleDecoder(10, 16, (1, 28, 28))
    options = {"fp32": (layer, False), "bf16 (autocast)": (layer, True)}
    return _time_layer("decoder", options, lambda m: m(poses, labels).float().sum(), repeats)


def _time_layer(label: str, options: dict, loss_of, repeats: int) -> list[dict]:
    train_steps, infer_steps = {}, {}
    for name, (module, cast) in options.items():

        def train(module=module, cast=cast):
            module.zero_grad(set_to_none=True)
            with _autocast(cast):
                loss = loss_of(module)
            loss.backward()

        def infer(module=module, cast=cast):
            with torch.no_grad(), _autocast(cast):
                loss_of(module)

        train_steps[name], infer_steps[name] = train, infer
    rows = {name: {"layer": label, "option": name} for name in options}
    for mode, steps in (("train", train_steps), ("infer", infer_steps)):
        for name, (wall, _cpu) in interleaved(steps, repeats).items():
            rows[name][f"{mode}_ms"] = 1e3 * wall
    return list(rows.values())


def whole_model(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = capsnet.create_model("capsnet_mnist")
    images, labels = _bench.synthetic_batch(model, batch, torch.device("cpu"))
    optimizer = capsnet.train.optim.adam(model.parameters())
    train_steps, infer_steps = {}, {}
    for name, cast in (("fp32", False), ("bf16 (amp=bf16)", True), ("bf16, PrimaryCaps direct", True)):

        algorithm = "direct" if "direct" in name else "auto"  # PrimaryCaps' algorithm; Conv1 stays "auto"

        def train(cast=cast, algorithm=algorithm):
            model.primary.conv.algorithm = algorithm
            with _autocast(cast):
                loss = _bench.natural_loss(model(images, labels), images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer(cast=cast, algorithm=algorithm):
            model.primary.conv.algorithm = algorithm
            with torch.no_grad(), _autocast(cast):
                model(images)

        train_steps[name], infer_steps[name] = train, infer
    rows = {name: {"layer": "capsnet_mnist", "option": name} for name in train_steps}
    for mode, steps in (("train", train_steps), ("infer", infer_steps)):
        for name, (wall, _cpu) in interleaved(steps, repeats).items():
            rows[name][f"{mode}_ms"] = 1e3 * wall
    return list(rows.values())


def table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["| layer | option | fwd+bwd (ms) | fwd, no_grad (ms) | error out | error grad x | error grad W |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['option']} | {fmt(r.get('train_ms'), '.1f')} | {fmt(r.get('infer_ms'), '.1f')} "
            f"| {fmt(r.get('error_out'), '.1e')} | {fmt(r.get('error_grad_x'), '.1e')} | {fmt(r.get('error_grad_w'), '.1e')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/<date>-<host>-bf16.json)")
    args = p.parse_args(argv)
    capsnet.allocator.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": socket.gethostname(), "cpu": cpu_model(),
        "cpu_bf16_units": cpu_bf16_units(), "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
        "loadavg_start": os.getloadavg()[0], "command": "python benchmarks/bf16.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    print(f"torch {torch.__version__}, {machine['threads']} threads, {machine['cpu']} (bf16 unit: {machine['cpu_bf16_units']}), batch {args.batch}")
    rows = []
    for part in (primary_caps, conv1, digit_caps, decoder, whole_model):
        rows += part(args.batch, args.repeats)
        print(f"  {part.__name__} done", flush=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    print(table(rows))
    out = args.out or Path(__file__).resolve().parent / "results" / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-bf16.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
