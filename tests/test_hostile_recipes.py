"""Recipes and command lines written by a hostile or careless user (issue 19): a recipe must never run code,
leak the environment, hang the loader, or reach Lightning/torch with a value they reject.

Every failing case ends as one line ``segrouter: error: ...``, exit code 2, nothing written.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from segrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module", autouse=True)
def _imported() -> None:
    """Pay torch/transformers/Lightning's import time once, outside the timed CLI calls."""
    from segrouter.recipe import _lightning_choices
    from segrouter.registry import registry

    registry("routing")  # imports the built-in components
    _lightning_choices()


def _check(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str, limit_s: float = 15.0) -> str:
    """Run the CLI in-process; assert exit 2, one error line holding ``fragment``, within ``limit_s``."""
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(argv)
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("segrouter: error:"), err[-2000:]
    assert "Traceback" not in err + out
    assert fragment in lines[0], (fragment, lines[0])
    assert elapsed < limit_s, f"{elapsed:.1f}s for {argv}"
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# a recipe never imports code


MARKER_PLUGIN = '''
from pathlib import Path
Path({marker!r}).write_text("imported")
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", {name!r})
class Marked(FullRouting):
    pass
'''


def _plugin_dir(tmp_path: Path, name: str) -> tuple[Path, Path]:
    plugins, marker = tmp_path / "their_plugins", tmp_path / "imported.txt"
    plugins.mkdir()
    (plugins / "marked.py").write_text(MARKER_PLUGIN.format(marker=str(marker), name=name))
    return plugins, marker


