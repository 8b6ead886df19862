"""Registry: registration, building with parameter checks, did-you-mean, plugin discovery."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from segrouter import registry as registry_module
from segrouter.errors import ParamError, RecipeError, SegrouterError, recipe_path
from segrouter.registry import Registry, load_plugin_file, load_plugins, registry, type_matches


class _Thing:
    def __init__(self, width: int, /, *, depth: int = 2, ratio: float = 0.5, mode: str | None = None) -> None:
        self.width, self.depth, self.ratio, self.mode = width, depth, ratio, mode


def _reg() -> Registry:
    r = Registry("thing")
    r.register("thing_a")(_Thing)
    return r


def test_build_passes_context_and_params() -> None:
    obj = _reg().build({"name": "thing_a", "depth": 3, "ratio": 1}, 64)
    assert (obj.width, obj.depth, obj.ratio) == (64, 3, 1)


def test_params_are_keyword_only_and_context_is_hidden() -> None:
    entry = _reg().get("thing_a")
    assert list(entry.params()) == ["depth", "ratio", "mode"]
    assert entry.context() == ["width"]
    assert entry.params()["depth"].describe() == "depth: int = 2"


def test_unknown_name_lists_registered_and_suggests() -> None:
    with pytest.raises(RecipeError) as err:
        _reg().get("thing_b", where="model.thing")
    msg = str(err.value)
    assert ("unknown thing 'thing_b'" in msg and "did you mean 'thing_a'" in msg
            and "registered thing names: thing_a" in msg)
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ({"name": "thing_a", "detph": 3}, "'detph' is not a parameter of thing 'thing_a' (did you mean 'depth'?)"),
        ({"name": "thing_a", "depth": "3"}, "wrong type: got '3' (str), expected int"),
        ({"name": "thing_a", "depth": True}, "expected int"),
        ({"name": "thing_a", "ratio": [1]}, "expected float"),
        ({"depth": 3}, "missing component name"),
        ("thing_a", "expected a mapping"),
    ],
)
def test_validate_rejects_bad_nodes(node: object, fragment: str) -> None:
    with pytest.raises(RecipeError, match=None) as err:
        _reg().validate(node, where="model.thing")  # type: ignore[arg-type]
    assert fragment in str(err.value)
    assert str(err.value).startswith("model.thing")


def test_required_parameter_missing() -> None:
    class Needs:
        def __init__(self, *, size: int) -> None:
            self.size = size

    r = Registry("thing")
    r.register("needs")(Needs)
    with pytest.raises(RecipeError, match="missing required parameter 'size'"):
        r.validate({"name": "needs"}, where="x")


class _Picky:
    def __init__(self, width: int, /, *, depth: int = 2) -> None:
        self.check_params(depth=depth)
        if width % depth:
            raise ParamError(f"width {width} is not divisible by depth {depth}", param="depth",
                             fix="pick another depth")
        self.depth = depth

    @staticmethod
    def check_params(**p: int) -> None:
        if p["depth"] < 1:
            raise ParamError(f"depth {p['depth']} is below 1", param="depth")

    def setup(self, layers: int) -> None:
        if layers < self.depth:
            raise ParamError(f"{layers} layers are fewer than depth {self.depth}")


def test_component_errors_name_the_path_they_are_built_under() -> None:
    r = Registry("thing")
    r.register("picky")(_Picky)
    for where in ("model.thing", "B: model.thing"):  # a recipe's path, and bench's own for a second candidate
        with pytest.raises(RecipeError) as err:
            r.validate({"name": "picky", "depth": 0}, where)
        assert str(err.value) == f"{where}.depth: depth 0 is below 1"
        with pytest.raises(RecipeError) as err:
            r.build({"name": "picky", "depth": 3}, 8, where=where)
        assert str(err.value) == f"{where}.depth: width 8 is not divisible by depth 3 — pick another depth"
        with pytest.raises(RecipeError) as err, recipe_path(where):
            r.build({"name": "picky", "depth": 2}, 8, where=where).setup(1)
        assert str(err.value) == f"{where}: 1 layers are fewer than depth 2"
    with pytest.raises(ParamError, match=r"^depth: depth 0 is below 1$"):  # built by hand: the parameter alone
        _Picky(8, depth=0)


def test_type_matches() -> None:
    assert type_matches(3, int) and not type_matches(3.0, int) and type_matches(3, float)
    assert type_matches(None, int | None) and type_matches([1, 2], list[int]) and not type_matches([1, "a"], list[int])
    assert type_matches([1, 2], tuple[int, ...]) and type_matches({"a": 1}, dict)


def test_duplicate_registration_is_refused() -> None:
    r = _reg()

    class Other:
        pass

    with pytest.raises(SegrouterError, match="registered twice"):
        r.register("thing_a")(Other)


def test_builtins_are_registered() -> None:
    assert "full" in registry("routing").names()
    assert {"timm_vit"} <= set(registry("vision_encoder").names())
    assert {"mlp"} <= set(registry("compressor").names())
    assert {"sam", "conv"} <= set(registry("mask_decoder").names())
    assert "synthetic" in registry("dataset").names()
    with pytest.raises(SegrouterError, match="unknown component kind 'routin'.*did you mean 'routing'"):
        registry("routin")


def test_the_registry_imports_what_fills_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking a registry imports the built-in packages: nobody has to load them first."""
    package = f"segrouter_test_builtin_{tmp_path.name[-8:]}".replace("-", "_")
    (tmp_path / f"{package}.py").write_text(
        "from segrouter.registry import register\n\n\n"
        "@register('routing', 'self_loaded')\nclass SelfLoaded:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry("routing")  # the real built-ins go into the real registry, which the test then sets aside
    monkeypatch.setitem(registry_module.REGISTRIES, "routing", Registry("routing"))  # restored after the test
    monkeypatch.setattr(registry_module, "_BUILTIN_PACKAGES", (*registry_module._BUILTIN_PACKAGES, package))
    assert package not in sys.modules
    assert "self_loaded" in registry("routing").names()


PLUGIN = '''
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "{name}")
class Plugged(FullRouting):
    """A plugin strategy: full routing under another name, with one parameter."""

    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
'''


def test_plugin_file_registers_with_its_source(tmp_path: Path) -> None:
    f = tmp_path / "my_plugin.py"
    f.write_text(PLUGIN.format(name="plugged_unit"))
    load_plugin_file(f)
    entry = registry("routing").get("plugged_unit")
    assert str(f) in entry.source and list(entry.params()) == ["scale"]


def test_broken_plugin_file_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.py"
    f.write_text("raise ValueError('boom')\n")
    with pytest.raises(SegrouterError) as err:
        load_plugin_file(f)
    assert "broken.py failed to import: ValueError: boom" in str(err.value)


def test_load_plugins_twice_loads_each_plugin_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"segrouter_test_ep_once_{tmp_path.name[-8:]}".replace("-", "_")
    (tmp_path / f"{module}.py").write_text("CALLS = []\n\n\ndef setup():\n    CALLS.append('entry point')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="once", value=f"{module}:setup", group="segrouter.plugins")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "segrouter.plugins" else real(**kw))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "counted.py").write_text(PLUGIN.format(name="plugged_once")
                                        + f"\nimport {module}\n{module}.CALLS.append('file')\n")
    load_plugins([plugins])
    load_plugins([plugins])  # no "registered twice": nothing is imported or called again
    assert sys.modules[module].CALLS == ["entry point", "file"]
    assert "plugged_once" in registry("routing").names()


def test_a_second_checkout_with_the_same_plugins_is_not_a_conflict(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Working in another clone of the repository while segrouter is installed from this one: its plugins/
    (loaded from the working directory) holds copies of ours. Identical copies are one plugin; a copy that
    differs is refused in one line that says how to pick one checkout."""
    ours = Path(__file__).resolve().parents[1] / "plugins" / "fastv.py"
    clone = tmp_path / "clone"
    (clone / "plugins").mkdir(parents=True)
    (clone / "plugins" / "fastv.py").write_bytes(ours.read_bytes())
    monkeypatch.chdir(clone)
    load_plugins()
    assert registry("routing").get("fastv").source == f"plugin {ours}"  # the installed checkout's copy, first

    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "fastv.py").write_text(ours.read_text() + "\n# edited in the other clone\n")
    with pytest.raises(SegrouterError, match="registered twice") as err:
        load_plugins([edited])
    assert "run from the checkout segrouter is installed from" in str(err.value)


def test_a_component_that_builds_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    """Every kind names the class its components are (registry.BASES); a factory that builds something else is
    refused where it is built, naming the component, its source and the base class."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "not_a_strategy.py").write_text(
        "import torch\nfrom segrouter.registry import register\n\n\n"
        "@register('routing', 'not_a_strategy')\nclass NotAStrategy(torch.nn.Module):\n    pass\n")
    load_plugins([plugins])
    with pytest.raises(SegrouterError) as err:
        registry("routing").build({"name": "not_a_strategy"}, where="model.routing")
    line = str(err.value)
    assert line.startswith("model.routing: routing 'not_a_strategy' (plugin ") and len(line.splitlines()) == 1
    assert "built a NotAStrategy, not a RoutingStrategy" in line and "segrouter.routing.base.RoutingStrategy" in line


@pytest.mark.parametrize("kind", sorted(registry_module.BASES))
def test_every_kind_names_a_base_class(kind: str) -> None:
    base = registry_module._base_of(kind)
    assert isinstance(base, type) and kind in registry_module.KINDS
