"""segrouter: efficient segmentation with multimodal LLMs, composed from registered components."""

__version__ = "0.1.0"