@pytest.mark.parametrize("via", ["recipe", "base", "override"])
def test_a_recipe_listing_plugins_imports_nothing(via: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins, marker = _plugin_dir(tmp_path, f"marked_{via}")
    recipe = tmp_path / "r.yaml"
    extra: list[str] = []
    if via == "recipe":
        recipe.write_text(f"base: [{TINY}]\nplugins: [{plugins}]\n")
    elif via == "base":
        (tmp_path / "shared.yaml").write_text(f"base: [{TINY}]\nplugins: [{plugins}]\n")
        recipe.write_text("base: [shared.yaml]\n")
    else:
        recipe.write_text(f"base: [{TINY}]\n")
        extra = [f"plugins=[{plugins}]"]
    line = _check(["fit", "--recipe", str(recipe), f"output_dir={tmp_path / 'runs'}", *extra], capsys,
                  f"plugins: the recipe lists plugin folder {plugins}, which is not loaded")
    assert f"--plugins {plugins}" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_recipe_plugins_load_when_named_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins, marker = _plugin_dir(tmp_path, "marked_opt_in")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: [{TINY}]\nplugins: [{plugins}]\nmodel: {{routing: {{name: marked_opt_in}}}}\n")
    # the recipe validates (its routing comes from the plugin); the command then stops at the missing checkpoint
    _check(["validate", "--recipe", str(recipe), "--plugins", str(plugins), f"output_dir={tmp_path / 'runs'}"],
           capsys, "no checkpoint found for recipe 'tiny'")
    assert marker.exists()


# --------------------------------------------------------------------------------------------------------------
# no resolver calls: ${oc.env:...} would copy a secret into recipe.yaml, hparams.yaml and the checkpoints

SECRET = "hf_s3cr3t_token_value"

RESOLVER_CASES = [  # (recipe text beyond the base, override, key named in the error, resolver)
    ("name: ${oc.env:SEGROUTER_TEST_SECRET}\n", None, "name", "oc.env"),
    ("name: run-${oc.env:SEGROUTER_TEST_SECRET,default}\n", None, "name", "oc.env"),
    ("name: '${ oc.env : SEGROUTER_TEST_SECRET }'\n", None, "name", "oc.env"),
    ("model: {routing: {name: '${oc.decode:full}'}}\n", None, "model.routing.name", "oc.decode"),
    ("data: {dataset: {forms: ['${oc.env:SEGROUTER_TEST_SECRET}']}}\n", None, "data.dataset.forms[0]", "oc.env"),
    ("", "name=${oc.env:SEGROUTER_TEST_SECRET}", "name", "oc.env"),
    ("", "output_dir=\\${oc.env:SEGROUTER_TEST_SECRET}", "output_dir", "oc.env"),
]


@pytest.mark.parametrize(("text", "override", "key", "resolver"), RESOLVER_CASES)
@pytest.mark.parametrize("in_base", [False, True])
def test_resolver_calls_are_refused(text: str, override: str | None, key: str, resolver: str, in_base: bool,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SEGROUTER_TEST_SECRET", SECRET)
    recipe = tmp_path / "r.yaml"
    if in_base:
        (tmp_path / "shared.yaml").write_text(f"base: [{TINY}]\n{text}")
        recipe.write_text("base: [shared.yaml]\n")
    else:
        recipe.write_text(f"base: [{TINY}]\n{text}")
    argv = ["fit", "--recipe", str(recipe), f"output_dir={tmp_path / 'runs'}", *([override] if override else [])]
    line = _check(argv, capsys, f"{key}: ")
    assert f"calls the resolver '{resolver}'" in line and SECRET not in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------------------
# bounded loading: a few lines of YAML or base: must not ask for billions of values or loads

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""
FLOW_BOMB = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
                            + [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(7)]) + "]"

BOUNDED = [  # (recipe file text, overrides, fragment)
    (BILLION_LAUGHS, [], "expands to more than 20000 values"),
    (f"base: [{TINY}]\ndata: {{dataset: {{forms: &x [*x]}}}}\n", [], "a YAML alias refers to a node that contains it"),
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", [], "nested deeper than 64 levels"),
    ("name: " + "[" * 100 + "]" * 100 + "\n", [], "nested deeper than 64 levels"),
    (f"base: [{TINY}]\n", [f"model.freeze={FLOW_BOMB}"], "model.freeze: expands to more than 20000 values"),
    (f"base: [{TINY}]\n", ["name=" + "[" * 3000 + "]" * 3000], "name: nested deeper than 64 levels"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("text", "overrides", "fragment"), BOUNDED, ids=[f"bomb{i}" for i in range(len(BOUNDED))])
def test_alias_bombs_and_deep_nesting_are_refused(text: str, overrides: list[str], fragment: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    _check(["fit", "--recipe", str(recipe), f"output_dir={tmp_path / 'runs'}", *overrides], capsys, fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)
def test_a_base_named_twice_at_every_level_is_loaded_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    levels = 22  # 2^22 loads if each base: entry were read again
    for i in range(levels):
        nxt = f"level{i + 1}.yaml" if i + 1 < levels else TINY
        (tmp_path / f"level{i}.yaml").write_text(f"base: [{nxt}, {nxt}]\nseed: {i}\n")
    # it loads (and validates) in well under a second; the command then stops at the missing checkpoint
    _check(["validate", "--recipe", str(tmp_path / "level0.yaml"), f"output_dir={tmp_path / 'runs'}"], capsys,
           "no checkpoint found for recipe 'tiny'")


def test_a_repeated_base_keeps_its_merge_order(tmp_path: Path) -> None:
    from segrouter.recipe import load_recipe
    (tmp_path / "a.yaml").write_text(f"base: [{TINY}]\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("seed: 2\nmetrics: {flops_batches: 5}\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml, a.yaml]\n")
    cfg = load_recipe(tmp_path / "c.yaml")
    assert cfg.seed == 1 and cfg.metrics.flops_batches == 5  # the second a.yaml wins over b.yaml, as before


@pytest.mark.timeout(60)
def test_a_very_long_base_chain_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(40):
        (tmp_path / f"chain{i}.yaml").write_text(f"base: [chain{i + 1}.yaml]\n" if i < 39 else f"base: [{TINY}]\n")
    _check(["fit", "--recipe", str(tmp_path / "chain0.yaml"), f"output_dir={tmp_path / 'runs'}"], capsys,
           "more than 32 levels of base: recipes")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------------------
# values the types accept but Lightning/torch reject: refused at validation, before any folder exists

OUT_OF_RANGE = [  # (override, key named in the error)
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.max_epochs=-2", "trainer.max_epochs"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("trainer.val_check_interval=-3", "trainer.val_check_interval"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    ("trainer.val_check_interval=abc", "trainer.val_check_interval"),
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches"),
    ("trainer.limit_val_batches=2.5", "trainer.limit_val_batches"),
    ("trainer.limit_test_batches=[1]", "trainer.limit_test_batches"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.num_sanity_val_steps=-2", "trainer.num_sanity_val_steps"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=-3", "trainer.devices"),
    ("trainer.devices=many", "trainer.devices"),
    ("trainer.devices=[]", "trainer.devices"),
    ("trainer.accelerator=gpux", "trainer.accelerator"),
    ("trainer.precision=8-mixed", "trainer.precision"),
    ("trainer.strategy=ddp_magic", "trainer.strategy"),
    ("trainer.strategy=deepspeed_stage_9", "trainer.strategy"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=-4", "data.batch_size"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("checkpoint.save_top_k=-2", "checkpoint.save_top_k"),
    ("checkpoint.every_n_train_steps=0", "checkpoint.every_n_train_steps"),
    ("metrics.flops_batches=-1", "metrics.flops_batches"),
    ("seed=-1", "seed"),
    ("seed=99999999999", "seed"),
    ("model.image_size=0", "model.image_size"),
    ("model.num_mask_tokens=0", "model.num_mask_tokens"),
    ("model.loss.dice_weight=-1", "model.loss.dice_weight"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.llm.num_layers=0", "model.llm.num_layers"),
    ("model.llm.num_heads=0", "model.llm.num_heads"),
    ("model.llm.hidden_size=0", "model.llm.hidden_size"),
    ("model.llm.intermediate_size=0", "model.llm.intermediate_size"),
    ("model.llm.num_kv_heads=0", "model.llm.num_kv_heads"),
    ("model.llm.num_kv_heads=3", "model.llm.num_kv_heads"),
    ("model.llm.rope_theta=0", "model.llm.rope_theta"),
    ("model.vision_encoder.depth=0", "model.vision_encoder.depth"),
    ("model.vision_encoder.patch_size=0", "model.vision_encoder.patch_size"),
    ("model.vision_encoder.num_heads=0", "model.vision_encoder.num_heads"),
    ("model.vision_encoder.num_heads=3", "model.vision_encoder.num_heads"),
    ("model.mask_decoder.embed_dim=0", "model.mask_decoder.embed_dim"),
    ("model.mask_decoder.upscale=0", "model.mask_decoder.upscale"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("override", "key"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_fail_at_validation(override: str, key: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    line = _check(["fit", "--recipe", TINY, f"output_dir={tmp_path / 'runs'}", override], capsys, f"{key}: ")
    assert "allowed: " in line or "use one of: " in line or "divisible" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override", ["trainer.max_steps=-1", "trainer.max_steps=0", "trainer.devices=auto",
                                      "trainer.devices=[0]", "trainer.val_check_interval=0.5",
                                      "trainer.limit_val_batches=0", "checkpoint.save_top_k=-1",
                                      "trainer.precision=bf16-mixed", "trainer.strategy=ddp",
                                      "trainer.max_epochs=null", "model.llm.num_kv_heads=1"])
def test_values_lightning_accepts_still_validate(override: str) -> None:
    from segrouter.recipe import load_recipe
    load_recipe(TINY, [override])


# --------------------------------------------------------------------------------------------------------------
# a run folder that cannot be created: one line before anything is built


@pytest.mark.parametrize("command", ["fit", "validate"])
@pytest.mark.parametrize("case", ["output_dir_is_a_file", "name_is_a_file", "file_above", "unwritable"])
def test_output_dir_that_cannot_hold_a_run(case: str, command: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import os

    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    fragment = "output_dir: "
    if case == "output_dir_is_a_file":
        out = blocker
    elif case == "name_is_a_file":
        out = tmp_path / "runs"
        out.mkdir()
        (out / "tiny").write_text("not a folder")
    elif case == "file_above":
        out = blocker / "deeper" / "runs"
    else:
        if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new folders even to root
            out = Path("/sys/segrouter_runs")
        else:
            out = tmp_path / "locked"
            out.mkdir()
            out.chmod(0o555)
        fragment = "is not writable"
    argv = [command, "--recipe", TINY, f"output_dir={out}"]
    if command == "validate":  # evaluation writes a new version folder too; give it a checkpoint to get there
        ckpt = tmp_path / "some.ckpt"
        ckpt.write_bytes(b"")
        argv += ["--ckpt", str(ckpt)]
    before = sorted(tmp_path.rglob("*"))
    _check(argv, capsys, fragment)
    assert sorted(tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------------------------------------
# plugins that misbehave: one line and exit 2, never a traceback or a silent exit 0

BAD_PLUGIN_FILES = {
    "int_name": ("from segrouter.registry import register\n@register('routing', 3)\nclass R:\n    pass\n",
                 "routing name 3 is not a non-empty string"),
    "empty_name": ("from segrouter.registry import register\n@register('routing', '')\nclass R:\n    pass\n",
                   "routing name '' is not a non-empty string"),
    "exit_0": ("import sys\nsys.exit(0)\n", "SystemExit"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGIN_FILES))
def test_bad_plugin_file(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, fragment = BAD_PLUGIN_FILES[case]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / f"bad_{case}.py").write_text(text)
    line = _check(["list", "--plugins", str(plugins)], capsys, fragment)
    assert f"bad_{case}.py" in line


CHECK_RAISES = '''
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "picky_{tag}")
class Picky(FullRouting):
    def __init__(self, *, level: int = 1) -> None:
        super().__init__()

    @staticmethod
    def check_params(**params):
        if params["level"] > 3:
            raise ValueError(f"level must be <= 3, got {{params['level']}}")
'''


def test_check_params_raising_value_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "picky.py").write_text(CHECK_RAISES.format(tag=tmp_path.name[-8:]))
    line = _check(["fit", "--recipe", TINY, "--plugins", str(plugins), f"output_dir={tmp_path / 'runs'}",
                   f"model.routing.name=picky_{tmp_path.name[-8:]}", "model.routing.level=5"], capsys,
                  "model.routing: routing 'picky_")
    assert "level must be <= 3, got 5" in line
    assert not (tmp_path / "runs").exists()


EP_MODULE = {
    "raises": "raise RuntimeError('broken at import')\n",
    "exits_0": "import sys\nsys.exit(0)\n",
    "function_exits_0": "import sys\n\ndef setup():\n    sys.exit(0)\n",
    "function_raises": "def setup():\n    raise KeyError('missing')\n",
}


@pytest.mark.parametrize("case", sorted(EP_MODULE))
def test_entry_point_that_raises_or_exits(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    module = f"segrouter_test_ep_{case}_{tmp_path.name[-8:]}".replace("-", "_")
    (tmp_path / f"{module}.py").write_text(EP_MODULE[case])
    monkeypatch.syspath_prepend(str(tmp_path))
    value = f"{module}:setup" if case.startswith("function") else module
    ep = importlib.metadata.EntryPoint(name=case, value=value, group="segrouter.plugins")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "segrouter.plugins" else real(**kw))
    for argv in (["list"], ["fit", "--recipe", TINY, f"output_dir={tmp_path / 'runs'}"]):
        line = _check(argv, capsys, f"plugin entry point '{case}' ({value}) failed to load")
        assert ("SystemExit" if "exit" in case else "Error") in line
    assert not (tmp_path / "runs").exists()
