"""Released MILES / Frozen-in-Time / MCQ checkpoints load whole and evaluate as the same weights in ours.

The files are built by `released_files` from recorded facts about the releases (every key under
`module.` with its shape, the official trainer's entries with its pickled `parse_config.ConfigParser`, an
AdamW state, tensors saved from a GPU), at reduced widths; the text tower is a config-only DistilBERT
folder with the uncased BERT vocabulary. No download is needed, and nothing is taken from our model.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import pytest
import torch
from released_files import FACTS, SCALED, _config_parser_class, _importable, write_release_file
from safetensors.torch import load_file, save_file
from transformers import DistilBertConfig

from miles import checkpoint as ckpt
from miles.checkpoint import CheckpointError, ReleasedRunArgs, ReleasedRunConfig
from miles.cli import main
from miles.config import build_config
from miles.model import MilesModel
from miles.released import infer_model_overrides, load_whole, read_checkpoint_file

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _distilbert_folder(root: Path, minilm_dir: Path, dim: int, layers: int = 2, **settings) -> Path:
    """A config-only DistilBERT folder with the uncased BERT vocabulary distilbert-base-uncased uses."""
    folder = root / f"distilbert-{dim}"
    folder.mkdir()
    settings = {"n_heads": 2, "hidden_dim": 4 * dim, **settings}
    DistilBertConfig(dim=dim, n_layers=layers, **settings).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, folder / name)
    return folder


# The released video tower's shape at the fixtures' widths (224 px, patch 16, 4 frames, as released), for
# building our model by hand; `miles eval` reads it off the file's tensors instead.
SHAPE = [
    f"model.embed_dim={SCALED['video_dim']}",
    f"model.depth={SCALED['video_blocks']}",
    "model.num_heads=2",
    "model.img_size=224",
    "model.patch_size=16",
    "model.num_frames=4",
    "data.size=224",
    "data.num_frames=4",
]


def by_hand(release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a user would write: strip DataParallel's `module.`, and MILES' `text_proj` is our `txt_proj`."""
    out = {}
    for key, value in release_state.items():
        name = key.removeprefix("module.")
        out["txt_proj." + name[len("text_proj.") :] if name.startswith("text_proj.") else name] = value
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory, minilm_dir: Path, smoke_data: Path) -> dict:
    root = tmp_path_factory.mktemp("released")
    text = _distilbert_folder(root, minilm_dir, SCALED["text_dim"], SCALED["text_layers"])
    paths = {name: root / file for name, file in (("miles", "MILES.pth"), ("frozen", "frozen.pth.tar"))}
    release_state = write_release_file(paths["miles"], "miles", seed=7)
    write_release_file(paths["frozen"], "frozen", seed=7)  # the same weights under Frozen's names
    paths["mcq"] = root / "MCQ.pth"
    write_release_file(paths["mcq"], "mcq", seed=7)
    # The same weights in our own checkpoint format, loaded by hand (not through miles.released).
    torch.manual_seed(0)
    cfg = build_config("smoke", overrides=[f"model.text_model={text}", *SHAPE])
    model = MilesModel(cfg)
    result = model.load_state_dict(by_hand(release_state), strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"predictor", "video_model"}
    assert [k for k in result.missing_keys if k.startswith("video_model.")] == ["video_model.mask_token"]
    state = model.state_dict()
    paths["ours"] = root / "ours.pt"
    torch.save({"config": cfg.to_dict(), "model": state, "step": 6}, paths["ours"])
    towers = by_hand(release_state)
    for name, content in (("no_prefix", {"state_dict": dict(towers)}), ("bare", dict(towers))):
        paths[name] = root / f"{name}.pth"
        torch.save(content, paths[name])
    paths["safetensors"] = root / "released.safetensors"
    save_file({k: v.contiguous() for k, v in release_state.items()}, str(paths["safetensors"]))
    return {"root": root, "text": text, "paths": paths, "state": state, "data": smoke_data}


