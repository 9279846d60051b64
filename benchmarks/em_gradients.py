"""Where an EM network's gradient comes from: per-layer norms and batch-to-batch cosines.

    CAPSNET_DATA=../shared/data python benchmarks/em_gradients.py RUN/best.pt [RUN2/best.pt ...]

For each checkpoint of a ``MatrixCapsNet`` trained on MNIST: the spread loss (margin 0.9) of four
batches of 32 validation digits (the 5,000-digit split, no shifts), back-propagated three ways:
the exact gradient, ``truncate_gradient`` (the Gaussians each E-step reads held constant) and
``detach_intermediate`` (the assignments R constant). Per layer it prints the mean gradient norm
over the batches and the mean cosine between the gradients of two batches (every pair). docs/em_training.md,
session 12, has what it showed. A diagnostic, not a speed benchmark: one thread, seconds.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from capsnet.data.registry import load_dataset
from capsnet.functional import spread_loss
from capsnet.train.restore import load_model

#: Parameter-name prefixes of the layers reported.
LAYERS = {"conv1": "conv1.", "primary": "primary.", "caps1": "caps1.weight", "caps2": "caps2.weight", "classes": "classes.weight"}
_EXACT = dict(truncate_gradient=False, detach_intermediate=False, iteration_grad_scale=1.0)
#: Routing gradient options per row, whatever the checkpoint was trained with.
VARIANTS = {"exact": _EXACT, "truncated": dict(_EXACT, truncate_gradient=True), "R detached": dict(_EXACT, detach_intermediate=True)}


def layer_gradients(model, batches) -> list[dict[str, torch.Tensor]]:
    """One dict per batch: each layer's gradient, flattened."""
    out = []
    for x, y in batches:
        model.zero_grad()
        spread_loss(model(x).activations, y, margin=0.9).backward()
        named = list(model.named_parameters())
        out.append({layer: torch.cat([p.grad.flatten() for n, p in named if n.startswith(prefix) and p.grad is not None])
                    for layer, prefix in LAYERS.items()})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default=os.environ.get("CAPSNET_DATA"), help="data root (default: $CAPSNET_DATA)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 (at least 2)")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error("--batches must be at least 2: the cosine compares two batches")
    if not args.data:
        parser.error("no data root: pass --data or set CAPSNET_DATA")
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data, val_size=5000, shift=0)
    batches = [b for _, b in zip(range(args.batches), data.eval_batches("val", 32))]
    for checkpoint in args.checkpoints:
        print(checkpoint)
        for variant, options in VARIANTS.items():
            model, _, _ = load_model(checkpoint)
            for layer in model.routed_layers().values():
                for key, value in options.items():
                    setattr(layer, key, value)
            model.train()
            grads = layer_gradients(model, batches)
            cells = []
            for layer in LAYERS:
                norm = torch.stack([g[layer].norm() for g in grads]).mean()
                cosine = torch.stack([torch.nn.functional.cosine_similarity(a[layer], b[layer], dim=0)
                                      for a, b in itertools.combinations(grads, 2)]).mean()
                cells.append(f"{layer} {norm:.3g} / {cosine:.2f}")
            print(f"  {variant:10s}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
