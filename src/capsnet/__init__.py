"""capsnet: capsule networks for PyTorch (dynamic routing and EM routing)."""

from .functional import margin_loss, reconstruction_loss, safe_norm, spread_loss, squash
from .models import create_model, list_models, register_model
from .routing import EMRoutingResult, RoutingResult, dynamic_routing, em_routing

__version__ = "0.1.0"

__all__ = [
    "EMRoutingResult",
    "RoutingResult",
    "create_model",
    "dynamic_routing",
    "em_routing",
    "list_models",
    "margin_loss",
    "reconstruction_loss",
    "register_model",
    "safe_norm",
    "spread_loss",
    "squash",
]
