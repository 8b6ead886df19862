"""The contract every vision encoder meets."""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Maps images (B, 3, H, W) in [0, 1] to a feature map (B, out_dim, h, w).

    Both the compressor (tokens for the LLM) and the mask decoder read this map, so its grid defines the
    spatial layout every later component works on.
    """

    out_dim: int
    grid_size: tuple[int, int]
    # the size of the encoder's own letterbox of the original image, when it reads one (SAM's 1024 as LISA's mask
    # encoder); datasets of real images then put it in the batch as ``mask_image``. None: it reads the model's input
    input_size: int | None = None
    # True: the encoder reads a centre crop of the original image (CLIP's own preprocessing, as LISA feeds its CLIP:
    # :func:`~segrouter.images.center_crop`) instead of the model's letterboxed input; datasets of real images then
    # put it in the batch as ``vision_image`` (images that exist only at the model's size are square: the same)
    center_crop: bool = False

    def set_normalisation(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        """The per-channel mean and std (images in [0, 1]) that :meth:`normalise` applies: buffers that move with
        the module and stay out of checkpoints."""
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [0, 1], normalised as the encoder's weights expect."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
