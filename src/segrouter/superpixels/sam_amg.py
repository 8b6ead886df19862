"""SAM automatic ("everything") mask generation turned into a partition of semantic superpixels.

The steps follow SAM's ``SamAutomaticMaskGenerator`` (single crop, no crop layers), written here against
transformers' ``SamModel`` so that the image embedding can be passed in (the paper reuses the RIS
framework's frozen SAM encoder output instead of running SAM twice):

1. the image is resized (longest side to SAM's input size), normalised and padded, as SAM's processor does;
   the image encoder runs once per image, or not at all when ``image_embeddings`` is given;
2. a ``points_per_side``² grid of single foreground points (cell centres) is prompted in batches of
   ``points_per_batch`` with ``multimask_output=True`` (3 masks per point);
3. low-resolution logits are upsampled once to the padded original size and cropped (SAM upsamples twice,
   via the 1024 input frame; one bilinear step gives the same masks up to interpolation rounding and
   needs ``max(H, W)``² memory per mask instead of 1024²);
4. masks are kept when predicted IoU ≥ ``pred_iou_thresh`` and stability ≥ ``stability_thresh``
   (stability = IoU of the mask thresholded at +offset and at -offset, SAM's definition, offset 1.0);
5. duplicates are removed by greedy NMS on *mask* IoU > ``nms_thresh`` in predicted-IoU order (SAM uses
   box IoU; mask IoU does not drop a small part that sits inside a larger object's box);
6. the partition: masks are painted from the largest area to the smallest, so parts and small objects stay
   on top of the larger masks that contain them (as SAM's "everything" visualisation orders them);
   pixels no mask covers become the connected components of the leftover (unrelated leftovers in different
   places must not share a token); then :func:`~segrouter.superpixels.regions.merge_regions`.

With :meth:`~SAMAutomaticMaskGenerator.reuse_encoder` the embeddings come from the model's own SAM image
encoder (the paper's setting: no second SAM pass), and this SAM's image encoder is dropped.

A painted-over mask may end up in several pieces: it keeps one label, since SAM said it is one thing.
Without ``sam_path`` a tiny randomly initialised SAM (seeded, so partitions are reproducible) is built:
its partitions are valid but meaningless, for tests only; experiments need real weights or SLIC.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as connected_components
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from segrouter.errors import ParamError, SegrouterError
from segrouter.superpixels.regions import merge_regions
from segrouter.vision_encoders.sam_vit import SAM_PIXEL_MEAN, SAM_PIXEL_STD

_MEAN = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) * 255.0
_RANDOM_SEED = 0


def normalise_for_sam(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..255 → ImageNet-normalised, as SAM's processor does."""
    return (pixels.float() - _MEAN.to(pixels.device)) / _STD.to(pixels.device)


def tiny_sam_config(width: int = 32, depth: int = 1, image_size: int = 64, patch_size: int = 8) -> SamConfig:
    """A SAM small enough for CPU: ``depth`` ViT layers of ``width`` channels on ``image_size`` px inputs
    (embedding grid ``image_size / patch_size``; the mask decoder predicts masks at 4x that grid)."""
    grid = image_size // patch_size
    return SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=width, output_channels=width, num_hidden_layers=depth, num_attention_heads=2,
            mlp_dim=2 * width, image_size=image_size, patch_size=patch_size, window_size=grid // 2,
            global_attn_indexes=[depth - 1], num_pos_feats=width // 2, scale=width // 2,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=width, image_size=image_size, patch_size=patch_size, image_embedding_size=grid
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=width, num_attention_heads=2, mlp_dim=2 * width, iou_head_hidden_dim=width
        ),
    )


