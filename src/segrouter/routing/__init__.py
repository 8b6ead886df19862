"""Routing strategies (registry kind ``routing``): which tokens each LLM layer computes."""

from segrouter.routing import full  # noqa: F401  (registers built-ins)
from segrouter.routing.base import Kind, RoutingStrategy, TokenSequence

__all__ = ["Kind", "RoutingStrategy", "TokenSequence"]
