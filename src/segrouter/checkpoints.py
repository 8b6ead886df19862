"""Local weight loading (safetensors or torch files). Nothing here downloads."""

from __future__ import annotations

from pathlib import Path

import torch

from segrouter.errors import SegrouterError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (``weights_only``: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise SegrouterError(f"weights file not found: {path}", fix="point the recipe at a local file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SegrouterError(f"cannot read weights {path}: {type(exc).__name__}: {exc}", fix="check the file is intact") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SegrouterError(f"{path} holds no state dict", fix="save it with torch.save(model.state_dict(), path)")
    return obj
