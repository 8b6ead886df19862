"""The SAM superpixel projector: partitions, region merging, pooling, padding, cache, ablations, gradients."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, tiny_cfg
from skimage.color import rgb2lab

from segrouter.compressors.sam_superpixel import SAMSuperpixelProjector, region_stats
from segrouter.errors import RecipeError, SegrouterError
from segrouter.superpixels import (
    PartitionCache,
    SAMAutomaticMaskGenerator,
    SLICGenerator,
    check_partition,
    merge_regions,
)
from segrouter.superpixels.regions import border_lengths, merge_similar_colours
from segrouter.superpixels.sam_amg import paint


def _scene(size: int = 48, seed: int = 0) -> np.ndarray:
    """A noisy two-tone background with two flat squares: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3)) + 0.3
    image[:, size // 2 :] = 0.6
    image[5:20, 5:20] = (0.9, 0.1, 0.1)
    image[25:40, 28:44] = (0.1, 0.2, 0.9)
    image += rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _tiny_sam(**kw: object) -> SAMAutomaticMaskGenerator:
    settings = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_thresh": 0.0, "min_area": 4, "max_regions": 32}
    return SAMAutomaticMaskGenerator(**{**settings, **kw})  # type: ignore[arg-type]


def _stripes(k: int, size: int = 32) -> np.ndarray:
    """A partition of k vertical stripes."""
    return np.broadcast_to((np.arange(size) * k // size)[None, :], (size, size)).astype(np.int64).copy()


# ------------------------------------------------------------------------------------------- partitions
def _slic() -> SLICGenerator:
    return SLICGenerator(n_segments=12, compactness=20.0, colour_threshold=0.0, min_area=8, max_regions=64)


@pytest.mark.parametrize("make", [_slic, _tiny_sam])
def test_partition_covers_every_pixel_exactly_once(make: Callable[[], Callable[[np.ndarray], np.ndarray]]) -> None:
    gen = make()
    for image in (_scene(), _scene(40, seed=1)[:, :33]):  # square and non-square
        labels = gen(image)
        check_partition(labels, image.shape[:2])  # int64, shape, labels exactly 0..K-1
        assert labels.min() == 0 and np.bincount(labels.ravel()).sum() == image.shape[0] * image.shape[1]


def test_random_sam_masks_are_painted_and_embeddings_can_be_passed_in() -> None:
    gen, image = _tiny_sam(), _scene()
    masks, scores = gen.masks(image)
    assert masks.shape[1:] == image.shape[:2] and masks.dtype == bool and len(masks) == len(scores) > 0
    assert np.all(np.diff(scores) <= 0)  # NMS output is best first
    labels = gen(image)
    assert labels.max() + 1 > 1
    np.testing.assert_array_equal(gen(image, image_embeddings=gen.image_embeddings(image)), labels)


def test_strict_thresholds_leave_one_region() -> None:
    """No mask passes → every pixel is leftover → one connected component."""
    labels = _tiny_sam(pred_iou_thresh=1.0, stability_thresh=1.0)(_scene())
    assert labels.max() == 0


def test_paint_keeps_small_masks_on_top_and_splits_leftover_components() -> None:
    big = np.zeros((6, 6), bool)
    big[:, :3] = True
    small = np.zeros((6, 6), bool)
    small[1:3, 1:3] = True
    labels = paint(np.stack([small, big]), (6, 6))
    assert (labels[small] == 0).all() and (labels[big & ~small] == 1).all()
    leftover = labels[:, 3:]
    assert set(np.unique(leftover)) == {2}  # one connected leftover component
    split = np.zeros((6, 6), bool)
    split[:, 2:4] = True
    labels = paint(split[None], (6, 6))
    assert len(np.unique(labels)) == 3  # left and right leftovers are different regions


def test_min_area_and_max_regions_are_respected() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 40, size=(24, 24))  # hundreds of tiny fragments
    for min_area, max_regions in ((10, 100), (1, 7), (30, 5)):
        labels = merge_regions(noisy, min_area, max_regions)
        check_partition(labels, noisy.shape)
        areas = np.bincount(labels.ravel())
        assert len(areas) <= max_regions and areas.min() >= min_area
    gen = SLICGenerator(n_segments=40, compactness=20.0, colour_threshold=0.0, min_area=60, max_regions=6)
    areas = np.bincount(gen(_scene()).ravel())
    assert len(areas) <= 6 and areas.min() >= 60


def test_small_region_merges_into_its_longest_border_neighbour() -> None:
    labels = np.array([[0, 1, 0, 0], [0, 2, 1, 1], [0, 1, 1, 1]])  # region 2 (1 px) touches 0 once, 1 three times
    assert border_lengths(labels)[2] == {0: 1, 1: 3}
    merged = merge_regions(labels, min_area=2, max_regions=10)
    assert merged[1, 1] == merged[0, 1] and len(np.unique(merged)) == 2
    assert merge_regions(np.zeros((3, 3), np.int64), min_area=100, max_regions=1).max() == 0  # nothing to merge into


def test_colour_merging_gives_one_region_per_colour_area() -> None:
    """SLIC over-segments the two-tone background and the two squares; colour merging recovers exactly
    the four flat-colour areas, and threshold 0 leaves plain SLIC."""
    image = _scene()
    truth = np.zeros(image.shape[:2], np.int64)
    truth[:, 24:] = 1
    truth[5:20, 5:20] = 2
    truth[25:40, 28:44] = 3
    plain = SLICGenerator(n_segments=24, compactness=20.0, colour_threshold=0.0, min_area=8, max_regions=64)(image)
    merged = SLICGenerator(n_segments=24, compactness=20.0, colour_threshold=20.0, min_area=8, max_regions=64)(image)
    assert plain.max() + 1 > 8 and merged.max() + 1 == 4
    for region in range(4):  # each merged region is one colour area, up to a few boundary pixels
        inside = truth[merged == region]
        assert np.bincount(inside).max() >= 0.98 * inside.size


def test_colour_merging_updates_means_closest_pair_first() -> None:
    """Three grey stripes with L* gaps of about 9.0 and 12.9 and a threshold of 15: the closer pair merges
    first, which moves the pooled mean about 17.4 away from the third stripe, so it stays separate;
    thresholding the initial distances alone would have chained all three into one."""
    greys = np.array([90, 112, 145]) / 255
    lightness = [float(rgb2lab(np.full((1, 1, 3), g))[0, 0, 0]) for g in greys]
    gaps = np.diff(lightness)
    assert 8.5 < gaps[0] < 9.5 and 12.5 < gaps[1] < 13.5
    labels = _stripes(3, size=30)
    image = (greys[labels][..., None].repeat(3, axis=2) * 255).round().astype(np.uint8)
    merged = merge_similar_colours(labels, image, threshold=15.0)
    assert merged.max() + 1 == 2 and merged[0, 0] == merged[0, 10] != merged[0, 29]
    assert merge_similar_colours(labels, image, threshold=8.0).max() + 1 == 3


# --------------------------------------------------------------------------------------------- pooling
def test_pooling_and_geometry_match_a_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4×4 image, 2×2 grid of 2×2-pixel cells; region 0 is one pixel, smaller than a patch
    labels = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    stats = region_stats(labels, (2, 2))
    np.testing.assert_allclose(stats.occupancy, [[0.25, 0, 0, 0], [0.75, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(stats.centroids[0], [0.125, 0.125])
    g0, g1 = stats.geometry[0], stats.geometry[1]
    np.testing.assert_allclose(g0[:7], [0, 0, 0.25, 0.25, 0.125, 0.125, 1 / 16])
    np.testing.assert_allclose(g0[7:], np.ones(16))  # one pixel fills its own bbox
    np.testing.assert_allclose(g1[:4], [0, 0, 0.5, 1.0])
    np.testing.assert_allclose(g1[7:].reshape(4, 4), [[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])

    proj = SAMSuperpixelProjector(2, 2, (2, 2), positional_embedding=False, aggregator=False, depth=1)
    with torch.no_grad():
        proj.proj[0].weight.copy_(torch.eye(2))
        proj.proj[0].bias.zero_()
    monkeypatch.setattr(proj, "partition", lambda image: labels)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = proj(torch.stack([feats, 10 * feats])[None], torch.zeros(1, 3, 4, 4))
    expected = torch.tensor([1.0, (3 * 1 + 4 * 2) / 7, 3.0, 4.0])  # region 1: weights 3/7, 4/7
    torch.testing.assert_close(out.embeds[0], torch.stack([expected, 10 * expected], 1))
    torch.testing.assert_close(out.coords[0, 0], torch.tensor([0.125, 0.125]))


def test_tokens_are_in_centroid_raster_order() -> None:
    labels = np.array([[3, 3, 0, 0], [3, 3, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]])
    ys, xs = region_stats(labels, (2, 2)).centroids.T
    np.testing.assert_allclose(ys, [0.25, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(xs, [0.25, 0.75, 0.25, 0.75])


# ------------------------------------------------------------------------------------- letterbox padding
def test_region_stats_leave_unlabelled_pixels_out() -> None:
    # the right half is padding (-1): it belongs to no region, yet cells keep their full pixel count
    labels = np.array([[0, 0, -1, -1], [1, 1, -1, -1], [1, 1, -1, -1], [1, 1, -1, -1]])
    stats = region_stats(labels, (2, 2))
    np.testing.assert_allclose(stats.occupancy, [[0.5, 0, 0, 0], [0.5, 0, 1, 0]])
    np.testing.assert_allclose(stats.centroids, [[0.125, 0.25], [0.625, 0.25]])
    np.testing.assert_allclose(stats.geometry[:, 6], [2 / 16, 6 / 16])  # area fractions of the whole image


def test_the_letterbox_padding_is_no_region() -> None:
    """A dark object touching the black padding: partitioned with the padding (as before), SLIC's colour merging
    joins them into one region; partitioned inside ``content_hw`` (as now), the padding is no region at all,
    makes no token, and the object is a region of its own."""
    from segrouter.compressors.base import ImageContext

    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    image[:, 24:] = 0  # the letterbox padding: content (32, 24)
    image[8:20, 16:24] = 3  # a near-black object touching it
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2, n_segments=16, min_area=4)
    padded = proj.partition(image)
    assert padded[10, 20] == padded[10, 30]  # before: the object and the padding are one region
    ctx = ImageContext(content_hw=torch.tensor([[32, 24]]))
    (labels,) = proj.partitions(images, ctx)
    assert (labels[:, 24:] == -1).all() and (labels[:, :24] >= 0).all()
    obj = labels == labels[10, 20]
    assert obj[8:20, 16:24].all() and obj.sum() == 12 * 8
    out = proj(torch.randn(1, 8, 4, 4), images, ctx)
    assert out.counts.item() == labels.max() + 1
    assert (out.coords[0, :, 1] < 24 / 32).all()  # every token's centroid lies inside the content


def _reused(tmp_path: Path) -> tuple[SAMSuperpixelProjector, torch.nn.Module, Path]:
    """A tiny SAM folder, its image encoder as the model's mask encoder, and a projector reusing that encoder."""
    from transformers import SamModel

    from segrouter.superpixels.sam_amg import tiny_sam_config
    from segrouter.vision_encoders.sam_vit import SamViT

    torch.manual_seed(3)
    SamModel(tiny_sam_config()).save_pretrained(tmp_path / "sam")
    encoder = SamViT(64, path=str(tmp_path / "sam")).eval()
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2, generator="sam", sam_path=str(tmp_path / "sam"),
                                  reuse_mask_encoder=True, points_per_side=4, pred_iou_thresh=0.0,
                                  stability_thresh=0.0, min_area=4)
    proj.attach_mask_encoder(encoder)
    return proj, encoder, tmp_path / "sam"


def test_reused_sam_embedding_gives_the_partition_of_a_second_sam_pass(tmp_path: Path) -> None:
    """The paper's point: the superpixels come from the embedding the mask decoder's SAM computed anyway. With
    that encoder being the generator's own SAM, the partition equals the one of a separate SAM pass; the
    generator's image encoder is gone, and the cache key hashes the encoder that made the embedding."""
    from segrouter.compressors.base import ImageContext

    proj, encoder, sam = _reused(tmp_path)
    image = _scene(64)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        embedding = encoder(images)
    own = SAMAutomaticMaskGenerator(str(sam), points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0,
                                    min_area=4)
    torch.testing.assert_close(embedding, own.image_embeddings(image), atol=1e-4, rtol=1e-4)
    (labels,) = proj.partitions(images, ImageContext(sam_embedding=embedding, sam_image=images))
    np.testing.assert_array_equal(labels, own(image))
    assert proj.generator.model.vision_encoder is None
    key = proj.generator.settings()["weights"]
    assert key.startswith("sha256:") and "+encoder:sha256:" in key and key != own.settings()["weights"]
    with torch.no_grad():
        encoder.encoder.neck.conv1.weight.add_(1.0)
    assert _reused(tmp_path / "again")[0].generator.settings()["weights"] == key  # same weights, same key
    proj.attach_mask_encoder(encoder)
    assert proj.generator.settings()["weights"] != key  # another encoder, another embedding: another key
    with pytest.raises(SegrouterError, match="got no SAM embedding"):
        proj(torch.randn(1, 8, 4, 4), images, ImageContext())


def test_reused_partition_maps_onto_a_centre_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a vision encoder that reads a centre crop (CLIP's preprocessing), SAM's partition of the whole image
    (its content in SAM's letterbox) is resized as the crop resizes the image and cropped: a wide image's four
    vertical stripes leave the middle two on the crop, one token region each."""
    from segrouter.compressors.base import ImageContext

    proj, _, _ = _reused(tmp_path)
    stripes = np.broadcast_to(np.arange(64)[None] // 16, (32, 64)).astype(np.int64)
    seen = []
    monkeypatch.setattr(proj.cache, "get", lambda image, generator, compute=None: seen.append(image.shape) or stripes)
    ctx = ImageContext(center_crop=True, sam_embedding=torch.zeros(1, 32, 8, 8), sam_image=torch.rand(1, 3, 64, 64),
                       sam_image_hw=torch.tensor([[32, 64]]))
    (labels,) = proj.partitions(torch.rand(1, 3, 16, 16), ctx)
    assert seen == [(32, 64, 3)]  # SAM partitioned the image inside its letterbox padding
    np.testing.assert_array_equal(labels, np.tile(np.repeat([0, 1], 8), (16, 1)))


def test_reuse_needs_a_matching_sam_mask_encoder(tmp_path: Path) -> None:
    from segrouter.vision_encoders.sam_vit import SamViT

    proj, _, _ = _reused(tmp_path)
    with pytest.raises(RecipeError, match="needs the model's SAM mask encoder, and the model has none"):
        proj.attach_mask_encoder(None)
    with pytest.raises(RecipeError, match=r"embedding \(width 16, input 64 px\) is not what this SAM's mask decoder "
                                          r"reads \(width 32, input 64 px\)"):
        proj.attach_mask_encoder(SamViT(64, input_size=64, patch_size=8, hidden_size=16, depth=1, num_heads=2,
                                        output_channels=16, window_size=4))
    with pytest.raises(RecipeError, match="reuse_mask_encoder is only used by generator: sam"):
        SAMSuperpixelProjector(8, 16, (4, 4), reuse_mask_encoder=True)


# ----------------------------------------------------------------------------------- batching and model
def test_variable_counts_are_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2)
    monkeypatch.setattr(proj, "partition", lambda image: _stripes(int(image[0, 0, 0]) + 1))
    images = torch.zeros(3, 3, 32, 32)
    images[:, 0, 0, 0] = torch.tensor([0.0, 4.0, 1.0]) / 255  # 1, 5 and 2 regions
    out = proj(torch.randn(3, 8, 4, 4), images)
    assert out.embeds.shape == (3, 5, 16) and out.counts.tolist() == [1, 5, 2]
    assert out.mask[0].tolist() == [True, False, False, False, False]
    assert (out.embeds[~out.mask] == 0).all() and (out.coords[~out.mask] == 0).all()
    assert torch.isfinite(out.embeds).all()


def test_full_model_forward_with_sam_superpixel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(tmp_path, "model.compressor.name=sam_superpixel", "model.compressor.n_segments=6")
    model, dm = build_model(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = model(batch)  # real SLIC partitions
    assert out["masks"].shape == batch["mask"].shape and (out["visual_tokens"] >= 1).all()
    counts = iter(range(1, 100))
    monkeypatch.setattr(model.compressor, "partition", lambda image: _stripes(next(counts) % 4 + 1))
    out = model(batch)  # forced different counts per sample
    assert out["visual_tokens"].tolist() == [2, 3, 4, 1]
    model.losses(out, batch["mask"])["loss"].backward()
    assert model.compressor.proj[0].weight.grad.abs().sum() > 0


def test_validation_logs_the_spread_of_per_image_token_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adaptive counts are logged as the split's mean, min and max, and predict_step returns them per image."""
    import lightning as L

    cfg = tiny_cfg(tmp_path, "model.compressor.name=sam_superpixel", "model.compressor.n_segments=6")
    model, dm = build_model(cfg)
    counts = iter(range(1, 10_000))
    monkeypatch.setattr(model.compressor, "partition", lambda image: _stripes(next(counts) % 4 + 1))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)
    logged = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert (logged["val/visual_tokens_min"], logged["val/visual_tokens_max"]) == (1.0, 4.0)
    assert 1.0 < logged["val/visual_tokens"] < 4.0
    batch = next(iter(dm.val_dataloader()))
    out = model.predict_step(batch, 0)
    assert out["visual_tokens"].shape == (len(batch["id"]),) and set(out["visual_tokens"].tolist()) <= {1, 2, 3, 4}


# ----------------------------------------------------------------------------------------------- cache
def test_cache_hits_misses_and_atomic_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen, image = _slic(), _scene()
    cache = PartitionCache(tmp_path)
    first = cache.get(image, gen)
    assert (cache.hits, cache.misses) == (0, 1)
    files = list(tmp_path.rglob("*"))
    npz = [f for f in files if f.is_file()]
    assert len(npz) == 1 and npz[0].suffix == ".npz" and npz[0].parent.parent.name == "slic"
    np.testing.assert_array_equal(cache.get(image, gen), first)
    assert (cache.hits, cache.misses) == (1, 1)

    fresh = PartitionCache(tmp_path)  # another process: served from disk
    labels = fresh.get(image, gen)
    assert (fresh.hits, fresh.misses) == (1, 0) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, first)

    fresh.get(image, SLICGenerator(n_segments=12, compactness=5.0, colour_threshold=0.0, min_area=8, max_regions=64))
    fresh.get(_scene(seed=3), gen)
    assert fresh.misses == 2 and len([f for f in tmp_path.rglob("*.npz")]) == 3

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        PartitionCache(tmp_path).get(_scene(seed=4), gen)
    assert len(list(tmp_path.rglob("*.npz"))) == 3 and not list(tmp_path.rglob("*.tmp"))


def test_in_memory_cache_without_dir() -> None:
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2, n_segments=6)
    images = torch.rand(2, 3, 32, 32)
    proj(torch.randn(2, 8, 4, 4), images)
    proj(torch.randn(2, 8, 4, 4), images)
    assert (proj.cache.hits, proj.cache.misses) == (2, 2) and proj.cache.dir is None


# ------------------------------------------------------------------------------ ablations and gradients
def test_ablation_switches_remove_their_parameters() -> None:
    def names(**kw: object) -> set[str]:
        proj = SAMSuperpixelProjector(16, 32, (4, 4), **kw)  # type: ignore[arg-type]
        return {n.split(".")[0] for n, _ in proj.named_parameters()}

    assert names() == {"aggregator", "proj", "sspe"}
    assert names(positional_embedding=False) == {"aggregator", "proj"}
    assert names(aggregator=False) == {"proj", "sspe"}
    assert names(aggregator=False, positional_embedding=False) == {"proj"}
    no_context = {n for n, _ in SAMSuperpixelProjector(16, 32, (4, 4), context_tokens=0).named_parameters()}
    assert not any("context" in n for n in no_context)


def test_gradient_reaches_projector_sspe_aggregator_and_features() -> None:
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2, n_segments=6)
    feats = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = proj(feats, torch.rand(2, 3, 32, 32))
    (out.embeds**2).sum().backward()
    for name in ("proj.0.weight", "sspe.0.weight", "aggregator.attn.out_proj.weight"):
        assert proj.get_parameter(name).grad.abs().sum() > 0, name
    assert feats.grad.abs().sum() > 0


def test_aggregator_starts_as_identity() -> None:
    torch.manual_seed(0)
    feats, images = torch.randn(1, 8, 4, 4), torch.rand(1, 3, 32, 32)
    with_agg = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2, positional_embedding=False)
    without = SAMSuperpixelProjector(8, 16, (4, 4), aggregator=False, positional_embedding=False)
    without.proj.load_state_dict(with_agg.proj.state_dict())
    torch.testing.assert_close(with_agg(feats, images).embeds, without(feats, images).embeds)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    proj = SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2)
    with pytest.raises(SegrouterError, match="needs RGB images"):
        proj(torch.randn(1, 8, 4, 4), torch.rand(1, 1, 32, 32))
    with pytest.raises(SegrouterError, match="SAM directory not found"):
        SAMSuperpixelProjector(8, 16, (4, 4), generator="sam", sam_path=str(tmp_path / "missing"))
    with pytest.raises(RecipeError, match="aggregator_heads must divide the vision width 8"):
        SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=3)
    with pytest.raises(RecipeError, match="sam_path is only used by generator: sam"):
        SAMSuperpixelProjector(8, 16, (4, 4), sam_path=str(tmp_path))
    with pytest.raises(RecipeError, match="max_regions"):
        SAMSuperpixelProjector(8, 16, (4, 4), max_regions=0)
    with pytest.warns(UserWarning, match="random tiny SAM"):
        SAMSuperpixelProjector(8, 16, (4, 4), generator="sam", aggregator_heads=2)


def test_trained_tiny_sam_folder_loads_as_sam_path(tmp_path: Path) -> None:
    """benchmarks/train_tiny_sam.py writes a save_pretrained folder that generator: sam loads offline and
    partitions with; its settings (the cache key) hold a hash of the weights: the same for a copy of the folder,
    another for the same files with one weight changed (same names, same sizes)."""
    out = tmp_path / "tiny_sam"
    script = Path(__file__).parents[1] / "benchmarks" / "train_tiny_sam.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--steps", "2", "--batch", "2", "--points", "2",
         "--width", "32", "--depth", "1", "--num-samples", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 2 and 0.0 <= report["val_point_miou"] <= 1.0
    gen = SAMAutomaticMaskGenerator(str(out), points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0,
                                    min_area=4, max_regions=32)
    assert gen.model.config.vision_config.hidden_size == 32 and gen.settings()["weights"].startswith("sha256:")
    check_partition(gen(_scene(64)), (64, 64))
    copy = tmp_path / "elsewhere"
    shutil.copytree(out, copy)
    assert SAMAutomaticMaskGenerator(str(copy)).settings()["weights"] == gen.settings()["weights"]
    changed = gen.model
    with torch.no_grad():
        changed.mask_decoder.iou_token.weight.add_(1.0)
    changed.save_pretrained(copy)
    assert SAMAutomaticMaskGenerator(str(copy)).settings()["weights"] != gen.settings()["weights"]


def test_slic_fallback_is_said_at_build_and_in_list(capsys: pytest.CaptureFixture[str]) -> None:
    from segrouter.cli import main

    SAMSuperpixelProjector(8, 16, (4, 4), aggregator_heads=2)
    assert "sam_superpixel: generator: slic runs the SLIC fallback" in capsys.readouterr().err
    assert main(["list", "compressor"]) == 0
    listed = capsys.readouterr().out
    assert "note: generator: slic runs the SLIC fallback" in listed.split("sam_superpixel", 1)[1]
