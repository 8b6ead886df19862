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


def _check(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str, limit_s: float = 5.0) -> str:
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
