"""Training-free routing on the vision-dependent testbed (issue 13, first look): every registered routing
strategy, at its defaults, applied to the trained testbed checkpoint of each seed with ``segrouter test
--training-free``, then one table of counted LLM FLOPs (relative to ``full`` on the same batches), test cIoU
and name_acc per seed, written into docs/results.md between the "visref-tf" markers.

    python benchmarks/visref_training_free.py --runs runs/visref --seeds 0 1 [--table-only] [key=value ...]

``--runs`` is the output folder of benchmarks/visref.py (its ``visref_sS/version_0`` are the testbeds).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from visref import best_checkpoint, run, run_script, write_section  # noqa: E402

from segrouter.compare import summarize  # noqa: E402

STRATEGIES = ("full", "token_routing", "fastv", "pdrop", "mod", "random")
BEGIN, END = "<!-- visref-tf:begin -->", "<!-- visref-tf:end -->"


def evaluate(runs: Path, out: Path, seed: int, overrides: list[str]) -> None:
    ckpt = str(best_checkpoint(runs / f"visref_s{seed}" / "version_0"))
    for name in STRATEGIES:
        run("test", "--recipe", "recipes/visref.yaml", f"output_dir={out}", f"name={name}_s{seed}", f"seed={seed}",
            "trainer.enable_progress_bar=false", "--ckpt", ckpt, "--training-free", f"model.routing.name={name}",
            *overrides)


def table(out: Path, seeds: list[int], command: str) -> str:
    values = {(n, s): summarize(out / f"{n}_s{s}" / "version_0").values for n in STRATEGIES for s in seeds}
    rows = ["| routing (defaults) | LLM FLOPs / full | " + " | ".join(f"test cIoU s{s}" for s in seeds) + " | "
            + " | ".join(f"test name_acc s{s}" for s in seeds) + " |",
            "|---|---:|" + "---:|" * (2 * len(seeds))]
    for n in STRATEGIES:
        ratio = [values[n, s]["llm_flops"] / values["full", s]["llm_flops"] for s in seeds]
        rows.append(f"| {n} | {sum(ratio) / len(ratio):.3f} | "
                    + " | ".join(f"{values[n, s]['test/ciou']:.3f}" for s in seeds) + " | "
                    + " | ".join(f"{values[n, s]['test/name_acc']:.3f}" for s in seeds) + " |")
    return f"Regenerate with `{command}`.\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/visref", help="benchmarks/visref.py's output folder")
    parser.add_argument("--out", default="runs/visref_tf", help="folder for the evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every evaluation")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if not args.table_only:
        for seed in args.seeds:
            evaluate(Path(args.runs).resolve(), out, seed, args.overrides)
    command = shlex.join(["python", "benchmarks/visref_training_free.py", "--runs", args.runs, "--seeds",
                          *map(str, args.seeds)])
    text = table(out, args.seeds, command)
    print(text)
    doc = Path(args.doc)
    old = doc.read_text()
    if BEGIN not in old or END not in old:  # the table belongs inside the benchmark's section, not at the end
        print(f"visref_training_free.py: error: {doc} has no {BEGIN} … {END} markers", file=sys.stderr)
        return 2
    write_section(text, doc, BEGIN, END)
    return 0


if __name__ == "__main__":
    run_script(main, "visref_training_free.py")
