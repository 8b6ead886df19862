"""Model analyses (attention profiles) behind ``segrouter analyze``."""
