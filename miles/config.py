"""Run configuration: YAML presets, `key=value` overrides, validation before any work starts.

The schema is a tree of dataclasses so that an unknown key is an error rather than a silently ignored
typo, and every value is checked once, up front, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_dali.loaders import DATA_BACKENDS
from data_dali.shards import is_shard_dir

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration the run refuses; the message names the key and the fix."""


@dataclass
class DataConfig:
    root: str = "data/demo"  # where the demo data is generated when the manifests are missing
    train_manifest: str = "data/demo/train.csv"
    val_manifest: str = "data/demo/val.csv"
    classes: str = "data/demo/classes.txt"  # zero-shot class names; "" disables zero-shot
    generate_demo: bool = True  # create the procedural demo set at `root` if the manifests are missing
    demo_train: int = 1200
    demo_val: int = 200
    video_column: str = "video"
    caption_column: str = "caption"
    label_column: str = "label"
    num_frames: int = 4
    size: int = 224
    hflip: float = 0.5
    max_text_length: int = 32
    num_workers: int = 2
    backend: str = "auto"  # auto (DALI where it can decode the data here) | dali | reference (PyAV)


@dataclass
class ModelConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_frames: int = 4
    drop_path: float = 0.0
    time_init: str = "zeros"  # "zeros": temporal attention starts as a no-op (the released default)
    attention: str = "auto"  # auto (xformers on CUDA where it loads, else sdpa) | xformers | sdpa | reference
    text_model: str = (
        "distilbert-base-uncased"  # a local HF folder, "minilm" (shipped demo model) or an arch name
    )
    projection_dim: int = 256
    video_weights: str = ""  # optional checkpoint for the video encoder (timm ViT or MILES/Frozen keys)


@dataclass
class MVMConfig:
    enabled: bool = True
    mode: str = "bert"  # bert: mask token, full grid through the encoder | drop: visible tubes only
    kernels: str = (
        "auto"  # tube_mask / drop_tokens / restore_tokens implementation: auto | reference | triton
    )
    mask_ratio: float = 0.5
    block_min_area: int = 4
    contrastive_input: str = "full"  # full: contrastive on an unmasked pass | masked: reuse the MVM pass
    weight: float = 1.0
    loss: str = "mse"  # mse | smooth_l1
    normalize_target: bool = True
    predictor_dim: int = 384
    predictor_depth: int = 2
    predictor_heads: int = 6
    snapshot: str = "ema"  # ema | copy
    ema_momentum: float = 0.999
    copy_every: int = 1000  # steps between snapshot copies when snapshot=copy


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    text_lr: float = 3e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 0.05
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    threads: int = 0  # torch CPU threads; 0 = torch's default
    crash_at_step: int = 0  # testing aid: SIGKILL this process right after that step (0 = never)


@dataclass
class EvalConfig:
    batch_size: int = 32
    prompt: str = "a video of {}"  # zero-shot prompt template
    before_training: bool = True  # also evaluate the untrained model (the demo's side-by-side table)


