"""A corpus of broken recipes and CLI calls (issue 7).

Every case must end with exactly one line on stderr starting with ``segrouter: error:``, exit code 2, no
traceback, fail fast (validation happens before any model is built), and leave an existing run folder
untouched. The cases are generated systematically from the recipe schema and the component registries;
the wrong-typed values are drawn with hypothesis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import string
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segrouter import recipe as recipe_mod
from segrouter.cli import main
from segrouter.registry import KINDS, load_plugins, registry

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
# CPU seconds this process may spend before refusing a bad input (a failing case normally takes a few tens of
# milliseconds): CPU time, not wall time, so other work on a shared 2-core box cannot fail the check
SLOW_S = 2.0

load_plugins()  # the repository's plugins/ (e.g. fastv) are part of what a recipe may name

COMPONENT_PATH = {kind: (f"model.{kind}" if kind != "dataset" else "data.dataset") for kind in KINDS}

# --------------------------------------------------------------------------------------------------------------
# the existing run that no bad input may touch


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("existing")
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["fit", "--recipe", TINY, f"output_dir={root}"]) == 0
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert (root / "tiny" / "version_0" / "checkpoints" / "last.ckpt").exists()
    _BEFORE[root] = _snapshot(root)  # taken now, before any case of the corpus runs
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


_BEFORE: dict[Path, dict[str, str]] = {}


def _check(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str | None = None) -> str:
    capsys.readouterr()
    outs = [Path(a.partition("=")[2]) for a in argv if a.startswith("output_dir=")]
    listing = [sorted(map(str, o.rglob("*"))) for o in outs]
    t0 = time.process_time()
    rc = main(argv)
    elapsed = time.process_time() - t0
    assert [sorted(map(str, o.rglob("*"))) for o in outs] == listing, f"{argv} wrote into the output folder"
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, argv, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("segrouter: error:"), (argv, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    if fragment is not None:
        assert fragment in lines[0], (fragment, lines[0])
    assert elapsed < SLOW_S, f"{elapsed:.2f} CPU s: validation happened too late for {argv}"
    return lines[0]


def _recipe_file(tmp_path: Path, data: Any, name: str = "bad.yaml") -> str:
    """A recipe inheriting the tiny one, with ``data`` merged on top."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": [TINY], **data}, sort_keys=False))
    return str(path)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


# --------------------------------------------------------------------------------------------------------------
# what the schema and the registries contain


def _schema_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) for every field of the structured schema, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        out.append((key, hint))
        if dataclasses.is_dataclass(hint):
            out.extend(_schema_fields(hint, key + "."))
    return out


SCHEMA = _schema_fields(recipe_mod.Recipe)
SCHEMA_KEYS = {k for k, _ in SCHEMA}


def _typos(word: str) -> list[str]:
    """Two deterministic misspellings: a doubled letter and a dropped (or swapped) one."""
    doubled = word[:-1] + word[-1] * 2 if len(word) > 1 else word * 2
    dropped = word[:-1] if len(word) > 3 else word[0] + word
    if len(word) > 4:
        i = len(word) // 2
        dropped = (word[:i] + word[i + 1] + word[i] + word[i + 2 :] if word[i] != word[i + 1]
                   else word[:i] + word[i + 1 :])
    return [t for t in dict.fromkeys([doubled, dropped]) if t != word]


def _components() -> list[tuple[str, str]]:
    return [(kind, name) for kind in KINDS for name in registry(kind).names()]


def _component_params() -> list[tuple[str, str, str, Any]]:
    return [
        (kind, name, p.name, p.annotation)
        for kind, name in _components()
        for p in registry(kind).get(name).params().values()
    ]


# --------------------------------------------------------------------------------------------------------------
# 1. unknown component names (typos of every registered name → did-you-mean; unrelated names)


