"""Routing algorithms as pure functions."""

from .dense import dense_routing, dense_votes
from .dynamic import RoutingResult, dynamic_routing
from .em import EMRoutingResult, em_routing
from .self_attention import SelfAttentionRoutingResult, self_attention_routing

__all__ = ["EMRoutingResult", "RoutingResult", "dense_routing", "dense_votes", "dynamic_routing", "em_routing"]
__all__ += ["SelfAttentionRoutingResult", "self_attention_routing"]
