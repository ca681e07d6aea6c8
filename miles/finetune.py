"""`miles finetune`: the dual encoder from a checkpoint (ours or released), trained for retrieval on a
downstream split with the contrastive loss and evaluated on `--val` every `train.eval_every` steps.

It is the pre-training job (`miles.pretrain.run_pretraining`: the same trainer, DDP, exact resume,
preemption, logging) with three differences: the model's shape and weights come from `--init`, the
presets turn MVM off, and the evaluation before training is the init model's zero-shot retrieval, printed
beside the fine-tuned and the best (`checkpoints/best.pt`, chosen by `train.best_metric`) numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from miles.config import Config, ConfigError, build_config
from miles.pretrain import Columns, run_pretraining
from miles.released import CheckpointFile, infer_model_overrides, read_checkpoint_file

log = logging.getLogger("miles")

DEFAULT_PRESET = "finetune_demo"
# The keys of ours that shape the model (and so must be the checkpoint's); the rest are the preset's.
MODEL_SHAPE_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_frames",
    "text_model",
    "projection_dim",
)
# used with mvm.enabled=true; the predictor's head width follows mvm.target (miles.targets.target_dim)
PREDICTOR_SHAPE_KEYS = ("predictor_dim", "predictor_depth", "predictor_heads", "target")
COLUMNS = Columns(job="finetune", before="zero-shot", after="finetuned", before_key="zero_shot")


def shape_overrides(file: CheckpointFile, text_model: str | None = None) -> list[str]:
    """`key=value` overrides that give the model the shape of the `--init` file: ours from its config, a
    released one from its tensors (`miles.released.infer_model_overrides`; the text tower from
    `text_model`)."""
    if file.config is None:
        out = infer_model_overrides(file.state)
    else:
        model, mvm = file.config.get("model"), file.config.get("mvm")
        if not isinstance(model, dict) or not isinstance(mvm, dict):
            raise ConfigError(f"checkpoint {file.path}: its config has no 'model' and 'mvm' sections")
        out = [f"model.{k}={json.dumps(model[k])}" for k in MODEL_SHAPE_KEYS if k in model]
        out += [f"mvm.{k}={json.dumps(mvm[k])}" for k in PREDICTOR_SHAPE_KEYS if k in mvm]
        if "img_size" in model:
            out.append(f"data.size={json.dumps(model['img_size'])}")
    if text_model:
        out.append(f"model.text_model={json.dumps(text_model)}")
    return out


def finetune_config(
    init: Path,
    preset: str = DEFAULT_PRESET,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    train: Path | None = None,
    val: Path | None = None,
    text_model: str | None = None,
) -> Config:
    """The preset, with the model's shape from `init`, the data from `train` / `val` (if given), then the
    config file and `overrides`; checked before any work."""
    if (train is None) != (val is None):
        raise ConfigError("--train and --val go together: give both manifests, or neither for the preset's")
    file = read_checkpoint_file(init)
    data: list[str] = []
    if train is not None and val is not None:
        classes = val.parent / "classes.txt"  # where `miles data` and `miles demo-data` put it
        data = [
            f"data.train_manifest={json.dumps(str(train))}",
            f"data.val_manifest={json.dumps(str(val))}",
            f"data.classes={json.dumps(str(classes) if classes.is_file() else '')}",
            "data.generate_demo=false",
        ]
    start = [f"model.init_checkpoint={json.dumps(str(init))}", "model.video_weights=''"]
    cfg = build_config(
        preset, config_file, [*shape_overrides(file, text_model), *data, *start, *(overrides or [])]
    )
    if cfg.model.init_checkpoint != str(init):
        raise ConfigError(
            f"config key 'model.init_checkpoint' is {cfg.model.init_checkpoint!r}, but --init is {init}; "
            "give the starting checkpoint once, as --init"
        )
    if cfg.model.video_weights:
        raise ConfigError(
            "config key 'model.video_weights': --init gives every weight already; leave video_weights empty"
        )
    if cfg.train.eval_every < 1:
        raise ConfigError(
            "config key 'train.eval_every': miles finetune evaluates --val periodically to keep the best "
            f"checkpoint; give a number of steps >= 1 (got {cfg.train.eval_every})"
        )
    return cfg


def run_finetuning(
    cfg: Config, out_dir: Path, resume: bool = False, allow_data_change: bool = False
) -> dict[str, Any]:
    """The fine-tuning job; returns what it writes to `out_dir/metrics.json` (rank 0): the fine-tuned
    numbers, `zero_shot` (the init model, when `eval.before_training`) and `best` (step, value, metrics)."""
    log.info(
        "fine-tuning %s on %s, evaluating %s every %d steps, best by %s",
        cfg.model.init_checkpoint,
        cfg.data.train_manifest,
        cfg.data.val_manifest,
        cfg.train.eval_every,
        cfg.train.best_metric,
    )
    return run_pretraining(
        cfg,
        out_dir,
        resume,
        allow_data_change,
        columns=COLUMNS,
    )
