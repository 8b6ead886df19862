"""Model analyses behind ``segrouter analyze``: attention profiles and where the kept image tokens lie."""
