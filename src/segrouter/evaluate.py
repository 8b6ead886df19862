"""``segrouter validate`` and ``segrouter test``: evaluate a checkpoint on the val or test split.

The checkpoint must fit the recipe (a checkpoint of another recipe fails in one line, before any run folder is
created), unless ``--training-free`` asks to apply this recipe's method to a checkpoint trained without it: then
the tensors the checkpoint lacks keep their initialisation, and one line on stderr says which and what they do.
``test --suite refcoco`` evaluates the checkpoint on every split of the field's RefCOCO table in one run
(:mod:`segrouter.suite`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segrouter.errors import SegrouterError
from segrouter.recipe import CONTROLS
from segrouter.suite import SUITES, check_files, run_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint (default: the newest run's best)")
    parser.add_argument("--control", choices=CONTROLS,
                        help="evaluate with the LLM's visual tokens shuffled across the batch or zeroed "
                             "(sets metrics.control; metrics are logged under the usual names)")
    parser.add_argument("--suite", choices=sorted(SUITES),
                        help="test only: evaluate on every split of the field's table (refcoco: RefCOCO val/testA/"
                             "testB, RefCOCO+ val/testA/testB, RefCOCOg-umd val/test) and write one table")
    parser.add_argument("--training-free", action="store_true",
                        help="apply this recipe's method to --ckpt, trained without it (e.g. a full model): "
                             "parameters the checkpoint lacks keep their initialisation (sets metrics.training_free)")


def run(args: argparse.Namespace) -> int:
    from segrouter.build import build
    from segrouter.checkpoints import is_sharded, load_weights
    from segrouter.recipe import load_recipe, recipe_yaml
    from segrouter.runs import check_output_dir, find_eval_checkpoint, next_version
    from segrouter.training.trainer import build_trainer, compiled

    if args.control:
        args.overrides.append(f"metrics.control={args.control}")
    if args.training_free:
        args.overrides.append("metrics.training_free=true")
    cfg = load_recipe(args.recipe, args.overrides)
    training_free = bool(cfg.metrics.training_free)
    if training_free and not args.ckpt:
        raise SegrouterError("--training-free needs --ckpt", fix="name the checkpoint trained without this recipe's "
                             "method, e.g. --ckpt runs/full/version_0/checkpoints/last.ckpt")
    if args.suite and args.command != "test":
        raise SegrouterError(f"--suite is an option of 'segrouter test', not of '{args.command}'",
                             fix=f"run segrouter test --suite {args.suite} ...")
    if args.print_recipe:  # with what --control and --training-free set
        print(recipe_yaml(cfg), end="")
        return 0
    if args.suite:
        check_files(cfg, args.suite)
    ckpt = find_eval_checkpoint(cfg, args.ckpt)
    check_output_dir(cfg)  # evaluation logs into a new version folder
    sharded = is_sharded(ckpt)  # DeepSpeed's checkpoint folder: only its strategy can read it
    if sharded and args.suite:
        raise SegrouterError(f"--suite reads one checkpoint file; {ckpt} is a DeepSpeed folder",
                             fix=f"merge it first: segrouter consolidate {ckpt} model.ckpt")
    model, data = build(cfg)
    if not sharded or training_free:  # a checkpoint of another recipe fails here, in one line, before any run folder
        fresh = load_weights(model, ckpt, allow_missing=True)
        if fresh and not training_free:
            raise SegrouterError(
                f"checkpoint {ckpt} does not fit the recipe ({len(fresh)} of its model's tensors are not in it, "
                f"e.g. {fresh[0]})", fix="pass the recipe (and overrides) it was trained with, or add --training-free "
                "to evaluate this recipe's method on it with those tensors at their initialisation")
        if training_free:
            print(f"segrouter: training-free: {training_free_note(model, fresh, ckpt)}", file=sys.stderr)
    if args.suite:
        run_dir = Path(cfg.output_dir) / cfg.name / f"version_{next_version(cfg)}"
        run_dir.mkdir(parents=True)
        run_suite(cfg, args.suite, model, data.tokenizer, run_dir)
        return 0
    trainer = build_trainer(cfg, version=next_version(cfg))
    evaluate = trainer.validate if args.command == "validate" else trainer.test
    evaluate(compiled(model, cfg), datamodule=data, ckpt_path=ckpt if sharded else None)
    return 0


def training_free_note(model: Any, fresh: list[str], ckpt: str) -> str:
    """One line: which of ``model``'s tensors are not in ``ckpt`` (by module, e.g. ``routing.projectors (8)``), and
    what they compute at their initialisation."""
    if not fresh:
        return f"every tensor comes from {ckpt} (routing '{model.cfg.model.routing.name}' adds none)"
    groups: dict[str, dict[str, int]] = {}  # top-level part -> module -> tensors
    for key in fresh:
        names = key.split(".")
        module = ".".join(names[:2]) if len(names) > 2 else names[0]
        groups.setdefault(names[0], {})[module] = groups.get(names[0], {}).get(module, 0) + 1
    said = [", ".join(f"{m} ({n})" for m, n in modules.items()) + ": "
            + (model.routing.initial_state() if part == "routing" else "as a fresh model builds them")
            for part, modules in groups.items()]
    return f"{len(fresh)} tensors are not in {ckpt} and keep their initialisation — {'; '.join(said)}"
