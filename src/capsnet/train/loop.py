"""The training loop: seeded data order, atomic checkpoints, exact resume, validation-based selection."""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..data import ExperimentData, load_dataset
from ..models import create_model
from .checkpoint import load_checkpoint, load_latest, rotate_and_save, save_checkpoint
from .config import AMP_DTYPES, EPOCH_SEED_STRIDE, TrainConfig
from .distributed import Dist
from .metrics import MetricsLogger
from .objectives import Objective, create_objective
from .optim import adam

__all__ = ["evaluate", "load_model", "train"]

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


@dataclass
class Progress:
    """Where training stands; everything needed, with the RNG states, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    train_seconds: float = 0.0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))


def lr_factor(cfg: TrainConfig, total_steps: Optional[int] = None):
    """The learning rate at a step, as a multiple of ``cfg.lr`` (floored at ``lr_min``).

    After ``w = lr_warmup_steps`` steps of linear warm-up (factor ``(step + 1) / w``), the decay
    runs over ``lr_decay_steps`` steps (None: ``total_steps - w``, the rest of the run):
    ``"exponential"``, the official CapsNet code's continuous ``rate^(step / steps)``; or
    ``"cosine"``, ``(1 + cos(pi t)) / 2`` from ``lr`` down to ``lr_min`` at ``t = 1``, held after.
    """
    floor = cfg.lr_min / cfg.lr
    warmup = cfg.lr_warmup_steps
    length = cfg.lr_decay_steps
    if length is None:  # the rest of the run
        if total_steps is None:
            raise ValueError("lr_decay_steps=None needs the run's total steps")
        length = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        decay_step = max(0, step - warmup)
        if cfg.lr_schedule == "cosine":
            t = min(1.0, decay_step / length)
            value = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            value = cfg.lr_decay_rate ** (decay_step / length)
        if step < warmup:
            value *= (step + 1) / warmup
        return max(value, floor)

    return factor


def _kwargs_error(exc: TypeError, kwargs: dict, what: str, name: str) -> Optional[ValueError]:
    """A ValueError for a ``TypeError`` that ``kwargs`` caused, or None when it did not (empty kwargs).

    An unknown key ("unexpected keyword argument 'k'") or one the trainer sets itself
    ("multiple values for ... argument 'k'") is named; any other TypeError with kwargs present
    is reported as a value of the wrong type.
    """
    if not kwargs:
        return None
    text = str(exc)
    unknown = re.search(r"unexpected keyword argument '([^']+)'", text)
    if unknown and unknown.group(1) in kwargs:
        return ValueError(f"bad {what} for {name}: {text}; fix that key in the config")
    reserved = re.search(r"multiple values for (?:keyword )?argument '([^']+)'", text)
    if reserved and reserved.group(1) in kwargs:
        return ValueError(
            f"bad {what} for {name}: {reserved.group(1)!r} is set by the trainer; remove it from {what} "
            "(use the top-level config key, e.g. seed)"
        )
    return ValueError(f"{name} refused {what} {kwargs}: {type(exc).__name__}: {text}; check the types of these values")


def build_model(cfg: TrainConfig, data: ExperimentData) -> torch.nn.Module:
    try:
        model = create_model(cfg.model, **cfg.model_kwargs)
    except TypeError as exc:
        error = _kwargs_error(exc, cfg.model_kwargs, "model_kwargs", f"model {cfg.model!r}")
        if error is None:
            raise
        raise error from exc
    check_model_fits_data(model, cfg, data)
    return model


def check_model_fits_data(model: torch.nn.Module, cfg: TrainConfig, data: ExperimentData) -> None:
    """A ValueError naming both when the model's ``in_channels`` / ``image_size`` differ from the data's images."""
    expected = (getattr(model, "in_channels", None), getattr(model, "image_size", None))
    c, h, w = data.image_shape
    if expected[0] is not None and (expected[0] != c or expected[1] not in (h, (h, w))):
        raise ValueError(
            f"model {cfg.model!r} expects {expected[0]}x{expected[1]}x{expected[1]} images but dataset "
            f"{cfg.dataset!r} gives {c}x{h}x{w}; adjust model_kwargs or dataset_kwargs in the config"
        )


def load_data(cfg: TrainConfig, data_root: str | Path, download: bool) -> ExperimentData:
    """The dataset of ``cfg``; a misspelt ``dataset_kwargs`` key is a ValueError naming it."""
    try:
        return load_dataset(cfg.dataset, data_root, download=download, seed=cfg.seed, **cfg.dataset_kwargs)
    except TypeError as exc:
        error = _kwargs_error(exc, cfg.dataset_kwargs, "dataset_kwargs", f"dataset {cfg.dataset!r}")
        if error is None:
            raise
        raise error from exc


@torch.no_grad()
def evaluate(
    model, data: ExperimentData, split: str, objective: Objective, *, batch_size: int = 256, device="cpu", step: int = 0, dist: Optional[Dist] = None
) -> dict:
    """Accuracy and mean loss of ``model`` on every sample of ``split``, without augmentation.

    Under ``torch.distributed`` each rank evaluates every ``world``-th batch and the counts are summed.
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0.0, 0.0, 0.0
    for k, (images, labels) in enumerate(data.eval_batches(split, batch_size)):
        if k % dist.world != dist.rank:
            continue
        images, labels = images.to(device), labels.to(device)
        out = model(images)
        correct += float(objective.correct(out, labels).sum())
        loss_sum += float(objective.loss(out, images, labels, step)) * len(labels)
        total += len(labels)
    correct, total, loss_sum = dist.sum([correct, total, loss_sum], device=device)
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": int(total)}


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def numerics() -> dict:
    """What float results depend on besides the config: the thread count, torch and the CPU.

    The same run is bit-identical only under the same values: reductions split over a
    different number of threads, or run by other vector kernels (AVX2, AVX-512, AMX), add
    in a different order and round differently (docs/reliability.md, "Resume").
    """
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "cpu": str(torch.backends.cpu.get_cpu_capability())}


