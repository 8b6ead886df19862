"""The LightningDataModule: builds the registered dataset per split and batches samples with text padding."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from segrouter.datasets.base import ENCODER_INPUTS, image_keys, shared_images
from segrouter.errors import DataError
from segrouter.recipe import component
from segrouter.registry import registry
from segrouter.text import encode_example

log = logging.getLogger(__name__)


def dataset_vocabulary(cfg: DictConfig) -> list[str]:
    """Words the dataset's expressions can use (for word-level tokenizers); empty if it does not say."""
    entry = registry("dataset").get(cfg.data.dataset.name, where="data.dataset.name")
    vocab = getattr(entry.factory, "vocabulary", None)
    return list(vocab()) if callable(vocab) else []


class EpochSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch), able to start part-way through an epoch.

    Lightning restores the model, optimiser and loop counters from a mid-epoch checkpoint but restarts a
    plain shuffled DataLoader from a fresh permutation, so a resumed run would see different batches than
    an uninterrupted one. With this sampler the permutation of epoch ``e`` is always the same, and a resume
    skips the batches already trained on (by index, without loading them).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.epoch = 0
        self.skip = 0  # samples to skip at the start of the next iteration only

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(int(state))).tolist()
        start, self.skip = self.skip, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.num_samples


class SegDataModule(L.LightningDataModule):
    """Turns samples ``{image, mask, text, id}`` (and ``target``, ``semantic``, ``original_mask`` with
    ``content_hw``, ``ignore``, ``no_target`` where the dataset gives them) into padded batches the model consumes."""

    def __init__(self, cfg: DictConfig, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.node = component(cfg, "data.dataset")
        self.datasets: dict[str, Dataset] = {}
        self._resume: dict[str, int] | None = None  # from a checkpoint, used by the next train_dataloader()
        self.mask_image_size: int | None = None  # the mask encoder's input size (sam_vit), set by build()
        self.vision_crop = False  # the vision encoder reads a centre crop (hf_clip), set by build()

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = registry("dataset").build(self.node, split, where="data.dataset")
        found = self.datasets[split]
        if hasattr(found, "mask_image_size"):  # real images: the encoders' own inputs, where they read them
            found.mask_image_size = self.mask_image_size
            found.vision_crop = self.vision_crop
        return found

    def setup(self, stage: str) -> None:
        """Lightning's hook before a fit or an evaluation: the leak check of the split it evaluates."""
        split = {"fit": "val", "validate": "val", "test": "test"}.get(stage)
        if split is not None:
            self.check_leak(split)

    def check_leak(self, split: str) -> tuple[int, int] | None:
        """Warn when images of ``split`` are also training images (scores on them measure memory): (shared,
        evaluated) image counts, or None when the check cannot run (a dataset without image names, such as the
        synthetic one, or a training split that is not on disk)."""
        evaluated = image_keys(self.dataset(split))
        if evaluated is None:
            return None
        try:
            train = image_keys(self.dataset("train"))
        except DataError as exc:
            log.info("leak check of %s skipped: the training split cannot be read (%s)", split, exc)
            return None
        if train is None:
            return None
        shared, total, some = shared_images(train, evaluated)
        if shared:
            log.warning("leak check: %d of the %d %s images are also training images (e.g. %s); scores on them "
                        "measure memory, not generalisation: evaluate on a split disjoint from training",
                        shared, total, split, ", ".join(some))
        return shared, total

    def collate(self, samples: list[dict[str, Any]], train: bool = False) -> dict[str, Any]:
        """A padded batch; only training batches name the target in the answer (see ``render_answer``).
        Evaluation batches whose samples name a target, under an answer template with ``{target}``, also
        carry it separately (``probe_*``), for the model's ``name_acc`` probe."""
        d = self.cfg.data
        k = int(self.cfg.model.num_mask_tokens)
        targets = [s.get("target") for s in samples]
        encoded = [encode_example(self.tokenizer, s["text"], d.prompt, d.answer, k, t if train else None)
                   for s, t in zip(samples, targets, strict=True)]
        input_ids, labels, text_mask = self._pad([(ids, lab) for ids, lab, _ in encoded])
        shapes = {tuple(s["image"].shape) for s in samples}
        if len(shapes) != 1:
            raise DataError(f"images in one batch differ in size: {sorted(shapes)}", fix="resize images in the dataset")
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]).float(),
            "input_ids": input_ids,
            "labels": labels,
            "text_mask": text_mask,
            "text": [s["text"] for s in samples],
            "id": [s["id"] for s in samples],
        }
        if all("semantic" in s for s in samples):  # per-pixel classes, where the dataset gives them
            batch["semantic"] = torch.stack([s["semantic"] for s in samples])
        for key in ENCODER_INPUTS:  # real images' letterbox sizes and the encoders' own inputs (sam_vit, hf_clip)
            if all(key in s for s in samples):
                batch[key] = torch.stack([s[key] for s in samples])
        if all("original_mask" in s for s in samples):  # for scoring at the original resolution (metrics.resolution)
            batch["original_mask"] = [s["original_mask"] for s in samples]
        if all("ignore" in s for s in samples):  # pixels scoring leaves out (ReasonSeg)
            batch["ignore"] = torch.stack([s["ignore"] for s in samples])
            if all("original_ignore" in s for s in samples):
                batch["original_ignore"] = [s["original_ignore"] for s in samples]
        if all("no_target" in s for s in samples):  # generalized referring data (gRefCOCO): N-acc and T-acc
            batch["no_target"] = torch.tensor([bool(s["no_target"]) for s in samples])
        if not train and "{target}" in d.answer and all(t is not None for t in targets):
            named = [encode_example(self.tokenizer, s["text"], d.prompt, d.answer, k, t)
                     for s, t in zip(samples, targets, strict=True)]
            batch["probe_ids"], batch["probe_labels"], batch["probe_text_mask"] = self._pad(
                [(ids, names) for ids, _, names in named]
            )
        return batch

    def _pad(self, encoded: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (ids, labels, text mask) of (ids, labels) pairs."""
        t = max(len(ids) for ids, _ in encoded)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(encoded), t), pad, dtype=torch.long)
        labels = torch.full((len(encoded), t), -100, dtype=torch.long)
        text_mask = torch.zeros((len(encoded), t), dtype=torch.bool)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            text_mask[i, : len(ids)] = True
        return input_ids, labels, text_mask

    def _loader(self, split: str, sampler: Sampler[int] | None = None) -> DataLoader:
        d = self.cfg.data
        train = sampler is not None
        return DataLoader(
            self.dataset(split),
            batch_size=d.batch_size if train else d.eval_batch_size,
            sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=partial(self.collate, train=train),
            persistent_workers=d.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(len(self.dataset("train")), int(self.cfg.seed))
        if self._resume is not None:
            consumed, per_epoch = self._resume["batches_consumed"], self._resume["batches_per_epoch"]
            if self.trainer is not None and self.trainer.world_size > 1:
                warnings.warn("mid-epoch resume under DDP restarts the epoch's shuffle: batches may repeat",
                              stacklevel=2)
            elif per_epoch > 0:
                sampler.set_epoch(consumed // per_epoch)
                sampler.skip = (consumed % per_epoch) * int(self.cfg.data.batch_size)
            self._resume = None
        return self._loader("train", sampler)

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: how far into the shuffled training stream the run has got."""
        t = self.trainer
        if t is None or t.state.fn != "fit":
            return {}
        per_epoch = t.num_training_batches
        return {
            "batches_consumed": t.global_step * t.accumulate_grad_batches,
            "batches_per_epoch": int(per_epoch) if per_epoch != float("inf") else 0,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
