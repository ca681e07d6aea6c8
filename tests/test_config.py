"""Configuration: presets, overrides, and refusal of bad values before any work starts."""

from __future__ import annotations

import pytest

from miles.cli import main
from miles.config import ConfigError, available_presets, build_config


def test_presets_load_and_validate() -> None:
    assert {"base", "demo", "smoke"} <= set(available_presets())
    base = build_config("base")
    assert (base.model.embed_dim, base.model.depth, base.model.img_size, base.model.patch_size) == (
        768,
        12,
        224,
        16,
    )
    assert base.model.num_frames == 4 and base.model.projection_dim == 256
    assert base.train.temperature == 0.05 and base.mvm.ema_momentum == 0.999
    assert (base.mvm.mode, base.mvm.mask_ratio, base.mvm.contrastive_input) == ("drop", 0.75, "masked")
    assert build_config("demo").model.text_model == "minilm"


def test_overrides_keep_types() -> None:
    cfg = build_config(
        "smoke", overrides=["train.max_steps=17", "mvm.mask_ratio=0.6", "mvm.enabled=false", "train.lr=1e-3"]
    )
    assert cfg.train.max_steps == 17 and cfg.mvm.mask_ratio == 0.6 and cfg.mvm.enabled is False
    assert cfg.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override,key",
    [
        ("mvm.mask_ratio=1.2", "mvm.mask_ratio"),
        ("data.num_frames=0", "data.num_frames"),
        ("train.batch_size=1", "train.batch_size"),
        ("model.num_heads=5", "model.num_heads"),
        ("mvm.loss=l3", "mvm.loss"),
        ("train.lr=fast", "train.lr"),
        ("train.max_step=3", "train.max_step"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("data.num_frames=8", "data.num_frames"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("mvm.mask_ratio=0.01", "mvm.mask_ratio"),
        ("mvm.contrastive_input=both", "mvm.contrastive_input"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("smoke", overrides=[override])


def test_unknown_preset_and_malformed_override() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        build_config("smoke", overrides=["train.max_steps"])


def test_config_file_merges_over_preset(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 9\nmvm:\n  weight: 0.5\n")
    cfg = build_config("smoke", path, ["train.max_steps=11"])
    assert cfg.train.max_steps == 11 and cfg.mvm.weight == 0.5


def test_cli_refuses_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["pretrain", "--preset", "smoke", "--out", str(out), "mvm.mask_ratio=1.2"])
    assert code == 2
    assert "mvm.mask_ratio" in capsys.readouterr().err
    assert not out.exists()  # nothing was started
    missing = tmp_path / "missing.csv"
    code = main(
        [
            "pretrain",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "data.generate_demo=false",
            f"data.train_manifest={missing}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "data.train_manifest" in err and str(missing) in err
    assert not out.exists()
