"""One registry per component kind, plus plugin discovery.

A component is a class (or factory) registered under a name with :func:`register`. Its constructor has
two kinds of parameters:

* positional-only *context* arguments (before ``/``) that the framework supplies from the other parts
  (e.g. the LLM width for a compressor), never written in a recipe;
* keyword-only *recipe* parameters (after ``*``), set in the recipe node ``{name: ..., **params}``.

Keeping the two apart lets ``segrouter list`` show exactly what a researcher can set, and lets a recipe be
checked (unknown keys, missing values, wrong types) before any model is built.

The registries fill themselves (mmengine's ``Registry(locations=...)``): the first :func:`registry` call imports
the built-in component packages, so no caller has to remember to, and a recipe, a test or a script that forgot
cannot see an empty registry. Plugins are code the user opts into (``--plugins``), so they are loaded only by
:func:`load_plugins`, once per process however often it is called.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segrouter.errors import RecipeError, SegrouterError, did_you_mean, recipe_path

KINDS: tuple[str, ...] = ("vision_encoder", "compressor", "llm", "routing", "mask_decoder", "dataset")
# the type each kind's factory must build, checked at every build (as detectron2's build_backbone asserts it);
# named as module:class so that the registry imports no component code until a component is built
BASES: dict[str, str] = {
    "vision_encoder": "segrouter.vision_encoders.base:VisionEncoder",
    "compressor": "segrouter.compressors.base:Compressor",
    "llm": "segrouter.llms.base:CausalLLM",
    "routing": "segrouter.routing.base:RoutingStrategy",
    "mask_decoder": "segrouter.mask_decoders.base:MaskDecoder",
    "dataset": "torch.utils.data:Dataset",
}
ENTRY_POINT_GROUP = "segrouter.plugins"
PLUGIN_MODULE_PREFIX = "segrouter_plugins"
_BUILTIN_PACKAGES = (
    "segrouter.vision_encoders",
    "segrouter.compressors",
    "segrouter.llms",
    "segrouter.routing",
    "segrouter.mask_decoders",
    "segrouter.datasets",
)


@dataclass(frozen=True)
class Param:
    """A recipe-settable parameter of a component."""

    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        hint = _type_name(self.annotation)
        return f"{self.name}: {hint}" + ("" if self.required else f" = {self.default!r}")


@dataclass(frozen=True)
class Entry:
    """A registered component: its factory, where it came from, and its parameters."""

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str

    def _signature_target(self) -> Callable[..., Any]:
        return self.factory.__init__ if inspect.isclass(self.factory) else self.factory

    def params(self) -> dict[str, Param]:
        target = self._signature_target()
        hints = _safe_type_hints(target)
        out: dict[str, Param] = {}
        for p in inspect.signature(target).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out[p.name] = Param(p.name, hints.get(p.name, Any), p.default)
        return out

    def context(self) -> list[str]:
        return [
            p.name
            for p in inspect.signature(self._signature_target()).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.name != "self"
        ]


class Registry:
    """Name → component for one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        if not isinstance(name, str) or not name.strip():  # a recipe can only name it with a string
            raise SegrouterError(f"{self.kind} name {name!r} is not a non-empty string",
                                 fix=f'register it as @register("{self.kind}", "my_name")')

        def deco(factory: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and old.factory is not factory and _qualname(old.factory) != _qualname(factory):
                if _same_plugin_file(old.factory, factory):  # one plugin, two copies (a second checkout's plugins/)
                    return factory
                raise SegrouterError(
                    f"{self.kind} '{name}' is registered twice ({old.source} and {_source_of(factory)})",
                    fix="rename one of them (two checkouts' plugins/ folders with different copies of one plugin: run "
                        "from the checkout segrouter is installed from, or pip install -e . in this one)",
                )
            self._entries[name] = Entry(self.kind, name, factory, _source_of(factory))
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._entries:
            raise RecipeError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}",
                where=where,
                fix=f"registered {self.kind} names: {', '.join(self.names()) or '(none)'}",
            )
        return self._entries[name]

    def validate(self, node: Mapping[str, Any], where: str) -> tuple[Entry, dict[str, Any]]:
        """Check a recipe node against the component's signature; return the entry and its kwargs."""
        if not isinstance(node, Mapping):
            raise RecipeError(
                f"expected a mapping with a 'name' key, got {type(node).__name__}",
                where=where,
                fix=f"write e.g. {{name: {self.names()[0] if self.names() else '...'}}}",
            )
        if "name" not in node or not isinstance(node["name"], str):
            raise RecipeError(
                f"missing component name for {self.kind}",
                where=where,
                fix=f"add 'name:' with one of: {', '.join(self.names())}",
            )
        entry = self.get(node["name"], where=f"{where}.name")
        params = entry.params()
        kwargs = {k: v for k, v in node.items() if k != "name"}
        for key, value in kwargs.items():
            if key not in params:
                known = ", ".join(params) or "(none)"
                raise RecipeError(
                    f"'{key}' is not a parameter of {self.kind} '{entry.name}'{did_you_mean(key, params)}",
                    where=f"{where}.{key}",
                    fix=f"its parameters are: {known}",
                )
            if not type_matches(value, params[key].annotation):
                raise RecipeError(
                    f"wrong type: got {value!r} ({type(value).__name__}), "
                    f"expected {_type_name(params[key].annotation)}",
                    where=f"{where}.{key}",
                    fix=f"set {where}.{key} to a {_type_name(params[key].annotation)}",
                )
        for p in params.values():
            if p.required and p.name not in kwargs:
                raise RecipeError(
                    f"missing required parameter '{p.name}' of {self.kind} '{entry.name}'",
                    where=where,
                    fix=f"add {p.describe()}",
                )
        check = getattr(entry.factory, "check_params", None)
        if callable(check):  # value ranges, so that a recipe fails at validation, before anything is built
            try:
                with recipe_path(where):
                    check(**{**{n: p.default for n, p in params.items() if not p.required}, **kwargs})
            except ValueError as exc:  # a plugin may reject values the Python way rather than with RecipeError
                raise RecipeError(f"{self.kind} '{entry.name}' rejects these values: {exc}", where=where,
                                  fix="fix the values (its check_params raised ValueError)") from None
        return entry, kwargs

    def build(self, node: Mapping[str, Any], *context: Any, where: str | None = None) -> Any:
        """Validate ``node`` and call the factory with the context arguments and recipe parameters."""
        where = where or self.kind
        entry, kwargs = self.validate(node, where)
        with recipe_path(where):
            built = entry.factory(*context, **kwargs)
        base = _base_of(self.kind)
        if base is not None and not isinstance(built, base):
            raise SegrouterError(
                f"{self.kind} '{entry.name}' ({entry.source}) built a {type(built).__name__}, not a {base.__name__}",
                where=where, fix=f"make it a subclass of {base.__module__}.{base.__name__} (docs/plugins.md)",
            )
        return built


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}