def tiny_random_sam() -> SamModel:
    """A seeded, randomly initialised tiny SAM (64 px input, 8×8 embedding) for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        return SamModel(tiny_sam_config())


class SAMAutomaticMaskGenerator:
    """Point-grid SAM masks → filtered, de-duplicated, painted into a partition (see the module doc)."""

    name = "sam"

    def __init__(
        self,
        sam_path: str | None = None,
        *,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.86,
        stability_thresh: float = 0.92,
        stability_offset: float = 1.0,
        nms_thresh: float = 0.7,
        min_area: int = 16,
        max_regions: int = 64,
    ) -> None:
        if sam_path is not None:
            path = Path(sam_path)
            if not path.is_dir():
                raise ParamError(
                    f"SAM directory not found: {sam_path}",
                    param="sam_path",
                    fix="point it at a local SamModel folder (config.json + weights), or use generator: slic",
                )
            self.model = SamModel.from_pretrained(str(path), local_files_only=True)
            self.weights_id: str = weights_digest(self.model)
        else:
            self.model = tiny_random_sam()
            self.weights_id = f"random-tiny-seed{_RANDOM_SEED}"
        self.model.eval().requires_grad_(False)
        self.input_size = int(self.model.config.vision_config.image_size)
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_thresh, self.stability_thresh = pred_iou_thresh, stability_thresh
        self.stability_offset, self.nms_thresh = stability_offset, nms_thresh
        self.min_area, self.max_regions = min_area, max_regions

    def reuse_encoder(self, encoder: torch.nn.Module) -> None:
        """Take the image embeddings from ``encoder`` (the model's own SAM image encoder, e.g. LISA's frozen
        SAM ViT-H) instead of running SAM's: this generator's image encoder is dropped, and the cache key hashes
        this SAM's prompt encoder and mask decoder with ``encoder``'s weights, which now make the embedding.
        ``encoder`` needs ``out_dim`` and ``input_size`` equal to this SAM's embedding width and input size."""
        vision = self.model.config.vision_config
        mine = (int(vision.output_channels), int(vision.image_size))
        theirs = (getattr(encoder, "out_dim", None), getattr(encoder, "input_size", None))
        if mine != theirs:
            raise ParamError(
                f"the mask encoder's embedding (width {theirs[0]}, input {theirs[1]} px) is not what this SAM's "
                f"mask decoder reads (width {mine[0]}, input {mine[1]} px)",
                param="reuse_mask_encoder",
                fix="point sam_path at the SAM the mask encoder comes from, or set reuse_mask_encoder: false",
            )
        self.model.vision_encoder = None  # never run: the embeddings come from ``encoder``
        self.weights_id = weights_digest(self.model) + "+encoder:" + weights_digest(encoder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> SAMAutomaticMaskGenerator:
        """Run SAM where the images are (the model is not a registered submodule: it stays out of
        checkpoints and optimisers, so Lightning does not move it)."""
        self.model.to(device)
        return self

    def settings(self) -> dict[str, Any]:
        """Everything the output depends on besides the image (the cache key)."""
        return {
            "weights": self.weights_id,
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_thresh": self.stability_thresh,
            "stability_offset": self.stability_offset,
            "nms_thresh": self.nms_thresh,
            "min_area": self.min_area,
            "max_regions": self.max_regions,
        }

    def _scale(self, height: int, width: int) -> float:
        return self.input_size / max(height, width)

    @torch.no_grad()
    def image_embeddings(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → SAM image embedding (1, C, e, e), preprocessed as SAM's processor does."""
        _check_image(image)
        h, w = image.shape[:2]
        s = self._scale(h, w)
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False, antialias=True)
        x = normalise_for_sam(x)
        x = F.pad(x, (0, self.input_size - x.shape[-1], 0, self.input_size - x.shape[-2]))
        return self.model.get_image_embeddings(x)

    @torch.no_grad()
    def masks(self, image: np.ndarray, image_embeddings: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Filtered, de-duplicated masks (M, H, W) bool and their predicted IoUs (M,), best first."""
        _check_image(image)
        h, w = image.shape[:2]
        emb = self.image_embeddings(image) if image_embeddings is None else image_embeddings.to(self.device)
        if emb.dim() == 3:
            emb = emb[None]
        n = self.points_per_side
        centres = (np.arange(n) + 0.5) / n
        grid = np.stack(np.meshgrid(centres * w, centres * h, indexing="xy"), -1).reshape(-1, 2)  # (x, y)
        points = torch.tensor(grid * self._scale(h, w), dtype=torch.float32, device=self.device)
        side = max(h, w)
        kept_masks, kept_scores = [], []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            out = self.model(
                image_embeddings=emb,
                input_points=batch[None, :, None, :],
                input_labels=torch.ones(1, len(batch), 1, dtype=torch.int, device=self.device),
                multimask_output=True,
            )
            low = out.pred_masks[0].flatten(0, 1)[:, None]  # (P*3, 1, 4e, 4e)
            logits = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[:, 0, :h, :w]
            scores = out.iou_scores[0].flatten()
            inter = (logits > self.stability_offset).flatten(1).sum(1)
            union = (logits > -self.stability_offset).flatten(1).sum(1)
            stability = inter / union.clamp(min=1)
            masks = logits > 0
            keep = (scores >= self.pred_iou_thresh) & (stability >= self.stability_thresh) & masks.flatten(1).any(1)
            kept_masks.append(masks[keep].cpu())
            kept_scores.append(scores[keep].cpu())
        masks, scores = torch.cat(kept_masks), torch.cat(kept_scores)
        order = _mask_nms(masks.flatten(1), scores, self.nms_thresh)
        return masks[order].numpy(), scores[order].numpy()

    def __call__(self, image: np.ndarray, image_embeddings: torch.Tensor | None = None) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W) int64 partition; ``image_embeddings`` skips SAM's image encoder."""
        masks, _ = self.masks(image, image_embeddings)
        return merge_regions(paint(masks, image.shape[:2]), self.min_area, self.max_regions)


def paint(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Overlapping masks → label map: largest first so smaller masks stay on top; uncovered pixels →
    connected components (4-connectivity) of the leftover, labelled after the masks."""
    labels = np.full(shape, -1, dtype=np.int64)
    for i in np.argsort([-int(m.sum()) for m in masks], kind="stable"):
        labels[masks[i]] = i
    leftover = labels < 0
    if leftover.any():
        components = connected_components(leftover, connectivity=1)
        labels[leftover] = len(masks) + components[leftover] - 1
    return labels


def _mask_nms(flat: torch.Tensor, scores: torch.Tensor, thresh: float) -> list[int]:
    """Greedy NMS on mask IoU: indices of kept masks, highest score first."""
    kept: list[int] = []
    areas = flat.sum(1)
    as_float = flat.float()
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        if kept:
            inter = as_float[kept] @ as_float[i]
            iou = inter / (areas[kept] + areas[i] - inter)
            if bool((iou > thresh).any()):
                continue
        kept.append(i)
    return kept


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SegrouterError(f"SAM mask generation needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's weights themselves (names, shapes, dtypes and bytes), for the partition cache: two
    copies of the same SAM share cached partitions, and weights changed in place (same file names and sizes)
    never reuse stale ones."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
