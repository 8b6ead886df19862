"""SAM's two-way-transformer mask decoder (transformers ``SamMaskDecoder``), prompted by [SEG] states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import SamMaskDecoderConfig, SamModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamLayerNorm, SamMaskDecoder, SamPositionalEmbedding

from segrouter.errors import ParamError, check_min
from segrouter.mask_decoders.base import MaskDecoder
from segrouter.registry import register


@register("mask_decoder", "sam")
class SAMDecoder(MaskDecoder):
    """As in LISA: the projected [SEG] state is a sparse prompt, the dense prompt is SAM's "no mask"
    embedding, and a single mask is predicted (``multimask_output=False``). A SAM-style neck maps the
    vision features to the decoder width; ``neck: false`` leaves it out, for features that already are a SAM
    image embedding (the ``sam_vit`` mask encoder, LISA's layout). ``path`` takes the decoder, the positional
    embedding and the no-mask embedding from a local ``SamModel`` directory."""

    def __init__(
        self,
        vision_dim: int,
        grid_size: tuple[int, int],
        /,
        *,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        path: str | None = None,
        neck: bool = True,
    ) -> None:
        super().__init__()
        self.check_params(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, path=path)
        if path:
            if not Path(path).is_dir():
                raise ParamError(f"SAM directory not found: {path}", param="path")
            sam = SamModel.from_pretrained(path, local_files_only=True)
            embed_dim = sam.config.mask_decoder_config.hidden_size
            self.decoder = sam.mask_decoder
            self.pos = sam.shared_image_embedding
            self.no_mask = sam.prompt_encoder.no_mask_embed
        else:
            if embed_dim % num_heads or embed_dim % 8:
                raise ParamError(
                    f"embed_dim {embed_dim} must be divisible by num_heads {num_heads} and by 8",
                )
            cfg = SamMaskDecoderConfig(
                hidden_size=embed_dim,
                num_hidden_layers=depth,
                num_attention_heads=num_heads,
                mlp_dim=mlp_dim,
                iou_head_hidden_dim=embed_dim,
            )
            cfg._attn_implementation = "sdpa"
            self.decoder = SamMaskDecoder(cfg)
            self.pos = SamPositionalEmbedding(SamVisionConfig(num_pos_feats=embed_dim // 2))
            self.no_mask = nn.Embedding(1, embed_dim)
        self.prompt_dim = embed_dim
        self.grid_size = grid_size
        if not neck and vision_dim != embed_dim:
            raise ParamError(f"neck: false needs features of the decoder's width ({embed_dim}); the vision path "
                             f"gives {vision_dim}", param="neck",
                             fix="set neck: true, or use a SAM image encoder (sam_vit) as model.mask_encoder")
        self.neck: nn.Module = nn.Sequential(
            nn.Conv2d(vision_dim, embed_dim, 1, bias=False),
            SamLayerNorm(embed_dim, data_format="channels_first"),
            nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False),
            SamLayerNorm(embed_dim, data_format="channels_first"),
        ) if neck else nn.Identity()

    @staticmethod
    def check_params(**p: Any) -> None:
        """Sizes of a randomly initialised decoder, checked when a recipe is validated (and here)."""
        if not p["path"]:
            check_min(embed_dim=p["embed_dim"], depth=p["depth"], num_heads=p["num_heads"],
                      mlp_dim=p["mlp_dim"])

    def _image_pe(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
        xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.pos(grid).permute(2, 0, 1).unsqueeze(0)

    def forward(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        emb = self.neck(features)
        b, _, h, w = emb.shape
        dense = self.no_mask.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        pe = self._image_pe(h, w, emb).expand(b, -1, -1, -1)
        masks, _ = self.decoder(
            image_embeddings=emb,
            image_positional_embeddings=pe,
            sparse_prompt_embeddings=prompts.unsqueeze(1),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0, 0]