def registry(kind: str) -> Registry:
    """The registry of one kind, with the built-in components in it."""
    found = _registry_of(kind)
    _load_builtins()
    return found


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: ``@register("routing", "my_strategy")`` on a class or factory."""
    return _registry_of(kind).register(name)  # no loading here: the built-in packages register while they import


def _base_of(kind: str) -> type | None:
    """The class every component of ``kind`` is an instance of (None for a kind without one, e.g. in tests)."""
    if kind not in BASES:
        return None
    module, name = BASES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def _registry_of(kind: str) -> Registry:
    if kind not in REGISTRIES:
        raise SegrouterError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}",
                             fix=f"kinds: {', '.join(KINDS)}")
    return REGISTRIES[kind]


def _load_builtins() -> None:
    """Import the built-in component packages; their ``@register`` decorators fill the registries. Python imports
    each package once, so every later call costs six dictionary look-ups."""
    for pkg in _BUILTIN_PACKAGES:
        importlib.import_module(pkg)


def default_plugin_dirs() -> list[Path]:
    """The repository's ``plugins/`` and the working directory's, when they exist."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "plugins", Path.cwd() / "plugins"]
    out: list[Path] = []
    for c in candidates:
        if c.is_dir() and c.resolve() not in [o.resolve() for o in out]:
            out.append(c)
    return out


