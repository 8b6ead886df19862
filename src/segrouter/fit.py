"""``segrouter fit``: train a recipe, or resume a run of it from a checkpoint.

Everything that can be checked before training is: the recipe (once the CLI has loaded the plugins), the
flags, the run folder and a checkpoint to resume, so that a mistake costs a second, not a run.
``--print-recipe`` stops after the recipe and flag checks and prints the recipe the run would train.
"""

from __future__ import annotations

import argparse

from segrouter.errors import SegrouterError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="resume from --ckpt, or from this recipe's newest last.ckpt")
    parser.add_argument("--ckpt", help="checkpoint to resume from (with --resume)")
    parser.add_argument("--other-recipe", action="store_true",
                        help="with --resume --ckpt: continue a checkpoint saved by another recipe (name) as a new run "
                             "of this one (its architecture must still fit)")


def run(args: argparse.Namespace) -> int:
    from segrouter.build import build
    from segrouter.checkpoints import check_resumable
    from segrouter.recipe import load_recipe, recipe_yaml
    from segrouter.runs import check_output_dir, find_resume, next_version
    from segrouter.training.trainer import build_trainer, compiled

    cfg = load_recipe(args.recipe, args.overrides)
    if cfg.metrics.training_free:
        raise SegrouterError("metrics.training_free describes an evaluation, not a training run",
                             fix="start a fine-tune from a checkpoint with init_from=PATH instead")
    if args.ckpt is not None and not args.resume:
        raise SegrouterError("--ckpt on fit needs --resume",
                             fix="add --resume to continue training from that checkpoint")
    if args.other_recipe and not args.ckpt:
        raise SegrouterError("--other-recipe needs --resume --ckpt PATH", fix="name the checkpoint to continue")
    if args.print_recipe:
        print(recipe_yaml(cfg), end="")
        return 0
    version, ckpt = find_resume(cfg, "last" if args.ckpt is None else args.ckpt) if args.resume else (None, None)
    check_output_dir(cfg)
    model, data = build(cfg, init_weights=not args.resume)
    if ckpt is not None:  # before anything is written: a checkpoint that cannot be resumed stops here, in one line
        check_resumable(model, ckpt, cfg.name, other_recipe=args.other_recipe)
    if version is None:
        version = next_version(cfg)
    trainer = build_trainer(cfg, version=version)
    trainer.fit(compiled(model, cfg), datamodule=data, ckpt_path=ckpt)
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if trainer.is_global_zero:
        cb = trainer.checkpoint_callback
        best = getattr(cb, "best_model_score", None)
        metric = cfg.checkpoint.monitor
        score = f"{metric}={float(best):.4f}" if best is not None else "no monitored score"
        print(f"segrouter: fit done ({score}); run folder: {log_dir}; best: {getattr(cb, 'best_model_path', '')}")
    return 0
