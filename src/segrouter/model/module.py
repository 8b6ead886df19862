"""``SegmentationMLLM``: the LISA-style model assembled from registered components.

images → vision encoder → compressor → visual tokens spliced into the text at ``<image>`` → LLM layers
driven by the routing strategy → the mask tokens' final states, projected → mask decoder (which also reads
the full vision features, or those of its own ``mask_encoder``) → mask logits. Loss: LISA's
``ce·CE + bce·BCE + dice·Dice``, plus ``semantic·CE`` of a per-pixel label head on the vision features where
the recipe asks for it and the data labels every pixel (dense supervision of the vision stage).

Besides cIoU/gIoU, evaluation logs ``name_acc`` where the data names each target: whether the LM head,
teacher-forced after the mask tokens, names the target (e.g. "red circle") — what the LLM read from the
image, apart from the mask decoder. Controls for that question: ``model.blind_llm`` trains without visual
tokens, and ``metrics.control`` shuffles or zeroes them at evaluation (:func:`visual_control`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, MinMetric

from segrouter.compressors.base import ImageContext, VisualTokens
from segrouter.errors import RecipeError, SegrouterError, recipe_path
from segrouter.flops import count_flops
from segrouter.images import unletterbox
from segrouter.metric_names import EVAL_IOU, EVAL_MEANS, EVAL_RANGE
from segrouter.metrics import CIoU, GIoU
from segrouter.model.losses import bce_loss, dice_loss
from segrouter.model.sequence import build_sequence
from segrouter.recipe import component
from segrouter.registry import registry
from segrouter.routing.base import RoutingStrategy, TokenSequence, gather
from segrouter.text import IMAGE_TOKEN, mask_token_names

SPLITS = ("val", "test")
# the semantic head predicts each vision-grid cell's labels on a 2×2 finer grid (then upsampled to the image):
# in an exploration on the visref ViT this left an object's shape more linearly readable from its features than
# per-cell logits did, as one head per attribute did against one over colour-shape pairs (benchmarks/vit_probe.py)
SEMANTIC_SUBCELLS = 2


class Encoded(NamedTuple):
    """What :meth:`SegmentationMLLM.encode` makes of a batch before the LLM layers."""

    features: torch.Tensor  # the vision encoder's (B, C, h, w), which the compressor read
    visual: VisualTokens
    seq: TokenSequence
    labels: torch.Tensor  # the LM targets, aligned with ``seq``
    mask_pos: torch.Tensor  # (B, K) positions of the mask tokens in ``seq``
    mask_features: torch.Tensor | None  # the mask encoder's output, when the compressor already needed it


def visual_control(visual: VisualTokens, control: str) -> VisualTokens:
    """The visual tokens as a control changes them: ``blind`` (none at all), ``zero`` (same count and places,
    zero embeddings) or ``shuffle`` (each sample gets the next sample's tokens, so none keeps its own)."""
    if control == "blind":
        return VisualTokens(visual.embeds[:, :0], visual.mask[:, :0], visual.coords[:, :0])
    if control == "zero":
        return VisualTokens(torch.zeros_like(visual.embeds), visual.mask, visual.coords)
    if control == "shuffle":
        if visual.embeds.shape[0] < 2:
            raise SegrouterError("the shuffle control needs batches of at least 2 samples, got one",
                                 fix="choose data.eval_batch_size so that no evaluation batch holds a single sample")
        return VisualTokens(*(t.roll(1, dims=0) for t in (visual.embeds, visual.mask, visual.coords)))
    raise SegrouterError(f"unknown control '{control}'", fix="use blind, zero or shuffle")


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
    """Built from a validated recipe and the tokenizer the data module uses; ``semantic_classes`` are the
    dataset's per-pixel labels (its ``semantic_classes``: attribute → class names), which
    ``model.loss.semantic_weight`` needs."""

    def __init__(self, recipe: DictConfig | dict[str, Any], tokenizer: Any,
                 semantic_classes: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        cfg = recipe if isinstance(recipe, DictConfig) else OmegaConf.create(recipe)
        self.save_hyperparameters({"recipe": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        m = cfg.model
        self.image_size = int(m.image_size)
        self.vision = registry("vision_encoder").build(component(cfg, "model.vision_encoder"), self.image_size,
                                                       where="model.vision_encoder")
        self.llm = registry("llm").build(component(cfg, "model.llm"), tokenizer, where="model.llm")
        self.compressor = registry("compressor").build(
            component(cfg, "model.compressor"), self.vision.out_dim, self.llm.hidden_size, self.vision.grid_size,
            where="model.compressor",
        )
        self.routing: RoutingStrategy = registry("routing").build(component(cfg, "model.routing"),
                                                                  where="model.routing")
        with recipe_path("model.routing"):
            self.routing.setup(self.llm)
        self.mask_encoder = None
        decoder_vision = self.vision
        if m.mask_encoder is not None:
            self.mask_encoder = registry("vision_encoder").build(
                component(cfg, "model.mask_encoder"), self.image_size, where="model.mask_encoder"
            )
            decoder_vision = self.mask_encoder
        if self.compressor.reads_sam_embedding:
            with recipe_path("model.compressor"):
                self.compressor.attach_mask_encoder(self.mask_encoder)
        self.mask_decoder = registry("mask_decoder").build(
            component(cfg, "model.mask_decoder"), decoder_vision.out_dim, decoder_vision.grid_size,
            where="model.mask_decoder",
        )
        self.semantic_head: nn.Conv2d | None = None
        self.semantic_sizes: list[int] = []  # classes + background, per attribute
        if m.loss.semantic_weight > 0:
            if not semantic_classes:
                raise RecipeError(f"model.loss.semantic_weight needs per-pixel classes, which the "
                                  f"{cfg.data.dataset.name} dataset does not give", where="model.loss.semantic_weight",
                                  fix="set it to 0, or use a dataset with semantic_classes (synthetic)")
            self.semantic_sizes = [len(c) + 1 for c in semantic_classes.values()]
            self.semantic_head = nn.Conv2d(self.vision.out_dim, sum(self.semantic_sizes) * SEMANTIC_SUBCELLS ** 2, 1)
        d = self.llm.hidden_size
        self.text_proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True),
                                       nn.Linear(d, self.mask_decoder.prompt_dim))
        if m.lora.enabled:
            apply_lora(self.llm, m.lora)
        if m.freeze_vision:
            self.vision.requires_grad_(False)
        parts = dict(self.named_children())
        unknown = [name for name in m.freeze if name not in parts]
        if unknown:
            raise SegrouterError(f"model.freeze names no part of the model: {', '.join(unknown)}", where="model.freeze",
                                 fix=f"the model's parts are: {', '.join(parts)}")
        for name in m.freeze:
            parts[name].requires_grad_(False)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.mask_token_ids = [
            int(i) for i in tokenizer.convert_tokens_to_ids(mask_token_names(int(m.num_mask_tokens)))
        ]
        self.loss_w = m.loss
        self.eval_metrics = nn.ModuleDict(
            {s: MetricCollection(dict(zip(EVAL_IOU, (GIoU(), CIoU()), strict=True)), prefix=f"{s}/") for s in SPLITS}
        )
        self.eval_means = nn.ModuleDict(
            {s: nn.ModuleDict({k: MeanMetric() for k in EVAL_MEANS}) for s in SPLITS}
        )
        # adaptive compressors vary the count per image: its spread over the split, next to the mean
        self.eval_token_range = nn.ModuleDict(
            {s: nn.ModuleDict(dict(zip(EVAL_RANGE, (MinMetric(), MaxMetric()), strict=True))) for s in SPLITS}
        )
        self._step_start = 0.0

    # ----------------------------------------------------------------------------------------- forward
    def encode(self, batch: dict[str, Any], control: str | None = None, *, prompt_only: bool = False) -> Encoded:
        """Everything before the LLM layers. ``control`` (see :func:`visual_control`) changes the visual tokens;
        ``model.blind_llm`` drops them. ``prompt_only``: the batch is a prompt without its answer (generation), so
        it has no mask token yet. A compressor that reuses the SAM mask encoder's embedding gets it here, and the
        mask decoder then reads the same ``mask_features``."""
        images = batch["image"]
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise SegrouterError(
                f"images are {tuple(images.shape[-2:])} but the model expects {self.image_size}×{self.image_size}",
                fix="set data.dataset.image_size to model.image_size",
            )
        cropped = "vision_image" in batch  # the vision encoder's centre crop of the original (hf_clip, as LISA)
        pixels = batch["vision_image"] if cropped else images
        feats = self.vision(pixels)
        context = ImageContext(content_hw=None if cropped else batch.get("content_hw"), center_crop=cropped)
        mask_features = None
        if self.compressor.reads_sam_embedding:
            mask_features = self.decoder_features(batch, feats)
            sam_image, sam_image_hw = self.mask_input(batch)
            context = dataclasses.replace(context, sam_embedding=mask_features, sam_image=sam_image,
                                          sam_image_hw=sam_image_hw)
        visual = self.compressor(feats, pixels, context)
        if self.cfg.model.blind_llm:
            visual = visual_control(visual, "blind")
        if control is not None:
            visual = visual_control(visual, control)
        seq, labels, mask_pos = build_sequence(
            self.llm.embed(batch["input_ids"]),
            batch["input_ids"],
            batch["text_mask"],
            batch["labels"],
            visual,
            self.image_token_id,
            self.mask_token_ids,
            prompt_only=prompt_only,
        )
        return Encoded(feats, visual, seq, labels, mask_pos, mask_features)

    def forward(self, batch: dict[str, Any], flops: bool = False, control: str | None = None) -> dict[str, Any]:
        images = batch["image"]
        enc = self.encode(batch, control)
        llm_flops = None
        if flops:
            hidden, llm_flops = count_flops(lambda: self.routing(self.llm, enc.seq))
        else:
            hidden = self.routing(self.llm, enc.seq)
        masks = self.decode_masks(self.decoder_features(batch, enc.features, enc.mask_features),
                                  gather(hidden, enc.mask_pos), images.shape[-2:])
        return {
            "masks": masks,
            "features": enc.features,
            "hidden": hidden,
            "labels": enc.labels,
            "visual_tokens": enc.visual.counts,
            "visual": enc.visual,
            "llm_flops": llm_flops,
        }

    def decode_masks(self, features: torch.Tensor, states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (B, *size) from the mask decoder's features and the LLM's mask-token states (B, K, D):
        projected by ``text_proj`` into the decoder's prompt, decoded, upsampled to the model's input size."""
        low = self.mask_decoder(features, self.text_proj(states))
        return F.interpolate(low[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def decoder_features(self, batch: dict[str, Any], feats: torch.Tensor,
                         mask_features: torch.Tensor | None = None) -> torch.Tensor:
        """What the mask decoder reads: the vision features the LLM's tokens come from, or the mask encoder's
        own, from the batch's ``mask_image`` where the dataset gives one (a SAM encoder at 1024 px, as in LISA);
        ``mask_features`` where :meth:`encode` already computed them."""
        if mask_features is not None:
            return mask_features
        if self.mask_encoder is None:
            return feats
        image, content_hw = self.mask_input(batch)
        return self.mask_encoder(image) if content_hw is None else self.mask_encoder(image, content_hw)

    def mask_input(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the mask encoder reads: its own letterbox of the original (``mask_image``) and the image's size
        inside that padding, where the dataset gives one and the encoder reads one; else the model's input and
        None (the encoder resizes the whole input, padding included)."""
        if "mask_image" in batch and getattr(self.mask_encoder, "input_size", None) is not None:
            return batch["mask_image"], batch["mask_image_hw"]
        return batch["image"], None

    def name_tokens(self, batch: dict[str, Any], visual: VisualTokens
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every token of the targets' names, teacher-forced on the answer that names them (the ``probe_*``
        tensors of an evaluation batch): (LM-head prediction, true token, sample index), each (N,).

        The name follows the mask tokens, so it cannot change anything at or before them: the masks come from
        the batch without it; this is a second LLM pass over the same visual tokens."""
        seq, names, _ = build_sequence(
            self.llm.embed(batch["probe_ids"]), batch["probe_ids"], batch["probe_text_mask"], batch["probe_labels"],
            visual, self.image_token_id, self.mask_token_ids,
        )
        hidden = self.routing(self.llm, seq)
        nxt = names[:, 1:]
        sel = nxt != -100
        return self.llm.lm_head(hidden[:, :-1][sel]).argmax(dim=-1), nxt[sel], sel.nonzero()[:, 0]

    def losses(self, out: dict[str, Any], target: torch.Tensor, semantic: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The weighted sum and its parts; ``semantic`` (B, A, H, W), the batch's per-pixel labels of each of the
        dataset's A attributes, for the semantic head (when the recipe has one; a batch without them is then an
        error). The semantic part sums one cross-entropy per attribute."""
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
        parts = {"ce": ce.detach(), "bce": bce.detach(), "dice": dice.detach()}
        if self.semantic_head is not None:
            if semantic is None:
                raise SegrouterError("model.loss.semantic_weight is set but the batch has no per-pixel classes",
                                     fix="set it to 0, or use a dataset with semantic_classes (synthetic)")
            logits = F.interpolate(F.pixel_shuffle(self.semantic_head(out["features"]), SEMANTIC_SUBCELLS),
                                   size=semantic.shape[-2:], mode="bilinear", align_corners=False).float()
            parts["semantic"] = sum(F.cross_entropy(part, semantic[:, a]) for a, part in
                                    enumerate(logits.split(self.semantic_sizes, dim=1)))
            total = total + w.semantic_weight * parts["semantic"]
            parts["semantic"] = parts["semantic"].detach()
        return {"loss": total, **parts}

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.device.type == "cuda":  # time the GPU's work, not only its launch
            torch.cuda.synchronize()
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        parts = self.losses(out, batch["mask"], batch.get("semantic"))
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
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.log("train/step_latency_ms", (time.perf_counter() - self._step_start) * 1000.0, batch_size=1)

    # -------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, split: str, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch["image"].shape[0]
        count = batch_idx < int(self.cfg.metrics.flops_batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self(batch, flops=count, control=self.cfg.metrics.control)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        parts = self.losses(out, batch["mask"], batch.get("semantic"))
        means = self.eval_means[split]
        found = self.score(split, out["masks"], batch)
        if "no_target" in batch:  # generalized data: N-acc over no-target samples, T-acc over the others
            for name, rows, hit in (("n_acc", batch["no_target"], ~found), ("t_acc", ~batch["no_target"], found)):
                if bool(rows.any()):
                    means[name].update(hit[rows].float())
        means["visual_tokens"].update(out["visual_tokens"].float())
        for metric in self.eval_token_range[split].values():
            metric.update(out["visual_tokens"].float())
        if "probe_ids" in batch:  # name_acc: a sample counts when every token of its target's name is right
            pred, true, sample = self.name_tokens(batch, out["visual"])
            wrong = torch.zeros(bs, device=pred.device).index_add_(0, sample, (pred != true).float())
            named = torch.zeros(bs, dtype=torch.bool, device=pred.device).index_fill_(0, sample, True)
            if bool(named.any()):
                means["name_acc"].update((wrong[named] == 0).float())
        if count:
            means["llm_flops"].update(torch.tensor(out["llm_flops"] / bs, dtype=torch.float64), weight=bs)
        else:  # latency from uncounted batches only: the FLOP counter slows the ops it watches
            means["latency_ms"].update(torch.tensor(elapsed_ms / bs), weight=bs)
        self.log(f"{split}/loss", parts["loss"], batch_size=bs, sync_dist=True)

    def score(self, split: str, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Update ``split``'s gIoU and cIoU with the batch's masks (B, S, S) and return which samples' predicted
        mask is non-empty (B,). With ``metrics.resolution: original`` and a batch that keeps its original masks,
        each prediction is first cropped out of the padding and resized to its original image
        (:func:`~segrouter.images.unletterbox`); otherwise masks are scored at the model's resolution. Pixels of the
        batch's ``ignore`` masks (ReasonSeg) count in neither intersection nor union, as in LISA's evaluation."""
        metrics = self.eval_metrics[split]
        if self.cfg.metrics.resolution != "original" or "original_mask" not in batch:
            pred, target = logits > 0, batch["mask"] > 0.5
            if "ignore" in batch:
                pred, target = pred & ~batch["ignore"], target & ~batch["ignore"]
            metrics.update(pred, target)
            return pred.flatten(1).any(dim=1)
        found = []
        ignores = batch.get("original_ignore", [None] * len(logits))
        for mask, hw, target, ignore in zip(logits, batch["content_hw"].tolist(), batch["original_mask"], ignores,
                                            strict=True):
            pred = unletterbox(mask, hw, tuple(target.shape)) > 0
            if ignore is not None:
                pred, target = pred & ~ignore, target & ~ignore
            metrics.update(pred[None], target[None])
            found.append(bool(pred.any()))
        return torch.tensor(found, device=logits.device)

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
        return {"id": batch["id"], "masks": out["masks"] > 0, "logits": out["masks"],
                "visual_tokens": out["visual_tokens"]}

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """On ``fit --resume`` the recipe's ``optim.lr``, ``weight_decay`` and ``betas`` replace those saved with
        the optimiser: resuming with a lower ``optim.lr`` is how a run that blew up is continued, and the saved
        state would silently restore the old rate. The schedule's progress (warm-up, cosine) is kept."""
        o = self.cfg.optim
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                base = group.get("initial_lr", group["lr"])
                group["lr"] = group["lr"] * (o.lr / base) if base else o.lr
                group["initial_lr"] = o.lr
                group["weight_decay"] = o.weight_decay
                group["betas"] = tuple(o.betas)
        for sched in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in sched:
                sched["base_lrs"] = [o.lr] * len(sched["base_lrs"])
