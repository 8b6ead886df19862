"""Where do mask tokens look, layer by layer? The observation token routing is built on.

For each LLM layer (run unrouted, every token present) this measures the attention mass — summed over
image keys, averaged over heads and queries — that mask tokens, text tokens and image tokens give to the
image tokens. The paper reports that image tokens attend to image tokens in all layers, while mask
tokens attend to them only in deeper layers; this reproduces the measurement on our models.

This module is also the ``segrouter analyze`` command: it loads the recipe, the checkpoint and the validation
batches once, in the same way for every analysis of :data:`ANALYSES` (``tokens``: where the kept image
tokens lie, :mod:`segrouter.analysis.tokens`), which then measures, prints and writes its files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segrouter.analysis import tokens
from segrouter.analysis.base import plot_per_layer
from segrouter.arguments import at_least, file_in_the_way
from segrouter.errors import SegrouterError
from segrouter.routing.base import Kind, attention_bias, received_attention, run_layer

GROUPS = {"mask": Kind.MASK, "text": Kind.TEXT, "image": Kind.IMAGE}


def attention_profile(model: Any, batches: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean attention mass on image tokens per layer, for mask / text / image queries."""
    llm = model.llm
    sums = {g: torch.zeros(llm.num_layers, dtype=torch.float64) for g in GROUPS}
    counts = {g: 0 for g in GROUPS}
    with torch.no_grad():
        for batch in batches:
            seq = model.encode(batch).seq
            h, pos, valid = seq.embeds, seq.positions, seq.valid
            bias = attention_bias(pos, valid, pos, valid, h.dtype)
            pe = llm.rotary(h, pos)
            to_image = (seq.kinds == Kind.IMAGE).to(h.dtype)
            for i, layer in enumerate(llm.layers):
                for g, kind in GROUPS.items():
                    q = seq.kinds == kind
                    # mean over this group's queries of their attention mass on image keys, per sample
                    mass = (received_attention(layer, h, pe, pos, valid, q) * to_image).sum(-1)
                    sums[g][i] += float((mass * q.sum(1)).sum())
                    if i == 0:
                        counts[g] += int(q.sum())
                h = run_layer(llm, layer, h, bias, pe, pos)
    return {g: (sums[g] / max(1, counts[g])).tolist() for g in GROUPS}


def report(cfg: Any, ckpt: str, model: Any, batches: list[dict[str, Any]], out: Path) -> list[Path]:
    """Measure, then print the table and write attention.json and attention.png to ``out``."""
    profile = attention_profile(model, batches)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps({"ckpt": str(ckpt), "profile": profile}, indent=2))
    plot_per_layer({f"{g} → image": values for g, values in profile.items()}, out / "attention.png",
                   title=f"{cfg.name}: attention on image tokens", ylabel="attention mass on image tokens")
    print(f"{'layer':>5} " + " ".join(f"{g + '→image':>12}" for g in profile))
    for i in range(len(profile["mask"])):
        print(f"{i:>5} " + " ".join(f"{profile[g][i]:>12.3f}" for g in profile))
    return [out / "attention.png", out / "attention.json"]


ANALYSES: dict[str, Callable[[Any, str, Any, list[dict[str, Any]], Path], list[Path]]] = {
    "attention": report,
    "tokens": tokens.report,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=list(ANALYSES),
                   help="attention: per-layer attention on image tokens; tokens: per layer, where the kept (or proxy) "
                        "image tokens lie relative to the target's mask")
    p.add_argument("--recipe", required=True)
    p.add_argument("--ckpt", help="checkpoint (default: the newest run's best)")
    p.add_argument("--batches", type=at_least(1), default=4, help="validation batches to average over")
    p.add_argument("--out", default=None, help="folder for WHAT.png / WHAT.json (default: the checkpoint's run folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    from segrouter.build import build
    from segrouter.checkpoints import load_weights
    from segrouter.recipe import load_recipe
    from segrouter.runs import find_eval_checkpoint

    cfg = load_recipe(args.recipe, args.overrides)
    ckpt = find_eval_checkpoint(cfg, args.ckpt)
    out = Path(args.out) if args.out else Path(ckpt).resolve().parent.parent
    blocked = file_in_the_way(out)
    if blocked is not None:
        raise SegrouterError(f"--out {out}: {blocked} is a file", fix="name a folder for the analysis' .png and .json")
    model, data = build(cfg)
    load_weights(model, ckpt)  # one line, exit 2, when the checkpoint does not fit the recipe
    model.eval()
    loader = data.val_dataloader()
    batches = [b for _, b in zip(range(args.batches), loader, strict=False)]
    written = ANALYSES[args.what](cfg, ckpt, model, batches, out)
    print(f"segrouter: wrote {' and '.join(str(p) for p in written)}")
    return 0
