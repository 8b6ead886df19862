"""``segrouter card``: one configuration's efficiency card — the cost of a recipe's routing and compressor
parameters at the testbed's shape and at real LLM shapes, beside the accuracy of runs trained with exactly
those parameters (issue 13: no figure may come from a configuration other than the row it sits in).

For recipe A (with its overrides) against a reference B (usually ``full``), every figure from one command:

- **testbed**: the recipes' own models on one validation batch (``segrouter bench`` without ``--random-init``):
  counted LLM FLOPs ratio A/B and wall-time speedup B/A, with the spread of the per-round speedups.
- **each named shape** (default Qwen2-0.5B and LLaMA-7B; random weights, a LISA-shaped sequence of 576 image
  tokens): the FLOPs ratio counted at full depth on meta tensors, and the speedup timed at the shape's full depth
  where its fp32 weights fit in memory, else on its first ``--wall-layers`` (LLaMA-7B: 4 of 32; the strategies'
  depth fractions scale with the depth, and the FLOPs ratio at the timed depth is given beside the speedup).
  A compressor's saving carries over as a fraction of the patch grid: A gets round(576 × its testbed visual
  tokens / B's) image tokens.
- **accuracy**: mean ± std over the ``--run`` folders (A's trained or evaluated runs, e.g. one per seed) of cIoU,
  gIoU and name_acc, on test where every run logged it, else val. A run whose recipe has other routing or
  compressor parameters than A's is refused: its accuracy belongs to another configuration.

The card is printed, written as JSON to ``--out``, and saved as ``card.json`` in each ``--run`` folder, where
``segrouter compare`` shows it in its "card" columns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from segrouter.arguments import at_least, output_file
from segrouter.errors import SegrouterError

DEFAULT_SHAPES = ("qwen2-0.5b", "llama-7b")
WALL_LAYERS = {"llama-7b": 4}  # its 32 layers' fp32 weights (26 GB) exceed a 24 GiB machine's memory
ACCURACY = ("ciou", "giou", "name_acc")
CARD_FILE = "card.json"


def _bench_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """The ``segrouter bench`` arguments of one measurement of the card: bench's own defaults (from its parser),
    the card's shared options, then ``changes``."""
    from segrouter.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bench = parser.parse_args(["--recipe", str(args.recipe), "--vs", str(args.vs)])
    shared = {k: getattr(args, k) for k in ("image_tokens", "batch", "warmup", "repeats", "device")}
    return argparse.Namespace(**{**vars(bench), "overrides": list(args.overrides), **shared, **changes})


def _timed_row(result: dict[str, Any]) -> dict[str, Any]:
    return {"flops_ratio_timed": result["flops_ratio"], "speedup": result["speedup"],
            "speedup_per_round": result["speedup_per_round"], "fraction_of_ideal": result["fraction_of_ideal"],
            "warnings": result["warnings"]}


def _node(tree: dict[str, Any], key: str) -> Any:
    return (tree.get("model") or {}).get(key)


