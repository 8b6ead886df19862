"""The field's evaluation protocol (issue 16): original-resolution scoring, gRefCOCO (no-target samples, N-acc /
T-acc), ReasonSeg (ignore regions, short/long queries), the leak check and ``segrouter test --suite refcoco``,
all on tiny files written here in each dataset's real on-disk layout."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_refcoco import make_layout
from torchmetrics import MetricCollection

from segrouter.cli import main
from segrouter.datasets.grefcoco import NO_TARGET, GRefCOCODataset
from segrouter.datasets.reasonseg import ReasonSegDataset
from segrouter.errors import DataError
from segrouter.metrics import CIoU, GIoU
from segrouter.model.module import SegmentationMLLM
from tests.conftest import build_model, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


# ------------------------------------------------------------------------------------------------ scoring
def scorer(resolution: str) -> SimpleNamespace:
    """What :meth:`SegmentationMLLM.score` reads of the model: its recipe's resolution and the test metrics."""
    return SimpleNamespace(cfg=OmegaConf.create({"metrics": {"resolution": resolution}}),
                           eval_metrics={"test": MetricCollection({"giou": GIoU(), "ciou": CIoU()})})


def one_sample_batch(ignore: bool = False) -> tuple[torch.Tensor, dict]:
    """A 3×5 image letterboxed to 10×10 (content 6×10). Target: row 0, columns 0-2 of the original (3 pixels;
    rows 0-1, columns 0-5 once letterboxed, 12 pixels). Prediction: +1 on rows 0-1, columns 0-2 of the model's
    grid (6 pixels), -1 elsewhere. Resized to 3×5 each original pixel is the mean of a 2×2 block, so only (0, 0)
    stays positive ((0, 1) averages +1 and -1 to 0)."""
    original = torch.zeros(3, 5, dtype=torch.bool)
    original[0, :3] = True
    letterboxed = torch.zeros(10, 10)
    letterboxed[:2, :6] = 1
    logits = -torch.ones(1, 10, 10)
    logits[0, :2, :3] = 1
    batch = {"mask": letterboxed[None], "original_mask": [original], "content_hw": torch.tensor([[6, 10]])}
    if ignore:  # ignore original column 2 (model columns 4-5): it leaves both target and union
        batch["original_ignore"] = [torch.zeros(3, 5, dtype=torch.bool).index_fill_(1, torch.tensor([2]), True)]
        batch["ignore"] = torch.zeros(1, 10, 10, dtype=torch.bool)
        batch["ignore"][0, :, 4:6] = True
    return logits, batch


@pytest.mark.parametrize(("resolution", "ignore", "iou"), [
    ("original", False, 1 / 3),  # prediction (0, 0) against 3 target pixels
    ("model", False, 6 / 12),  # 6 predicted pixels inside 12 target pixels
    ("original", True, 1 / 2),  # column 2 ignored: 1 of 2
    ("model", True, 6 / 8),  # model columns 4-5 ignored: 6 of 8
])
def test_score_at_original_and_model_resolution(resolution: str, ignore: bool, iou: float) -> None:
    model = scorer(resolution)
    logits, batch = one_sample_batch(ignore)
    found = SegmentationMLLM.score(model, "test", logits, batch)
    scores = model.eval_metrics["test"].compute()
    assert found.tolist() == [True]
    assert float(scores["ciou"]) == pytest.approx(iou) and float(scores["giou"]) == pytest.approx(iou)


def test_no_target_scoring_follows_rela() -> None:
    """A no-target sample predicted empty scores IoU 1 and adds nothing to I or U; predicted non-empty it scores
    0 and adds its predicted area to U (ReLA's evaluator)."""
    model = scorer("model")
    logits = -torch.ones(2, 4, 4)
    logits[1, 0, :2] = 1  # sample 1 predicts 2 pixels
    target = torch.zeros(2, 4, 4)
    found = SegmentationMLLM.score(model, "test", logits, {"mask": target})
    scores = model.eval_metrics["test"].compute()
    assert found.tolist() == [False, True]
    assert float(scores["giou"]) == pytest.approx(0.5)  # (1 + 0) / 2
    m = model.eval_metrics["test"]["ciou"]
    assert float(m.inter) == 0 and float(m.union) == 2


