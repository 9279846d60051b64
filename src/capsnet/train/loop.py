"""The training loop: seeded data order, atomic checkpoints, exact resume, validation-based selection."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import ExperimentData, load_dataset
from ..precision import resolve_amp
from .checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    atomic_write,
    load_checkpoint,
    rotate_and_save,
    save_checkpoint,
    set_aside_damaged,
)
from .config import AMP_DTYPES, EPOCH_SEED_STRIDE, TrainConfig
from .distributed import Dist
from .ema import WeightAverage
from .evaluation import evaluate
from .logs import MetricsLogger
from .objectives import Objective, create_objective
from .optim import adam, lr_scales
from .restore import (
    CHECKPOINT_FORMAT,
    build_model,
    check_model_fits_data,
    check_numerics,
    checkpoint_model_kwargs,
    kwargs_error,
    load_model,
    numerics,
    rng_state,
    set_rng_state,
)
from .rundir import BEST, LAST, SUMMARY, RunExistsError, claim_run_dir, progress_bar, resume_point
from .schedules import lr_factor

__all__ = ["RunExistsError", "TrainingInterrupted", "evaluate", "load_model", "train"]
# Also importable from here, as before the split into evaluation, restore, rundir and schedules:
_REEXPORTED = (BEST, CHECKPOINT_FORMAT, build_model, check_model_fits_data, checkpoint_model_kwargs, lr_factor)

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`, after it saved what it could; the message says which step ``last.pt`` holds."""


@dataclass
class Progress:
    """Where training stands; everything needed, with the RNG states, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    train_seconds: float = 0.0
    validated_step: int = -1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))


def load_data(cfg: TrainConfig, data_root: str | Path, download: bool) -> ExperimentData:
    """The dataset of ``cfg``; a misspelt ``dataset_kwargs`` key is a ValueError naming it."""
    try:
        return load_dataset(cfg.dataset, data_root, download=download, seed=cfg.seed, **cfg.dataset_kwargs)
    except TypeError as exc:
        error = kwargs_error(exc, cfg.dataset_kwargs, "dataset_kwargs", f"dataset {cfg.dataset!r}")
        if error is None:
            raise
        raise error from exc


def train(
    cfg: TrainConfig,
    *,
    data_root: str | Path,
    out_dir: str | Path,
    download: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    final_test: bool = True,
    data: Optional[ExperimentData] = None,
) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the summary also written to ``metrics.json``.

    ``data``: the experiment's data when the caller has it (:func:`load_data_in_rank_order`),
    else it is loaded from ``data_root``.

    ``last.pt`` (everything needed to resume, plus ``keep_checkpoints - 1`` older copies)
    is written every ``checkpoint_every`` steps, at the end of each epoch, at the end of the
    run, and on Ctrl-C (then :class:`TrainingInterrupted` is raised); ``best.pt`` holds the
    weights with the best validation accuracy. The test split is evaluated once, at the
    end, with the validation-selected weights.

    One run per directory: while training, ``out_dir`` is locked (another run there raises
    :class:`~capsnet.train.checkpoint.RunDirectoryBusyError`). A directory that already holds
    a run is refused (:class:`RunExistsError`) unless ``resume`` continues it or
    ``overwrite`` deletes it first. Resuming a finished run returns its summary.

    A model with a callable attribute ``training_metrics`` has it called, without arguments,
    at every ``log_every`` step right after the optimizer step, when the parameters'
    ``.grad`` still hold that step's gradients; the ``dict[str, float]`` it returns is
    logged beside ``train/loss`` under its own keys (rank 0 only, from its own shard).

    Under ``torch.distributed`` (e.g. ``torchrun``), every rank draws the same global batch
    and augmentation and trains on its own contiguous shard of it, so a run matches the
    single-process run on the same global batch and resumes with any number of processes.
    Only rank 0 writes logs and checkpoints.
    """
    if resume and overwrite:
        raise ValueError("resume continues the run in out_dir and overwrite deletes it: pass one of them, not both")
    out = Path(out_dir)
    dist = Dist()
    torch.manual_seed(cfg.seed)
    data = load_data_in_rank_order(cfg, data_root, download, dist) if data is None else data
    model = build_model(cfg, data).to(device)
    objective = create_objective(cfg.objective, **cfg.objective_kwargs)
    lr_scales(model, cfg.lr_scale)  # a pattern that matches no parameter is refused here, not after the directory
    routed_layers(model, cfg)  # so is a warm-up the model cannot route with
    # Only now, with every name and *_kwargs of the config accepted: a refused config leaves no run directory.
    with claim_run_dir(out, dist, resume=resume, overwrite=overwrite):
        run = _Run(cfg, data, model, objective, out=out, dist=dist, device=device, found=resume_point(out, dist, device) if resume else None)
        finished = run.finished_summary(final_test) if resume else None
        return finished if finished is not None else run.train(resumed=resume, progress=progress, final_test=final_test)


