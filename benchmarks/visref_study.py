"""The method study on the vision-dependent testbed (issue 13): every routing strategy at one matched budget
(about half of ``full``'s LLM FLOPs), token routing's two negative controls, and ``full`` itself, each started
from the same trained testbed checkpoint of each seed and measured twice:

* *training-free*: ``segrouter test --training-free`` on that checkpoint (new parameters keep their
  initialisation: token routing's projector passes the proxy's FFN update through, MoD's routers are zero);
* *fine-tuned*: ``segrouter fit`` from that checkpoint (every part, ``init_modules=[]``) for the same number
  of steps for every arm, ``full`` included, then ``segrouter test`` of its best checkpoint.

Then one table (counted LLM FLOPs relative to ``full`` on the same test batches, test cIoU and name_acc as
mean ± std over seeds, and the fine-tuned difference to fine-tuned ``full``, paired by seed) is written into
docs/results.md between the "visref-study" markers.

    python benchmarks/visref_study.py --runs runs/visref --seeds 0 1 [--steps 400] [--table-only] [key=value ...]

``--runs`` is the output folder of benchmarks/visref.py (its ``visref_sS/version_0`` are the testbeds); the
knobs of each arm were chosen by counting FLOPs on the testbed's validation batches (0.48–0.51 of ``full``).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from visref import best_checkpoint, mean_std, run, run_script, write_section  # noqa: E402

from segrouter.compare import summarize  # noqa: E402

BEGIN, END = "<!-- visref-study:begin -->", "<!-- visref-study:end -->"
# the parameters of recipes/lisa7b_token_routing.yaml (fractions carry over: 0.497 of full's FLOPs at LLaMA-7B)
TOKEN_ROUTING = ("model.routing.name=token_routing", "model.routing.route_start=0", "model.routing.proxy_ratio=0.125")
ARMS: dict[str, tuple[str, ...]] = {
    "full": ("model.routing.name=full",),
    "token_routing": TOKEN_ROUTING,
    "token_routing, random assignment": (*TOKEN_ROUTING, "model.routing.assignment=random"),
    "token_routing, zero projector": (*TOKEN_ROUTING, "model.routing.projector=zero"),
    "fastv": ("model.routing.name=fastv", "model.routing.k=1", "model.routing.ratio=0.85"),
    "random": ("model.routing.name=random", "model.routing.k=1", "model.routing.keep=0.2"),
    "pdrop": ("model.routing.name=pdrop", "model.routing.keep=[0.25,0.125,0.0625]"),
    "mod": ("model.routing.name=mod", "model.routing.route_layers=all", "model.routing.capacity=0.4"),
}


def _slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "_")


def evaluate(runs: Path, out: Path, seed: int, arms: list[str], steps: int, lr: float, overrides: list[str],
             tune: bool = True) -> None:
    """Both measurements of every arm for one seed's testbed (the training-free one only, without ``tune``)."""
    ckpt = str(best_checkpoint(runs / f"visref_s{seed}" / "version_0"))
    common = ("--recipe", "recipes/visref.yaml", f"output_dir={out}", f"seed={seed}",
              "trainer.enable_progress_bar=false")
    for arm in arms:
        knobs = ARMS[arm]
        run("test", *common, f"name=tf_{_slug(arm)}_s{seed}", "--ckpt", ckpt, "--training-free", *knobs, *overrides)
        if not tune:
            continue
        name = f"ft_{_slug(arm)}_s{seed}"
        run("fit", *common, f"name={name}", f"init_from={ckpt}", "init_modules=[]", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", f"optim.lr={lr}", "optim.warmup_steps=20", *knobs, *overrides)
        tuned = str(best_checkpoint(out / name / "version_0"))
        run("test", *common, f"name={name}", "--ckpt", tuned, *knobs, *overrides)


def training_free_table(out: Path, seeds: list[int], arms: list[str], command: str) -> str:
    """The training-free half alone: each arm applied to the trained testbed, against the testbed itself."""
    def test(arm: str, seed: int) -> dict[str, float]:
        return summarize(out / f"tf_{_slug(arm)}_s{seed}" / "version_0").values

    rows = ["| arm (knobs) | LLM FLOPs / full | training-free cIoU | training-free name_acc "
            "| − full (cIoU points, paired by seed) |", "|---|---:|---:|---:|---:|"]
    full = {s: test("full", s) for s in seeds}
    for arm in arms:
        free = {s: test(arm, s) for s in seeds}
        ratio = statistics.mean(free[s]["llm_flops"] / full[s]["llm_flops"] for s in seeds)
        diff = [100 * (free[s]["test/ciou"] - full[s]["test/ciou"]) for s in seeds]
        rows.append(f"| {arm}{_knobs(arm)} | {ratio:.3f} | {mean_std([free[s]['test/ciou'] for s in seeds])} | "
                    f"{mean_std([free[s]['test/name_acc'] for s in seeds])} | "
                    f"{'—' if arm == 'full' else mean_std(diff, 1)} |")
    return f"Regenerate with `{command}`.\n\n" + "\n".join(rows)


def _knobs(arm: str) -> str:
    """`` (knob=value, ...)`` of an arm's recipe overrides, for its table row."""
    label = ", ".join(k.split("=", 1)[0].removeprefix("model.routing.") + "=" + k.split("=", 1)[1]
                      for k in ARMS[arm][1:] if "assignment" not in k and "projector" not in k)
    return f" ({label})" if label else ""


def table(out: Path, seeds: list[int], arms: list[str], command: str) -> str:
    def test(prefix: str, arm: str, seed: int) -> dict[str, float]:
        k = 0 if prefix == "tf" else 1  # a fine-tune's test run follows its training run in the same folder
        return summarize(out / f"{prefix}_{_slug(arm)}_s{seed}" / f"version_{k}").values

    header = ("| arm (knobs) | LLM FLOPs / full | training-free cIoU | fine-tuned cIoU | fine-tuned name_acc "
              "| fine-tuned − full (cIoU points) |")
    rows = [header, "|---|---:|---:|---:|---:|---:|"]
    full = {s: test("ft", "full", s) for s in seeds}
    for arm in arms:
        tuned = {s: test("ft", arm, s) for s in seeds}
        ratio = statistics.mean(tuned[s]["llm_flops"] / full[s]["llm_flops"] for s in seeds)
        free = [test("tf", arm, s)["test/ciou"] for s in seeds]
        diff = [100 * (tuned[s]["test/ciou"] - full[s]["test/ciou"]) for s in seeds]
        rows.append(f"| {arm}{_knobs(arm)} | {ratio:.3f} | {mean_std(free)} | "
                    f"{mean_std([tuned[s]['test/ciou'] for s in seeds])} | "
                    f"{mean_std([tuned[s]['test/name_acc'] for s in seeds])} | "
                    f"{'—' if arm == 'full' else mean_std(diff, 1)} |")
    return f"Regenerate with `{command}`.\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/visref", help="benchmarks/visref.py's output folder")
    parser.add_argument("--out", default="runs/visref_study", help="folder for the evaluations and fine-tunes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM",
                        help=f"a subset of the arms (full is always run): {', '.join(map(repr, ARMS))}")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps, the same for every arm")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (cosine, 20 warm-up steps)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from --out")
    parser.add_argument("--training-free-only", action="store_true",
                        help="only the training-free evaluations (no fine-tunes): a table of those alone")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every command")
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    if not doc.is_file() or BEGIN not in doc.read_text() or END not in doc.read_text():
        print(f"visref_study.py: error: {doc} has no {BEGIN} … {END} markers — pass --doc a markdown file with them",
              file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"visref_study.py: error: --steps {args.steps} must be at least 1", file=sys.stderr)
        return 2
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        print(f"visref_study.py: error: unknown arm {unknown[0]!r} — choose from {', '.join(map(repr, ARMS))}",
              file=sys.stderr)
        return 2
    arms = [a for a in ARMS if a == "full" or a in args.arms]
    out = Path(args.out).resolve()
    if not args.table_only:
        for seed in args.seeds:
            evaluate(Path(args.runs).resolve(), out, seed, arms, args.steps, args.lr, args.overrides,
                     tune=not args.training_free_only)
    chosen = [] if arms == list(ARMS) else ["--arms", *arms]
    tuning = ["--training-free-only"] if args.training_free_only else ["--steps", str(args.steps), "--lr", str(args.lr)]
    command = shlex.join(["python", "benchmarks/visref_study.py", "--runs", args.runs, "--seeds",
                          *map(str, args.seeds), *chosen, *tuning, *args.overrides])
    text = (training_free_table if args.training_free_only else table)(out, args.seeds, arms, command)
    print(text)
    write_section(text, doc, BEGIN, END)
    return 0


if __name__ == "__main__":
    run_script(main, "visref_study.py")