# ------------------------------------------------------------------------------------------------ gRefCOCO
def make_grefcoco(tmp: Path) -> tuple[Path, Path]:
    root, images = tmp / "refer", tmp / "train2014"
    (root / "grefcoco").mkdir(parents=True)
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / name)
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8},
                   {"id": 2, "file_name": "b.jpg", "height": 8, "width": 8}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[4, 4, 8, 4, 8, 8, 4, 8]]},
            {"id": 20, "image_id": 2, "category_id": 1, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    refs = [
        {"ref_id": 1, "image_id": 1, "ann_id": [10, 11], "split": "train", "no_target": False,
         "sentences": [{"sent": "both animals"}]},
        {"ref_id": 2, "image_id": 2, "ann_id": [-1], "split": "train", "no_target": True,
         "sentences": [{"sent": "the horse"}, {"sent": "a horse"}]},
        {"ref_id": 3, "image_id": 2, "ann_id": 20, "split": "train", "no_target": False, "sentences": []},
        {"ref_id": 4, "image_id": 2, "ann_id": [20], "split": "val", "no_target": False,
         "sentences": [{"sent": "the cat"}]},
        {"ref_id": 5, "image_id": 1, "ann_id": [-1], "split": "val", "no_target": True,
         "sentences": [{"sent": "the bird"}]},
        {"ref_id": 6, "image_id": 1, "ann_id": [10], "split": "testA", "no_target": False,
         "sentences": [{"sent": "the small cat"}]},
    ]
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root, images


def test_grefcoco_targets_no_targets_and_splits(tmp_path: Path) -> None:
    root, images = make_grefcoco(tmp_path)
    kw = {"root": str(root), "image_dir": str(images), "image_size": 16}  # 8×8 images, doubled
    train = GRefCOCODataset("train", **kw)
    assert len(train) == 3  # the ref without sentences gives none
    both, horse = train[0], train[1]
    assert both["target"] == "cat and dog" and not both["no_target"]
    assert both["mask"].sum() == 4 * (4 + 16)  # the union of the two objects (2×2 and 4×4 pixels, doubled)
    assert horse["target"] == NO_TARGET and horse["no_target"] and horse["mask"].sum() == 0
    assert "original_mask" not in both  # training samples carry no original
    val = GRefCOCODataset("val", **kw)
    assert [s["no_target"] for s in (val[0], val[1])] == [False, True]
    assert val[1]["original_mask"].shape == (8, 8) and not val[1]["original_mask"].any()
    assert GRefCOCODataset("test", **kw)[0]["text"] == "the small cat"  # test_split defaults to testA
    assert val.image_keys() == {"a.jpg", "b.jpg"}


def test_grefcoco_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    root, images = make_grefcoco(tmp_path)
    kw = {"root": str(root), "image_dir": str(images)}
    with pytest.raises(DataError, match="unknown split 'testC'"):
        GRefCOCODataset("test", **kw, test_split="testC")
    with pytest.raises(DataError, match="no refs in split 'testB'"):
        GRefCOCODataset("test", **kw, test_split="testB")
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    refs[0]["ann_id"] = [10, 99]
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(DataError, match="annotation 99") as e:
        GRefCOCODataset("train", **kw)
    assert "\n" not in str(e.value)
    (root / "grefcoco" / "grefs(unc).json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        GRefCOCODataset("train", **kw)


def test_grefcoco_test_logs_n_acc_and_t_acc(tmp_path: Path) -> None:
    root, images = make_grefcoco(tmp_path)
    data = ["data.dataset.name=grefcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            "data.dataset.test_split=val", "data.dataset.image_size=32", "data.batch_size=2", "data.eval_batch_size=2"]
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}/runs", *data]) == 0
    with open(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv") as f:
        assert {"val/n_acc", "val/t_acc"} <= set(next(csv.reader(f)))  # monitorable, as metric_names says
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["test", "--recipe", TINY, "--ckpt", str(ckpt), f"output_dir={tmp_path}/runs", *data]) == 0
    rows = list(csv.DictReader(open(tmp_path / "runs" / "tiny" / "version_1" / "metrics.csv")))
    logged = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith("test/")}
    # one no-target and one target sample: each accuracy is 0 or 1, and they agree with gIoU's no-target part
    assert logged["test/n_acc"] in (0.0, 1.0) and logged["test/t_acc"] in (0.0, 1.0)
    assert 0.0 <= logged["test/ciou"] <= 1.0


# ------------------------------------------------------------------------------------------------ ReasonSeg
def write_reasonseg(folder: Path, name: str, ann: dict | str, *, encoding: str = "utf-8", size: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(folder / f"{name}.jpg")
    (folder / f"{name}.json").write_bytes((ann if isinstance(ann, str) else json.dumps(ann, ensure_ascii=False))
                                          .encode(encoding))


def make_reasonseg(tmp: Path) -> Path:
    root = tmp / "ReasonSeg"
    square = [[0, 0], [8, 0], [8, 8], [0, 8]]
    inner = [[2, 2], [6, 2], [6, 6], [2, 6]]
    write_reasonseg(root / "train", "t1", {"text": ["the plate", "the dish"], "is_sentence": False,
                                           "shapes": [{"label": "target", "points": inner}]})
    # an ignore region inside the target (smaller, so drawn over it), and a flag shape (skipped)
    write_reasonseg(root / "val", "v1", {"text": ["what keeps food warm", "unused"], "is_sentence": True, "shapes": [
        {"label": "target", "points": square}, {"label": "ignore", "points": inner},
        {"label": "flag", "points": [[0, 0], [1, 0], [1, 1]]}]})
    write_reasonseg(root / "val", "v2", {"text": ["café cup"], "is_sentence": False,
                                         "shapes": [{"label": "target", "points": inner}]}, encoding="cp1252")
    return root


def test_reasonseg_masks_ignore_and_queries(tmp_path: Path) -> None:
    root = make_reasonseg(tmp_path)
    train = ReasonSegDataset("train", root=str(root), image_size=16)
    assert [s["text"] for s in (train[0], train[1])] == ["the plate", "the dish"]  # every query of train
    val = ReasonSegDataset("val", root=str(root), image_size=16)
    assert len(val) == 2 and val[0]["text"] == "what keeps food warm"  # the first query only
    v1 = val[0]
    assert v1["ignore"].sum() == 4 * 16 and v1["mask"].sum() == 4 * (64 - 16)  # ignore drawn over the target
    assert not (v1["mask"].bool() & v1["ignore"]).any() and v1["original_ignore"].sum() == 16
    assert val[1]["text"] == "café cup"  # a Windows-1252 file
    assert [s["text"] for s in ReasonSegDataset("val", root=str(root), image_size=16, queries="long")] \
        == ["what keeps food warm"]
    assert len(ReasonSegDataset("val", root=str(root), image_size=16, queries="short")) == 1


def test_reasonseg_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_reasonseg(tmp_path)
    (root / "val" / "v2.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        val = ReasonSegDataset("val", root=str(root))
    assert len(val) == 1 and val.missing == 1 and "missing" in caplog.text
    write_reasonseg(root / "val", "v3", "{broken")
    with pytest.raises(DataError, match="v3.json") as e:
        ReasonSegDataset("val", root=str(root))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="folder not found"):
        ReasonSegDataset("test", root=str(root))


def test_reasonseg_fit_end_to_end(tmp_path: Path) -> None:
    root = make_reasonseg(tmp_path)
    data = ["data.dataset.name=reasonseg", f"data.dataset.root={root}", "data.dataset.test_split=val",
            "data.dataset.image_size=32", "data.batch_size=1", "data.eval_batch_size=2"]
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}/runs", *data]) == 0


# ------------------------------------------------------------------------------------------------ leak check
def test_leak_check_warns_when_evaluated_images_are_training_images(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    root, images = make_layout(tmp_path)
    cfg = tiny_cfg(tmp_path, "data.dataset.name=refcoco", f"data.dataset.root={root}",
                   f"data.dataset.image_dir={images}", "data.dataset.test_split=testA", "data.dataset.image_size=32")
    _, data = build_model(cfg)
    with caplog.at_level(logging.WARNING):
        assert data.check_leak("val") == (1, 1)  # a.png: in train and in val
    assert "1 of the 1 val images are also training images (e.g. a.png)" in caplog.text
    synthetic = build_model(tiny_cfg(tmp_path))[1]
    assert synthetic.check_leak("val") is None  # generated scenes have no image names


# ------------------------------------------------------------------------------------------------ the suite
def make_suite_layout(tmp: Path) -> tuple[Path, Path]:
    """RefCOCO, RefCOCO+ (copies of the refcoco layout) and RefCOCOg-umd (val and test)."""
    root, images = make_layout(tmp)
    shutil.copytree(root / "refcoco", root / "refcoco+")
    (root / "refcocog").mkdir()
    shutil.copy(root / "refcoco" / "instances.json", root / "refcocog" / "instances.json")
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "box"}]},
            {"ref_id": 2, "ann_id": 20, "image_id": 2, "split": "val", "sentences": [{"sent": "blob"}]},
            {"ref_id": 3, "ann_id": 10, "image_id": 1, "split": "test", "sentences": [{"sent": "the box"}]}]
    with open(root / "refcocog" / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f)
    return root, images