def routed_layers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Module]:
    """The layers whose iterations ``cfg.warmup_iterations`` overrides: every module with an int ``iterations``.

    Refuses a warm-up for a model without one, and for an EM layer whose inverse-temperature
    schedule is an explicit sequence of another length (one lambda per iteration).
    """
    routed = [m for m in model.modules() if type(getattr(m, "iterations", None)) is int]
    n = cfg.warmup_iterations
    if n is None:
        return routed
    if not routed:
        raise ValueError(f"config key 'warmup_iterations' sets the routing iterations, but model {cfg.model!r} has no routed "
                         "layer (no module with an int 'iterations'); drop warmup_iterations and warmup_iterations_steps")
    for m in routed:
        schedule = getattr(m, "schedule", None)
        if schedule is not None and not isinstance(schedule, str) and len(schedule) != n:
            raise ValueError(f"config key 'warmup_iterations' is {n}, but a {type(m).__name__} of model {cfg.model!r} has an explicit "
                             f"lambda schedule of {len(schedule)} values (one per iteration); give warmup_iterations={len(schedule)} "
                             "or a named schedule such as 'fan_in'")
    return routed


def load_data_in_rank_order(cfg: TrainConfig, data_root: str | Path, download: bool, dist: Dist) -> ExperimentData:
    """The dataset of ``cfg``; with ``download``, rank 0 fetches and verifies it before the others read it."""
    if download and not dist.is_main:
        dist.barrier()  # rank 0 downloads first; the others then find complete, verified files
    data = load_data(cfg, data_root, download)
    if download and dist.is_main:
        dist.barrier()
    return data


#: ``_Run.pending_rng`` while the optimizer updates: a Ctrl-C then cannot be saved as a consistent state.
_UPDATING = object()


