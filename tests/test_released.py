"""Released MILES / Frozen-in-Time / MCQ checkpoints load whole and evaluate as the same weights in ours.

The files are written here in each released layout (keys as the released code saves them, random
weights, a DistilBERT text tower built from a small config), so no download is needed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DistilBertConfig

from miles.checkpoint import CheckpointError
from miles.cli import main
from miles.config import build_config
from miles.model import MilesModel
from miles.released import infer_model_overrides, load_whole, read_checkpoint_file

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _distilbert_folder(root: Path, minilm_dir: Path, dim: int) -> Path:
    """A config-only DistilBERT folder with the uncased BERT vocabulary distilbert-base-uncased uses."""
    folder = root / f"distilbert-{dim}"
    folder.mkdir()
    DistilBertConfig(dim=dim, n_layers=2, n_heads=2, hidden_dim=2 * dim).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory, minilm_dir: Path, smoke_data: Path) -> dict:
    root = tmp_path_factory.mktemp("released")
    text = _distilbert_folder(root, minilm_dir, 32)
    torch.manual_seed(7)
    cfg = build_config("smoke", overrides=[f"model.text_model={text}"])
    model = MilesModel(cfg)
    state = model.state_dict()
    ours = root / "ours.pt"
    torch.save({"config": cfg.to_dict(), "model": state, "step": 6}, ours)
    towers = {k: v for k, v in state.items() if not k.startswith("predictor.")}
    miles_keys = {"module." + k.replace("txt_proj.", "text_proj.", 1): v for k, v in towers.items()}
    files = {
        "miles": {"state_dict": miles_keys, "epoch": 10, "arch": "MILES"},
        "frozen": {"state_dict": {"module." + k: v for k, v in towers.items()}, "epoch": 3},
        "no_prefix": {"state_dict": dict(towers)},
        "bare": dict(towers),
    }
    paths = {"ours": ours}
    for name, content in files.items():
        paths[name] = root / f"{name}.pth"
        torch.save(content, paths[name])
    paths["safetensors"] = root / "released.safetensors"
    save_file({k: v.contiguous() for k, v in miles_keys.items()}, str(paths["safetensors"]))
    return {"root": root, "text": text, "paths": paths, "state": state, "data": smoke_data}


# A released file has no config: the head count cannot be read off the weights, and the smoke run
# evaluates 2 frames at batch 16.
RELEASED_OVERRIDES = ["model.num_heads=2", "data.num_frames=2", "eval.batch_size=16"]


def _eval(released: dict, name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    args = ["eval", "--checkpoint", str(released["paths"][name]), "--data", str(released["data"] / "val.csv")]
    args += ["--classes", str(released["data"] / "classes.txt"), "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_the_video_encoders_shape_is_read_off_its_tensors(released: dict) -> None:
    file = read_checkpoint_file(released["paths"]["miles"])
    assert file.layout == "released MILES" and file.config is None
    assert infer_model_overrides(file.state) == [
        "model.embed_dim=64",
        "model.patch_size=8",
        "model.img_size=32",
        "data.size=32",
        "model.num_frames=4",
        "model.depth=2",
        "model.mlp_ratio=4.0",
        "model.projection_dim=256",
    ]
    assert "txt_proj.1.weight" in file.state and not any(k.startswith("module.") for k in file.state)
    assert read_checkpoint_file(released["paths"]["frozen"]).layout == "released Frozen-in-Time / MCQ"


@pytest.mark.parametrize("name", ["miles", "frozen", "no_prefix", "bare", "safetensors"])
def test_released_layouts_evaluate_like_the_same_weights_in_ours(released: dict, name: str, tmp_path: Path):
    ours = _eval(released, "ours", tmp_path)
    theirs = _eval(released, name, tmp_path, "--text-model", str(released["text"]), *RELEASED_OVERRIDES)
    assert theirs["t2v"] == ours["t2v"] and theirs["v2t"] == ours["v2t"]
    assert theirs["zeroshot"] == ours["zeroshot"]
    assert theirs["checkpoint_layout"].startswith("released") and ours["checkpoint_layout"] == "miles"


def test_loading_is_strict_and_a_partial_load_says_what_is_random(
    released: dict, tmp_path: Path, caplog
) -> None:
    state = torch.load(released["paths"]["miles"], weights_only=True)["state_dict"]
    video_only = tmp_path / "video_only.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if ".video_model." in k}}, video_only)
    base = [f"model.text_model={released['text']}", "model.num_heads=2"]
    cfg = build_config("smoke", overrides=[*base, f"model.init_checkpoint={video_only}"])
    with pytest.raises(CheckpointError) as err:
        MilesModel(cfg)
    assert f"checkpoint {video_only} (released Frozen-in-Time / MCQ) is not a whole model" in str(err.value)
    assert "(text_model, txt_proj, vid_proj; e.g. text_model." in str(err.value)
    assert "model.allow_partial_init=true" in str(err.value)
    with caplog.at_level(logging.INFO, logger="miles"):
        model = MilesModel(
            build_config(
                "smoke",
                overrides=[*base, f"model.init_checkpoint={video_only}", "model.allow_partial_init=true"],
            )
        )
    assert "RANDOM (initialisation kept): predictor, text_model, txt_proj, vid_proj" in caplog.text
    assert "this is NOT the checkpoint's model" in caplog.text
    key = "video_model.blocks.1.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], released["state"][key])

    extra = tmp_path / "extra.pth"
    torch.save({"state_dict": {**state, "module.head.weight": torch.zeros(3)}}, extra)
    with pytest.raises(CheckpointError, match=r"1 tensors of the file unused \(e.g. head.weight\)"):
        MilesModel(build_config("smoke", overrides=[*base, f"model.init_checkpoint={extra}"]))


def test_a_pretraining_checkpoint_initialises_a_model_without_mvm(released: dict) -> None:
    """Our checkpoint holds the MVM predictor; a contrastive-only model (mvm.enabled=false) has none, so
    those tensors go unused, said why, and every other tensor still loads strictly."""
    overrides = [f"model.text_model={released['text']}", "mvm.enabled=false"]
    model = MilesModel(build_config("smoke", overrides=overrides))
    assert model.predictor is None
    report = load_whole(model, read_checkpoint_file(released["paths"]["ours"]))
    predictor = {k for k in released["state"] if k.startswith("predictor.")}
    assert predictor and set(report.unexpected) == predictor and not report.missing
    assert all("this model has none (mvm.enabled=false)" in why for why in report.unexpected.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, released["state"][key]), key
    with_mvm = MilesModel(build_config("smoke", overrides=overrides[:1]))  # has a predictor: all of it loads
    assert not load_whole(with_mvm, read_checkpoint_file(released["paths"]["ours"])).unexpected


def test_a_text_tower_of_another_size_names_the_key_and_both_shapes(
    released: dict, minilm_dir: Path, tmp_path: Path
) -> None:
    wide = _distilbert_folder(tmp_path, minilm_dir, 48)
    path = released["paths"]["miles"]
    with pytest.raises(CheckpointError) as err:
        MilesModel(
            build_config("smoke", overrides=[f"model.text_model={wide}", f"model.init_checkpoint={path}"])
        )
    assert (
        "text_model.embeddings.word_embeddings.weight: (30522, 32) in the file, (30522, 48) in the model"
        in str(err.value)
    )


def test_init_checkpoint_starts_the_whole_model_from_a_released_file(released: dict) -> None:
    path = released["paths"]["miles"]
    cfg = build_config(
        "smoke", overrides=[f"model.text_model={released['text']}", f"model.init_checkpoint={path}"]
    )
    state = MilesModel(cfg).state_dict()
    for key, value in released["state"].items():
        if not key.startswith("predictor."):
            assert torch.equal(state[key], value), key


def test_convert_writes_safetensors_in_our_layout_and_round_trips(released: dict, tmp_path: Path) -> None:
    out = tmp_path / "miles.safetensors"
    args = ["convert", str(released["paths"]["miles"]), str(out), "--text-model", str(released["text"])]
    assert main([*args, *RELEASED_OVERRIDES]) == 0
    tensors = load_file(str(out))
    towers = {k for k in released["state"] if not k.startswith("predictor.")}
    assert {k for k in tensors if not k.startswith("predictor.")} == towers  # our key layout
    assert any(k.startswith("predictor.") for k in tensors)  # the whole model (the base preset's predictor)
    for key, value in released["state"].items():
        if not key.startswith("predictor."):
            assert torch.equal(tensors[key], value), key
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["layout"] == "released MILES" and sidecar["config"]["model"]["num_heads"] == 2
    released["paths"]["converted"] = out
    converted = _eval(released, "converted", tmp_path)  # config from the JSON: no overrides needed
    assert converted["t2v"] == _eval(released, "ours", tmp_path)["t2v"]
    assert converted["checkpoint_layout"] == "miles (safetensors)"


def test_the_released_protocol_is_selectable_and_recorded(released: dict, tmp_path: Path) -> None:
    ours = _eval(released, "ours", tmp_path)
    theirs = _eval(released, "ours", tmp_path, "eval.protocol=released")
    assert ours["protocol"] == {
        "name": "ours",
        "max_text_length": 32,
        "t2v_ties": "optimistic",
        "v2t_ties": "optimistic",
        "test_frames": "the middle frame of each of F equal segments",
    }
    assert theirs["protocol"]["name"] == "released" and theirs["protocol"]["v2t_ties"] == "average"
    assert theirs["protocol"]["max_text_length"] == 512  # DistilBERT's position table: no 32-token cut


@pytest.mark.slow
def test_evaluation_sharded_over_two_ranks_gives_the_single_process_numbers(
    released: dict, tmp_path: Path
) -> None:
    """Each rank embeds its share of the videos and captions; the gathered whole is ranked once."""
    import os
    import subprocess
    import sys

    single = _eval(released, "ours", tmp_path)
    out = tmp_path / "two_ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "miles"]
    cmd += [
        "eval",
        "--checkpoint",
        str(released["paths"]["ours"]),
        "--data",
        str(released["data"] / "val.csv"),
    ]
    cmd += ["--classes", str(released["data"] / "classes.txt"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["num_videos"] == single["num_videos"] == 12  # the padded repeat counted once
    for side in ("t2v", "v2t", "zeroshot"):
        assert sharded[side] == pytest.approx(single[side]), side


def test_several_test_clips_average_their_embeddings_and_dsl_gets_its_own_numbers(
    released: dict, tmp_path: Path
) -> None:
    import torch.nn.functional as F

    from data_dali.manifest import read_manifest
    from miles.evaluate import EvalSet, embed_clips, embed_videos

    cfg = build_config("smoke", overrides=[f"model.text_model={released['text']}", "eval.num_clips=2"])
    model = MilesModel(cfg).eval()
    videos = EvalSet.from_entries(read_manifest(released["data"] / "val.csv")).videos
    cpu = torch.device("cpu")
    with torch.no_grad():
        first, kept, _ = embed_videos(model, videos, cfg, cpu, False, "reference", (0, 2))
        second, _, _ = embed_videos(model, videos, cfg, cpu, False, "reference", (1, 2))
        both, kept_both, _ = embed_clips(model, videos, cfg, cpu, False, "reference")
    assert kept_both == kept == list(range(12))
    assert not torch.allclose(first, second)  # the two clips see other frames
    assert torch.allclose(both, F.normalize(first + second, dim=-1), atol=1e-6)
    result = _eval(released, "ours", tmp_path, "eval.num_clips=2", "eval.dual_softmax=true")
    assert result["num_clips"] == 2 and result["dsl"]["temperature"] == 100.0
    assert set(result["dsl"]["t2v"]) == {"R1", "R5", "R10", "MedR", "MeanR"}
