"""Shared fixtures: the tiny recipe, a tokenizer and a model built from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@pytest.fixture(autouse=True)
def _isolated_run_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test picks its own run folder version (the CLI caches it in the environment for DDP ranks)."""
    monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)


def tiny_cfg(tmp_path: Path, *overrides: str) -> Any:
    from segrouter.recipe import load_recipe
    from segrouter.registry import load_plugins

    load_plugins()  # the repository's plugins/: load_recipe itself never imports code
    return load_recipe(RECIPES / "tiny.yaml", [f"output_dir={tmp_path}", *overrides])


def build_model(cfg: Any) -> tuple[Any, Any]:
    from segrouter.build import build

    return build(cfg)
