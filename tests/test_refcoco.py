"""RefCOCO layout and HF-folder datasets on tiny hand-made files: masks, splits, bad images, end to end."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segrouter.datasets.hf_refer import HFReferDataset
from segrouter.datasets.refcoco import RefCOCODataset
from segrouter.errors import DataError
from segrouter.images import letterbox, rle_to_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def rle_string(counts: list[int]) -> str:
    """The compressed string pycocotools writes for uncompressed ``counts`` (what annotation files hold)."""
    from pycocotools import mask as coco_mask

    h = 1
    return coco_mask.frPyObjects({"size": [h, sum(counts)], "counts": counts}, h, sum(counts))["counts"].decode()


def column_major_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(int)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


# image 1: 8×8, polygon rectangle x∈[2,6], y∈[1,4] → pixels rows 1..3, cols 2..5
POLY_EXPECTED = np.zeros((8, 8), bool)
POLY_EXPECTED[1:4, 2:6] = True
# image 2: 6×10 (h×w), an irregular RLE mask
RLE_EXPECTED = np.zeros((6, 10), bool)
RLE_EXPECTED[2:5, 1:3] = True
RLE_EXPECTED[0, 7:10] = True
RLE_EXPECTED[5, 9] = True


def make_layout(tmp: Path, *, rle_compressed: bool = True) -> tuple[Path, Path]:
    root, images = tmp / "refer", tmp / "train2014"
    (root / "refcoco").mkdir(parents=True)
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg at all")
    counts = column_major_counts(RLE_EXPECTED)
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 8, "width": 8},
            {"id": 2, "file_name": "b.jpg", "height": 6, "width": 10},
            {"id": 3, "file_name": "corrupt.jpg", "height": 8, "width": 8},
            {"id": 4, "file_name": "missing.jpg", "height": 8, "width": 8},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 20, "image_id": 2,
             "segmentation": {"size": [6, 10], "counts": rle_string(counts) if rle_compressed else counts}},
            {"id": 30, "image_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 40, "image_id": 4, "segmentation": [[0, 0, 4, 0, 4, 4]]},
        ],
        "categories": [{"id": 7, "name": "box"}],
    }
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    refs = [
        {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train",
         "sentences": [{"sent": "left box"}, {"sent": "the box"}]},
        {"ref_id": 2, "ann_id": 20, "image_id": 2, "split": "train", "sentences": [{"sent": "blob"}]},
        {"ref_id": 3, "ann_id": 30, "image_id": 3, "split": "train", "sentences": [{"sent": "broken"}]},
        {"ref_id": 4, "ann_id": 40, "image_id": 4, "split": "train", "sentences": [{"sent": "gone"}]},
        {"ref_id": 5, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "box"}]},
        {"ref_id": 6, "ann_id": 20, "image_id": 2, "split": "testA", "sentences": [{"sent": "blob a"}]},
        {"ref_id": 7, "ann_id": 10, "image_id": 1, "split": "testB", "sentences": [{"sent": "box b"}]},
    ]
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root, images


def test_rle_decoding_compressed_and_uncompressed() -> None:
    counts = column_major_counts(RLE_EXPECTED)
    assert np.array_equal(rle_to_mask({"size": [6, 10], "counts": counts}), RLE_EXPECTED)
    assert np.array_equal(rle_to_mask({"size": [6, 10], "counts": rle_string(counts)}), RLE_EXPECTED)
    # a known pycocotools string: a 4x4 mask whose column 1 rows 1..2 are set
    m = np.zeros((4, 4), bool)
    m[1:3, 1] = True
    assert np.array_equal(rle_to_mask({"size": [4, 4], "counts": rle_string(column_major_counts(m))}), m)


def test_masks_are_pycocotools_own_and_broken_rle_is_one_error() -> None:
    from pycocotools import mask as coco_mask

    from segrouter.images import polygons_to_mask

    slanted = [[1.3, 0.2, 7.7, 2.9, 3.1, 7.6], [0, 0, 1, 0]]  # a triangle, and a degenerate polygon (skipped)
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(slanted[:1], 9, 8))).astype(bool)
    assert np.array_equal(polygons_to_mask(slanted, 9, 8), expected) and expected.sum() > 10
    assert not polygons_to_mask([[0, 0, 1, 0]], 4, 4).any()
    for bad in ({"size": [4, 4], "counts": [3, 2]}, {"size": [4, 4], "counts": "01"}, {"size": [4], "counts": []},
                {"size": [4, 4], "counts": "zzzz"}):
        with pytest.raises(DataError, match="RLE"):
            rle_to_mask(bad)


def test_refcoco_masks_splits_and_bad_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, images = make_layout(tmp_path)
    kw = {"root": str(root), "image_dir": str(images), "image_size": 16}
    with caplog.at_level(logging.WARNING):
        train = RefCOCODataset("train", **kw)
    assert train.missing == 1 and "missing" in caplog.text  # missing.jpg dropped at construction, once
    assert len(train) == 4  # 2 + 1 + 1 (corrupt still listed; skipped when loaded)
    # 8×8 → 16×16 (×2, no padding): the polygon mask scaled exactly
    s0 = train[0]
    assert s0["image"].shape == (3, 16, 16) and s0["mask"].shape == (16, 16) and s0["text"] == "left box"
    expected = torch.from_numpy(POLY_EXPECTED.repeat(2, 0).repeat(2, 1).astype(np.float32))
    assert torch.equal(s0["mask"], expected)
    # 6×10 → 10×16 (longest side 16) then padded to 16×16 at the bottom
    s2 = train[2]
    assert s0["target"] == "box" and "target" not in s2  # COCO category name, when the annotation has one
    assert s2["text"] == "blob" and s2["mask"][10:].sum() == 0 and s2["image"][:, 10:].abs().sum() == 0
    _, ref_mask = letterbox(Image.new("RGB", (10, 6)), RLE_EXPECTED, 16)
    assert torch.equal(s2["mask"], ref_mask) and s2["mask"].sum() > 0
    # the corrupt image (index 3) is skipped: the next good sample is returned (wraps to 0), and counted
    s3 = train[3]
    assert s3["id"] == s0["id"] and train.skipped == 1
    assert train[3]["id"] == s0["id"] and train.skipped == 1  # deterministic, counted once
    # split mapping: val → val; test → test_split
    assert RefCOCODataset("val", **kw)[0]["text"] == "box"
    assert RefCOCODataset("test", **kw, test_split="testA")[0]["text"] == "blob a"
    assert RefCOCODataset("test", **kw, test_split="testB")[0]["text"] == "box b"
    assert len(RefCOCODataset("train", **kw, max_samples=2)) == 2


def test_refcoco_uncompressed_rle(tmp_path: Path) -> None:
    root, images = make_layout(tmp_path, rle_compressed=False)
    ds = RefCOCODataset("test", root=str(root), image_dir=str(images), image_size=20, test_split="testA")
    expected = RLE_EXPECTED.repeat(2, 0).repeat(2, 1).astype(np.float32)  # 6×10 → 12×20, padded to 20×20
    assert torch.equal(ds[0]["mask"][:12], torch.from_numpy(expected)) and ds[0]["mask"][12:].sum() == 0


def test_refcoco_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    root, images = make_layout(tmp_path)
    with pytest.raises(DataError) as e:
        RefCOCODataset("train", root=str(root), image_dir=str(images), split_by="umd")
    assert "refs(umd).p" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no refs in split 'test'"):
        RefCOCODataset("test", root=str(root), image_dir=str(images))
    with pytest.raises(DataError, match="unknown split 'testC'"):
        RefCOCODataset("test", root=str(root), image_dir=str(images), test_split="testC")


def test_hf_refer_mask_and_polygon_columns(tmp_path: Path) -> None:
    import datasets

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    masks = [POLY_EXPECTED.astype(np.uint8).tolist()] * 3
    polys = [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]] * 3
    features = datasets.Features({
        "image": datasets.Image(), "expression": datasets.Value("string"),
        "mask": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
        "polygon": datasets.Sequence(datasets.Value("float32")),
    })
    data = {"image": imgs, "expression": ["a", "b", "c"], "mask": masks, "polygon": polys}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(data, features=features) for s in ("train", "validation")})
    dd.save_to_disk(str(tmp_path / "hf"))
    expected = torch.from_numpy(POLY_EXPECTED.repeat(2, 0).repeat(2, 1).astype(np.float32))
    by_mask = HFReferDataset("train", path=str(tmp_path / "hf"), image_size=16)
    by_poly = HFReferDataset("val", path=str(tmp_path / "hf"), image_size=16, mask_column=None,
                             polygon_column="polygon", max_samples=2)
    assert len(by_mask) == 3 and len(by_poly) == 2
    for ds in (by_mask, by_poly):
        s = ds[1]
        assert s["image"].shape == (3, 16, 16) and torch.equal(s["mask"], expected) and s["text"] == "b"
    with pytest.raises(DataError, match="split 'test' not in"):
        HFReferDataset("test", path=str(tmp_path / "hf"))


def test_fit_two_steps_on_refcoco_layout(tmp_path: Path) -> None:
    from segrouter.cli import main

    root, images = make_layout(tmp_path)
    rc = main([
        "fit", "--recipe", TINY, f"output_dir={tmp_path}/runs",
        "data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
        "data.dataset.image_size=32", "data.batch_size=2", "data.eval_batch_size=2",
    ])
    assert rc == 0
    assert (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").exists()
