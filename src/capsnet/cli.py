"""Command line: ``capsnet train | eval | viz | models``. The only place that parses arguments.

The data root is ``--data``, else the ``CAPSNET_DATA`` environment variable, else
``~/.cache/capsnet``; MNIST is read from ``<root>/mnist/*.gz``. The environment the library
takes as arguments is read here too: ``CAPSNET_KERNELS``, ``CAPSNET_CACHE`` and ``CC`` for the
compiled EM kernels (:func:`kernel_settings`), torchrun's ``WORLD_SIZE`` / ``LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from . import __version__, allocator

DATA_ENV = "CAPSNET_DATA"
DEFAULT_DATA = Path.home() / ".cache" / "capsnet"
log = logging.getLogger(__name__)
#: OSErrors that say a path cannot be written or created (not a full disk): exit 2 with the message.
PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT)


def _data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser()


def kernel_settings(environ) -> dict:
    """:func:`capsnet.ops.kernels.configure`'s arguments from the environment: ``CAPSNET_KERNELS``
    (``0`` / ``false`` / ``off`` / ``no``: off; ``1``: required, a build failure is an error;
    else auto), ``CAPSNET_CACHE`` (default ``~/.cache/capsnet``) and ``CC`` (default ``cc``)."""
    flag = environ.get("CAPSNET_KERNELS", "auto").strip().lower()
    mode = "off" if flag in ("0", "false", "off", "no") else "required" if flag == "1" else "auto"
    return dict(mode=mode, cache=environ.get("CAPSNET_CACHE") or None, compiler=environ.get("CC", "cc"))


def _build_kernels(model: str) -> None:
    """Build the EM kernels before an EM model's first step (every rank: they take turns on a lock)."""
    from .models.em import EM_BUILDERS
    from .ops import kernels

    if model in EM_BUILDERS:
        kernels.build()


def _threads(text: str) -> int:
    """``--threads``: an int >= 1 (0 used to be ignored silently, a negative one crashed in torch)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=f"dataset root (default: ${DATA_ENV} or {DEFAULT_DATA})")
    p.add_argument("--download", action="store_true", help="download missing dataset files (checksummed)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=_threads, help="torch intra-op threads, >= 1 (default: torch's choice)")


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
    from .train import TrainConfig, load_model
    from .train.config import apply_overrides

    for item in args.overrides:
        if item.partition("=")[0].split(".")[0] not in DATA_KEYS:
            raise ValueError(f"--set {item!r}: {args.command} may only override {', '.join(DATA_KEYS)}; the model is fixed by the checkpoint")
    model, cfg, _ = load_model(args.checkpoint, device=args.device)
    return model, TrainConfig.from_dict(apply_overrides(cfg.to_dict(), args.overrides))


def _run_dir(args) -> Path:
    """``train --out``, by default ``runs/<config>[-<variant>]``."""
    path, _, variant = args.config.partition(":")
    return Path(args.out or Path("runs") / (Path(path).stem + (f"-{variant}" if variant else "")))


def _check_device(name: str) -> None:
    """A ValueError now, not a traceback after the data is loaded, for a device this torch cannot use."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device ({exc}); use e.g. cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}, but no GPU is visible" if torch.version.cuda else "a build without CUDA"
            raise ValueError(f"--device {name}: torch {torch.__version__} is {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")


