"""Routing algorithms as pure functions."""

from .dynamic import RoutingResult, dynamic_routing
from .em import EMRoutingResult, em_routing

__all__ = ["EMRoutingResult", "RoutingResult", "dynamic_routing", "em_routing"]