# A released file has no config of ours: the head count cannot be read off the weights.
RELEASED_OVERRIDES = ["model.num_heads=2", "data.num_frames=4", "eval.batch_size=16"]


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
        "model.patch_size=16",
        "model.img_size=224",
        "data.size=224",
        "model.num_frames=4",
        "model.depth=2",
        "model.mlp_ratio=4.0",
        "model.projection_dim=256",
    ]
    assert "txt_proj.1.weight" in file.state and not any(k.startswith("module.") for k in file.state)
    assert read_checkpoint_file(released["paths"]["frozen"]).layout == "released Frozen-in-Time"


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
    state = ckpt.load(released["paths"]["miles"])["state_dict"]
    video_only = tmp_path / "video_only.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if ".video_model." in k}}, video_only)
    base = [f"model.text_model={released['text']}", *SHAPE]
    cfg = build_config("smoke", overrides=[*base, f"model.init_checkpoint={video_only}"])
    with pytest.raises(CheckpointError) as err:
        MilesModel(cfg)
    assert f"checkpoint {video_only} (released Frozen-in-Time) is not a whole model" in str(err.value)
    assert "(text_model, txt_proj, vid_proj; e.g. text_model." in str(err.value)
    assert "model.allow_partial_init=true" in str(err.value)
    with caplog.at_level(logging.INFO, logger="miles"):
        model = MilesModel(
            build_config(
                "smoke",
                overrides=[*base, f"model.init_checkpoint={video_only}", "model.allow_partial_init=true"],
            )
        )
    assert (
        "RANDOM (initialisation kept): text_model, txt_proj, vid_proj; "
        "pre-training only, initialised: predictor, video_model.mask_token" in caplog.text
    )
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
    overrides = [f"model.text_model={released['text']}", *SHAPE, "mvm.enabled=false"]
    model = MilesModel(build_config("smoke", overrides=overrides))
    assert model.predictor is None
    report = load_whole(model, read_checkpoint_file(released["paths"]["ours"]))
    predictor = {k for k in released["state"] if k.startswith("predictor.")}
    assert predictor and set(report.unexpected) == predictor and not report.missing
    assert all("this model has none (mvm.enabled=false)" in why for why in report.unexpected.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, released["state"][key]), key
    with_mvm = MilesModel(build_config("smoke", overrides=overrides[:-1]))  # has a predictor: all of it loads
    assert not load_whole(with_mvm, read_checkpoint_file(released["paths"]["ours"])).unexpected


def test_a_text_tower_of_another_size_names_the_key_and_both_shapes(
    released: dict, minilm_dir: Path, tmp_path: Path
) -> None:
    wide = _distilbert_folder(tmp_path, minilm_dir, 48)
    path = released["paths"]["miles"]
    with pytest.raises(CheckpointError) as err:
        MilesModel(
            build_config(
                "smoke", overrides=[f"model.text_model={wide}", *SHAPE, f"model.init_checkpoint={path}"]
            )
        )
    assert (
        "text_model.embeddings.word_embeddings.weight: (30522, 32) in the file, (30522, 48) in the model"
        in str(err.value)
    )


def test_init_checkpoint_starts_the_whole_model_from_a_released_file(released: dict) -> None:
    path = released["paths"]["miles"]
    cfg = build_config(
        "smoke", overrides=[f"model.text_model={released['text']}", *SHAPE, f"model.init_checkpoint={path}"]
    )
    state = MilesModel(cfg).state_dict()
    for key, value in released["state"].items():
        if not key.startswith(("predictor.", "video_model.mask_token")):
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
        if not key.startswith(("predictor.", "video_model.mask_token")):
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

    cfg = build_config(
        "smoke", overrides=[f"model.text_model={released['text']}", *SHAPE, "eval.num_clips=2"]
    )
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


