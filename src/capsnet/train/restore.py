"""Models from configs and checkpoints, and what a resumed run must match to continue bit-identically."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch

from ..data import ExperimentData
from ..models import create_model
from ..models.em import EM_BUILDERS, PAPER
from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig

__all__ = ["CHECKPOINT_FORMAT", "build_model", "check_model_fits_data", "checkpoint_model_kwargs", "load_model", "numerics"]

log = logging.getLogger("capsnet.train.loop")  # the training log's name, as before the split


def kwargs_error(exc: TypeError, kwargs: dict, what: str, name: str) -> Optional[ValueError]:
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
        error = kwargs_error(exc, cfg.model_kwargs, "model_kwargs", f"model {cfg.model!r}")
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


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def numerics(amp: Optional[str] = None) -> dict:
    """What float results depend on besides the config: the thread count, torch, the CPU, and
    the precision ``amp="auto"`` resolved to (``amp``: the resolved value, None for float32).

    The same run is bit-identical only under the same values: reductions split over a
    different number of threads, or run by other vector kernels (AVX2, AVX-512, AMX), add
    in a different order and round differently (docs/reliability.md, "Resume").
    """
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "cpu": str(torch.backends.cpu.get_cpu_capability()),
            "amp": amp or "fp32"}


def check_numerics(saved: Optional[dict], path: Path, amp: Optional[str] = None) -> None:
    """Warn when a resumed run cannot continue bit-identically (another thread count, CPU kind or precision)."""
    if not saved:
        return
    now = numerics(amp)
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        log.warning(
            "resuming %s under other numerics (%s): training continues correctly, but not bit-identically "
            "to an uninterrupted run; resume with the same --threads on the same kind of CPU for that", path, what
        )


#: Written into every checkpoint. 2: the EM builders (em_small, em_full, em_mnist, em_tiny) build
#: ``capsnet.models.em.TRAINABLE`` unless told otherwise; checkpoints without the key (format 1)
#: were trained with the paper's parametrisation, which :func:`checkpoint_model_kwargs` restores.
#: 3: ``TRAINABLE`` has a lambda per routed layer; format-2 EM checkpoints had one (``final_lambda=None``).
#: 4: ``TRAINABLE``'s activation is ``"offset"``; format-2 and -3 EM checkpoints had ``"centred"``.
CHECKPOINT_FORMAT = 4


def checkpoint_model_kwargs(cfg: TrainConfig, ckpt: dict) -> dict:
    """The model keywords that rebuild the model a checkpoint was trained as.

    Format-1 checkpoints of the EM builders get :data:`capsnet.models.em.PAPER` under their own
    keywords (the builders' defaults then), format-2 ones the single fan-in lambda of the
    builders then (``final_lambda=None``), format-2 and -3 ones the centred activation logit
    (``activation="centred"``); everything else is ``cfg.model_kwargs`` unchanged.
    """
    if cfg.model in EM_BUILDERS:
        if ckpt.get("format", 1) < 2:
            return {**PAPER, **cfg.model_kwargs}
        legacy = {}
        if ckpt["format"] < 3 and cfg.model_kwargs.get("schedule", "fan_in") == "fan_in":  # other schedules: TRAINABLE's lambdas never applied
            legacy["final_lambda"] = None
        if ckpt["format"] < 4:
            legacy["activation"] = "centred"
        return {**legacy, **cfg.model_kwargs}
    return dict(cfg.model_kwargs)


def load_model(checkpoint: str | Path, device="cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the model of a checkpoint with its weights; returns (model, config, checkpoint dict).

    A file that loads (its SHA-256 matches) can still hold no model capsnet can rebuild: no
    ``config`` or ``model``, a config that is not a dict, or weights of another model than its
    config names (a crafted config). That is a :class:`CheckpointError` naming the file, not
    the KeyError, TypeError or ``load_state_dict`` RuntimeError it would otherwise be.
    """
    ckpt = load_checkpoint(checkpoint, map_location=device)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model = create_model(cfg.model, **checkpoint_model_kwargs(cfg, ckpt)).to(device)
        model.load_state_dict(ckpt["model"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not str(exc).startswith("Error(s) in loading state_dict"):
            raise  # out of memory, a device error: not the file's fault
        reason = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]  # load_state_dict's detail is line 2
        raise CheckpointError(
            f"checkpoint {checkpoint} holds no model capsnet can rebuild ({type(exc).__name__}: {reason}); use a best.pt or last.pt "
            "written by capsnet train, unchanged"
        ) from exc
    model.eval()
    return model, cfg, ckpt
