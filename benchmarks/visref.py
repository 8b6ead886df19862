"""The vision-dependent benchmark (issue 12), end to end: for each seed, pretrain the ViT
(recipes/visref_pretrain.yaml), train a fresh LLM, projector and mask path on the position forms from that
checkpoint (recipes/visref_positions.yaml), go on from that model with the position and relation forms
(recipes/visref.yaml: the testbed) and evaluate it on the test split, as is and with its visual tokens shuffled
across the batch and zeroed; then train and evaluate the blind control through the same two stages
(recipes/visref_positions_blind.yaml, recipes/visref_blind.yaml: the same recipes with no visual tokens for the
LLM). Stages run one after another with every core, each timed: the testbed pipeline (pretraining, positions,
testbed, its evaluations) is what the issue's 30-minute budget applies to. Then write the table, the text-only
and segment-everything reference levels and the acceptance checks into docs/results.md (between the "visref"
markers).

    python benchmarks/visref.py --out runs/visref --seeds 0 1 [key=value ...]

Every step is a ``segrouter`` command (printed before it runs), so any row can be reproduced by hand;
``key=value`` overrides go to every training command (e.g. ``trainer.max_steps=200`` for a dry run). A seed
whose runs and stage times are already in ``--out`` is not rerun, so a benchmark cut off after a seed goes on
from the next one (delete the seed's folders to rerun it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from segrouter.compare import RunSummary, summarize  # noqa: E402
from segrouter.errors import SegrouterError  # noqa: E402

BEGIN, END = "<!-- visref:begin -->", "<!-- visref:end -->"
PRETRAIN, FULL, BLIND = "visref_pretrain", "visref", "visref_blind"
POSITIONS, BLIND_POSITIONS = "visref_positions", "visref_positions_blind"  # stage 2, before FULL / BLIND
CONTROLS = ("shuffle", "zero")


def _command(args: tuple[str, ...], threads: int | None = None) -> tuple[list[str], dict[str, str]]:
    cmd = ["segrouter", *args]
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SEGROUTER_RUN_VERSION", None)
    if threads is not None:  # commands side by side: each on its share of the cores
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return cmd, env


def run(*args: str, threads: int | None = None) -> None:
    """One segrouter command, echoed; a failure stops the benchmark (its own message is the last line). With
    ``threads``, the command's math runs on that many threads."""
    cmd, env = _command(args, threads)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def version(out: Path, name: str, k: int) -> Path:
    return out / name / f"version_{k}"


def best_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    if not found:
        raise SegrouterError(f"no best checkpoint in {run_dir}", fix="the training run failed: see its output above")
    return found[-1]


def last_checkpoint(out: Path, name: str) -> Path:
    """A training run's final weights: what the next stage starts from."""
    return version(out, name, 0) / "checkpoints" / "last.ckpt"


PIPELINE = ("pretrain", "positions", "testbed", "testbed evaluations")  # what the 30-minute budget covers


def seed_runs(out: Path, seed: int) -> dict[str, list[Path]]:
    """Where one seed's runs are, by role: [training run, evaluation run]. A testbed's evaluations follow its
    training in its folder: the test as version 1, then one version per control, in CONTROLS order."""
    full, blind = (f"{n}_s{seed}" for n in (FULL, BLIND))
    return {FULL: [version(out, full, 0), version(out, full, 1)],
            BLIND: [version(out, blind, 0), version(out, blind, 1)],
            **{f"{FULL}+{c}": [version(out, full, 0), version(out, full, k)] for k, c in enumerate(CONTROLS, start=2)}}