@pytest.mark.parametrize("layout", ["miles", "frozen"])
def test_a_released_file_reads_as_data_with_its_trainer_entries(released: dict, layout: str) -> None:
    """The pickled ConfigParser (and the distributed trainer's argparse Namespace) come back as records."""
    data = ckpt.load(released["paths"][layout])
    assert list(data) == FACTS["trainer_entries"]
    assert data["arch"] == ("DataParallel" if layout == "frozen" else "DistributedDataParallel")
    config = data["config"]
    assert isinstance(config, ReleasedRunConfig)
    facts = FACTS["config_parser"]
    order = (
        facts["dist_variant"]["attribute_insertion_order_fresh_run"]
        if layout == "miles"
        else facts["attribute_insertion_order_fresh_run"]
    )
    assert list(config.fields) == order
    assert isinstance(config.fields["_config"], OrderedDict)
    assert config.fields["_config"]["arch"]["args"]["video_params"]["num_frames"] == 4
    assert config.fields["_save_dir"] == PurePosixPath("/data/exps/models/MSRVTT/0315_101502")
    assert config.fields["log_levels"] == {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
    assert isinstance(config.fields.get("args"), ReleasedRunArgs) == (layout == "miles")
    group = data["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["correct_bias"] is True
    assert len(data["optimizer"]["state"]) == len(data["state_dict"])
    assert data["state_dict"]["module.video_model.cls_token"].device == torch.device("cpu")  # saved on cuda:0
    if layout == "miles":
        assert math.isinf(data["monitor_best"])


def _disguised(path: Path, build) -> Path:
    """A file whose `config` entry is pickled under the allowed name `parse_config.ConfigParser`, but
    built by `build(cls)` (a __reduce__ of the crafter's choosing)."""
    cls = _config_parser_class("parse_config")

    class Crafted:
        def __reduce__(self):
            return build(cls)

    with _importable("parse_config", cls):
        torch.save({"state_dict": {"module.w": torch.zeros(1)}, "config": Crafted()}, path)
    return path


class _Touch:
    """Unpickling this creates `marker` (what a hostile file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_disguised_config_parser_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = {
        # called with arguments, as a REDUCE of the allowed name (the real class would make folders)
        "called": lambda cls: (cls, (str(marker),)),
        # an allowed name whose state holds a callable that would run
        "state": lambda cls: (cls, (), {"_save_dir": _Touch(marker)}),
        # an allowed name whose state is not an attribute dict
        "odd_state": lambda cls: (cls, (), ("not", "a dict")),
    }
    for name, build in crafted.items():
        path = _disguised(tmp_path / f"{name}.pth", build)
        with pytest.raises(CheckpointError) as err:
            ckpt.load(path)
        assert not marker.exists(), name
        message = str(err.value)
        assert str(path) in message, name
        if name == "state":
            assert "pathlib.Path" in message and "builtins.getattr" in message  # names what it asked for
        elif name == "called":
            assert "not called" in message
        else:
            assert "not an attribute dict" in message
    assert "parse_config" not in sys.modules  # the crafting left no importable module behind


def test_a_released_mcq_file_evaluates_like_the_same_weights_in_ours(released: dict, tmp_path: Path) -> None:
    """MCQ.pth: its VideoFormer is our encoder without temporal attention (read off the missing
    temporal_embed), its final norm is `norm1`, and its BridgeFormer goes unused, with the reason."""
    file = read_checkpoint_file(released["paths"]["mcq"])
    assert file.layout == "released MCQ"
    assert "model.temporal_attention=false" in infer_model_overrides(file.state)
    release_state = ckpt.load(released["paths"]["mcq"])["state_dict"]
    shape = [*(o for o in SHAPE if o != "model.num_frames=4"), "model.temporal_attention=false"]
    cfg = build_config("smoke", overrides=[f"model.text_model={released['text']}", *shape])
    model = MilesModel(cfg)
    bridge = ("crossattn", "bridgeattn", "bridge_mlp", "norm4", "norm5", "norm6", "norm7")
    hand = {
        k.replace("video_model.norm1.", "video_model.norm.") if k.startswith("video_model.norm1.") else k: v
        for k, v in by_hand(release_state).items()
        if not k.startswith(("bridge_proj.", "video_model.norm2."))
        and not any(f".{part}." in k for part in bridge)
    }
    result = model.load_state_dict(hand, strict=False)
    assert not result.unexpected_keys
    assert not any(k.startswith("video_model.blocks") for k in result.missing_keys)
    ours = tmp_path / "ours_mcq.pt"
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "step": 0}, ours)
    released["paths"]["ours_mcq"] = ours
    theirs = _eval(released, "mcq", tmp_path, "--text-model", str(released["text"]), *RELEASED_OVERRIDES)
    mine = _eval(released, "ours_mcq", tmp_path)
    assert theirs["t2v"] == mine["t2v"] and theirs["v2t"] == mine["v2t"]
    assert theirs["checkpoint_layout"] == "released MCQ"
    unused = load_whole(MilesModel(cfg), file).unexpected
    per_block = [k for k in FACTS["layouts"]["mcq"]["per_video_block"] if any(f".{p}." in k for p in bridge)]
    assert len(unused) == 4 + SCALED["video_blocks"] * len(per_block)  # + bridge_proj and norm2
    assert all("MCQ's BridgeFormer" in why for why in unused.values())


def test_released_miles_at_full_size_loads_whole_with_one_line_for_pretraining_parts(
    tmp_path: Path, minilm_dir: Path, caplog
) -> None:
    """MILES.pth at the release's real shapes (ViT-B/16, 224 px, 4 frames, DistilBERT-base, 256-d): every
    tensor loads into the `base` model; the mask token and the predictor are reported, in one line."""
    path = tmp_path / "MILES.pth"
    release_state = write_release_file(path, "miles", scaled=False)
    settings = dict(FACTS["distilbert_config"])  # distilbert-base-uncased as the release used it
    del settings["position_ids_buffer_in_state_dict"]
    dim, layers = settings.pop("dim"), settings.pop("n_layers")
    text = _distilbert_folder(tmp_path, minilm_dir, dim, layers, **settings)
    cfg = build_config("base", overrides=[f"model.text_model={text}", f"model.init_checkpoint={path}"])
    with caplog.at_level(logging.INFO, logger="miles"):
        model = MilesModel(cfg)
    lines = [r.getMessage() for r in caplog.records if "weights from" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith(
        "327 tensors loaded; no part left random; pre-training only, initialised: predictor, "
        "video_model.mask_token"
    )
    state = model.state_dict()
    for key, value in by_hand(release_state).items():
        assert torch.equal(state[key], value), key


def test_video_weights_take_the_video_tower_of_a_released_file(released: dict) -> None:
    """`model.video_weights` reads the same file through the same loader (config record and all)."""
    path = released["paths"]["miles"]
    overrides = [f"model.text_model={released['text']}", *SHAPE, f"model.video_weights={path}"]
    state = MilesModel(build_config("smoke", overrides=overrides)).state_dict()
    for key, value in released["state"].items():
        if key.startswith("video_model.") and key != "video_model.mask_token":
            assert torch.equal(state[key], value), key


def _msrvtt_download(root: Path, clips: Path) -> Path:
    """MSR-VTT as its download unpacks (`annotation/MSR_VTT.json` with each video's captions interleaved,
    the JSFusion split lists and 1k-A caption choice under `high-quality/structured-symlinks/`, the videos
    in `videos/all/`), with 12 demo clips as videos 0-11: 8 train, 4 in the 1k-A test."""
    from data_dali.manifest import read_manifest

    entries = read_manifest(clips / "train.csv")[:12]
    annotations = [
        {"image_id": f"video{v}", "caption": caption, "id": 2 * v + c}
        for c, variant in enumerate(("{}", "there is {}"))
        for v, entry in enumerate(entries)
        for caption in [variant.format(entry.caption)]
    ]
    (root / "annotation").mkdir(parents=True)
    (root / "annotation" / "MSR_VTT.json").write_text(json.dumps({"annotations": annotations, "images": []}))
    lists = root / "high-quality" / "structured-symlinks"
    lists.mkdir(parents=True)
    (lists / "train_list_jsfusion.txt").write_text("".join(f"video{v}\n" for v in range(8)))
    (lists / "val_list_jsfusion.txt").write_text("".join(f"video{v}\n" for v in range(8, 12)))
    choice = {f"video{v}": v % 2 for v in range(8, 12)}
    (lists / "jsfusion_val_caption_idx.pkl").write_bytes(pickle.dumps(choice, protocol=2))
    (root / "videos" / "all").mkdir(parents=True)
    for v, entry in enumerate(entries):
        shutil.copy(entry.video, root / "videos" / "all" / f"video{v}{Path(entry.video).suffix}")
    return root


@pytest.mark.slow
def test_the_first_hour_msrvtt_eval_and_finetune_from_miles_pth(released: dict, tmp_path: Path) -> None:
    """docs/released-models.md's first hour on MILES.pth: `miles data msrvtt`, `miles eval ...
    eval.protocol=released` (the same numbers as the same weights loaded by hand), and `miles finetune
    --init MILES.pth`, stopped by a signal and resumed to the uninterrupted run's losses."""
    from miles.finetune import finetune_config, run_finetuning
    from miles.stop import StopRequested

    download = _msrvtt_download(tmp_path / "MSRVTT", released["data"])
    manifests = tmp_path / "msrvtt"
    assert main(["data", "msrvtt", str(download), str(manifests)]) == 0
    test_csv, train_csv = manifests / "test.csv", manifests / "train.csv"
    assert len(test_csv.read_text().splitlines()) == 1 + 4  # 1k-A test: one caption per video
    assert len(train_csv.read_text().splitlines()) == 1 + 16  # train: every caption

    heads = ["model.num_heads=2"]  # the fixture's reduced width; ViT-B/16's 12 is the default
    outs = {name: tmp_path / f"{name}.json" for name in ("released", "by_hand")}
    common = ["--data", str(test_csv), "eval.protocol=released", *heads]
    miles_pth = released["paths"]["miles"]
    args = ["eval", "--checkpoint", str(miles_pth), "--text-model", str(released["text"]), *common]
    assert main([*args, "--out", str(outs["released"])]) == 0
    by_hand_args = ["eval", "--checkpoint", str(released["paths"]["ours"]), *common]
    assert main([*by_hand_args, "--out", str(outs["by_hand"])]) == 0
    got, want = (json.loads(p.read_text()) for p in outs.values())
    assert got["protocol"]["name"] == "released" and got["num_videos"] == 4
    assert got["t2v"] == want["t2v"] and got["v2t"] == want["v2t"]

    data = {"train": train_csv, "val": test_csv, "text_model": str(released["text"])}
    overrides = [
        *heads,
        "data.num_frames=4",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "eval.before_training=false",
        "train.threads=1",
    ]
    threads = torch.get_num_threads()

    def config(*extra: str):
        return finetune_config(miles_pth, "finetune_smoke", None, [*overrides, *extra], **data)

    whole, cut = tmp_path / "finetune_whole", tmp_path / "finetune_cut"
    try:
        run_finetuning(config(), whole)
        with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2 of 4"):
            run_finetuning(config("train.crash_at_step=2", "train.crash_signal=TERM"), cut)
        run_finetuning(config(), cut, resume=True)
    finally:
        torch.set_num_threads(threads)

    def losses(run: Path) -> list[tuple[int, float]]:
        lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines if "loss" in r]

    assert [s for s, _ in losses(whole)] == [1, 2, 3, 4]
    assert losses(cut) == losses(whole)