@dataclass
class Config:
    preset: str = "base"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mvm: MVMConfig = field(default_factory=MVMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check a YAML value against the schema type; ints are accepted where floats are expected."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if typ in (int, float, str):
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {value!r}")
        return value
    if isinstance(typ, types.UnionType):
        raise ConfigError(f"config key '{key}' has an unsupported type {typ}")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = _field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it a mapping, not {value!r}")
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3); the value is parsed as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot parse value: {err}") from err
    if value is None:
        value = ""
    return key.split("."), value


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def build_config(
    preset: str = "demo", config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Preset, then the config file, then command-line overrides; validated at the end."""
    preset_path = PRESET_DIR / f"{preset}.yaml"
    if not preset_path.is_file():
        raise ConfigError(f"unknown preset '{preset}'; available: {', '.join(available_presets())}")
    cfg = Config()
    _merge(cfg, load_yaml(preset_path))
    cfg.preset = preset
    if config_file:
        _merge(cfg, load_yaml(Path(config_file)))
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: Config, *, check_files: bool = False) -> None:
    """Refuse impossible values before any work starts."""
    d, m, v, t = cfg.data, cfg.model, cfg.mvm, cfg.train
    _require(d.num_frames >= 1, "data.num_frames", f"must be at least 1, got {d.num_frames}")
    _require(m.num_frames >= 1, "model.num_frames", f"must be at least 1, got {m.num_frames}")
    _require(
        d.num_frames <= m.num_frames,
        "data.num_frames",
        f"{d.num_frames} frames exceed the model's temporal embedding ({m.num_frames}); "
        "raise model.num_frames or lower data.num_frames",
    )
    _require(d.size == m.img_size, "data.size", f"({d.size}) must equal model.img_size ({m.img_size})")
    _require(
        m.patch_size >= 1 and m.img_size % m.patch_size == 0,
        "model.patch_size",
        f"{m.patch_size} must divide model.img_size {m.img_size}",
    )
    _require(
        m.embed_dim % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} must divide model.embed_dim {m.embed_dim}",
    )
    _require(m.depth >= 1, "model.depth", "must be at least 1")
    _require(m.time_init in ("zeros", "random"), "model.time_init", "must be 'zeros' or 'random'")
    _require(
        m.attention in ("auto", "xformers", "sdpa", "reference"),
        "model.attention",
        f"must be 'auto', 'xformers', 'sdpa' or 'reference', got '{m.attention}'",
    )
    _require(0.0 <= d.hflip <= 1.0, "data.hflip", f"is a probability, got {d.hflip}")
    _require(
        d.backend in DATA_BACKENDS,
        "data.backend",
        f"must be one of {', '.join(DATA_BACKENDS)}, got '{d.backend}'",
    )
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(0.0 <= v.mask_ratio < 1.0, "mvm.mask_ratio", f"must be in [0, 1), got {v.mask_ratio}")
    _require(v.mode in ("bert", "drop"), "mvm.mode", f"must be 'bert' or 'drop', got '{v.mode}'")
    _require(
        v.kernels in ("auto", "reference", "triton"),
        "mvm.kernels",
        f"must be 'auto', 'reference' or 'triton', got '{v.kernels}'",
    )
    _require(
        v.contrastive_input in ("full", "masked"),
        "mvm.contrastive_input",
        f"must be 'full' or 'masked', got '{v.contrastive_input}'",
    )
    _require(v.loss in ("mse", "smooth_l1"), "mvm.loss", f"must be 'mse' or 'smooth_l1', got '{v.loss}'")
    _require(v.snapshot in ("ema", "copy"), "mvm.snapshot", f"must be 'ema' or 'copy', got '{v.snapshot}'")
    _require(0.0 <= v.ema_momentum <= 1.0, "mvm.ema_momentum", f"must be in [0, 1], got {v.ema_momentum}")
    _require(v.copy_every >= 1, "mvm.copy_every", "must be at least 1")
    _require(v.weight >= 0, "mvm.weight", "must be >= 0")
    _require(
        v.predictor_dim % v.predictor_heads == 0,
        "mvm.predictor_heads",
        f"{v.predictor_heads} must divide mvm.predictor_dim {v.predictor_dim}",
    )
    _require(v.predictor_depth >= 1, "mvm.predictor_depth", "must be at least 1")
    _require(v.block_min_area >= 1, "mvm.block_min_area", "must be at least 1")
    _require(t.batch_size >= 2, "train.batch_size", "must be at least 2 (contrastive negatives)")
    _require(t.grad_clip > 0, "train.grad_clip", f"must be > 0 (the max gradient norm), got {t.grad_clip}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(t.threads >= 0, "train.threads", f"must be >= 0 (0 = torch's default), got {t.threads}")
    _require(t.crash_at_step >= 0, "train.crash_at_step", "must be >= 0")
    patches = (m.img_size // max(1, m.patch_size)) ** 2
    _require(
        not v.enabled or round(v.mask_ratio * patches) >= 1,
        "mvm.mask_ratio",
        f"{v.mask_ratio} hides no patch of the {patches}-patch grid while mvm.enabled=true; "
        "raise it or set mvm.enabled=false",
    )
    _require(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    _require(t.max_steps >= 1, "train.max_steps", "must be at least 1")
    _require(t.lr > 0 and t.text_lr >= 0, "train.lr", "learning rates must be positive")
    _require(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _require(t.temperature > 0, "train.temperature", "must be > 0")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1")
    _require(t.log_every >= 1, "train.log_every", "must be at least 1")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
    _require("{}" in cfg.eval.prompt, "eval.prompt", "must contain '{}' where the class name goes")
    if check_files:
        check_data_files(cfg)


def check_data_files(cfg: Config) -> None:
    """Manifests must exist unless the demo generator will create them."""
    d = cfg.data
    for key in ("train_manifest", "val_manifest"):
        path = Path(getattr(d, key))
        if not path.is_file() and not is_shard_dir(path) and not d.generate_demo:
            raise ConfigError(
                f"config key 'data.{key}': manifest {path} does not exist; give an existing CSV/JSONL "
                "manifest, a frame-shard folder from `miles prepare`, or set data.generate_demo=true to "
                "create the demo set there"
            )
