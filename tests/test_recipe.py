"""Recipes: base inheritance order, overrides, schema errors, cycles, safety."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segrouter.errors import RecipeError, SegrouterError
from segrouter.recipe import load_recipe, save_recipe
from segrouter.registry import load_plugins

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

load_plugins()  # the repository's plugins/ (fastv): load_recipe itself never imports code


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bases_merge_in_order_then_file_then_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "name: a\nseed: 1\noptim: {lr: 0.1, weight_decay: 0.5}\n")
    _write(tmp_path / "b.yaml", "name: b\noptim: {lr: 0.2}\n")
    child = _write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\ntrainer: {max_steps: 7}\n")
    cfg = load_recipe(child)
    assert cfg.name == "b" and cfg.seed == 1 and cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 0.5
    assert cfg.trainer.max_steps == 7
    cfg = load_recipe(child, ["optim.lr=0.3", "name=z", "model.llm.hidden_size=64"])
    assert cfg.optim.lr == 0.3 and cfg.name == "z" and cfg.model.llm.hidden_size == 64


def test_nested_bases_and_interpolation(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "root.yaml", "model: {image_size: 48}\n")
    _write(tmp_path / "mid.yaml",
           "base: sub/root.yaml\ndata: {dataset: {name: synthetic, image_size: '${model.image_size}'}}\n")
    cfg = load_recipe(_write(tmp_path / "top.yaml", "base: [mid.yaml]\n"))
    assert cfg.data.dataset.image_size == 48


def test_shipped_recipes_validate() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*(root / "recipes").glob("*.yaml"), *(root / "benchmarks").glob("*.yaml")]):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "overrides", "fragment"),
    [
        ("trainr: {max_steps: 3}\n", [], "unknown key 'trainr' (did you mean 'trainer'?)"),
        ("trainer: {max_step: 3}\n", [], "trainer.max_step: unknown key 'max_step' (did you mean 'max_steps'?)"),
        ("trainer: {max_steps: many}\n", [], "trainer.max_steps"),
        ("", ["trainer.max_steps=abc"], "trainer.max_steps"),
        ("", ["optim.lr"], "override 'optim.lr' is not key=value"),
        ("model: {routing: {name: fulll}}\n", [], "model.routing.name: unknown routing 'fulll' (did you mean 'full'?)"),
        ("model: {llm: {name: hf_causal, hiden_size: 3}}\n", [],
         "model.llm.hiden_size: 'hiden_size' is not a parameter"),
        ("model: {llm: {name: hf_causal, hidden_size: big}}\n", [], "model.llm.hidden_size: wrong type"),
        ("data: {dataset: {name: refcoco9}}\n", [], "unknown dataset 'refcoco9'"),
        ("data: {prompt: 'no placeholder'}\n", [], "data.prompt: prompt template has no {expression}"),
        ("model: {num_mask_tokens: 0}\n", [], "model.num_mask_tokens"),
        ("name: [unclosed\n", [], "invalid YAML"),
        ("- a\n- b\n", [], "a recipe must be a mapping"),
        ("base: [missing.yaml]\n", [], "base recipe not found: missing.yaml"),
        ("x: !!python/object/apply:os.system ['echo pwned']\n", [], "invalid YAML"),
    ],
)
def test_bad_recipes_fail_with_one_line(tmp_path: Path, text: str, overrides: list[str], fragment: str) -> None:
    path = _write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_cycle_is_detected(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: [b.yaml]\n")
    _write(tmp_path / "b.yaml", "base: [a.yaml]\n")
    with pytest.raises(RecipeError, match=r"inheritance cycle: a.yaml -> b.yaml -> a.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_saved_recipe_round_trips(tmp_path: Path) -> None:
    cfg = load_recipe(_write(tmp_path / "r.yaml", "name: rt\nmodel: {image_size: 32}\n"
                             "data: {dataset: {name: synthetic, image_size: '${model.image_size}'}}\n"))
    save_recipe(cfg, tmp_path / "out" / "recipe.yaml")
    again = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_changing_a_component_name_drops_the_old_parameters(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "model: {mask_decoder: {name: sam, depth: 3, embed_dim: 32}}\n")
    cfg = load_recipe(_write(tmp_path / "b.yaml", "base: a.yaml\nmodel: {mask_decoder: {name: conv, upscale: 2}}\n"))
    assert dict(cfg.model.mask_decoder) == {"name": "conv", "upscale": 2}
    cfg = load_recipe(tmp_path / "a.yaml", ["model.mask_decoder.name=conv"])
    assert dict(cfg.model.mask_decoder) == {"name": "conv"}
    cfg = load_recipe(tmp_path / "a.yaml", ["model.mask_decoder.depth=4"])
    assert cfg.model.mask_decoder.depth == 4 and cfg.model.mask_decoder.embed_dim == 32


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["model.routing.name=token_routing", "model.routing.proxy_ratio=0"], "model.routing.proxy_ratio"),
        (["model.routing.name=pdrop", "model.routing.keep=[0.5,0.8,0.1]"], "model.routing.keep"),
        (["model.routing.name=mod", "model.routing.capacity=2.0"], "model.routing.capacity"),
        (["model.routing.name=fastv", "model.routing.ratio=1.5"], "model.routing.ratio"),  # a plugin's check
        (["model.compressor.name=sam_superpixel", "model.compressor.n_segments=0"], "model.compressor.n_segments"),
        (["model.compressor.name=resampler", "model.compressor.num_queries=0"], "model.compressor"),
        (["data.dataset.noise=0.9"], "data.dataset"),
        (["model.llm.num_heads=3"], "model.llm"),
    ],
)
def test_value_ranges_fail_at_validation_before_any_build(overrides: list[str], where: str) -> None:
    with pytest.raises(SegrouterError) as err:
        load_recipe(RECIPES / "tiny.yaml", overrides)  # validation only: nothing is built
    assert str(err.value).startswith(where), str(err.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ('data.answer="it is {mask_tokens} {foo}"', "unknown placeholder(s) ['foo']"),
        ('data.answer="{target} {mask_tokens}"', "{target} comes before {mask_tokens}"),
        ('data.prompt="segment {expression"', "bad template"),
    ],
)
def test_bad_templates_fail_at_validation(override: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny.yaml", [override])
    assert fragment in str(err.value) and len(str(err.value).splitlines()) == 1


def test_checkpoint_monitor_must_name_a_logged_metric(tmp_path: Path) -> None:
    import csv

    from segrouter.cli import main
    from segrouter.metric_names import monitorable

    with pytest.raises(RecipeError) as err:  # before: trained until the first validation, then crashed unsaved
        load_recipe(RECIPES / "tiny.yaml", ["checkpoint.monitor=val/cIoU"])
    assert str(err.value).startswith("checkpoint.monitor: no metric 'val/cIoU' is logged (did you mean 'val/ciou'?)")
    assert load_recipe(RECIPES / "tiny.yaml", ["checkpoint.monitor=null"]).checkpoint.monitor is None
    # every name the check accepts is one a fit logs (latency: from validation batches whose FLOPs are not counted;
    # train/semantic: where the recipe weighs the semantic loss; n_acc and t_acc: where the data has no-target
    # samples, checked on gRefCOCO in tests/test_eval_protocol.py)
    assert main(["fit", "--recipe", str(RECIPES / "tiny.yaml"), f"output_dir={tmp_path}", "checkpoint.monitor=val/loss",
                 "checkpoint.mode=min", "metrics.flops_batches=1", "data.eval_batch_size=2",
                 "model.loss.semantic_weight=1"]) == 0
    with open(tmp_path / "tiny" / "version_0" / "metrics.csv") as f:
        assert set(monitorable()) - {"val/n_acc", "val/t_acc"} <= set(next(csv.reader(f)))


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "..", "a\\b", ""])
def test_a_run_name_is_one_folder_name(name: str) -> None:
    with pytest.raises(RecipeError, match=r"^name: .* is not a folder name"):  # else runs land outside output_dir
        load_recipe(RECIPES / "tiny.yaml", [f"name='{name}'"])


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["trainer.early_stopping.monitor=val/cIoU"],
         "trainer.early_stopping.monitor: no metric 'val/cIoU' is logged (did you mean 'val/ciou'?)"),
        (["trainer.early_stopping.mode=maximum"], "trainer.early_stopping.mode: mode must be min or max"),
        (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience: -1 is out of range"),
        (["trainer.early_stopping.min_delta=-0.1"], "trainer.early_stopping.min_delta: -0.1 is out of range"),
        (["trainer.early_stopping.patiense=2"], "trainer.early_stopping.patiense"),
        (["trainer.lr_monitor=true", "logger.csv=false"], "trainer.lr_monitor: the learning rate has no logger"),
        (["trainer.compile.enabled=true", "trainer.compile.backend=indutor"],
         "trainer.compile.backend: unknown torch.compile backend 'indutor' (did you mean 'inductor'?)"),
        (["trainer.compile.mode=fast"], "trainer.compile.mode: unknown torch.compile mode 'fast'"),
        (["trainer.compile.enable=true"], "trainer.compile.enable"),
        (["logger.wandb.offline=maybe"], "logger.wandb.offline"),
    ],
)
def test_callback_keys_are_checked_with_the_recipe(overrides: list[str], line: str) -> None:
    with pytest.raises(RecipeError) as err:  # before anything is built, like every trainer key
        load_recipe(RECIPES / "tiny.yaml", overrides)
    assert str(err.value).startswith(line) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_callback_keys_are_off_by_default() -> None:
    cfg = load_recipe(RECIPES / "tiny.yaml")
    trainer = cfg.trainer
    assert trainer.lr_monitor is False and trainer.early_stopping.enabled is False
    assert trainer.compile.enabled is False and cfg.logger.wandb.enabled is False and cfg.logger.wandb.offline
    stop = load_recipe(RECIPES / "tiny.yaml", ["trainer.early_stopping.enabled=true"]).trainer.early_stopping
    assert (stop.monitor, stop.mode, stop.patience, stop.min_delta) == ("val/ciou", "max", 3, 0.0)


def test_wandb_without_the_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny.yaml", ["logger.wandb.enabled=true"])
    assert str(err.value).startswith("logger.wandb.enabled: the wandb package is not installed — pip install wandb")