def train_and_evaluate(out: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    """Every run of one seed (into the folders of :func:`seed_runs`); the minutes each stage took, with the
    1-minute load average before the first, to show whether the machine was idle."""
    common = [f"output_dir={out}", f"seed={seed}", "trainer.enable_progress_bar=false"]
    pretrain = f"{PRETRAIN}_s{seed}"
    minutes: dict[str, float] = {"load average at start": os.getloadavg()[0]}

    def timed(stage: str, *commands: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        for args in commands:
            run(*args)
        minutes[stage] = (time.perf_counter() - t0) / 60

    timed("pretrain", ("fit", "--recipe", f"recipes/{PRETRAIN}.yaml", *common, f"name={pretrain}", *overrides))
    for first_recipe, first_stage, recipe, stage in ((POSITIONS, "positions", FULL, "testbed"),
                                                     (BLIND_POSITIONS, "blind positions", BLIND, "blind")):
        first, name = f"{first_recipe}_s{seed}", f"{recipe}_s{seed}"
        timed(first_stage, ("fit", "--recipe", f"recipes/{first_recipe}.yaml", *common, f"name={first}",
                            f"init_from={last_checkpoint(out, pretrain)}", *overrides))
        timed(stage, ("fit", "--recipe", f"recipes/{recipe}.yaml", *common, f"name={name}",
                      f"init_from={last_checkpoint(out, first)}", *overrides))
        test = ("test", "--recipe", f"recipes/{recipe}.yaml", *common, f"name={name}", "--ckpt",
                str(best_checkpoint(version(out, name, 0))), *overrides)
        controls = CONTROLS if recipe == FULL else ()
        timed(f"{stage} evaluations", test, *((*test, "--control", c) for c in controls))
    return minutes


def reference_levels(overrides: list[str]) -> dict[str, float]:
    """What needs no LLM reading of the image, on the testbed's test split: the best text-only guess of the
    target's name (the most frequent name for each expression, fitted on the split itself, so optimistic),
    and the cIoU of segmenting every object."""
    from segrouter.recipe import component, load_recipe
    from segrouter.registry import registry

    cfg = load_recipe(ROOT / "recipes" / f"{FULL}.yaml", overrides)
    ds = registry("dataset").build(component(cfg, "data.dataset"), "test")
    limit = cfg.trainer.limit_test_batches
    n = len(ds) if limit is None else min(len(ds), int(limit) * int(cfg.data.eval_batch_size))
    names: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inter = union = 0
    for i in range(n):
        scene = ds.scene(i)
        target = scene.objects[scene.target]
        names[scene.expression.text][f"{target.colour} {target.shape}"] += 1
        every = sum(o.mask for o in scene.objects).astype(bool)
        inter += int((every & target.mask).sum())
        union += int((every | target.mask).sum())
    text_only = sum(c.most_common(1)[0][1] for c in names.values()) / n
    return {"text_only_name_acc": text_only, "segment_all_ciou": inter / union, "samples": n,
            "names": len(ds.colours) * len(ds.shapes), "colours": len(ds.colours), "shapes": len(ds.shapes)}


def name_breakdown(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """What name_acc is made of: on the testbed's test samples, how often the LM head names the target's
    colour and its shape right (the two words of the name, teacher-forced as in name_acc). Colour is a
    per-patch mean; shape needs the object's outline, so the two can differ widely."""
    import torch

    from segrouter.build import build
    from segrouter.checkpoints import load_weights
    from segrouter.recipe import load_recipe
    cfg = load_recipe(ROOT / "recipes" / f"{FULL}.yaml", overrides)
    model, data = build(cfg)
    load_weights(model, best_checkpoint(run_dir))
    model.eval()
    limit = cfg.trainer.limit_test_batches
    right = {"colour": 0, "shape": 0}
    samples = 0
    with torch.no_grad():
        for i, batch in enumerate(data.test_dataloader()):
            if limit is not None and i >= int(limit):
                break
            pred, true, sample = model.name_tokens(batch, model(batch)["visual"])
            if not torch.equal(sample, torch.arange(len(batch["mask"])).repeat_interleave(2)):
                raise SegrouterError("name_breakdown expects a two-word name (colour, shape) per sample",
                                     fix="use the visref recipes' synthetic data")
            right["colour"] += int((pred[0::2] == true[0::2]).sum())
            right["shape"] += int((pred[1::2] == true[1::2]).sum())
            samples += len(batch["mask"])
    return {k: v / samples for k, v in right.items()}


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (the value alone for one seed, ``—`` for none)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(command: str, seeds: list[int], runs: dict[int, dict[str, list[Path]]],
          minutes: dict[int, dict[str, float]], overrides: list[str]) -> str:
    """Per-seed rows and mean ± std rows, then the acceptance checks of issue 12."""
    roles = [(FULL, "testbed (reads its visual tokens)"), (f"{FULL}+shuffle", "testbed, tokens shuffled"),
             (f"{FULL}+zero", "testbed, tokens zeroed"), (BLIND, "trained blind (no visual tokens)")]
    cols = ("val/ciou", "val/name_acc", "test/ciou", "test/giou", "test/name_acc")
    rows = ["| model | evaluation | seed | val cIoU | val name_acc | test cIoU | test gIoU | test name_acc |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    values: dict[str, dict[str, list[float]]] = {r: {c: [] for c in cols} for r, _ in roles}
    for role, label in roles:
        for seed in seeds:
            train_run, eval_run = (summarize(p) for p in runs[seed][role])
            row = _values(train_run, eval_run, controlled="+" in role)
            for c in cols:
                if row[c] is not None:
                    values[role][c].append(row[c])
            control = role.split("+")[1] if "+" in role else ("blind" if role == BLIND else "—")
            rows.append(f"| {label} | {control} | {seed} | "
                        + " | ".join("—" if row[c] is None else f"{row[c]:.3f}" for c in cols) + " |")
        rows.append(f"| **{label}** | mean ± std | {len(seeds)} | "
                    + " | ".join(mean_std(values[role][c]) for c in cols) + " |")
    ref = reference_levels(overrides)
    words = [name_breakdown(runs[seed][FULL][0], overrides) for seed in seeds]
    full = values[FULL]["test/ciou"]
    blind = values[BLIND]["test/ciou"]
    gap = statistics.mean(full) - statistics.mean(blind)
    spread = max(full) - min(full)
    checks = [
        ("testbed val cIoU ≥ 0.55 (mean)", statistics.mean(values[FULL]["val/ciou"]) >= 0.55),
        ("testbed val name_acc ≥ 0.8 (mean)", statistics.mean(values[FULL]["val/name_acc"]) >= 0.8),
        ("trained blind ≥ 15 cIoU points below the testbed (test, means)", gap >= 0.15),
        *((f"{c} control ≥ 15 cIoU points below the testbed (test, means)",
           statistics.mean(full) - statistics.mean(values[f"{FULL}+{c}"]["test/ciou"]) >= 0.15) for c in CONTROLS),
        (f"seed spread of the testbed's test cIoU ({spread:.3f}) ≤ a third of the testbed − blind gap "
         f"({gap:.3f} / 3 = {gap / 3:.3f})",
         spread <= gap / 3),
    ]
    timed = [s for s in seeds if all(k in minutes.get(s, {}) for k in PIPELINE)]
    if timed:
        longest = max(sum(minutes[s][k] for k in PIPELINE) for s in timed)
        checks.append((f"testbed pipeline (pretraining, positions, testbed, its evaluations) ≤ 30 min per seed "
                       f"(longest: {longest:.1f} min)", longest <= 30))  # noqa: ISC004
    times = "; ".join(f"seed {s}: " + ", ".join(_stage_time(k, v) for k, v in minutes[s].items())
                      for s in seeds if s in minutes) or "not recorded"
    return "\n".join([
        f"Machine: {_cpu()}, {os.cpu_count()} cores. Wall time per stage: {times}. Regenerate with `{command}`.",
        "",
        *rows,
        "",
        f"Reference levels on the same {ref['samples']} test samples: the best text-only guess of the name "
        f"(most frequent name per expression, fitted on these samples) scores name_acc "
        f"{ref['text_only_name_acc']:.3f} (a uniform guess among the {ref['names']} names: {1 / ref['names']:.3f}); "
        f"segmenting every object scores cIoU {ref['segment_all_ciou']:.3f}. What the testbed's test name_acc is "
        f"made of (teacher-forced, per word): colour {mean_std([w['colour'] for w in words])} "
        f"(chance {1 / ref['colours']:.3f}), shape {mean_std([w['shape'] for w in words])} "
        f"(chance {1 / ref['shapes']:.3f}).",
        "",
        "| acceptance check (issue 12) | met |",
        "|---|---|",
        *(f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in checks),
    ])


def _stage_time(stage: str, value: float) -> str:
    return f"{stage} {value:.2f}" if stage.startswith("load") else f"{stage} {value:.1f} min"


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def _values(train_run: RunSummary, eval_run: RunSummary, controlled: bool) -> dict[str, float | None]:
    """Validation figures from training (its best step; none for a control, which is evaluated on the test
    split only), test figures from the evaluation run."""
    val = {} if controlled else train_run.values
    return {"val/ciou": val.get("val/ciou"), "val/name_acc": val.get("val/name_acc"),
            "test/ciou": eval_run.values.get("test/ciou"), "test/giou": eval_run.values.get("test/giou"),
            "test/name_acc": eval_run.values.get("test/name_acc")}


def write_section(text: str, doc: Path, begin: str = BEGIN, end: str = END) -> None:
    """Put ``text`` between the ``begin``/``end`` markers of ``doc`` (appended with them when absent)."""
    body = f"{begin}\n{text}\n{end}"
    old = doc.read_text()
    if begin in old and end in old:
        new = old[: old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/visref", help="output folder for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"),
                        help="markdown file to write the section into")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the runs in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every segrouter command")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2 and not args.table_only:
        print("visref.py: error: the seed spread needs at least 2 seeds — pass e.g. --seeds 0 1", file=sys.stderr)
        return 2
    if not Path(args.doc).is_file():
        print(f"visref.py: error: no such file: {args.doc} — pass --doc an existing markdown file", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    timings = out / "timings.json"
    minutes = {int(k): v for k, v in json.loads(timings.read_text()).items()} if timings.exists() else {}
    runs = {seed: seed_runs(out, seed) for seed in args.seeds}
    for seed in args.seeds:
        if args.table_only:
            continue
        if seed in minutes and all(p.is_dir() for paths in runs[seed].values() for p in paths):
            print(f"visref.py: seed {seed} is complete in {out} (its runs and timings.json): not rerun", flush=True)
        else:
            minutes[seed] = train_and_evaluate(out, seed, args.overrides)
            timings.write_text(json.dumps(minutes))
    command = shlex.join(["python", "benchmarks/visref.py", "--out", args.out, "--seeds", *map(str, args.seeds),
                          *args.overrides])
    text = table(command, args.seeds, runs, minutes, args.overrides)
    print(text)
    write_section(text, Path(args.doc))
    return 0


def run_script(main: Callable[[], int], name: str) -> None:
    """Exit with ``main``'s code; a bad argument or a failed segrouter command is one line and exit code 2
    (the command's own output, above, says why)."""
    try:
        sys.exit(main())
    except (SegrouterError, subprocess.CalledProcessError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main, "visref.py")