def _check_numerics(saved: Optional[dict], path: Path) -> None:
    """Warn when a resumed run cannot continue bit-identically (another thread count or CPU kind)."""
    if not saved:
        return
    now = numerics()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        log.warning(
            "resuming %s under other numerics (%s): training continues correctly, but not bit-identically "
            "to an uninterrupted run; resume with the same --threads on the same kind of CPU for that", path, what
        )


def load_model(checkpoint: str | Path, device="cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the model of a checkpoint with its weights; returns (model, config, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = create_model(cfg.model, **cfg.model_kwargs).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, ckpt


def train(
    cfg: TrainConfig,
    *,
    data_root: str | Path,
    out_dir: str | Path,
    download: bool = False,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    final_test: bool = True,
) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the summary also written to ``metrics.json``.

    ``last.pt`` (everything needed to resume, plus ``keep_checkpoints - 1`` older copies)
    is written every ``checkpoint_every`` steps and at the end of each epoch; ``best.pt``
    holds the weights with the best validation accuracy. The test split is evaluated
    once, at the end, with the validation-selected weights.

    Under ``torch.distributed`` (e.g. ``torchrun``), every rank draws the same global batch
    and augmentation and trains on its own contiguous shard of it, so a run matches the
    single-process run on the same global batch and resumes with any number of processes.
    Only rank 0 writes logs and checkpoints.
    """
    out = Path(out_dir)
    dist = Dist()
    torch.manual_seed(cfg.seed)
    if download and not dist.is_main:
        dist.barrier()  # rank 0 downloads first; the others then find complete, verified files
    data = load_data(cfg, data_root, download)
    if download and dist.is_main:
        dist.barrier()
    model = build_model(cfg, data).to(device)
    objective = create_objective(cfg.objective, **cfg.objective_kwargs)
    # Only now, with every name and *_kwargs of the config accepted: a refused config leaves no run directory.
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # Fused: one kernel for the whole update instead of a dozen per tensor (the same Adam
    # formula; on CPU the step of capsnet_mnist fell from ~70 to ~11 ms, docs/performance.md);
    # its state made now, below the activations (capsnet.train.optim), unless a checkpoint's is loaded.
    found = load_latest(out / LAST, map_location=device) if resume else None
    optimizer = adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, make_state=found is None)
    n = data.size("train")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
    device_type = torch.device(device).type
    amp_dtype = getattr(torch, AMP_DTYPES[cfg.amp]) if cfg.amp else None
    # Loss scaling only for float16 (bfloat16 has float32's range); a no-op when disabled.
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.amp == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)
    state = Progress()

    if found is not None:
        ckpt, path = found
        if ckpt["config"] != cfg.to_dict():
            changed = sorted(k for k in ckpt["config"] if ckpt["config"][k] != cfg.to_dict().get(k))
            log.warning("resuming with a changed config; keys that differ: %s", ", ".join(changed))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], generator)
        state = Progress(**ckpt["progress"])
        _check_numerics(ckpt.get("numerics"), path)
        log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
        del ckpt, found  # the loaded copies (of the parameters too) are not needed any more
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", out)
    trained = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model

    def check_finite() -> None:
        """Stop a diverged run before it overwrites a good checkpoint (only where the loop syncs anyway)."""
        if not math.isfinite(loss.item()) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise ValueError(
                f"training diverged at step {state.step}: loss {loss.item()} or weights are not finite; "
                f"{out / LAST} holds the last finite state. Lower lr (now {cfg.lr}) and resume or restart."
            )

    def checkpoint() -> None:
        check_finite()
        if dist.is_main:
            payload = {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(generator),
                "progress": vars(state).copy(),
                "numerics": numerics(),
            }
            rotate_and_save(payload, out / LAST, cfg.keep_checkpoints)

    def validate() -> None:
        result = evaluate(model, data, "val", objective, batch_size=cfg.eval_batch_size, device=device, step=state.step, dist=dist)
        if result["accuracy"] > state.best_val_accuracy:
            state.best_val_accuracy, state.best_step = result["accuracy"], state.step
            if dist.is_main:
                save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "step": state.step, "val": result}, out / BEST)
        if dist.is_main:
            logger.log(state.step, {"val/accuracy": result["accuracy"], "val/loss": result["loss"]})
            log.info("step %d: validation accuracy %.4f (best %.4f at step %d)", state.step, result["accuracy"], state.best_val_accuracy, state.best_step)

    logger = MetricsLogger(out, resume_step=state.step if resume else None) if dist.is_main else None
    trained.train()
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and dist.is_main), unit="step", dynamic_ncols=True)
    started = time.perf_counter()

    def keep_going() -> bool:
        if state.step >= total_steps:
            return False
        if cfg.time_budget_s is None:
            return True
        over = state.train_seconds + (time.perf_counter() - started) >= cfg.time_budget_s
        return not dist.sum([float(over)], device=device)[0]  # every rank stops at the same step

    window_images, window_start = 0, time.perf_counter()
    validated_at = -1
    loss = torch.zeros(())
    try:
        while keep_going():
            order = epoch_order(n, cfg.seed, state.epoch)
            while state.batch_in_epoch < steps_per_epoch and keep_going():
                index = order[state.batch_in_epoch * cfg.batch_size : (state.batch_in_epoch + 1) * cfg.batch_size]
                images, labels = data.train_batch(index, generator)  # the global batch, same on every rank
                local = dist.shard(torch.arange(len(index)))
                images, labels = images[local].to(device), labels[local].to(device)
                with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    output = trained(images, objective.teacher(labels))
                    loss = objective.loss(output, images, labels, state.step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state.step += 1
                state.batch_in_epoch += 1
                window_images += len(index)
                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    check_finite()
                    hits = float(objective.correct(output, labels).sum())
                    loss_sum, hits, count = dist.sum([loss.item() * len(labels), hits, float(len(labels))], device=device)
                    speed = window_images / max(time.perf_counter() - window_start, 1e-9)
                    if dist.is_main:
                        logger.log(state.step, {"train/loss": loss_sum / count, "train/accuracy": hits / count, "train/images_per_s": speed, "train/lr": scheduler.get_last_lr()[0]})
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{hits / count:.3f}", img_s=f"{speed:.0f}")
                    window_images, window_start = 0, time.perf_counter()
                bar.update(1)
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    validate()
                    validated_at = state.step
                if state.step % cfg.checkpoint_every == 0:
                    state.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint()
            if state.batch_in_epoch >= steps_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                if validated_at != state.step:
                    validate()
                    validated_at = state.step
        if validated_at != state.step:
            validate()
        state.train_seconds += time.perf_counter() - started
        started = time.perf_counter()
        checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.flush()

    summary = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "steps": state.step,
        "epochs_completed": state.epoch,
        "train_images": min(state.step * cfg.batch_size, state.epoch * n + state.batch_in_epoch * cfg.batch_size),
        "train_seconds": round(state.train_seconds, 1),
        "best_val_accuracy": state.best_val_accuracy,
        "best_step": state.best_step,
        "processes": dist.world,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if final_test:
        dist.barrier()  # best.pt is complete on disk before any rank reads it
        best, _, _ = load_model(out / BEST, device=device)
        result = evaluate(best, data, "test", objective, batch_size=cfg.eval_batch_size, device=device, step=state.step, dist=dist)
        summary.update(test_accuracy=result["accuracy"], test_error=1 - result["accuracy"], test_samples=result["samples"])
        if dist.is_main:
            logger.log(state.step, {"test/accuracy": result["accuracy"]})
    if dist.is_main:
        logger.close()
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary
