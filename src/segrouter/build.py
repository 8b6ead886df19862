"""From a validated recipe to the model and the data module (with the tokenizer they share)."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from segrouter.datasets.datamodule import SegDataModule, dataset_vocabulary
from segrouter.errors import RecipeError
from segrouter.model.module import SegmentationMLLM
from segrouter.text import build_tokenizer, template_words


def build(cfg: DictConfig) -> tuple[SegmentationMLLM, SegDataModule]:
    """Seed, then build tokenizer, model and data module. The dataset's image size must be the model's."""
    ds_size = cfg.data.dataset.get("image_size")
    if ds_size is not None and int(ds_size) != int(cfg.model.image_size):
        raise RecipeError(
            f"dataset image_size {ds_size} differs from model.image_size {cfg.model.image_size}",
            where="data.dataset.image_size",
            fix="set it to ${model.image_size}",
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    vocab = dataset_vocabulary(cfg) + template_words(cfg.data.prompt, cfg.data.answer)
    tokenizer = build_tokenizer(cfg.model.llm.get("path"), vocab, cfg.model.num_mask_tokens)
    data = SegDataModule(cfg, tokenizer)
    data.dataset("val")  # dataset parameter checks fail here, before the model is built or a run folder exists
    return SegmentationMLLM(cfg, tokenizer), data