class _Run:
    """One call of :func:`train`: what it builds, and training as resume, step, validate, checkpoint and summary."""

    def __init__(self, cfg: TrainConfig, data: ExperimentData, model, objective: Objective, *, out: Path, dist: Dist, device: str, found):
        self.cfg, self.data, self.model, self.objective = cfg, data, model, objective
        self.out, self.dist, self.device = out, dist, device
        # Fused: one kernel for the whole update instead of a dozen per tensor (the same Adam
        # formula, several times faster on CPU: docs/performance.md, "Proposed changes");
        # its state made now, below the activations (capsnet.train.optim), unless a checkpoint's is loaded.
        scales = lr_scales(model, cfg.lr_scale)
        self.optimizer = adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              lr_scales=scales, make_state=found is None)
        self.first_group_scale = scales[0] if scales else 1.0  # train/lr logs the schedule's lr, not a scaled group's
        self.n = data.size("train")
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.total_steps))
        self.device_type = torch.device(device).type
        self.amp = resolve_amp(cfg.amp, device)  # "auto": bf16 on CPUs with AMX-BF16 (capsnet.precision)
        self.amp_dtype = getattr(torch, AMP_DTYPES[self.amp]) if self.amp else None
        if cfg.amp == "auto":  # metrics.json and the checkpoints record it too
            log.debug("amp='auto' on %s: %s", device, self.amp or "float32")
        # Loss scaling only for float16 (bfloat16 has float32's range); a no-op when disabled.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.amp == "fp16")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.state = Progress()
        self.saved_step = -1  # the step last.pt holds
        self.pending_rng = None  # during a step: the RNG state before it (see interrupted)
        self.loss = torch.zeros(())  # of the last completed step
        self.grad_norm = torch.zeros(())  # of the last step, before clipping (with grad_clip)
        # The weights' moving average (ema_decay), copied before a checkpoint's weights are loaded: restore loads its own.
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.routed = routed_layers(model, cfg)
        if found is not None:
            self.restore(*found)
            del found  # the loaded copies (of the parameters too) are not needed any more
        self.trained = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
        self.logger: Optional[MetricsLogger] = None
        self.started = time.perf_counter()

    # ----------------------------------------------------------------------------- resume

    def restore(self, ckpt: dict, path: Path) -> None:
        cfg = self.cfg
        now = cfg.to_dict()
        saved = {**TrainConfig.defaults(), **ckpt["config"]}  # a key added since the checkpoint was written: its default
        if list(saved["lr_scale"].items()) != list(cfg.lr_scale.items()):  # the order too: the first match wins
            raise CheckpointError(
                f"{path} was trained with lr_scale={saved['lr_scale']!r}, this config has {cfg.lr_scale!r}; the optimizer's "
                f"state is grouped by those factors, so resume with --set 'lr_scale={saved['lr_scale']!r}' or start a new run"
            )
        if saved != now:
            changed = sorted(k for k in {**saved, **now} if saved.get(k) != now.get(k))
            log.warning("resuming with a changed config; keys that differ: %s (the optimizer's lr, betas and weight decay "
                        "continue from the checkpoint)", ", ".join(changed))
        legacy = checkpoint_model_kwargs(cfg, ckpt)
        if legacy != cfg.model_kwargs:
            sets = " ".join(f"--set model_kwargs.{k}={v}" for k, v in legacy.items() if k not in cfg.model_kwargs)
            raise CheckpointError(
                f"{path} was trained before {cfg.model} defaulted to another parametrisation (capsnet.models.em.TRAINABLE); "
                f"to continue it as it was trained, resume with {sets}"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.ema is None and ckpt.get("ema") is not None:
            log.warning("%s holds a weight average (ema_decay=%s) that this config drops: validation now scores the trained "
                        "weights, while best.pt (validation accuracy %.4f) holds the average; resume with --set ema_decay=%s to keep it",
                        path, saved["ema_decay"], ckpt["progress"]["best_val_accuracy"], saved["ema_decay"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema = WeightAverage(self.model, cfg.ema_decay)
                log.warning("%s holds no weight average (it was trained without ema_decay): the average starts from its weights", path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.generator)
        state = self.state = Progress(**ckpt["progress"])
        if state.batch_in_epoch >= self.steps_per_epoch:  # written by an older version before the epoch rolled over
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.saved_step = state.step
        check_numerics(ckpt.get("numerics"), path, self.amp)
        self._check_best()
        log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)

    def _check_best(self) -> None:
        """A damaged or missing ``best.pt`` is re-selected: the next validation writes a new one."""
        best, state = self.out / BEST, self.state
        if self.dist.is_main and best.exists():
            try:
                load_checkpoint(best)
            except DamagedCheckpointError:
                log.warning("%s is damaged (its checksum fails); set it aside as %s", best, set_aside_damaged(best).name)
        self.dist.barrier()  # rank 0 has set it aside before the others look
        if state.best_step >= 0 and not best.exists():
            log.warning(
                "%s is damaged or missing: the best weights so far (validation accuracy %.4f at step %d) are lost; "
                "the next validation selects a new best.pt", best, state.best_val_accuracy, state.best_step,
            )
            state.best_val_accuracy, state.best_step = -1.0, -1

    def finished_summary(self, final_test: bool) -> Optional[dict]:
        """The summary of a resumed run that has nothing left to do (None when it has)."""
        state, path = self.state, self.out / SUMMARY
        if self.keep_going() or state.validated_step != state.step or state.best_step < 0 or not path.exists():
            return None
        summary = json.loads(path.read_text())
        if summary.get("steps") != state.step or (final_test and "test_accuracy" not in summary):
            return None
        log.info("%s holds a run that is already finished (step %d of %d): nothing to do", self.out, state.step, self.total_steps)
        return summary

    # ----------------------------------------------------------------------------- the loop

    def train(self, *, resumed: bool, progress: bool, final_test: bool) -> dict:
        # Rows at the resume step that this run logs again: the test, and the validation of a finished run re-selecting best.pt.
        again = ("test/", "val/") if self.state.best_step < 0 and not self.keep_going() else ("test/",)
        if self.dist.is_main:
            self.logger = MetricsLogger(self.out, resume_step=self.state.step if resumed else None, again=again)
        try:
            bar = progress_bar(self.total_steps, self.state.step, progress and self.dist.is_main)
            with bar, logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
                self.fit(bar)
            return self.finish(final_test)
        finally:
            if self.logger is not None:
                self.logger.close()

    def keep_going(self) -> bool:
        if self.state.step >= self.total_steps:
            return False
        if self.cfg.time_budget_s is None:
            return True
        over = self.state.train_seconds + (time.perf_counter() - self.started) >= self.cfg.time_budget_s
        return not self.dist.sum([float(over)], device=self.device)[0]  # every rank stops at the same step

    def fit(self, bar: tqdm) -> None:
        cfg, state = self.cfg, self.state
        order, order_epoch = None, None
        self.started = self.window_start = time.perf_counter()
        self.window_images = 0
        try:
            while self.keep_going():
                if order_epoch != state.epoch:
                    order, order_epoch = epoch_order(self.n, cfg.seed, state.epoch), state.epoch
                output, labels, epoch_end = self.step(order)
                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    self.log_train(output, labels, bar)
                bar.update(1)
                if epoch_end or (cfg.eval_every and state.step % cfg.eval_every == 0):
                    self.validate()
                if epoch_end or state.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
            if state.validated_step != state.step or state.best_step < 0:
                self.validate()
            if self.saved_step != state.step:
                self.checkpoint()
        except KeyboardInterrupt:
            self.interrupted()

    def step(self, order: torch.Tensor):
        """One optimizer step on the next batch of ``order``: (output, labels, whether it ended the epoch)."""
        cfg, state = self.cfg, self.state
        self.pending_rng = rng_state(self.generator)
        index = order[state.batch_in_epoch * cfg.batch_size : (state.batch_in_epoch + 1) * cfg.batch_size]
        images, labels = self.data.train_batch(index, self.generator)  # the global batch, same on every rank
        local = self.dist.shard(torch.arange(len(index)))
        images, labels = images[local].to(self.device), labels[local].to(self.device)
        with self.warmup_routing():
            with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                output = self.trained(images, self.objective.teacher(labels))
                loss = self.objective.loss(output, images, labels, state.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if cfg.grad_clip is not None:  # on the true gradients: unscaled first (a no-op without fp16's scaler)
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.pending_rng = _UPDATING
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        state.step += 1
        state.batch_in_epoch += 1
        epoch_end = state.batch_in_epoch == self.steps_per_epoch
        if epoch_end:  # roll over at once: no checkpoint holds a finished epoch, so a resume cannot end it twice
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.pending_rng, self.loss = None, loss
        self.window_images += len(index)
        return output, labels, epoch_end

    @contextlib.contextmanager
    def warmup_routing(self):
        """Route with ``warmup_iterations`` in this step if it falls in the warm-up; the model's own iterations after."""
        cfg = self.cfg
        if cfg.warmup_iterations is None or self.state.step >= cfg.warmup_iterations_steps:
            yield
            return
        own = [m.iterations for m in self.routed]
        for m in self.routed:
            m.iterations = cfg.warmup_iterations
        try:
            yield
        finally:
            for m, iterations in zip(self.routed, own):
                m.iterations = iterations

    def interrupted(self) -> None:
        """Ctrl-C: save the last completed step (unless it came mid-update), then raise :class:`TrainingInterrupted`.

        Before the update the parameters, optimizer and scheduler are those of the last
        completed step, so it is saved with the RNG state from before the interrupted step's
        draws; a model whose forward changes buffers (BatchNorm statistics) would need those too.
        """
        rng, state = self.pending_rng, self.state
        if rng is not _UPDATING and self.saved_step != state.step:
            self.checkpoint(rng=rng)
        held = f"{self.out / LAST} holds step {self.saved_step}" if self.saved_step >= 0 else "no checkpoint was written"
        cut = " (Ctrl-C came in the middle of an update, which cannot be saved)" if rng is _UPDATING else ""
        raise TrainingInterrupted(f"training interrupted at step {state.step}: {held}{cut}; rerun with --resume to continue")

    # ----------------------------------------------------------------------------- logs, validation, checkpoints

    def check_finite(self) -> None:
        """Stop a diverged run before it overwrites a good checkpoint (only where the loop syncs anyway)."""
        loss = self.loss.item()
        weights = [*self.model.parameters(), *(self.ema.module.parameters() if self.ema is not None else ())]
        if not math.isfinite(loss) or not all(bool(torch.isfinite(p).all()) for p in weights):
            raise ValueError(
                f"training diverged at step {self.state.step}: loss {loss} or weights are not finite; "
                f"{self.out / LAST} holds the last finite state. Lower lr (now {self.cfg.lr}) and resume or restart."
            )

    def log_train(self, output, labels: torch.Tensor, bar: tqdm) -> None:
        self.check_finite()
        hits = float(self.objective.correct(output, labels).sum())
        loss_sum, hits, count = self.dist.sum([self.loss.item() * len(labels), hits, float(len(labels))], device=self.device)
        speed = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        if self.dist.is_main:
            scalars = {"train/loss": loss_sum / count, "train/accuracy": hits / count, "train/images_per_s": speed, "train/lr": self.scheduler.get_last_lr()[0] / self.first_group_scale}
            if self.cfg.grad_clip is not None:  # the last step's norm before clipping
                scalars["train/grad_norm"] = float(self.grad_norm)
            self.logger.log(self.state.step, {**scalars, **self.model_metrics()})
        bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{hits / count:.3f}", img_s=f"{speed:.0f}", refresh=False)
        self.window_images, self.window_start = 0, time.perf_counter()

    def model_metrics(self) -> dict[str, float]:
        """What the model's ``training_metrics()`` returns, if it has one (see :func:`train`)."""
        hook = getattr(self.model, "training_metrics", None)
        return {tag: float(value) for tag, value in hook().items()} if callable(hook) else {}

    def validate(self) -> None:
        cfg, state = self.cfg, self.state
        model = self.ema.module if self.ema is not None else self.model  # best.pt and the test then hold the average
        result = evaluate(model, self.data, "val", self.objective, batch_size=cfg.eval_batch_size, device=self.device, step=state.step, dist=self.dist,
                          amp=self.amp)
        accuracy = result["accuracy"]  # None without validation samples (evaluate warned): best.pt then follows the last step
        if accuracy is None or accuracy > state.best_val_accuracy:
            state.best_val_accuracy, state.best_step = state.best_val_accuracy if accuracy is None else accuracy, state.step
            if self.dist.is_main:
                save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "step": state.step, "val": result,
                                 "format": CHECKPOINT_FORMAT}, self.out / BEST)
        if self.dist.is_main and accuracy is not None:
            self.logger.log(state.step, {"val/accuracy": result["accuracy"], "val/loss": result["loss"]})
            log.info("step %d: validation accuracy %.4f (best %.4f at step %d)", state.step, result["accuracy"], state.best_val_accuracy, state.best_step)
        state.validated_step = state.step

    def checkpoint(self, rng: Optional[dict] = None) -> None:
        """Save ``last.pt`` (rotating older ones) at the current step; ``rng``: the RNG state to save, if not the current one."""
        now = time.perf_counter()
        self.state.train_seconds += now - self.started
        self.started = now
        self.check_finite()
        if self.dist.is_main:
            payload = {
                "config": self.cfg.to_dict(),
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng or rng_state(self.generator),
                "progress": vars(self.state).copy(),
                "numerics": numerics(self.amp),
                "format": CHECKPOINT_FORMAT,
            }
            rotate_and_save(payload, self.out / LAST, self.cfg.keep_checkpoints)
        self.saved_step = self.state.step

    # ----------------------------------------------------------------------------- summary

    def finish(self, final_test: bool) -> dict:
        cfg, state = self.cfg, self.state
        summary = {
            "model": cfg.model,
            "dataset": cfg.dataset,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "train_images": min(state.step * cfg.batch_size, state.epoch * self.n + state.batch_in_epoch * cfg.batch_size),
            "train_seconds": round(state.train_seconds, 1),
            "best_val_accuracy": state.best_val_accuracy,
            "best_step": state.best_step,
            "processes": self.dist.world,
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "precision": self.amp or "fp32",
            "date": time.strftime("%Y-%m-%d"),
        }
        if final_test:
            self.dist.barrier()  # best.pt is complete on disk before any rank reads it
            best, _, _ = load_model(self.out / BEST, device=self.device)
            result = evaluate(best, self.data, "test", self.objective, batch_size=cfg.eval_batch_size, device=self.device, step=state.step,
                              dist=self.dist, amp=self.amp)
            accuracy = result["accuracy"]  # None without test samples
            summary.update(test_accuracy=accuracy, test_error=None if accuracy is None else 1 - accuracy, test_samples=result["samples"])
            if self.dist.is_main and accuracy is not None:
                self.logger.log(state.step, {"test/accuracy": result["accuracy"]})
        if self.dist.is_main:
            atomic_write(self.out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
        self.dist.barrier()
        return summary
