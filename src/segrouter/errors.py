"""User-facing errors.

Every problem a researcher can fix (a bad recipe, a missing file, an unknown component) is raised as a
:class:`SegrouterError`. The CLI prints it as one line and exits with code 2, so a typo never costs a
traceback hunt, and nothing is written before validation passes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class DataError(SegrouterError):
    """Input data cannot be read: missing or corrupt file, wrong layout."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_min(where: str, minimum: int = 1, **values: int | None) -> None:
    """Raise a :class:`RecipeError` naming ``where.key`` for the first value below ``minimum`` (``None`` is
    skipped: "not set"). For component sizes, so that e.g. ``num_layers: 0`` fails at validation, not in torch."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise RecipeError(f"{value} is out of range", where=f"{where}.{key}", fix=f"allowed: an integer >= {minimum}")
