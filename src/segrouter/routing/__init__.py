"""Routing strategies (registry kind ``routing``): which tokens each LLM layer computes."""

from segrouter.routing import full, token_routing  # noqa: F401  (registers built-ins)

# isort: split
from segrouter.routing import mod, pdrop, random_drop  # noqa: F401  (efficiency baselines)
from segrouter.routing.base import Kind, RoutingStrategy, TokenSequence

__all__ = ["Kind", "RoutingStrategy", "TokenSequence"]