def load_plugin_file(path: Path) -> None:
    """Import one plugin file (once per process); its ``@register`` decorators add its components."""
    _load_builtins()  # first, so that a plugin reusing a built-in name fails here, naming the plugin file
    path = path.resolve()
    mod_name = f"{PLUGIN_MODULE_PREFIX}.{path.stem}_{abs(hash(str(path))) % 10**8}"
    if mod_name in sys.modules:
        return
    if PLUGIN_MODULE_PREFIX not in sys.modules:
        sys.modules[PLUGIN_MODULE_PREFIX] = types.ModuleType(PLUGIN_MODULE_PREFIX)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SegrouterError(f"cannot import plugin file {path}", fix="plugin files must be Python modules (*.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SegrouterError as exc:  # e.g. a name registered twice: say which file did it
        del sys.modules[mod_name]
        if exc.where:
            raise
        raise type(exc)(exc.what, where=f"plugin file {path}", fix=exc.fix) from None
    except (Exception, SystemExit) as exc:  # a broken plugin must not look like a framework crash (or exit)
        del sys.modules[mod_name]
        raise SegrouterError(
            f"plugin file {path} failed to import: {type(exc).__name__}: {exc}",
            fix="fix the file, or move it out of the plugins folder",
        ) from exc


_LOADED_DIRS: set[Path] = set()  # plugin folders imported so far (resolved), see :func:`check_recipe_plugins`
_LOADED_ENTRY_POINTS: set[tuple[str, str]] = set()  # (name, value) of the entry points that loaded


def load_plugins(extra_dirs: Iterable[str | Path] = ()) -> None:
    """Discover plugins: entry points of installed packages, then ``*.py`` files in plugin folders.

    Idempotent: an entry point or a plugin file that loaded once is not loaded again, so calling it twice
    registers nothing twice (a file added to a folder since is loaded); what failed raises again. Only the
    command line calls this with folders (``--plugins DIR``): a recipe's ``plugins:`` list is checked by
    :func:`check_recipe_plugins` and never imported, so reading a recipe cannot run code."""
    _load_builtins()  # first, so that a plugin reusing a built-in name fails while it loads, naming itself
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in _LOADED_ENTRY_POINTS:
            continue
        try:
            obj = ep.load()
            if callable(obj) and not inspect.isclass(obj):
                obj()
        except SegrouterError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit(0) in a plugin must not make every command "succeed"
            raise SegrouterError(
                f"plugin entry point '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                fix="fix or uninstall the package that declares it",
            ) from exc
        _LOADED_ENTRY_POINTS.add((ep.name, ep.value))
    dirs = [*default_plugin_dirs()]
    for d in extra_dirs:
        p = Path(d)
        if not p.is_dir():
            raise SegrouterError(f"plugin folder {p} does not exist", fix="pass an existing folder to --plugins")
        dirs.append(p)
    for d in dirs:
        for f in sorted(d.glob("*.py")):
            if not f.name.startswith("_"):
                load_plugin_file(f)
        _LOADED_DIRS.add(d.resolve())


def check_recipe_plugins(dirs: Iterable[str]) -> None:
    """Check that every folder a recipe lists under ``plugins:`` is already loaded, without importing it.

    A recipe is data that may come from anyone (a shared ``base:``, a colleague's run folder), so naming a
    folder in it is not consent to run that folder's code: the user opts in on the command line with
    ``--plugins DIR``, or keeps the plugin in the repository's own ``plugins/`` (always loaded)."""
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise SegrouterError(f"plugin folder {p} does not exist", fix="pass an existing folder to --plugins")
        if p.resolve() not in _LOADED_DIRS:
            raise RecipeError(
                f"the recipe lists plugin folder {d}, which is not loaded: a recipe never imports code by itself",
                where="plugins",
                fix=f"if you trust its code, add '--plugins {d}' to the command",
            )


def type_matches(value: Any, hint: Any) -> bool:
    """Whether a recipe value fits a parameter annotation (recipes hold plain YAML data)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(type_matches(v, a) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        return all(type_matches(v, inner) for v in value)
    if origin in (dict, Mapping) or hint in (dict,):
        if not isinstance(value, Mapping):
            return False
        return True
    return True  # unknown annotations are the component's own business


def _type_name(hint: Any) -> str:
    if hint is Any or hint is inspect.Parameter.empty:
        return "any"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _safe_type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _plugin_file(obj: Any) -> Path | None:
    """The file of the plugin that defines ``obj``; None for built-ins and installed packages."""
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    file = getattr(module, "__file__", None)
    return Path(file) if file and module.__name__.startswith(PLUGIN_MODULE_PREFIX + ".") else None


def _same_plugin_file(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` come from two plugin files with the same content: one plugin in two ``plugins/``
    folders (the installed checkout's and the working directory's, when that is another clone)."""
    fa, fb = _plugin_file(a), _plugin_file(b)
    return fa is not None and fb is not None and fa.read_bytes() == fb.read_bytes()


def _source_of(obj: Any) -> str:
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    mod_name = getattr(module, "__name__", "?")
    if mod_name.startswith(PLUGIN_MODULE_PREFIX + ".") or not mod_name.startswith("segrouter"):
        return f"plugin {getattr(module, '__file__', mod_name)}"
    return mod_name
