"""Run configuration: YAML presets, `key=value` overrides, validation before any work starts.

The schema is a tree of dataclasses so that an unknown key is an error rather than a silently ignored
typo, and every value is checked once, up front, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_dali.demo import DEMO_KINDS
from data_dali.loaders import DATA_BACKENDS
from data_dali.shards import is_shard_dir
from miles.targets import ENCODER_TARGETS, TARGETS
from miles_kernels.ops import MASK_TYPES

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
    demo_kind: str = "pretrain"  # the demo set generate_demo writes: pretrain | downstream | relational
    demo_train: int = 1200
    demo_val: int = 200
    # Frame shards of the generated demo, prepared once beside it (root/shards) with `miles prepare`, so
    # the demo trains and evaluates on DALI's fast path; ignored with data.backend=reference.
    demo_shards: bool = False
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
    temporal_attention: bool = True  # false: MCQ's VideoFormer (spatial attention only, no temporal_embed)
    attention: str = "auto"  # auto (xformers on CUDA where it loads, else sdpa) | xformers | sdpa | reference
    text_model: str = (
        "distilbert-base-uncased"  # a local HF folder, "minilm" (shipped demo model) or an arch name
    )
    projection_dim: int = 256
    video_weights: str = ""  # optional checkpoint for the video encoder (timm ViT or MILES/Frozen keys)
    init_checkpoint: str = ""  # the whole model from a file: ours, released MILES/Frozen/MCQ, safetensors
    allow_partial_init: bool = False  # init_checkpoint may lack towers (they stay random; the log says so)
    grad_checkpointing: bool = False  # recompute each block in backward (video, text): less memory
    freeze_text_embeddings: bool = False  # keep the text tower's embeddings as loaded (not trained)


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
    ema_schedule: str = "constant"  # constant | cosine (ema_momentum at step 0 to 1.0 at train.max_steps)
    copy_every: int = 1000  # steps between snapshot copies when snapshot=copy
    snapshot_precision: str = "auto"  # the snapshot's no-grad pass: auto (as train.precision) | fp32 | bf16
    target: str = "snapshot"  # what MVM reconstructs: snapshot | frozen | pixel | hog (miles/targets.py)
    mask_type: str = "block_tube"  # block_tube | random_tube | block_frame | random_frame (bert mode only)


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
    tensorboard: bool = True  # also log every scalar to <out>/tensorboard (when the package is installed)
    compile: bool = False  # torch.compile the encoders (in place: checkpoint keys unchanged)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (the last two: to check the wiring)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: stop (error) | skip (drop that update)
    max_nonfinite_skips: int = 5  # with nonfinite=skip: this many non-finite steps in a row stop the run
    eval_every: int = 0  # evaluate data.val_manifest every N steps and at the end; 0 = not during training
    best_metric: str = "t2v_R1+t2v_R5+t2v_R10"  # what picks checkpoints/best.pt: metric names joined by '+'
    early_stop_patience: int = 0  # stop after this many evaluations without a better best_metric; 0 = never
    crash_at_step: int = 0  # testing aid: signal this process right after that step (0 = never)
    crash_signal: str = "KILL"  # testing aid: KILL | TERM | USR1 | INT, sent by crash_at_step
    crash_rank: int = 0  # testing aid: the rank that signals itself


@dataclass
class EvalConfig:
    batch_size: int = 32
    prompt: str = "a video of {}"  # zero-shot prompt template
    before_training: bool = True  # also evaluate the untrained model (the demo's side-by-side table)
    protocol: str = "ours"  # ours | released (the released MILES test script: see miles/evaluate.py)
    num_clips: int = 1  # test clips per video (evenly spaced in every segment), embeddings averaged
    dual_softmax: bool = False  # also report dual-softmax (DSL) re-scored retrieval, in its own column
    dsl_temperature: float = 100.0  # inverse temperature of the DSL prior


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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where (1-based line and column) and what, plus the usual cause of a tab."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    hint = "; indent YAML with spaces, not tabs" if "\\t" in problem or "tab" in problem else ""
    return f"{where}YAML syntax error: {problem}{hint}"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: {_yaml_problem(err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _preset_layers(preset: str, inheriting: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A preset's YAML after those it names with `inherit: NAME` (a variant states only what it changes)."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{preset}'; available: {', '.join(available_presets())}")
    if preset in inheriting:
        raise ConfigError(
            f"preset {path}: 'inherit' goes round in a circle: {' -> '.join((*inheriting, preset))}"
        )
    data = load_yaml(path)
    parent = data.pop("inherit", None)
    if parent is None:
        return [data]
    if not isinstance(parent, str):
        raise ConfigError(f"preset {path}: 'inherit' must name a preset, got {parent!r}")
    return [*_preset_layers(parent, (*inheriting, preset)), data]


def build_config(
    preset: str = "demo", config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Preset, then the config file, then command-line overrides; validated at the end."""
    cfg = Config()
    for layer in _preset_layers(preset):
        _merge(cfg, layer)
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


