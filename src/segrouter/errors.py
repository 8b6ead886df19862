"""User-facing errors.

Every problem a researcher can fix (a bad recipe, a missing file, an unknown component) is raised as a
:class:`SegrouterError`. The CLI prints it as one line and exits with code 2, so a typo never costs a
traceback hunt, and nothing is written before validation passes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class SegrouterError(Exception):
    """A problem the user can fix; ``str()`` is one line: what, where, how to fix."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, where, fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(fix)
        super().__init__(" — ".join(p.replace("\n", " ") for p in parts))


class RecipeError(SegrouterError):
    """The recipe is malformed: unknown key, wrong type, bad base, unknown component."""


class ParamError(RecipeError):
    """A component rejects its recipe parameters; ``param`` names the parameter (``None``: the node as a whole).

    A component cannot know the recipe path it is built under (``model.routing`` in a recipe, a node of its own
    in ``bench``), so it names only the parameter, and the registry, which builds it, places the error under
    that path (:func:`recipe_path`): ``ParamError("...", param="k")`` reads ``model.routing.k: ...``; raised
    where nothing places it (a component built by hand) it reads ``k: ...``."""

    def __init__(self, what: str, *, param: str | None = None, fix: str | None = None) -> None:
        self.param = param
        super().__init__(what, where=param, fix=fix)

    def at(self, path: str) -> RecipeError:
        """The same error placed under the recipe path ``path`` of the component's node."""
        return RecipeError(self.what, where=f"{path}.{self.param}" if self.param else path, fix=self.fix)


class DataError(SegrouterError):
    """Input data cannot be read: missing or corrupt file, wrong layout."""


@contextmanager
def recipe_path(where: str) -> Iterator[None]:
    """Place a :class:`ParamError` raised inside under the recipe path ``where`` of the component's node:
    ``ParamError(..., param="k")`` becomes a :class:`RecipeError` at ``model.routing.k``. The registry's
    ``validate`` and ``build`` use it; wrap later calls that check parameters too (a routing strategy's
    ``setup``, which needs the LLM)."""
    try:
        yield
    except ParamError as exc:
        raise exc.at(where) from None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_min(minimum: int = 1, /, **values: int | None) -> None:
    """Raise a :class:`ParamError` naming the first parameter whose value is below ``minimum`` (``None`` is
    skipped: "not set"). For component sizes, so that e.g. ``num_layers: 0`` fails at validation, not in torch."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise ParamError(f"{value} is out of range", param=key, fix=f"allowed: an integer >= {minimum}")
