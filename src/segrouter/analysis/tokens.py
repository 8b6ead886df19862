"""Where are the image tokens a method keeps? Per LLM layer, how many of them lie on the target.

Token pruning (FastV, PyramidDrop, MoD, random dropping) and token routing (its proxies) compute only some
image tokens fully in a layer; segmentation needs the target's tokens. This measures, for a trained model
on validation batches, per layer: ``kept`` — the share of image tokens that ran the layer's FFN (the kept
tokens for a pruning strategy, the proxies in a routed layer of token routing, all of them in a dense
layer); ``inside`` — the share of those kept tokens that lie inside the target's ground-truth mask; and
``recall`` — the share of the image tokens inside the mask that were kept. ``chance`` is the share of all
image tokens inside the mask, what ``inside`` is for a rule blind to the target (``full``, or random
dropping, on average). Each is a mean over samples.

A token lies inside the mask when the pixel holding its centre (``TokenSequence.coords``, ``(y, x)`` in
[0, 1]: pixel ``(floor(y·H), floor(x·W))``) is in it. The centre rather than the majority of a patch, because
not every compressor makes patches: superpixel tokens, ToMe's merged tokens and the resampler's queries
only have a centre (for the resampler, where its query looked; for a non-convex superpixel, its centroid,
which may lie outside it). Samples without any image-token centre inside their mask (targets smaller than
the token spacing) have no recall and are left out of every mean; their number is reported.

Which tokens ran each FFN comes from :func:`~segrouter.routing.base.recording_tokens`: every strategy,
plugins included, records it through :class:`~segrouter.routing.base.LayerStats` with no code of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from segrouter.analysis.base import plot_per_layer
from segrouter.errors import SegrouterError
from segrouter.images import letterbox_to_crop
from segrouter.routing.base import Kind, recording_tokens

MEASURES = ("kept", "inside", "recall")


def inside_mask(coords: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: whether the pixel holding each token centre ``coords`` (B, L, 2) lies in ``masks`` (B, H, W)
    (a pixel is in the mask above 0.5, as the metrics threshold it)."""
    h, w = masks.shape[-2:]
    y = (coords[..., 0] * h).long().clamp(0, h - 1)
    x = (coords[..., 1] * w).long().clamp(0, w - 1)
    rows = torch.arange(masks.shape[0], device=masks.device)[:, None]
    return masks[rows, y, x] > 0.5


def token_placement(model: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer, the means over samples of ``kept``, ``inside`` and ``recall`` (module docstring), with
    ``chance``, the number of samples averaged and of samples skipped."""
    layers = model.llm.num_layers
    sums = {m: torch.zeros(layers, dtype=torch.float64) for m in MEASURES}
    chance, used, skipped, with_image = 0.0, 0, 0, 0
    with torch.no_grad(), recording_tokens():
        for batch in batches:
            seq = model.encode(batch).seq
            model.routing(model.llm, seq)
            ffn_masks = model.routing.stats.ffn_masks
            _check_record(ffn_masks, layers, seq.kinds.shape, model.cfg.model.routing.name)
            image = seq.is_kind(Kind.IMAGE)
            masks = batch["mask"]
            if "vision_image" in batch:  # the tokens lie on the vision encoder's centre crop, not the letterbox
                masks = letterbox_to_crop(masks, batch["content_hw"])
            on_target = image & inside_mask(seq.coords, masks.to(seq.coords.device))
            n_image, n_inside = image.sum(dim=1), on_target.sum(dim=1)
            with_image += int((n_image > 0).sum())
            use = n_inside > 0
            used, skipped = used + int(use.sum()), skipped + int((~use).sum())
            chance += float((n_inside / n_image.clamp(min=1))[use].sum())
            for i, ffn in enumerate(ffn_masks):
                kept = ffn & image
                n_kept, kept_inside = kept.sum(dim=1), (kept & on_target).sum(dim=1)
                sums["kept"][i] += float((n_kept / n_image.clamp(min=1))[use].sum())
                sums["inside"][i] += float((kept_inside / n_kept.clamp(min=1))[use].sum())
                sums["recall"][i] += float((kept_inside / n_inside.clamp(min=1))[use].sum())
    if with_image == 0:
        raise SegrouterError("the LLM sequences hold no image tokens, so none can be kept",
                             fix="analyze a recipe whose LLM sees the image (model.blind_llm: false)")
    if used == 0:
        raise SegrouterError(f"none of the {skipped} samples has an image-token centre inside its target's mask",
                             fix="use more --batches, or a dataset whose targets are larger than the token spacing")
    return {"chance": chance / used, "samples": used, "skipped": skipped,
            "layers": {m: (sums[m] / used).tolist() for m in MEASURES}}


def _check_record(ffn_masks: list[torch.Tensor] | None, layers: int, shape: torch.Size, routing: str) -> None:
    """One (B, L) mask per layer, or one line saying what the strategy recorded instead."""
    if ffn_masks is None or len(ffn_masks) != layers or any(m.shape != shape for m in ffn_masks):
        got = "nothing" if not ffn_masks else f"{len(ffn_masks)} masks of shape {tuple(ffn_masks[0].shape)}"
        raise SegrouterError(
            f"routing '{routing}' recorded {got} for a {layers}-layer LLM over a {tuple(shape)} sequence",
            fix="make a fresh self.stats = LayerStats() in forward and call self.stats.record(attn_active, "
                "ffn_active) once per layer with (B, L) masks in sequence order (docs/plugins.md)")


def report(cfg: Any, ckpt: str, model: Any, batches: list[dict[str, Any]], out: Path) -> list[Path]:
    """Measure, then print the table and write tokens.json and tokens.png to ``out`` (nothing when it fails)."""
    placement = token_placement(model, batches)
    out.mkdir(parents=True, exist_ok=True)
    info = {"ckpt": str(ckpt), "recipe": cfg.name, "routing": cfg.model.routing.name,
            "inside_rule": "token centre's pixel in the mask", **placement}
    (out / "tokens.json").write_text(json.dumps(info, indent=2))
    labels = {"kept": "kept / image tokens", "inside": "inside / kept", "recall": "kept inside / inside"}
    plot_per_layer({labels[m]: placement["layers"][m] for m in MEASURES}, out / "tokens.png",
                   title=f"{cfg.name}: where the kept image tokens are", ylabel="share of image tokens",
                   reference=("chance: inside / image tokens", placement["chance"]))
    values = placement["layers"]
    print(f"{'layer':>5} {'kept':>7} {'inside':>7} {'chance':>7} {'recall':>7}")
    for i in range(len(values["kept"])):
        print(f"{i:>5} {values['kept'][i]:>7.3f} {values['inside'][i]:>7.3f} {placement['chance']:>7.3f} "
              f"{values['recall'][i]:>7.3f}")
    print(f"samples: {placement['samples']} ({placement['skipped']} without an image-token centre inside the "
          "target's mask left out)")
    return [out / "tokens.png", out / "tokens.json"]