def _check_writable(path: Path, *, is_dir: bool) -> None:
    """A ValueError before any work when ``--out`` cannot be created or written.

    The nearest existing folder on the way must be a writable directory (``os.access``:
    permissions and read-only filesystems; root passes it on most paths, and any refusal
    left is reported at the write as an OSError in :data:`PATH_ERRNOS`).
    """
    if path.exists() and path.is_dir() != is_dir:
        raise ValueError(f"--out {path} is {'a file' if is_dir else 'a directory'}; expected {'a directory' if is_dir else 'a file path'}")
    parent = path if is_dir else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, so {parent} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {existing} is not writable (read-only filesystem or no permission); choose another --out")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet", description="Capsule networks: train, evaluate, draw.")
    parser.add_argument("--version", action="version", version=f"capsnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a config file; evaluates the best checkpoint on the test set")
    p.add_argument("--config", required=True, help="path/to/config.py[:variant], e.g. configs/mnist.py:demo")
    p.add_argument("--out", help="run directory (default: runs/<config>[-<variant>])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start again (a run there is refused otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by capsnet train, e.g. runs/mnist/best.pt")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", help="write the result as JSON here")
    _data_overrides(p)
    _common(p)

    p = sub.add_parser("viz", help="draw reconstructions, pose perturbations, routing and curves from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by capsnet train, e.g. runs/mnist/best.pt")
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

    def refuse(exc: Exception) -> int:
        if args.verbose:  # where it came from, for a report
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        print(f"capsnet {args.command}: error: {exc}", file=sys.stderr)
        return 2

    try:  # before any data is read: the device and --out
        _check_device(args.device)
        if args.command == "train":
            _check_writable(_run_dir(args), is_dir=True)
        elif args.out:
            _check_writable(Path(args.out), is_dir=args.command == "viz")
        # CAPSNET_MALLOC: keep (default: large tensors reused without page faults), compact, system.
        allocator.apply_policy()
    except (ValueError, RuntimeError) as exc:
        return refuse(exc)
    from .ops import kernels
    from .train.distributed import Dist

    kernels.configure(**kernel_settings(os.environ))
    if args.threads:
        torch.set_num_threads(args.threads)
    dist, args.device = Dist.launch(args.device, os.environ)  # under torchrun: one process per rank
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        return _viz(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        return refuse(exc)
    except OSError as exc:
        if exc.errno not in PATH_ERRNOS:
            raise
        return refuse(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C: train() has saved what it could and says how to go on
        print(f"capsnet {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C stopped
    finally:
        dist.close()


def _train(args) -> int:
    from .train import load_config, load_model, train
    from .train.distributed import Dist
    from .train.loop import BEST, load_data_in_rank_order
    from .viz import write_figures

    cfg = load_config(args.config, tuple(args.overrides))
    out = _run_dir(args)
    dist = Dist()
    data = load_data_in_rank_order(cfg, _data_root(args.data), args.download, dist)  # once: training and figures
    _build_kernels(cfg.model)
    summary = train(
        cfg, data_root=_data_root(args.data), out_dir=out, download=args.download, resume=args.resume,
        overwrite=args.overwrite, device=args.device, progress=not args.no_progress, data=data,
    )
    if not dist.is_main:
        return 0  # rank 0 reports and draws
    written = []
    if cfg.figures:
        model, cfg, _ = load_model(out / BEST, device=args.device)
        written = write_figures(model, data, out / "figures", metrics_csv=out / "metrics.csv", device=args.device)
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
    _build_kernels(cfg.model)
    result = evaluate(model, data, args.split, create_objective(cfg.objective, **cfg.objective_kwargs), batch_size=cfg.eval_batch_size, device=args.device,
                      amp=cfg.amp)
    error = None if result["accuracy"] is None else 1 - result["accuracy"]  # None: the split has no samples
    result.update(checkpoint=str(args.checkpoint), dataset=cfg.dataset, split=args.split, error=error)
    text = json.dumps(_finite_or_null(result), indent=2, allow_nan=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _finite_or_null(result: dict) -> dict:
    """``result`` with NaN / inf numbers as None (JSON null): bare ``NaN`` is not JSON. Each is logged."""
    clean = {}
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            log.warning("%s is %s (the model's output or loss is not finite); written as null", key, value)
            value = None
        clean[key] = value
    return clean


def _viz(args) -> int:
    from .viz import write_figures

    model, cfg = _checkpoint_model(args)
    _build_kernels(cfg.model)
    ckpt_dir = Path(args.checkpoint).parent
    out = Path(args.out) if args.out else ckpt_dir / "figures"
    written = write_figures(model, _checked_data(model, cfg, args), out, split=args.split, metrics_csv=ckpt_dir / "metrics.csv", device=args.device)
    for p in written:
        print(f"figure: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
