"""The names of the metrics a fit logs, in one place: the model logs them, and the recipe check refuses a
``checkpoint.monitor`` that is none of them before training starts (a typo would otherwise train until the
first validation and then stop without any checkpoint)."""

from __future__ import annotations

# logged as train/<name> each step (semantic: where the recipe sets model.loss.semantic_weight)
TRAIN = ("loss", "ce", "bce", "dice", "semantic", "visual_tokens", "step_latency_ms")
EVAL_IOU = ("giou", "ciou")
# name_acc: where the data names targets; n_acc / t_acc: where it has no-target samples (gRefCOCO): the share of
# no-target samples predicted empty, and of the others predicted non-empty
EVAL_MEANS = ("visual_tokens", "llm_flops", "latency_ms", "name_acc", "n_acc", "t_acc")
EVAL_RANGE = ("visual_tokens_min", "visual_tokens_max")
EVAL = ("loss", *EVAL_IOU, *EVAL_MEANS, *EVAL_RANGE)  # logged as val/<name> and test/<name>


def monitorable() -> list[str]:
    """Every key ``checkpoint.monitor`` may name during ``fit``."""
    return [f"val/{m}" for m in EVAL] + [f"train/{m}" for m in TRAIN]
