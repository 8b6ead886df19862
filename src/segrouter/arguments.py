"""argparse types shared by the subcommands: a bad count is refused by argparse itself, in one line that names
the flag (exit code 2), before anything is built."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number >= ``minimum`` (``type=at_least(1)`` for counts, ``at_least(0)`` for optional ones)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type in some messages
    return parse