# The allowed interval of every numeric key, in interval notation; `test_every_numeric_key_has_a_range`
# keeps this table complete. Relations between keys (divisibility, equal sizes) are checked in `validate`.
RANGES: dict[str, str] = {
    "data.demo_train": "[2, inf)",
    "data.demo_val": "[1, inf)",
    "data.num_frames": "[1, inf)",
    "data.size": "[1, inf)",
    "data.hflip": "[0, 1]",
    "data.max_text_length": "[3, 512]",  # [CLS], a word piece, [SEP]; 512 = BERT-family position table
    "data.num_workers": "[0, inf)",
    "model.img_size": "[1, inf)",
    "model.patch_size": "[1, inf)",
    "model.embed_dim": "[1, inf)",
    "model.depth": "[1, inf)",
    "model.num_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)",
    "model.num_frames": "[1, inf)",
    "model.drop_path": "[0, 1)",
    "model.projection_dim": "[1, inf)",
    "mvm.mask_ratio": "[0, 1)",
    "mvm.block_min_area": "[1, inf)",
    "mvm.weight": "[0, inf)",
    "mvm.predictor_dim": "[1, inf)",
    "mvm.predictor_depth": "[1, inf)",
    "mvm.predictor_heads": "[1, inf)",
    "mvm.ema_momentum": "[0, 1]",
    "mvm.copy_every": "[1, inf)",
    "train.batch_size": "[2, inf)",  # contrastive negatives
    "train.grad_accum": "[1, inf)",
    "train.max_steps": "[1, inf)",
    "train.lr": "(0, inf)",
    "train.text_lr": "[0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.min_lr_ratio": "[0, 1]",
    "train.grad_clip": "(0, inf)",  # the max gradient norm
    "train.temperature": "(0, inf)",
    "train.seed": "[0, inf)",  # numpy's SeedSequence takes no negative seed
    "train.log_every": "[1, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.keep_checkpoints": "[1, inf)",
    "train.max_nonfinite_skips": "[1, inf)",
    "train.threads": "[0, inf)",  # 0 = torch's default
    "train.eval_every": "[0, inf)",  # 0 = no evaluation during training
    "train.early_stop_patience": "[0, inf)",  # 0 = no early stopping
    "train.crash_at_step": "[0, inf)",
    "train.crash_rank": "[0, inf)",
    "eval.batch_size": "[1, inf)",
    "eval.num_clips": "[1, 16]",
    "eval.dsl_temperature": "(0, inf)",
}

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on CUDA, fp32 on a CPU (miles.precision.resolve_precision)
CHOICES: dict[str, tuple[str, ...]] = {
    "data.backend": DATA_BACKENDS,
    "data.demo_kind": DEMO_KINDS,
    "model.time_init": ("zeros", "random"),
    "model.attention": ("auto", "xformers", "sdpa", "reference"),
    "mvm.mode": ("bert", "drop"),
    "mvm.kernels": ("auto", "reference", "triton"),
    "mvm.contrastive_input": ("full", "masked"),
    "mvm.loss": ("mse", "smooth_l1"),
    "mvm.snapshot": ("ema", "copy"),
    "mvm.ema_schedule": ("constant", "cosine"),  # miles.snapshot.MOMENTUM_SCHEDULES
    "mvm.target": TARGETS,
    "mvm.mask_type": tuple(MASK_TYPES),
    "train.precision": PRECISIONS,
    "mvm.snapshot_precision": PRECISIONS,
    "train.nonfinite": ("stop", "skip"),
    "train.crash_signal": ("KILL", "TERM", "USR1", "INT"),
    "eval.protocol": ("ours", "released"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
}


# What `train.best_metric` may sum: a name per number of `miles.evaluate.evaluate`'s result (its groups and
# keys joined by '_', as in TensorBoard) -> where it sits in that result. Ranks are better low, the rest high.
BEST_METRICS: dict[str, tuple[str, ...]] = {
    f"{prefix}{side}_{key}": (*path, side, key)
    for prefix, path in (("", ()), ("dsl_", ("dsl",)))
    for side in ("t2v", "v2t")
    for key in ("R1", "R5", "R10", "MedR", "MeanR")
} | {f"zeroshot_{key}": ("zeroshot", key) for key in ("top1", "top5")}


def best_metric_terms(text: str) -> tuple[list[str], bool]:
    """`train.best_metric` as (metric names, higher is better); refused naming the key and the known names."""
    by_lower = {name.lower(): name for name in BEST_METRICS}
    terms = [part.strip() for part in text.split("+")]
    unknown = [t for t in terms if t.lower() not in by_lower]
    _require(
        not unknown,
        "train.best_metric",
        f"unknown metric {unknown[0]!r} in {text!r}; give names joined by '+' from: {', '.join(BEST_METRICS)}"
        if unknown
        else "",
    )
    names = [by_lower[t.lower()] for t in terms]
    lower = {name.endswith(("MedR", "MeanR")) for name in names}
    _require(
        len(lower) == 1,
        "train.best_metric",
        f"{text!r} adds ranks (better low) to recalls or accuracies (better high); sum one kind only",
    )
    return names, not lower.pop()


def _in_interval(value: float, interval: str) -> bool:
    lo_text, hi_text = (part.strip() for part in interval[1:-1].split(","))
    lo, hi = float(lo_text), float(hi_text)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config, *, check_files: bool = False) -> None:
    """Refuse impossible values before any work starts (and before anything on disk changes)."""
    for key, interval in RANGES.items():
        value = _value(cfg, key)
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")
        _require(_in_interval(value, interval), key, f"must be in {interval}, got {value}")
    for key, allowed in CHOICES.items():
        value = _value(cfg, key)
        options = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" or '{allowed[-1]}'"
        _require(value in allowed, key, f"must be {options}, got '{value}'")
    d, m, v = cfg.data, cfg.model, cfg.mvm
    _require(
        d.num_frames <= m.num_frames,
        "data.num_frames",
        f"{d.num_frames} frames exceed the model's temporal embedding ({m.num_frames}); "
        "raise model.num_frames or lower data.num_frames",
    )
    _require(d.size == m.img_size, "data.size", f"({d.size}) must equal model.img_size ({m.img_size})")
    _require(
        m.img_size % m.patch_size == 0,
        "model.patch_size",
        f"{m.patch_size} must divide model.img_size {m.img_size}",
    )
    _require(
        m.embed_dim % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} must divide model.embed_dim {m.embed_dim}",
    )
    _require(
        v.predictor_dim % v.predictor_heads == 0,
        "mvm.predictor_heads",
        f"{v.predictor_heads} must divide mvm.predictor_dim {v.predictor_dim}",
    )
    patches = (m.img_size // m.patch_size) ** 2
    _require(
        not v.enabled or round(v.mask_ratio * patches) >= 1,
        "mvm.mask_ratio",
        f"{v.mask_ratio} hides no patch of the {patches}-patch grid while mvm.enabled=true; "
        "raise it or set mvm.enabled=false",
    )
    _require(
        v.mode == "bert" or not MASK_TYPES[v.mask_type][1],
        "mvm.mask_type",
        f"'{v.mask_type}' hides different positions in each frame, which only mvm.mode=bert can take: "
        "drop mode keeps the same visible positions in every frame so that spatial attention runs over K "
        "tokens per frame and temporal attention over each visible position; use a *_tube mask type or "
        "mvm.mode=bert",
    )
    _require(
        v.target != "hog" or m.patch_size % 2 == 0,
        "mvm.target",
        f"'hog' splits every patch into 2 x 2 HOG cells: model.patch_size must be even, got {m.patch_size}",
    )
    _require(
        v.ema_schedule == "constant" or v.snapshot == "ema",
        "mvm.ema_schedule",
        f"'{v.ema_schedule}' schedules the EMA momentum, but mvm.snapshot='{v.snapshot}' copies the encoder "
        "every mvm.copy_every steps; use mvm.snapshot=ema or mvm.ema_schedule=constant",
    )
    moving = v.target == "snapshot"
    updates = (("snapshot", v.snapshot, "ema"), ("ema_schedule", v.ema_schedule, "constant"))
    for key, value, default in updates:
        _require(
            moving or value == default,
            f"mvm.{key}",
            f"'{value}' updates a snapshot encoder, but mvm.target='{v.target}' "
            + ("never updates it" if v.target in ENCODER_TARGETS else "uses none")
            + f"; set mvm.target=snapshot or leave mvm.{key}={default}",
        )
    _require("{}" in cfg.eval.prompt, "eval.prompt", "must contain '{}' where the class name goes")
    t = cfg.train
    names, _ = best_metric_terms(t.best_metric)
    for name in names:
        _require(
            not name.startswith("zeroshot_") or bool(d.classes),
            "train.best_metric",
            f"{name} needs zero-shot evaluation, which data.classes='' turns off; give a class list",
        )
        _require(
            not name.startswith("dsl_") or cfg.eval.dual_softmax,
            "train.best_metric",
            f"{name} is a dual-softmax number: set eval.dual_softmax=true",
        )
    _require(
        t.early_stop_patience == 0 or t.eval_every > 0,
        "train.early_stop_patience",
        f"{t.early_stop_patience} counts evaluations, and train.eval_every=0 makes none: set "
        "train.eval_every",
    )
    if check_files:
        check_data_files(cfg)


def check_data_files(cfg: Config) -> None:
    """Manifests must exist unless the demo generator will create them; a folder must hold shards."""
    d = cfg.data
    for key in ("train_manifest", "val_manifest"):
        path = Path(getattr(d, key))
        if path.is_dir() and not is_shard_dir(path):
            raise ConfigError(
                f"config key 'data.{key}': {path} is a folder without a frame-shard index (index.jsonl); "
                "give a CSV/TSV/JSONL manifest file, or a folder written by `miles prepare`"
            )
        if not path.is_file() and not is_shard_dir(path) and not d.generate_demo:
            raise ConfigError(
                f"config key 'data.{key}': manifest {path} does not exist; give an existing CSV/JSONL "
                "manifest, a frame-shard folder from `miles prepare`, or set data.generate_demo=true to "
                "create the demo set there"
            )


def config_differences(saved: Any, cfg: Config, sections: tuple[str, ...] = ("model", "mvm")) -> list[str]:
    """`key was A in the checkpoint, is B now` for each differing key of `sections` (what shapes a model)."""
    if not isinstance(saved, dict):
        return []
    now = cfg.to_dict()
    out = []
    for section in sections:
        before = saved.get(section)
        if not isinstance(before, dict):
            continue
        for key, value in now[section].items():
            if key in before and before[key] != value:
                out.append(f"{section}.{key} was {before[key]!r} in the checkpoint, is {value!r} now")
    return out
