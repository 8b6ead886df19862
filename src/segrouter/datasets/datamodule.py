"""The LightningDataModule: builds the registered dataset per split and batches samples with text padding."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from segrouter.errors import DataError
from segrouter.recipe import component
from segrouter.registry import registry
from segrouter.text import encode_example


def dataset_vocabulary(cfg: DictConfig) -> list[str]:
    """Words the dataset's expressions can use (for word-level tokenizers); empty if it does not say."""
    entry = registry("dataset").get(cfg.data.dataset.name, where="data.dataset.name")
    vocab = getattr(entry.factory, "vocabulary", None)
    return list(vocab()) if callable(vocab) else []


class SegDataModule(L.LightningDataModule):
    """Turns samples ``{image, mask, text, id}`` into padded batches the model consumes."""

    def __init__(self, cfg: DictConfig, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.node = component(cfg, "data.dataset")
        self.datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = registry("dataset").build(self.node, split, where="data.dataset")
        return self.datasets[split]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        d = self.cfg.data
        k = int(self.cfg.model.num_mask_tokens)
        encoded = [encode_example(self.tokenizer, s["text"], d.prompt, d.answer, k) for s in samples]
        t = max(len(ids) for ids, _ in encoded)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(samples), t), pad, dtype=torch.long)
        labels = torch.full((len(samples), t), -100, dtype=torch.long)
        text_mask = torch.zeros((len(samples), t), dtype=torch.bool)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            text_mask[i, : len(ids)] = True
        shapes = {tuple(s["image"].shape) for s in samples}
        if len(shapes) != 1:
            raise DataError(f"images in one batch differ in size: {sorted(shapes)}", fix="resize images in the dataset")
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]).float(),
            "input_ids": input_ids,
            "labels": labels,
            "text_mask": text_mask,
            "text": [s["text"] for s in samples],
            "id": [s["id"] for s in samples],
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        d = self.cfg.data
        return DataLoader(
            self.dataset(split),
            batch_size=d.batch_size if shuffle else d.eval_batch_size,
            shuffle=shuffle,
            num_workers=d.num_workers,
            collate_fn=self.collate,
            persistent_workers=d.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
