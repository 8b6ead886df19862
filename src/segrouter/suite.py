"""``segrouter test --suite refcoco``: one checkpoint on every split of the field's referring table, in one run.

LISA, GLaMM and PSALM report RefCOCO val/testA/testB, RefCOCO+ val/testA/testB and RefCOCOg (umd) val/test;
their users' most frequent complaint is that those eight numbers cannot be reproduced (no script, an unclear
protocol). The suite evaluates all eight with the recipe's ``refcoco`` dataset settings (``root``,
``image_dir``, ``image_size``), reading each annotation set once (:func:`~segrouter.datasets.base.read_refer`),
and writes one table — cIoU and gIoU per split, with the samples scored, images missing or unreadable, and how
many of the split's images the recipe's own training split also has (the leak check) — to stdout and to the
run folder (``suite.json``, ``suite.md``). Every table carries a **protocol stamp**: a hash of the scoring
code (the metrics, the resize and its inverse, the mask decoders) and of the settings that change a score
(resolution, image size, sample limits, the splits), so two tables with the same stamp were scored alike.
Every annotation file is checked before the model is built: a missing one is one line and exit code 2.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segrouter.errors import DataError, SegrouterError

# (dataset, split_by, split) in the order of the field's tables
SUITES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "refcoco": (
        ("refcoco", "unc", "val"), ("refcoco", "unc", "testA"), ("refcoco", "unc", "testB"),
        ("refcoco+", "unc", "val"), ("refcoco+", "unc", "testA"), ("refcoco+", "unc", "testB"),
        ("refcocog", "umd", "val"), ("refcocog", "umd", "test"),
    ),
}


def split_recipe(cfg: DictConfig, dataset: str, split_by: str, split: str) -> DictConfig:
    """``cfg`` with its test split set to one split of the suite."""
    out = copy.deepcopy(cfg)
    out.data.dataset.dataset, out.data.dataset.split_by, out.data.dataset.test_split = dataset, split_by, split
    return out


def check_files(cfg: DictConfig, suite: str) -> None:
    """Every annotation file of the suite is there, and the recipe reads RefCOCO (one line each, exit code 2)."""
    d = cfg.data.dataset
    if d.name != "refcoco":
        raise SegrouterError(f"--suite {suite} evaluates the refcoco dataset, the recipe's is '{d.name}'",
                             fix="use a recipe whose data.dataset is refcoco, or set data.dataset.name=refcoco "
                                 "data.dataset.root=... data.dataset.image_dir=...")
    for dataset, split_by in dict.fromkeys((ds, by) for ds, by, _ in SUITES[suite]):
        for name in (f"refs({split_by}).p", "instances.json"):
            path = Path(d.root) / dataset / name
            if not path.is_file():
                raise DataError(f"--suite {suite}: {path} not found",
                                fix=f"put {dataset}/ (refer layout, docs/real_scale.md) under data.dataset.root")


def protocol_stamp(cfg: DictConfig, suite: str) -> tuple[str, dict[str, Any]]:
    """(12-hex-digit stamp, the settings it covers): a hash of the scoring code's source and of the settings."""
    from segrouter import images, metrics
    from segrouter.model.module import SegmentationMLLM

    settings = {
        "suite": [list(s) for s in SUITES[suite]],
        "resolution": str(cfg.metrics.resolution),
        "image_size": int(cfg.model.image_size),
        "max_samples": cfg.data.dataset.get("max_samples"),
        "limit_test_batches": cfg.trainer.limit_test_batches,
    }
    code = "".join(inspect.getsource(x) for x in (metrics, images, SegmentationMLLM.score))
    digest = hashlib.sha256(code.encode() + json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:12], settings


def run_suite(cfg: DictConfig, suite: str, model: Any, tokenizer: Any, run_dir: Path) -> list[dict[str, Any]]:
    """Evaluate ``model`` on every split of ``suite`` (one device, no logger: the table is the output), write
    ``suite.json`` and ``suite.md`` to ``run_dir`` and print the table. Returns the rows."""
    import lightning as L

    from segrouter.datasets.base import image_keys, shared_images
    from segrouter.datasets.datamodule import SegDataModule

    try:  # the recipe's training images, named once for every split's leak column
        train = image_keys(SegDataModule(cfg, tokenizer).dataset("train"))
    except DataError:
        train = None  # no training split on disk: the leak column says so
    stamp, settings = protocol_stamp(cfg, suite)
    rows: list[dict[str, Any]] = []
    for dataset, split_by, split in SUITES[suite]:
        split_cfg = split_recipe(cfg, dataset, split_by, split)
        data = SegDataModule(split_cfg, tokenizer)
        evaluated = data.dataset("test")
        t = cfg.trainer
        trainer = L.Trainer(accelerator=t.accelerator, devices=1, precision=t.precision, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=t.enable_progress_bar, limit_test_batches=t.limit_test_batches)
        scores = trainer.test(model, datamodule=data, verbose=False)[0]
        shared, total, _ = shared_images(train, evaluated.image_keys()) if train is not None else (None, None, [])
        rows.append({
            "dataset": dataset, "split_by": split_by, "split": split,
            "samples": len(evaluated), "missing": getattr(evaluated, "missing", 0), "skipped": evaluated.skipped,
            "ciou": float(scores["test/ciou"]), "giou": float(scores["test/giou"]),
            "images_in_training": shared, "images": total,
        })
    (run_dir / "suite.json").write_text(json.dumps({"suite": suite, "stamp": stamp, "settings": settings,
                                                    "rows": rows}, indent=2) + "\n")
    table = suite_table(suite, stamp, rows)
    (run_dir / "suite.md").write_text(table)
    OmegaConf.save(cfg, run_dir / "recipe.yaml")
    print(table, end="")
    return rows


def suite_table(suite: str, stamp: str, rows: list[dict[str, Any]]) -> str:
    """The suite's markdown table (cIoU and gIoU in percent, as the field reports them) under its stamp."""
    lines = [f"suite {suite}, protocol stamp {stamp}", "",
             "| dataset | split | cIoU | gIoU | samples | images missing / unreadable | images also in training |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        leak = "—" if r["images_in_training"] is None else f"{r['images_in_training']} of {r['images']}"
        lines.append(f"| {r['dataset']} ({r['split_by']}) | {r['split']} | {100 * r['ciou']:.1f} | "
                     f"{100 * r['giou']:.1f} | {r['samples']} | {r['missing']} / {r['skipped']} | {leak} |")
    return "\n".join(lines) + "\n"
