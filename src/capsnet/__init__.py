"""capsnet: capsule networks for PyTorch (dynamic routing and EM routing)."""

from importlib import metadata as _metadata

from .functional import margin_loss, reconstruction_loss, safe_norm, spread_loss, squash
from .models import create_model, list_models, register_model
from .routing import EMRoutingResult, RoutingResult, SelfAttentionRoutingResult, dense_routing, dynamic_routing, em_routing, self_attention_routing

try:  # pyproject.toml's static version is the one source; installing writes it into the metadata
    __version__ = _metadata.version("capsnet")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EMRoutingResult",
    "RoutingResult",
    "SelfAttentionRoutingResult",
    "create_model",
    "dense_routing",
    "dynamic_routing",
    "em_routing",
    "list_models",
    "margin_loss",
    "reconstruction_loss",
    "register_model",
    "safe_norm",
    "self_attention_routing",
    "spread_loss",
    "squash",
]
