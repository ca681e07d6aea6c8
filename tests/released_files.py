"""Checkpoint files shaped as the released MILES, Frozen-in-Time and MCQ files really are.

Everything here comes from `tests/data/released_checkpoints.json`, facts written down from the official
code (TencentARC/MCQ `MILES/`, m-bain/frozen-in-time): every state-dict key under `module.` with its
shape, and the official trainer's entries (`arch`, `epoch`, `state_dict`, `optimizer`, `monitor_best`,
`config`), where `config` is the run's `parse_config.ConfigParser` object, pickled with its `__dict__`
(PosixPath fields, an OrderedDict config, a dict of log levels). Nothing is taken from this project's
model. The weights are random; `scaled=True` keeps every key and shrinks the widths and depths (see
`_scale`) so that the files stay small enough for end-to-end runs on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PosixPath

import torch

FACTS = json.loads((Path(__file__).parent / "data" / "released_checkpoints.json").read_text())
LAYOUTS = tuple(FACTS["layouts"])  # miles, frozen, mcq

# The scaled fixtures: ViT width 768 -> 64, 12 blocks -> 2, DistilBERT 768 / 6 layers -> 32 / 2 (heads are
# not in the weights). The vocabulary (30522, the uncased BERT tokenizer's) and the 256-d projections stay.
SCALED = {"video_dim": 64, "video_blocks": 2, "text_dim": 32, "text_layers": 2}


def _scale(key: str, shape: list[int]) -> list[int]:
    """A recorded shape with the model widths replaced by the scaled ones (multiples stay multiples)."""
    if key.startswith(("module.text_model.", "module.text_proj.", "module.txt_proj.")):
        d = SCALED["text_dim"]
        table = {768: d, 3072: 4 * d}
    else:
        d = SCALED["video_dim"]
        table = {768: d, 2304: 3 * d, 1536: 2 * d, 3072: 4 * d}
    return [table.get(n, n) for n in shape]


def release_shapes(layout: str, *, scaled: bool = False) -> dict[str, list[int]]:
    """Every key of the released file's `state_dict` (with `module.`) -> its shape, in the saved order."""
    facts = FACTS["layouts"][layout]
    blocks = SCALED["video_blocks"] if scaled else facts["num_video_blocks"]
    layers = SCALED["text_layers"] if scaled else facts["num_text_layers"]
    shapes: dict[str, list[int]] = {}
    for key, shape in facts["non_repeated"].items():
        if key.startswith("module.text_model."):
            shapes[key] = shape
    for i in range(layers):
        for key, shape in facts["per_text_layer"].items():
            shapes[key.format(i=i)] = shape
    for key, shape in facts["non_repeated"].items():
        if key.startswith("module.video_model.") and ".norm" not in key:
            shapes[key] = shape
    for i in range(blocks):
        for key, shape in facts["per_video_block"].items():
            shapes[key.format(i=i)] = shape
    for key, shape in facts["non_repeated"].items():
        if key not in shapes:
            shapes[key] = shape
    assert scaled or len(shapes) == facts["num_keys"], (layout, len(shapes), facts["num_keys"])
    return {k: _scale(k, s) for k, s in shapes.items()} if scaled else shapes


def release_state_dict(layout: str, *, scaled: bool = False, seed: int = 0) -> OrderedDict:
    """Random weights in the released layout: LayerNorm weights near 1, the rest small, as trained ones."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in release_shapes(layout, scaled=scaled).items():
        value = torch.randn(shape, generator=gen) * 0.02
        if ("norm" in key.lower()) and key.endswith(".weight"):
            value += 1.0
        state[key] = value
    return state


# --- the official trainer's `config` entry ------------------------------------------------------------


def _config_parser_class(module: str) -> type:
    """A class named `<module>.ConfigParser`, as the release's trainer pickles it (an instance __dict__)."""
    cls = types.new_class("ConfigParser")
    cls.__module__ = module
    cls.__qualname__ = "ConfigParser"
    return cls