def test_suite_refcoco_writes_one_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, images = make_suite_layout(tmp_path)
    data = ["data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            "data.dataset.image_size=32", "data.batch_size=2", "data.eval_batch_size=2", f"output_dir={tmp_path}/runs"]
    assert main(["fit", "--recipe", TINY, *data]) == 0
    ckpt = str(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(["test", "--recipe", TINY, "--ckpt", ckpt, "--suite", "refcoco", *data]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "runs" / "tiny" / "version_1" / "suite.json").read_text())
    rows = saved["rows"]
    assert [(r["dataset"], r["split"]) for r in rows] == [
        ("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"), ("refcoco+", "val"), ("refcoco+", "testA"),
        ("refcoco+", "testB"), ("refcocog", "val"), ("refcocog", "test")]
    assert all(0.0 <= r["ciou"] <= 1.0 and r["samples"] == 1 for r in rows)
    # the recipe trains on refcoco's train split (a.png, b.jpg, corrupt.jpg): every split's image is in it
    assert all(r["images_in_training"] == 1 and r["images"] == 1 for r in rows)
    assert f"protocol stamp {saved['stamp']}" in out and out.count("| refcoco") == 8
    assert (tmp_path / "runs" / "tiny" / "version_1" / "suite.md").read_text() in out
    # same code and settings, same stamp; another resolution, another stamp
    assert main(["test", "--recipe", TINY, "--ckpt", ckpt, "--suite", "refcoco", *data]) == 0
    assert json.loads((tmp_path / "runs" / "tiny" / "version_2" / "suite.json").read_text())["stamp"] == saved["stamp"]
    assert main(["test", "--recipe", TINY, "--ckpt", ckpt, "--suite", "refcoco", *data,
                 "metrics.resolution=model"]) == 0
    assert json.loads((tmp_path / "runs" / "tiny" / "version_3" / "suite.json").read_text())["stamp"] != saved["stamp"]


def test_suite_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, images = make_layout(tmp_path)  # no refcoco+ nor refcocog
    data = ["data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            f"output_dir={tmp_path}/runs"]
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    suite = ["test", "--recipe", TINY, "--suite", "refcoco"]
    for argv, message in (
        ([*suite, "--ckpt", str(ckpt), *data], "refcoco+/refs(unc).p not found"),
        (["validate", "--recipe", TINY, "--suite", "refcoco", *data], "--suite is an option of 'segrouter test'"),
        ([*suite, f"output_dir={tmp_path}/runs"], "evaluates the refcoco dataset"),
        (["test", "--recipe", TINY, "--suite", "pascal", *data], "invalid choice"),
        (["test", "--recipe", TINY, *data, "metrics.resolution=native"], "unknown resolution 'native'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nothing written
