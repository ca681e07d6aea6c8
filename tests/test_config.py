"""Configuration: presets, overrides, and refusal of bad values before any work starts."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from miles.cli import main
from miles.config import RANGES, Config, ConfigError, available_presets, build_config


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


def test_an_inheriting_preset_is_its_parent_with_its_own_keys(tmp_path, monkeypatch) -> None:
    demo, relational = build_config("demo").to_dict(), build_config("demo_relational").to_dict()
    sections = [name for name, value in demo.items() if isinstance(value, dict)]
    changed = {(name, k) for name in sections for k in demo[name] if demo[name][k] != relational[name][k]}
    assert changed == {
        ("data", k) for k in ("root", "train_manifest", "val_manifest", "classes", "demo_kind")
    }
    assert relational["data"]["demo_kind"] == "relational" and relational["preset"] == "demo_relational"
    import miles.config

    monkeypatch.setattr(miles.config, "PRESET_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("inherit: b\ntrain:\n  max_steps: 3\n")
    (tmp_path / "b.yaml").write_text("inherit: a\n")
    with pytest.raises(ConfigError, match="goes round in a circle: a -> b -> a"):
        build_config("a")
    (tmp_path / "b.yaml").write_text("inherit: [demo]\n")
    with pytest.raises(ConfigError, match="'inherit' must name a preset"):
        build_config("a")


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


def test_every_numeric_key_has_a_range() -> None:
    """A new numeric key cannot skip the range check: the table must name it."""
    cfg = Config()
    numeric = []
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(node):
            continue
        for f in dataclasses.fields(node):
            if typing.get_type_hints(type(node))[f.name] in (int, float):
                numeric.append(f"{section.name}.{f.name}")
    assert sorted(numeric) == sorted(RANGES)


@pytest.mark.parametrize(
    "override,interval",
    [
        ("model.mlp_ratio=-1", "(0, inf)"),
        ("model.embed_dim=0", "[1, inf)"),
        ("model.drop_path=5", "[0, 1)"),
        ("mvm.predictor_dim=0", "[1, inf)"),
        ("data.max_text_length=0", "[3, 512]"),
        ("model.projection_dim=0", "[1, inf)"),
        ("train.seed=-1", "[0, inf)"),
        ("train.max_nonfinite_skips=0", "[1, inf)"),
    ],
)
def test_impossible_numbers_are_refused_with_the_allowed_range(override: str, interval: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides=[override])
    typed = float(value) if key == "model.mlp_ratio" or key == "model.drop_path" else int(value)
    assert str(err.value) == f"config key '{key}': must be in {interval}, got {typed}"


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_learning_rate_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr.*finite number"):
        build_config("smoke", overrides=[f"train.lr={value}"])


def test_choices_name_the_key_and_the_options() -> None:
    with pytest.raises(ConfigError, match=r"train\.nonfinite': must be 'stop' or 'skip', got 'ignore'"):
        build_config("smoke", overrides=["train.nonfinite=ignore"])


def test_refusal_leaves_an_earlier_run_in_place(tmp_path, capsys) -> None:
    """A value torch would reject is refused before the earlier run in --out is moved aside."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    code = main(["pretrain", "--preset", "smoke", "--out", str(out), "model.mlp_ratio=-1"])
    assert code == 2 and "model.mlp_ratio" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize(
    "text,where",
    [
        ("train:\n  max_steps: 3\n  lr: [1e-3\n", "line 4 column 1"),
        ("train:\n\tmax_steps: 3\n", "line 2 column 1"),
        ("train:\n  max_steps: 3\n mvm: {}\n", "line 3 column 2"),
    ],
)
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, capsys, text: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "run"), "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    first = err.splitlines()[0]
    assert first.startswith(f"miles: error: config file {path}: {where}: YAML syntax error")
    assert "Traceback" not in err
    if "\t" in text:
        assert "not tabs" in first
    assert not (tmp_path / "run").exists()


def test_a_manifest_key_naming_a_plain_folder_is_refused(tmp_path) -> None:
    from miles.config import check_data_files

    folder = tmp_path / "clips"
    folder.mkdir()
    cfg = build_config("smoke", overrides=[f"data.train_manifest={folder}", "data.generate_demo=true"])
    with pytest.raises(ConfigError) as err:
        check_data_files(cfg)
    assert str(err.value) == (
        f"config key 'data.train_manifest': {folder} is a folder without a frame-shard index (index.jsonl); "
        "give a CSV/TSV/JSONL manifest file, or a folder written by `miles prepare`"
    )