def accuracy(runs: list[Path], recipe: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std of each accuracy metric over ``runs``, after checking that they ran A's configuration."""
    from segrouter.compare import resolve_run, summarize

    folders = [resolve_run(p) for p in runs]
    for folder in folders:
        try:
            trained = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            raise SegrouterError(f"--run {folder}: no readable recipe.yaml",
                                 fix="pass run folders written by segrouter fit/validate/test") from None
        for key in ("routing", "compressor"):
            if _node(trained, key) != _node(recipe, key):
                raise SegrouterError(f"--run {folder} ran model.{key} {_node(trained, key)}, not the card's "
                                     f"{_node(recipe, key)}", fix="pass runs of this recipe with these overrides")
    summaries = [summarize(f) for f in folders]
    split = "test" if all(s.values.get("test/ciou") is not None for s in summaries) else "val"
    out: dict[str, Any] = {"split": split, "runs": [str(f) for f in folders]}
    for metric in ACCURACY:
        values = [v for s in summaries if (v := s.values.get(f"{split}/{metric}")) is not None]
        out[metric] = {"mean": statistics.mean(values) if values else None,
                       "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}
    return out


def make_card(args: argparse.Namespace) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from segrouter.bench import SHAPES, run_bench
    from segrouter.recipe import load_recipe

    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SegrouterError(f"--shapes: unknown shape {', '.join(unknown)}", fix=f"shapes: {', '.join(SHAPES)}")
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        raise SegrouterError(f"--run: no run folder {', '.join(missing)}", fix="pass run folders of recipe A")
    if args.out:
        output_file(args.out, "--out")
    cfg = load_recipe(args.recipe, args.overrides)
    recipe = OmegaConf.to_container(cfg, resolve=True)
    acc = accuracy(args.runs, recipe) if args.runs else None  # checked before the minutes of timing
    testbed = run_bench(_bench_args(args))
    visual = (testbed["A"]["visual_tokens"], testbed["B"]["visual_tokens"])
    candidate = None if visual[0] == visual[1] else max(1, round(args.image_tokens * visual[0] / visual[1]))
    rows = [{"shape": "testbed", "layers": None, "layers_timed": None, "image_tokens": list(visual),
             "flops_ratio": testbed["flops_ratio"], **_timed_row(testbed)}]
    for shape in args.shapes:
        counted = run_bench(_bench_args(args, random_init=shape, flops_only=True, candidate_image_tokens=candidate))
        depth = SHAPES[shape]["num_layers"]
        layers = min(depth, args.wall_layers or WALL_LAYERS.get(shape, depth))
        timed = run_bench(_bench_args(args, random_init=shape, num_layers=layers, candidate_image_tokens=candidate))
        rows.append({"shape": shape, "layers": depth, "layers_timed": layers,
                     "image_tokens": [candidate or args.image_tokens, args.image_tokens],
                     "flops_ratio": counted["flops_ratio"], **_timed_row(timed)})
    card = {"recipe": str(args.recipe), "name": str(cfg.name), "overrides": list(args.overrides), "vs": str(args.vs),
            "routing": recipe["model"]["routing"], "compressor": recipe["model"]["compressor"], "shapes": rows,
            "accuracy": acc, "setup": testbed["setup"]}
    text = json.dumps(card, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    for run in (acc or {}).get("runs", []):
        (Path(run) / CARD_FILE).write_text(text)
    return card


def _mean_std(a: dict[str, Any]) -> str:
    if a["mean"] is None:
        return "—"
    return f"{a['mean']:.4f}" + ("" if a["std"] is None else f" ± {a['std']:.4f}") + f" (n={a['n']})"


def format_card(card: dict[str, Any]) -> str:
    lines = [f"efficiency card: {card['name']} {' '.join(card['overrides'])} vs {card['vs']}".rstrip(),
             f"  routing {card['routing']}", f"  compressor {card['compressor']}",
             f"{'shape':<14}{'layers (timed)':>16}{'image tokens A/B':>18}{'FLOPs A/B':>11}{'at timed':>10}"
             f"{'speedup B/A':>13}{'IQR':>14}{'of ideal':>10}"]
    for r in card["shapes"]:
        layers = "—" if r["layers"] is None else f"{r['layers']} ({r['layers_timed']})"
        sp = r["speedup_per_round"]
        tokens = f"{r['image_tokens'][0]:.0f}/{r['image_tokens'][1]:.0f}"
        lines.append(f"{r['shape']:<14}{layers:>16}{tokens:>18}{r['flops_ratio']:>11.3f}"
                     f"{r['flops_ratio_timed']:>10.3f}{r['speedup']:>12.2f}×{sp['q1']:>8.2f}–{sp['q3']:.2f}×"
                     f"{100 * r['fraction_of_ideal']:>9.0f}%")
        lines += [f"  warning ({r['shape']}): {w}" for w in r["warnings"]]
    acc = card["accuracy"]
    if acc is None:
        lines.append("accuracy: no --run given")
    else:
        lines.append(f"accuracy ({acc['split']}, {len(acc['runs'])} runs): "
                     + ", ".join(f"{m} {_mean_std(acc[m])}" for m in ACCURACY))
    lines.append(f"setup: {card['setup']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe A: the configuration the card describes")
    p.add_argument("--vs", required=True, help="recipe B: the reference (e.g. the dense testbed)")
    p.add_argument("--run", dest="runs", action="append", type=Path, default=[], metavar="RUN_DIR",
                   help="a run folder of recipe A with these overrides, for its accuracy (repeatable: one per seed)")
    p.add_argument("--shapes", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_SHAPES),
                   help=f"named LLM shapes besides the testbed, comma-separated (default {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--wall-layers", type=at_least(1), metavar="N",
                   help="time the named shapes on at most N layers (default: all that fit; LLaMA-7B 4)")
    p.add_argument("--image-tokens", type=at_least(1), default=576, help="image tokens of B at the named shapes")
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the card (JSON) here too")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of recipe A")


def run(args: argparse.Namespace) -> int:
    card = make_card(args)
    print(format_card(card))
    for run_dir in (card["accuracy"] or {}).get("runs", []):
        print(f"segrouter: wrote {Path(run_dir) / CARD_FILE}", file=sys.stderr)
    return 0
