"""capsnet's Conv2d against PyTorch's nn.Conv2d, interleaved in one process (before/after ratios).

    python benchmarks/conv.py                    # batch 128, torch's default threads
    python benchmarks/conv.py --batch 32 --threads 1

Timed round-robin (as ``routing.py``), medians of wall-clock and process CPU time:

* each convolution of ``capsnet_mnist`` alone, forward + backward: Conv1 (1 -> 256, 9x9;
  the images need no gradient) and PrimaryCaps (256 -> 256, 9x9, stride 2; with the input
  gradient), as ``nn.Conv2d`` and as ``capsnet.layers.Conv2d`` with ``algorithm="direct"``
  (PyTorch's forward, the faster weight gradient) and ``"dft"`` (the bilinear DFT algorithm
  of ``capsnet.ops.dft``);
* the same convolutions forward under ``no_grad``;
* the whole ``capsnet_mnist`` training step with ``conv_weight_grad="native"`` (PyTorch's
  convolutions), ``conv_algorithm="direct"`` and the default (``"auto"``: the DFT for
  PrimaryCaps), next to the conv bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from routing import interleaved, show  # noqa: E402
from run import cpu_model  # noqa: E402

import capsnet  # noqa: E402
import capsnet.allocator  # noqa: E402
import capsnet.train.optim  # noqa: E402
from capsnet.layers import Conv2d  # noqa: E402

CONVS = {  # name: (in_channels, out_channels, kernel, stride, input side, input needs a gradient)
    "Conv1": (1, 256, 9, 1, 28, False),
    "PrimaryCaps": (256, 256, 9, 2, 20, True),
}


def _conv_steps(batch: int, spec: tuple, train: bool) -> dict:
    c_in, c_out, kernel, stride, side, input_grad = spec
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, side, side, requires_grad=train and input_grad)
    steps = {}
    layers = {
        "nn.Conv2d": torch.nn.Conv2d(c_in, c_out, kernel, stride=stride),
        "Conv2d direct": Conv2d(c_in, c_out, kernel, stride=stride, algorithm="direct"),
        "Conv2d dft": Conv2d(c_in, c_out, kernel, stride=stride, algorithm="dft"),
    }
    for name, layer in layers.items():
        if not train:

            def forward(layer=layer):
                with torch.no_grad():
                    layer(x)

            steps[name] = forward
            continue

        def step(layer=layer):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        steps[name] = step
    return steps


def _model_step(batch: int, **options):
    torch.manual_seed(0)
    model = capsnet.create_model("capsnet_mnist", **options)
    images, labels = _bench.synthetic_batch(model, batch, torch.device("cpu"))
    optimizer = capsnet.train.optim.adam(model.parameters())

    def step():
        loss = _bench.natural_loss(model(images, labels), images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-model", action="store_true", help="only the convolutions")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's malloc defaults (default: as the CLI)")
    args = p.parse_args(argv)
    if not args.system_malloc:
        capsnet.allocator.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, batch {args.batch}")
    for name, spec in CONVS.items():
        show(f"{name} forward + backward", interleaved(_conv_steps(args.batch, spec, True), args.repeats))
        show(f"{name} forward (no_grad)", interleaved(_conv_steps(args.batch, spec, False), args.repeats))
    if not args.skip_model:
        bound = _conv_steps(args.batch, CONVS["PrimaryCaps"], True)["nn.Conv2d"]
        steps = {
            "conv bound (fwd+bwd)": bound,
            "capsnet_mnist native": _model_step(args.batch, conv_weight_grad="native"),
            "capsnet_mnist direct": _model_step(args.batch, conv_algorithm="direct"),
            "capsnet_mnist auto": _model_step(args.batch),
        }
        show(f"capsnet_mnist train step, batch {args.batch} (bound / step = the ratio to the bound)",
             interleaved(steps, args.repeats))  # fmt: skip


if __name__ == "__main__":
    main()
