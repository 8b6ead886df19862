"""From a validated recipe to the model and the data module (with the tokenizer they share)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from segrouter.checkpoints import load_weights
from segrouter.datasets.datamodule import SegDataModule, dataset_vocabulary
from segrouter.errors import RecipeError
from segrouter.model.module import SegmentationMLLM
from segrouter.text import build_tokenizer, template_words


def build(cfg: DictConfig, *, init_weights: bool = False) -> tuple[SegmentationMLLM, SegDataModule]:
    """Seed, then build tokenizer, model and data module. The dataset's image size must be the model's.
    With ``init_weights`` (a fresh ``fit``) the model starts from the recipe's ``init_from`` checkpoint."""
    ds_size = cfg.data.dataset.get("image_size")
    if ds_size is not None and int(ds_size) != int(cfg.model.image_size):
        raise RecipeError(
            f"dataset image_size {ds_size} differs from model.image_size {cfg.model.image_size}",
            where="data.dataset.image_size",
            fix="set it to ${model.image_size}",
        )
    if init_weights and cfg.init_from and not Path(cfg.init_from).is_file():
        raise RecipeError(f"checkpoint not found: {cfg.init_from}", where="init_from",
                          fix="train the recipe it comes from first (e.g. the stage-1 recipe), or fix the path")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    vocab = dataset_vocabulary(cfg) + template_words(cfg.data.prompt, cfg.data.answer)
    tokenizer = build_tokenizer(cfg.model.llm.get("path"), vocab, cfg.model.num_mask_tokens)
    data = SegDataModule(cfg, tokenizer)
    val = data.dataset("val")  # dataset parameter checks fail here, before the model is built or a run folder exists
    model = SegmentationMLLM(cfg, tokenizer, getattr(val, "semantic_classes", None))
    data.mask_image_size = getattr(model.mask_encoder, "input_size", None)
    data.vision_crop = model.vision.center_crop
    parts = [name for name, _ in model.named_children()]
    unknown = [m for m in cfg.init_modules if m not in parts]
    if unknown:
        raise RecipeError(f"init_modules names no part of the model: {', '.join(unknown)}", where="init_modules",
                          fix=f"the model's parts are: {', '.join(parts)}")
    if init_weights and cfg.init_from:
        fresh = load_weights(model, cfg.init_from, allow_missing=True, only=list(cfg.init_modules), where="init_from",
                             fix="start from a checkpoint of this architecture (the same model settings)")
        if fresh:
            print(f"segrouter: init_from {cfg.init_from}: {len(fresh)} tensors not in it keep their initialisation "
                  f"({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''})", file=sys.stderr)
    return model, data