@contextlib.contextmanager
def _importable(module: str, cls: type) -> Iterator[None]:
    """pickle checks that a class can be found under its name: provide the module while saving only."""
    mod = types.ModuleType(module)
    mod.ConfigParser = cls
    previous = sys.modules.get(module)
    sys.modules[module] = mod
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[module]
        else:
            sys.modules[module] = previous


def release_config_parser(layout: str, save_root: str = "/data/exps") -> object:
    """The pickled run config: MILES and MCQ were trained with `parse_config_dist_multi.ConfigParser`
    (an `args` Namespace first), Frozen-in-Time with `parse_config.ConfigParser`."""
    facts = FACTS["config_parser"]
    dist = layout in ("miles", "mcq")
    module = facts["dist_variant"]["module"] if dist else facts["module"]
    parser = _config_parser_class(module)()
    config = json.loads(json.dumps(FACTS["release_config"]["json"]), object_pairs_hook=OrderedDict)
    name, stamp = config.get("name", "run"), "0315_101502"
    if dist:
        parser.args = argparse.Namespace(
            config="configs/pretrain.json",
            resume=None,
            device=None,
            observe=False,
            launcher="pytorch",
            local_rank=0,
            master_address="127.0.0.1",
            master_port=29500,
            world_size=8,
            rank=0,
            lr=None,
            bs=None,
        )
    parser.cfg_fname = PosixPath("configs/pretrain.json")
    parser.resume = None
    parser._config = config
    parser._save_dir = PosixPath(save_root) / "models" / name / stamp
    parser._web_log_dir = PosixPath(save_root) / "web" / name / stamp
    parser._log_dir = PosixPath(save_root) / "log" / name / stamp
    parser.log_levels = {int(k): v for k, v in facts["log_levels"].items()}
    return parser


def release_optimizer_state(state_dict: dict[str, torch.Tensor], *, moments: bool, seed: int = 1) -> dict:
    """`transformers.AdamW(...).state_dict()` after some steps: one param group with `correct_bias`.

    `moments=False` leaves `state` empty (an optimizer before its first step) to keep a full-size file
    small; the scaled fixtures hold every moment."""
    facts = FACTS["optimizer"]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    if moments:
        for i, value in enumerate(state_dict.values()):
            state[i] = {
                "step": 4210,
                "exp_avg": torch.randn(value.shape, generator=gen) * 1e-4,
                "exp_avg_sq": torch.rand(value.shape, generator=gen) * 1e-8,
            }
    group = {
        "lr": 3e-05,
        "betas": tuple(facts["defaults"]["betas"]),
        "eps": facts["defaults"]["eps"],
        "weight_decay": facts["defaults"]["weight_decay"],
        "correct_bias": facts["defaults"]["correct_bias"],
        "params": list(range(len(state_dict))),
    }
    return {"state": state, "param_groups": [group]}


@contextlib.contextmanager
def _saved_from_gpu() -> Iterator[None]:
    """The official trainer saved CUDA tensors: record storage location 'cuda:0', as those files do."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def write_release_file(path: Path, layout: str, *, scaled: bool = True, seed: int = 0) -> dict:
    """A checkpoint file as the official trainer writes it; returns its `state_dict` (for comparisons)."""
    state = release_state_dict(layout, scaled=scaled, seed=seed)
    parser = release_config_parser(layout)
    checkpoint = {
        "arch": "DataParallel" if layout == "frozen" else "DistributedDataParallel",
        "epoch": 10,
        "state_dict": state,
        "optimizer": release_optimizer_state(state, moments=scaled),
        "monitor_best": math.inf if layout != "frozen" else 0.4182,
        "config": parser,
    }
    assert list(checkpoint) == FACTS["trainer_entries"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _importable(type(parser).__module__, type(parser)), _saved_from_gpu():
        torch.save(checkpoint, path)
    return state
