"""Training: config, loop, checkpoints, metrics and objectives."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .loop import evaluate, load_model, train
from .objectives import create_objective

__all__ = ["CheckpointError", "TrainConfig", "load_config", "create_objective", "evaluate", "load_checkpoint", "load_model", "save_checkpoint", "train"]