@pytest.mark.parametrize(
    ("kind", "typo"),
    [(kind, t) for kind, name in _components() for t in _typos(name) if t not in registry(kind).names()],
)
def test_component_name_typo(kind: str, typo: str, run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _check(["fit", "--recipe", TINY, f"output_dir={run_root}", f"{COMPONENT_PATH[kind]}.name={typo}"], capsys,
                  f"{COMPONENT_PATH[kind]}.name: unknown {kind} '{typo}'")
    assert "did you mean" in line


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["zzz_nothing_like_it", "", "None"])
def test_component_name_unknown(kind: str, name: str, run_root: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = _recipe_file(tmp_path, _nest(COMPONENT_PATH[kind], {"name": name}))
    _check(["fit", "--recipe", bad, f"output_dir={run_root}"], capsys, f"unknown {kind} '{name}'")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("node", [{"nam": "x"}, {"name": 3}, {"name": ["full"]}, "full", 7, ["full"]],
                         ids=["no-name", "int-name", "list-name", "str-node", "int-node", "list-node"])
def test_component_node_malformed(kind: str, node: Any, run_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = _recipe_file(tmp_path, _nest(COMPONENT_PATH[kind], node))
    _check(["fit", "--recipe", bad, f"output_dir={run_root}"], capsys, COMPONENT_PATH[kind].split(".")[0])


# --------------------------------------------------------------------------------------------------------------
# 2. misspelled keys at every level of the schema and in every component's parameters


@pytest.mark.parametrize(
    ("key", "typo", "via"),
    [
        (key, typo, via)
        for i, (key, _) in enumerate(SCHEMA)
        for j, typo in enumerate(_typos(key.rpartition(".")[2]))
        for via in [("override", "yaml")[(i + j) % 2]]
        if f"{key.rpartition('.')[0]}.{typo}".lstrip(".") not in SCHEMA_KEYS
    ],
)
def test_schema_key_typo(key: str, typo: str, via: str, run_root: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    parent = key.rpartition(".")[0]
    dotted = f"{parent}.{typo}" if parent else typo
    if via == "override":
        argv = ["fit", "--recipe", TINY, f"output_dir={run_root}", f"{dotted}=1"]
    else:
        argv = ["fit", "--recipe", _recipe_file(tmp_path, _nest(dotted, 1)), f"output_dir={run_root}"]
    _check(argv, capsys, f"{dotted}: unknown key '{typo}'")


@pytest.mark.parametrize(
    ("kind", "name", "typo"),
    [
        (kind, name, typo)
        for kind, name, param, _ in _component_params()
        for typo in _typos(param)[:1]
        if typo not in registry(kind).get(name).params()
    ],
)
def test_component_param_typo(kind: str, name: str, typo: str, run_root: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    path = COMPONENT_PATH[kind]
    line = _check(["fit", "--recipe", TINY, f"output_dir={run_root}", f"{path}.name={name}", f"{path}.{typo}=1"],
                  capsys, f"{path}.{typo}: '{typo}' is not a parameter of {kind} '{name}'")
    assert "did you mean" in line


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "dataset"])
def test_parameter_of_a_parameterless_or_other_component(kind: str, run_root: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _check(["fit", "--recipe", TINY, f"output_dir={run_root}", f"{COMPONENT_PATH[kind]}.no_such_parameter=1"],
           capsys, "is not a parameter of")


@pytest.mark.parametrize(("name", "missing"), [("hf_refer", "path"), ("refcoco", "root")])
def test_required_component_parameter_missing(name: str, missing: str, run_root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _check(["fit", "--recipe", TINY, f"output_dir={run_root}", f"data.dataset.name={name}"], capsys,
           f"missing required parameter '{missing}'")


# --------------------------------------------------------------------------------------------------------------
# 3. wrong types (values drawn with hypothesis)

_WORD = st.text(alphabet=string.ascii_letters + "_ -.", max_size=8).map(lambda s: "x" + s)  # never a number/bool
_LIST = st.lists(st.integers(-5, 5) | _WORD, min_size=0, max_size=3)
_DICT = st.dictionaries(st.sampled_from(["a", "b", "k"]), st.integers(0, 3) | _WORD, min_size=1, max_size=2)
_SETTINGS = settings(max_examples=3, derandomize=True, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _schema_wrong(hint: Any) -> st.SearchStrategy[Any] | None:
    """Values of the wrong type for a schema field (omegaconf converts '3' to 3 and 1 to True, so avoid those)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        hint = args[0]
    if hint in (int, float):
        return _WORD | _LIST | _DICT
    if hint is bool:
        return _WORD | _LIST | _DICT
    if hint is str:
        return _LIST | _DICT
    if typing.get_origin(hint) is list:
        inner = typing.get_args(hint)[0]
        return _DICT | (st.lists(_DICT, min_size=1, max_size=2) if inner is str
                        else st.lists(_WORD, min_size=1, max_size=2))
    if dataclasses.is_dataclass(hint):
        return _WORD | st.integers(0, 9) | _LIST
    if hint is dict[str, Any] or typing.get_origin(hint) is dict:
        return None  # component nodes: covered by test_component_node_malformed
    return None  # Any


SCHEMA_TYPED = [(k, h) for k, h in SCHEMA if _schema_wrong(h) is not None]


@pytest.mark.parametrize(("key", "hint"), SCHEMA_TYPED, ids=[k for k, _ in SCHEMA_TYPED])
@_SETTINGS
@given(data=st.data())
def test_schema_wrong_type(key: str, hint: Any, data: st.DataObject, run_root: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    value = data.draw(_schema_wrong(hint), label=key)
    bad = _recipe_file(tmp_path, _nest(key, value))
    out = [] if key == "output_dir" else [f"output_dir={run_root}"]  # the override would replace the bad value
    _check(["fit", "--recipe", bad, *out], capsys, key.split(".")[0])


def _param_wrong(hint: Any) -> st.SearchStrategy[Any] | None:
    """Values that ``registry.type_matches`` must refuse for a component parameter annotation."""
    from segrouter.registry import type_matches

    if hint is Any:
        return None
    candidates = _WORD | _LIST | _DICT | st.booleans() | st.floats(0.1, 0.9) | st.integers(2, 9) | st.none()
    return candidates.filter(lambda v: not type_matches(v, hint))


COMPONENT_TYPED = [(k, n, p, h) for k, n, p, h in _component_params() if _param_wrong(h) is not None]


@pytest.mark.parametrize(("kind", "name", "param", "hint"), COMPONENT_TYPED,
                         ids=[f"{k}-{n}-{p}" for k, n, p, _ in COMPONENT_TYPED])
@_SETTINGS
@given(data=st.data())
def test_component_param_wrong_type(kind: str, name: str, param: str, hint: Any, data: st.DataObject,
                                    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value = data.draw(_param_wrong(hint), label=param)
    path = COMPONENT_PATH[kind]
    bad = _recipe_file(tmp_path, _nest(path, {"name": name, param: value}))
    line = _check(["fit", "--recipe", bad, f"output_dir={run_root}"], capsys, f"{path}.{param}: ")
    # a list or mapping the base recipe already sets fails at the merge, before the schema check
    assert "wrong type" in line or "must keep the kind" in line, line


# --------------------------------------------------------------------------------------------------------------
# 4. out-of-range values and incompatible dimensions (checked before anything is built)

RANGE = [
    (["model.routing.name=token_routing", "model.routing.proxy_ratio=0"], "proxy_ratio"),
    (["model.routing.name=token_routing", "model.routing.proxy_ratio=1.5"], "proxy_ratio"),
    (["model.routing.name=token_routing", "model.routing.proxy_ratio=-0.1"], "proxy_ratio"),
    (["model.routing.name=token_routing", "model.routing.num_proxies=0"], "num_proxies"),
    (["model.routing.name=token_routing", "model.routing.neighbours=0"], "neighbours"),
    (["model.routing.name=token_routing", "model.routing.route_layers=[0,99]"], "route_layers"),
    (["model.routing.name=fastv", "model.routing.ratio=1.0"], "ratio"),
    (["model.routing.name=fastv", "model.routing.ratio=1.5"], "ratio"),
    (["model.routing.name=fastv", "model.routing.ratio=-0.5"], "ratio"),
    (["model.routing.name=fastv", "model.routing.k=0"], "model.routing"),
    (["model.routing.name=fastv", "model.routing.k=99"], "model.routing"),
    (["model.routing.name=pdrop", "model.routing.keep=[0.5,0.8,0.1]"], "keep"),
    (["model.routing.name=pdrop", "model.routing.keep=[1.5,0.5,0.25]"], "keep"),
    (["model.routing.name=pdrop", "model.routing.layers=[0.5,0.25,0.75]"], "model.routing"),
    (["model.routing.name=pdrop", "model.routing.layers=[0.5]"], "model.routing"),
    (["model.routing.name=mod", "model.routing.capacity=0"], "model.routing"),
    (["model.routing.name=mod", "model.routing.capacity=1.5"], "model.routing"),
    (["model.routing.name=mod", "model.routing.route_layers=[99]"], "model.routing"),
    (["model.compressor.name=sam_superpixel", "model.compressor.pred_iou_thresh=1.5"], "pred_iou_thresh"),
    (["model.compressor.name=sam_superpixel", "model.compressor.n_segments=0"], "n_segments"),
    (["model.compressor.name=sam_superpixel", "model.compressor.depth=0"], "depth"),
    (["model.compressor.name=resampler", "model.compressor.num_heads=3"], "num_heads"),
    (["model.compressor.name=avgpool", "model.compressor.k=3"], "model.compressor"),
    (["model.compressor.name=tome", "model.compressor.r=1000"], "model.compressor"),
    (["data.dataset.num_samples=0"], "num_samples"),
    (["data.dataset.noise=0.9"], "noise"),
    (["data.dataset.shapes=[hexagon]"], "shapes"),
    (["model.num_mask_tokens=0"], "model.num_mask_tokens"),
    (["model.num_mask_tokens=-3"], "model.num_mask_tokens"),
    (["model.lora.enabled=true", "model.lora.r=0"], "model.lora"),
    (["model.lora.enabled=true", "model.lora.targets=[]"], "model.lora"),
    (["optim.scheduler=linear"], "optim.scheduler"),
    (["checkpoint.mode=maximum"], "checkpoint.mode"),
    (["data.prompt=segment it"], "data.prompt"),
    (["data.answer=it is"], "data.answer"),
    (["trainer.strategy=deepspeed_stage_9"], "trainer.strategy: unknown value 'deepspeed_stage_9'"),
    # incompatible dimensions
    (["data.dataset.image_size=48"], "differs from model.image_size"),
    (["model.image_size=48", "data.dataset.image_size=32"], "differs from model.image_size"),
    (["model.llm.num_heads=3"], "hidden_size 32 is not divisible by num_heads 3"),
    (["model.llm.hidden_size=30"], "head size 15"),
    (["model.llm.hidden_size=33"], "not divisible"),
    (["model.vision_encoder.patch_size=5"], "patch_size"),
    (["model.image_size=36"], "patch_size"),
    (["model.mask_decoder.name=sam", "model.mask_decoder.embed_dim=12", "model.mask_decoder.num_heads=5"], "embed_dim"),
]


@pytest.mark.parametrize(("overrides", "fragment"), RANGE, ids=[" ".join(o) for o, _ in RANGE])
def test_out_of_range_or_incompatible(overrides: list[str], fragment: str, run_root: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _check(["fit", "--recipe", TINY, f"output_dir={run_root}", *overrides], capsys, fragment)


# --------------------------------------------------------------------------------------------------------------
# 5. broken files: YAML, tags, non-mappings, bases, cycles

YAML_TEXTS = [
    ("name: [unclosed\n", "invalid YAML"),
    ("name: {a: 1\n", "invalid YAML"),
    ("model:\n  llm: {name: hf_causal}\n   bad_indent: 1\n", "invalid YAML"),
    ("a: 1\na: 2\n", None),
    ("\tname: tab\n", "invalid YAML"),
    ("name: 'open\n", "invalid YAML"),
    ("key: value: other\n", "invalid YAML"),
    ("- a\n- b\n", "a recipe must be a mapping"),
    ("just a string\n", "a recipe must be a mapping"),
    ("42\n", "a recipe must be a mapping"),
    ("[1, 2, 3]\n", "a recipe must be a mapping"),
    ("x: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("x: !!python/name:os.system\n", "invalid YAML"),
    ("x: !!python/tuple [1, 2]\n", "invalid YAML"),
    ("!!python/object:collections.OrderedDict {}\n", "invalid YAML"),
    ("x: !custom 3\n", "invalid YAML"),
    ("base: 3\n", "'base' must be"),
    ("base: {a: b}\n", "'base' must be"),
    ("base: [3]\n", "is not a path"),
    ("base: [missing.yaml]\n", "base recipe not found: missing.yaml"),
    ("base: missing.yaml\n", "base recipe not found: missing.yaml"),
    ("base: [sub/dir/missing.yaml]\n", "base recipe not found"),
    ("plugins: notalist\n", "plugins"),
    ("plugins: [/no/such/plugin/dir]\n", "does not exist"),
    ("name: ${nonexistent.key}\n", None),
    ("seed: ${name}\n", None),
    ("model: 3\n", "model"),
    ("trainer: [1, 2]\n", "trainer"),
    ("\xff\xfe garbage\n", None),
]


@pytest.mark.parametrize(("text", "fragment"), YAML_TEXTS, ids=[f"yaml{i}" for i in range(len(YAML_TEXTS))])
def test_broken_recipe_file(text: str, fragment: str | None, run_root: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("latin-1"))
    _check(["fit", "--recipe", str(path), f"output_dir={run_root}"], capsys, fragment)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_inheritance_cycle(n: int, run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = [f"r{i}.yaml" for i in range(n)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"base: [{names[(i + 1) % n]}]\n")
    _check(["fit", "--recipe", str(tmp_path / names[0]), f"output_dir={run_root}"], capsys, "inheritance cycle")


def test_cycle_through_a_valid_base(run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(f"base: [{TINY}, b.yaml]\n")
    (tmp_path / "b.yaml").write_text("base: [c.yaml]\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml]\n")
    _check(["fit", "--recipe", str(tmp_path / "a.yaml"), f"output_dir={run_root}"], capsys,
           "inheritance cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml")


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
@pytest.mark.parametrize("recipe", ["recipes/nope.yaml", "/no/such/dir/r.yaml", "recipes"])
def test_missing_recipe_file(command: str, recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    _check([command, "--recipe", recipe], capsys, "recipe file not found")


# --------------------------------------------------------------------------------------------------------------
# 6. the command line: checkpoints, resume, plugins, overrides

BAD_OVERRIDES = [
    (["optim.lr"], "is not key=value"),
    (["trainer.max_steps", "3"], "is not key=value"),
    (["--", "x"], None),
    (["=3"], None),
    (["trainer..max_steps=3"], None),
    (["trainer.max_steps==3"], "trainer.max_steps"),
    (["trainer.max_steps=[1"], None),
    (["model=3"], "model"),
    (["trainer.max_steps={a: 1}"], "trainer.max_steps"),
]


@pytest.mark.parametrize(("overrides", "fragment"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override(overrides: list[str], fragment: str | None, run_root: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    _check(["fit", "--recipe", TINY, f"output_dir={run_root}", *overrides], capsys, fragment)


def test_cli_checkpoints_and_resume(run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = f"output_dir={run_root}"
    empty = f"output_dir={tmp_path / 'empty'}"
    _check(["validate", "--recipe", TINY, out, "--ckpt", str(tmp_path / "missing.ckpt")], capsys,
           "checkpoint not found")
    _check(["test", "--recipe", TINY, out, "--ckpt", "missing.ckpt"], capsys, "checkpoint not found")
    _check(["validate", "--recipe", TINY, empty], capsys, "no checkpoint found for recipe 'tiny'")
    _check(["test", "--recipe", TINY, empty], capsys, "no checkpoint found for recipe 'tiny'")
    _check(["fit", "--recipe", TINY, empty, "--resume"], capsys, "no last.ckpt to resume")
    _check(["fit", "--recipe", TINY, out, "--resume", "--ckpt", str(tmp_path / "nope.ckpt")], capsys,
           "checkpoint not found")
    last = run_root / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    _check(["fit", "--recipe", TINY, out, "--ckpt", str(last)], capsys, "--ckpt on fit needs --resume")


@pytest.fixture(scope="module")
def broken_checkpoints(run_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file (or folder) per way a checkpoint can be broken, made from the existing run's last.ckpt."""
    import torch

    last = run_root / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    good = torch.load(last, weights_only=True)
    state = good["state_dict"]
    key = next(iter(state))
    d = tmp_path_factory.mktemp("broken_ckpts")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "truncated.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (d / "garbage.ckpt").write_bytes(bytes(range(256)) * 16)
    (d / "text.ckpt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], d / "list.ckpt")
    torch.save({"epoch": 1}, d / "no_state_dict.ckpt")
    torch.save({**good, "state_dict": {**state, key: torch.zeros(3, 3, 3)}}, d / "shape.ckpt")
    torch.save({**good, "state_dict": {"llm.no_such_layer.weight": torch.zeros(2)}}, d / "other_model.ckpt")
    (d / "folder.ckpt").mkdir()  # a folder that is not a DeepSpeed checkpoint
    return {p.stem: p for p in d.iterdir()}


BROKEN_CKPTS = ["empty", "truncated", "garbage", "text", "list", "no_state_dict", "shape", "other_model", "folder"]
CKPT_COMMANDS = ["fit --resume", "validate", "test", "predict", "chat", "analyze attention"]


@pytest.mark.parametrize("command", CKPT_COMMANDS)
@pytest.mark.parametrize("case", BROKEN_CKPTS)
def test_broken_checkpoint_on_every_command(case: str, command: str, run_root: Path, tmp_path: Path,
                                            broken_checkpoints: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Every command that reads a checkpoint refuses a broken one in one line, before it writes anything."""
    from PIL import Image

    ckpt = str(broken_checkpoints[case])
    out = f"output_dir={run_root}"
    if command == "predict":
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
        argv = ["predict", "--recipe", TINY, "--ckpt", ckpt, "--image", str(image), "--text", "the red circle",
                "--out", str(tmp_path / "mask.png"), out]
    elif command == "chat":
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
        argv = ["chat", "--recipe", TINY, "--ckpt", ckpt, "--image", str(image), "--out-dir", str(tmp_path / "chat"),
                out]
    elif command == "analyze attention":
        argv = ["analyze", "attention", "--recipe", TINY, "--ckpt", ckpt, "--out", str(tmp_path / "analysis"), out]
    else:
        argv = [*command.split(), "--recipe", TINY, out, "--ckpt", ckpt]
        if command == "fit --resume":
            argv = ["fit", "--resume", "--recipe", TINY, out, "--ckpt", ckpt]
    _check(argv, capsys)
    assert not any((tmp_path / name).exists() for name in ("mask.png", "analysis", "chat"))


ARGPARSE = [
    ["fit"],
    ["fit", "--recipe"],
    ["fit", "--recipe", TINY, "--bogus-flag"],
    ["fitt", "--recipe", TINY],
    [],
    ["validate", "--recipe", TINY, "--resume"],
    ["list", "routing", "extra"],
]


@pytest.mark.parametrize("argv", ARGPARSE, ids=[" ".join(a) or "empty" for a in ARGPARSE])
def test_argparse_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _check(argv, capsys)


COMMAND_VALUES = [
    (["bench", "--recipe", TINY, "--vs", TINY, "--text-tokens", "-3"], "--text-tokens: expected a whole number >= 0"),
    (["bench", "--recipe", TINY, "--vs", TINY, "--batch", "0"], "--batch: expected a whole number >= 1"),
    (["bench", "--recipe", TINY, "--vs", TINY, "--repeats", "two"], "--repeats: expected a whole number >= 1"),
    (["bench", "--recipe", TINY, "--vs", TINY, "--random-init", "llama-9b"], "unknown shape 'llama-9b'"),
    (["analyze", "attention", "--recipe", TINY, "--batches", "0"], "--batches: expected a whole number >= 1"),
    (["compare", "/no/such/run"], "no run folder found: /no/such/run"),
    (["compare", "{run}", "--metric", "val/cIoU"], "no run logs val/cIoU (did you mean 'val/ciou'?)"),
    (["compare", "{run}", "--format", "html"], "invalid choice: 'html'"),
    (["bench", "--recipe", TINY, "--vs", TINY, "--device", "gpu0"], "unknown --device 'gpu0'"),
    (["bench", "--recipe", TINY, "--vs", TINY, "--out", "{afile}/b.json"], "cannot be written: "),
    (["compare", "{run}", "--plot", "{afile}/p.png"], "--plot "),
    (["compare", "{run}", "--out", "{afile}/sub/t.md"], "--out "),
    (["compare", "{run}", "--out", "{folder}"], "is a folder — name a file to write"),
]


@pytest.mark.parametrize(("argv", "fragment"), COMMAND_VALUES, ids=[" ".join(a[-2:]) for a, _ in COMMAND_VALUES])
def test_bad_command_values_are_one_line(argv: list[str], fragment: str, run_root: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("a file where a folder would go")
    (tmp_path / "folder").mkdir()
    paths = {"run": run_root / "tiny" / "version_0", "afile": tmp_path / "afile", "folder": tmp_path / "folder"}
    argv = [a.format(**paths) for a in argv]
    _check(argv, capsys, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # nothing written


@pytest.mark.parametrize("kind", ["vision_encodr", "routings"])
def test_list_unknown_kind(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    _check(["list", kind], capsys, "unknown component kind")


BROKEN_PLUGINS = {
    "syntax": ("def broken(:\n    pass\n", "SyntaxError"),
    "import": ("import segrouter_no_such_module_xyz\n", "ModuleNotFoundError"),
    "from_import": ("from segrouter.registry import no_such_name\n", "ImportError"),
    "runtime": ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    "multiline": ("raise ValueError('first line\\nsecond line')\n", "ValueError"),
    "name": ("undefined_name + 1\n", "NameError"),
    "zero": ("1 / 0\n", "ZeroDivisionError"),
    "exit": ("import sys\nsys.exit(3)\n", "SystemExit"),
    "duplicate": ("from segrouter.registry import register\n@register('routing', 'full')\nclass Full:\n    pass\n",
                  "registered twice"),
    "bad_kind": ("from segrouter.registry import register\n@register('routers', 'x')\nclass X:\n    pass\n",
                 "unknown component kind"),
}


@pytest.mark.parametrize("where", ["flag", "recipe"])
@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
def test_plugin_that_raises_on_import(case: str, where: str, run_root: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    text, fragment = BROKEN_PLUGINS[case]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / f"broken_{case}.py").write_text(text)
    if where == "flag":
        argv = ["fit", "--recipe", TINY, "--plugins", str(plugins), f"output_dir={run_root}"]
    else:  # a recipe's plugins: list, opted into on the command line (a recipe alone never imports code)
        argv = ["fit", "--recipe", TINY, "--plugins", str(plugins), f"output_dir={run_root}", f"plugins=[{plugins}]"]
    _check(argv, capsys, fragment)


@pytest.mark.parametrize("command", ["fit", "validate", "test", "list"])
def test_missing_plugins_folder(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "--plugins", "/no/such/dir"] + ([] if command == "list" else ["--recipe", TINY])
    _check(argv, capsys, "plugin folder /no/such/dir does not exist")


# --------------------------------------------------------------------------------------------------------------
# last: nothing above touched the existing run


def test_zz_existing_run_untouched(run_root: Path) -> None:
    assert _snapshot(run_root) == _BEFORE[run_root]
    assert not (run_root / "tiny" / "version_1").exists()
