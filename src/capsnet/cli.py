"""Command line: ``capsnet train | eval | viz | models``. The only place that parses arguments.

The data root is ``--data``, else the ``CAPSNET_DATA`` environment variable, else
``~/.cache/capsnet``; MNIST is read from ``<root>/mnist/*.gz``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DATA_ENV = "CAPSNET_DATA"
DEFAULT_DATA = Path.home() / ".cache" / "capsnet"


def _data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=f"dataset root (default: ${DATA_ENV} or {DEFAULT_DATA})")
    p.add_argument("--download", action="store_true", help="download missing dataset files (checksummed)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


# Keys ``eval`` and ``viz`` may override in a checkpoint's config: the data it is evaluated
# on, never the model (whose weights the checkpoint fixes).
DATA_KEYS = ("dataset", "dataset_kwargs", "eval_batch_size")


def _data_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"evaluate on other data: override {', '.join(DATA_KEYS)} (e.g. --set dataset=mnist_expanded)",
    )


def _checkpoint_model(args):
    """The model and config of ``args.checkpoint``, with ``--set`` data overrides applied."""
    from .train import TrainConfig
    from .train.config import apply_overrides
    from .train.loop import load_model

    for item in args.overrides:
        if item.partition("=")[0].split(".")[0] not in DATA_KEYS:
            raise ValueError(f"--set {item!r}: {args.command} may only override {', '.join(DATA_KEYS)}; the model is fixed by the checkpoint")
    model, cfg, _ = load_model(args.checkpoint, device=args.device)
    return model, TrainConfig.from_dict(apply_overrides(cfg.to_dict(), args.overrides))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet", description="Capsule networks: train, evaluate, draw.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a config file; evaluates the best checkpoint on the test set")
    p.add_argument("--config", required=True, help="path/to/config.py[:variant], e.g. configs/mnist.py:demo")
    p.add_argument("--out", help="run directory (default: runs/<config>[-<variant>])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if it exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", help="write the result as JSON here")
    _data_overrides(p)
    _common(p)

    p = sub.add_parser("viz", help="draw reconstructions, pose perturbations, routing and curves from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="figure directory (default: <checkpoint dir>/figures)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    _data_overrides(p)
    _common(p)

    sub.add_parser("models", help="list registered models")
    return parser


def _load_data(cfg, args):
    from .train.loop import load_data

    return load_data(cfg, _data_root(args.data), args.download)


def _checked_data(model, cfg, args):
    """The data of ``eval`` / ``viz``, refused before any pass when its images do not fit the checkpoint's model."""
    from .train.loop import check_model_fits_data

    data = _load_data(cfg, args)
    check_model_fits_data(model, cfg, data)
    return data


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from . import list_models
    from .data import DataError

    if args.command == "models":
        print("\n".join(list_models()))
        return 0
    from .allocator import keep_freed_memory

    keep_freed_memory()  # large tensors reused without page faults; CAPSNET_MALLOC=system keeps glibc's defaults
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # launched by torchrun: one process per rank
        import torch.distributed as dist

        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        return _viz(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"capsnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _train(args) -> int:
    from .train import load_config, train
    from .train.loop import BEST, load_model
    from .viz import write_figures

    cfg = load_config(args.config, tuple(args.overrides))
    path, _, variant = args.config.partition(":")
    out = Path(args.out or Path("runs") / (Path(path).stem + (f"-{variant}" if variant else "")))
    summary = train(
        cfg, data_root=_data_root(args.data), out_dir=out, download=args.download, resume=args.resume,
        device=args.device, progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports and draws
    written = []
    if cfg.figures:
        model, cfg, _ = load_model(out / BEST, device=args.device)
        written = write_figures(model, _load_data(cfg, args), out / "figures", metrics_csv=out / "metrics.csv", device=args.device)
    print(json.dumps(summary, indent=2))
    print(f"run directory: {out}")
    print(f"  metrics: {out / 'metrics.json'}  (per-step log: {out / 'metrics.csv'}, TensorBoard: {out / 'tensorboard'})")
    print(f"  checkpoints: {out / 'best.pt'} (best on validation), {out / 'last.pt'} (resume)")
    for p in written:
        print(f"  figure: {p}")
    return 0


def _eval(args) -> int:
    from .train import create_objective, evaluate

    model, cfg = _checkpoint_model(args)
    data = _checked_data(model, cfg, args)
    result = evaluate(model, data, args.split, create_objective(cfg.objective, **cfg.objective_kwargs), batch_size=cfg.eval_batch_size, device=args.device)
    result.update(checkpoint=str(args.checkpoint), dataset=cfg.dataset, split=args.split, error=1 - result["accuracy"])
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _viz(args) -> int:
    from .viz import write_figures

    model, cfg = _checkpoint_model(args)
    ckpt_dir = Path(args.checkpoint).parent
    out = Path(args.out) if args.out else ckpt_dir / "figures"
    written = write_figures(model, _checked_data(model, cfg, args), out, split=args.split, metrics_csv=ckpt_dir / "metrics.csv", device=args.device)
    for p in written:
        print(f"figure: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
