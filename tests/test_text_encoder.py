"""The text tower: the shipped MiniLM, the paper's DistilBERT architecture without weights, bad names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from miles.text_encoder import build_text_encoder, shipped_minilm_dir, text_cls


def test_shipped_minilm_is_pretrained_and_offline() -> None:
    model, tokenizer, hidden = build_text_encoder("minilm")
    assert hidden == 384 and tokenizer.is_fast
    assert getattr(model, "pooler", None) is None  # CLS is used directly; no unused DDP parameters
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(shipped_minilm_dir())
    for name, param in model.named_parameters():  # the shipped weights, not a fresh initialisation
        assert torch.equal(param, reference.state_dict()[name]), name
    tokens = tokenizer(["A Red Circle"], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])[1:4] == ["a", "red", "circle"]
    model.eval()
    with torch.no_grad():
        cls = text_cls(model, tokens["input_ids"], tokens["attention_mask"])
    assert cls.shape == (1, 384)


def test_distilbert_without_local_weights_is_random_with_a_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="miles"):
        model, tokenizer, hidden = build_text_encoder("distilbert-base-uncased")
    assert type(model).__name__ == "DistilBertModel" and hidden == 768
    assert model.config.vocab_size == 30522 and tokenizer.vocab_size == 30522
    assert "RANDOMLY INITIALISED" in caplog.text and "distilbert-base-uncased" in caplog.text


def test_bad_text_model_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.text_model"):
        build_text_encoder("no-such-architecture-xyz")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_text_encoder(str(tmp_path))


def test_folder_without_weights_builds_its_config_randomly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config + tokenizer folder (the offline GPU bundle) gives the architecture, freshly initialised."""
    import shutil

    src = shipped_minilm_dir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        shutil.copy(src / name, tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="miles"):
        model, tokenizer, hidden = build_text_encoder(str(tmp_path))
    assert hidden == 384 and type(model).__name__ == "BertModel" and tokenizer.is_fast
    assert "RANDOMLY INITIALISED" in caplog.text and str(tmp_path) in caplog.text
    pretrained, _, _ = build_text_encoder("minilm")
    weights = dict(pretrained.named_parameters())
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("query.weight"))
    assert param.shape == weights[name].shape and not torch.equal(param, weights[name])
