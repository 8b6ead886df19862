"""``SegmentationMLLM``: the LISA-style model assembled from registered components.

images → vision encoder → compressor → visual tokens spliced into the text at ``<image>`` → LLM layers
driven by the routing strategy → the mask tokens' final states, projected → mask decoder (which also reads
the full vision features) → mask logits. Loss: LISA's ``ce·CE + bce·BCE + dice·Dice``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, MinMetric

from segrouter.errors import SegrouterError
from segrouter.flops import count_flops
from segrouter.metrics import CIoU, GIoU
from segrouter.model.losses import bce_loss, dice_loss
from segrouter.model.sequence import build_sequence
from segrouter.recipe import component
from segrouter.registry import load_builtins, registry
from segrouter.routing.base import RoutingStrategy, TokenSequence, gather
from segrouter.text import IMAGE_TOKEN, mask_token_names

SPLITS = ("val", "test")


def apply_lora(llm: nn.Module, lora: DictConfig) -> None:
    """Add LoRA adapters to ``lora.targets`` in place and freeze the rest of the LLM, as LISA does.

    ``inject_adapter_in_model`` swaps each target ``nn.Linear`` for a LoRA layer inside its parent module,
    so ``llm.layers`` (which the routing strategies call directly) runs the adapters with no wrapper model
    in between. LoRA's B starts at zero: at init the model computes exactly what it did without LoRA. The
    token embeddings and LM head stay trainable: the ``<image>``/``[SEG]`` rows are new and must be learnt.
    """
    from peft import LoraConfig, inject_adapter_in_model

    llm.requires_grad_(False)
    config = LoraConfig(r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
                        target_modules=list(lora.targets), bias="none")
    try:
        inject_adapter_in_model(config, llm)
    except ValueError as exc:
        raise SegrouterError(f"LoRA: {str(exc).splitlines()[0]}", where="model.lora.targets",
                             fix="name Linear modules of the LLM, e.g. q_proj, k_proj, v_proj, o_proj") from None
    for name, p in llm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    llm.lm_head.requires_grad_(True)
    for module in llm.modules():
        if isinstance(module, nn.Embedding):
            module.requires_grad_(True)


class SegmentationMLLM(L.LightningModule):
    """Built from a validated recipe and the tokenizer the data module uses."""

    def __init__(self, recipe: DictConfig | dict[str, Any], tokenizer: Any) -> None:
        super().__init__()
        load_builtins()
        cfg = recipe if isinstance(recipe, DictConfig) else OmegaConf.create(recipe)
        self.save_hyperparameters({"recipe": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        m = cfg.model
        self.image_size = int(m.image_size)
        self.vision = registry("vision_encoder").build(component(cfg, "model.vision_encoder"), self.image_size, where="model.vision_encoder")
        self.llm = registry("llm").build(component(cfg, "model.llm"), tokenizer, where="model.llm")
        self.compressor = registry("compressor").build(
            component(cfg, "model.compressor"), self.vision.out_dim, self.llm.hidden_size, self.vision.grid_size,
            where="model.compressor",
        )
        self.routing: RoutingStrategy = registry("routing").build(component(cfg, "model.routing"), where="model.routing")
        self.routing.setup(self.llm)
        self.mask_decoder = registry("mask_decoder").build(
            component(cfg, "model.mask_decoder"), self.vision.out_dim, self.vision.grid_size, where="model.mask_decoder"
        )
        d = self.llm.hidden_size
        self.text_proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, self.mask_decoder.prompt_dim))
        if m.lora.enabled:
            apply_lora(self.llm, m.lora)
        if m.freeze_vision:
            self.vision.requires_grad_(False)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.mask_token_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(mask_token_names(int(m.num_mask_tokens)))]
        self.loss_w = m.loss
        self.eval_metrics = nn.ModuleDict(
            {s: MetricCollection({"giou": GIoU(), "ciou": CIoU()}, prefix=f"{s}/") for s in SPLITS}
        )
        self.eval_means = nn.ModuleDict(
            {s: nn.ModuleDict({k: MeanMetric() for k in ("visual_tokens", "llm_flops", "latency_ms")}) for s in SPLITS}
        )
        # adaptive compressors vary the count per image: its spread over the split, next to the mean
        self.eval_token_range = nn.ModuleDict(
            {s: nn.ModuleDict({"visual_tokens_min": MinMetric(), "visual_tokens_max": MaxMetric()}) for s in SPLITS}
        )
        self._step_start = 0.0

    # ----------------------------------------------------------------------------------------- forward
    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, TokenSequence, torch.Tensor, torch.Tensor]:
        """Everything before the LLM layers: (vision features, visual tokens, sequence, labels, mask positions)."""
        images = batch["image"]
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise SegrouterError(
                f"images are {tuple(images.shape[-2:])} but the model expects {self.image_size}×{self.image_size}",
                fix="set data.dataset.image_size to model.image_size",
            )
        feats = self.vision(images)
        visual = self.compressor(feats, images)
        seq, labels, mask_pos = build_sequence(
            self.llm.embed(batch["input_ids"]),
            batch["input_ids"],
            batch["text_mask"],
            batch["labels"],
            visual,
            self.image_token_id,
            self.mask_token_ids,
        )
        return feats, visual, seq, labels, mask_pos

    def forward(self, batch: dict[str, Any], flops: bool = False) -> dict[str, Any]:
        images = batch["image"]
        feats, visual, seq, labels, mask_pos = self.encode(batch)
        llm_flops = None
        if flops:
            hidden, llm_flops = count_flops(lambda: self.routing(self.llm, seq))
        else:
            hidden = self.routing(self.llm, seq)
        prompts = self.text_proj(gather(hidden, mask_pos))
        low = self.mask_decoder(feats, prompts)
        masks = F.interpolate(low[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {
            "masks": masks,
            "hidden": hidden,
            "labels": labels,
            "visual_tokens": visual.counts,
            "llm_flops": llm_flops,
        }

    def losses(self, out: dict[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, labels = out["hidden"], out["labels"]
        nxt = labels[:, 1:]
        sel = nxt != -100
        if bool(sel.any()):
            logits = self.llm.lm_head(hidden[:, :-1][sel])
            ce = F.cross_entropy(logits.float(), nxt[sel])
        else:
            ce = hidden.sum() * 0.0
        masks = out["masks"].float()
        bce, dice = bce_loss(masks, target), dice_loss(masks, target)
        w = self.loss_w
        total = w.ce_weight * ce + w.bce_weight * bce + w.dice_weight * dice
        return {"loss": total, "ce": ce.detach(), "bce": bce.detach(), "dice": dice.detach()}

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        parts = self.losses(out, batch["mask"])
        if not torch.isfinite(parts["loss"]):
            raise SegrouterError(
                f"non-finite loss ({parts['loss'].item()}) at global step {self.global_step}",
                fix="lower optim.lr or enable trainer.gradient_clip_val; the last good checkpoint is kept",
            )
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False, batch_size=bs)
        self.log("train/visual_tokens", out["visual_tokens"].float().mean(), batch_size=bs)
        return parts["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/step_latency_ms", (time.perf_counter() - self._step_start) * 1000.0, batch_size=1)

    # -------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, split: str, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch["image"].shape[0]
        count = batch_idx < int(self.cfg.metrics.flops_batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self(batch, flops=count)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        parts = self.losses(out, batch["mask"])
        self.eval_metrics[split].update(out["masks"] > 0, batch["mask"] > 0.5)
        means = self.eval_means[split]
        means["visual_tokens"].update(out["visual_tokens"].float())
        for metric in self.eval_token_range[split].values():
            metric.update(out["visual_tokens"].float())
        if count:
            means["llm_flops"].update(torch.tensor(out["llm_flops"] / bs, dtype=torch.float64), weight=bs)
        else:  # latency from uncounted batches only: the FLOP counter slows the ops it watches
            means["latency_ms"].update(torch.tensor(elapsed_ms / bs), weight=bs)
        self.log(f"{split}/loss", parts["loss"], batch_size=bs, sync_dist=True)

    def _eval_epoch_end(self, split: str) -> None:
        self.log_dict(self.eval_metrics[split].compute(), prog_bar=True, sync_dist=False)
        self.eval_metrics[split].reset()
        for name, metric in [*self.eval_means[split].items(), *self.eval_token_range[split].items()]:
            if metric.update_called:
                self.log(f"{split}/{name}", metric.compute())
            metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        return {"id": batch["id"], "masks": out["masks"] > 0, "logits": out["masks"], "visual_tokens": out["visual_tokens"]}

    # ---------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(o.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if o.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
