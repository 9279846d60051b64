"""Routing algorithms as pure functions."""

from .dynamic import RoutingResult, dynamic_routing

__all__ = ["RoutingResult", "dynamic_routing"]
