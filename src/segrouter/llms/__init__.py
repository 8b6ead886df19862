"""LLMs (registry kind ``llm``): decoder-only transformers whose layers the routing strategy drives."""

from segrouter.llms import hf_causal  # noqa: F401  (registers built-ins)
from segrouter.llms.base import CausalLLM

__all__ = ["CausalLLM"]
