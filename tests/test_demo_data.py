"""The procedural demo dataset: deterministic, reusable, and its captions describe its pixels."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_dali import demo
from data_dali.demo import COLOURS, MOTIONS, write_demo_dataset

SMALL = {"n_train": 24, "n_val": 10, "seed": 0, "frames": 16, "size": 112, "fps": 8}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _colour_word(caption: str) -> str:
    words = [w for w in caption.split() if w in COLOURS]
    assert len(words) == 1, caption
    return words[0]


def _shape_mask(frame: np.ndarray) -> np.ndarray:
    """The shape is the only bright thing: background stays below ~45 in every channel."""
    return frame.max(axis=-1) > 100


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL)


def test_layout_and_manifests(small_demo: dict[str, Path]) -> None:
    root = small_demo["train"].parent
    assert small_demo["classes"].read_text().splitlines() == list(MOTIONS)
    train, val = _rows(small_demo["train"]), _rows(small_demo["val"])
    assert len(train) == SMALL["n_train"]
    assert len(val) == 2 * SMALL["n_val"]
    assert list(train[0]) == ["video", "caption", "label"]
    for row in train + val:
        assert row["label"] in MOTIONS
        assert not Path(row["video"]).is_absolute()
        assert (root / row["video"]).is_file()
    assert len({r["video"] for r in train}) == SMALL["n_train"]
    assert all(r["video"].startswith("videos/train/") for r in train)
    assert all(r["video"].startswith("videos/val/") for r in val)


def test_clips_are_h264_with_expected_geometry(small_demo: dict[str, Path]) -> None:
    root = small_demo["train"].parent
    path = root / _rows(small_demo["train"])[0]["video"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (SMALL["size"], SMALL["size"])
        assert stream.frames == SMALL["frames"]
        keyframes = [p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None]
    assert len(keyframes) >= 2, "a small GOP keeps seeking cheap"


def test_val_has_two_distinct_captions_per_clip(small_demo: dict[str, Path]) -> None:
    by_video: dict[str, list[dict[str, str]]] = {}
    for row in _rows(small_demo["val"]):
        by_video.setdefault(row["video"], []).append(row)
    assert len(by_video) == SMALL["n_val"]
    for rows in by_video.values():
        assert len(rows) == 2
        assert rows[0]["caption"] != rows[1]["caption"]
        assert rows[0]["label"] == rows[1]["label"]
        assert _colour_word(rows[0]["caption"]) == _colour_word(rows[1]["caption"])


def test_deterministic_for_seed(tmp_path: Path, small_demo: dict[str, Path]) -> None:
    again = write_demo_dataset(tmp_path / "again", **SMALL)
    for split in ("train", "val"):
        assert small_demo[split].read_text() == again[split].read_text()
    for rel in ("videos/train/00003.mp4", "videos/val/00001.mp4"):
        a = _decode_all(small_demo["train"].parent / rel)
        b = _decode_all(again["train"].parent / rel)
        assert np.array_equal(a, b)
    other = write_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 1, "n_val": 1})
    assert _rows(other["train"]) != _rows(small_demo["train"])


def test_second_call_is_skipped_and_interrupted_call_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {**SMALL, "n_train": 4, "n_val": 2}
    out = write_demo_dataset(tmp_path, workers=1, **params)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    calls: list[str] = []
    real_encode = demo._encode_clip
    monkeypatch.setattr(demo, "_encode_clip", lambda job: calls.append(job[0]) or real_encode(job))
    t0 = time.perf_counter()
    assert write_demo_dataset(tmp_path, workers=1, **params) == out
    assert time.perf_counter() - t0 < 0.5
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before

    # A lost clip (or a manifest that was never renamed into place) means the run did not finish.
    (tmp_path / "videos/train/00002.mp4").unlink()
    write_demo_dataset(tmp_path, workers=1, **params)
    assert len(calls) == 6
    assert (tmp_path / "videos/train/00002.mp4").is_file()

    # Different parameters are regenerated too.
    calls.clear()
    write_demo_dataset(tmp_path, workers=1, **{**params, "n_val": 3})
    assert len(calls) == 7
    assert len(_rows(out["val"])) == 6


def test_shape_colour_matches_caption(small_demo: dict[str, Path]) -> None:
    root = small_demo["val"].parent
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
    rows = _rows(small_demo["val"]) + _rows(small_demo["train"])
    seen = set()
    for row in rows:
        frames = _decode_all(root / row["video"])
        for frame in (frames[0], frames[-1]):
            mask = _shape_mask(frame)
            assert mask.sum() > 30, f"shape not visible in {row['video']}"
            mean = frame[mask].astype(np.float64).mean(axis=0)
            nearest = min(palette, key=lambda n: np.linalg.norm(palette[n] - mean))
            assert nearest == _colour_word(row["caption"]), (row, mean)
        seen.add(_colour_word(row["caption"]))
    assert len(seen) >= 5


def _centroid(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(_shape_mask(frame))
    return float(xs.mean()), float(ys.mean())


def _area(frame: np.ndarray) -> int:
    return int(_shape_mask(frame).sum())


def test_motion_is_visible(small_demo: dict[str, Path]) -> None:
    root = small_demo["train"].parent
    size = SMALL["size"]
    checked = set()
    for row in _rows(small_demo["train"]) + _rows(small_demo["val"]):
        frames = _decode_all(root / row["video"])
        (x0, y0), (x1, y1) = _centroid(frames[0]), _centroid(frames[-1])
        motion = row["label"]
        if motion == "moving left":
            assert x0 - x1 > 0.4 * size and abs(y1 - y0) < 3
        elif motion == "moving right":
            assert x1 - x0 > 0.4 * size and abs(y1 - y0) < 3
        elif motion == "moving up":
            assert y0 - y1 > 0.4 * size and abs(x1 - x0) < 3
        elif motion == "moving down":
            assert y1 - y0 > 0.4 * size and abs(x1 - x0) < 3
        elif motion == "growing":
            assert _area(frames[-1]) > 3 * _area(frames[0])
        elif motion == "shrinking":
            assert _area(frames[0]) > 3 * _area(frames[-1])
        elif motion == "rotating":
            assert "circle" not in row["caption"]
            mid = _shape_mask(frames[len(frames) // 3])
            assert (mid != _shape_mask(frames[0])).sum() > 0.2 * mid.sum()
        checked.add(motion)
    assert {"moving left", "growing", "rotating"} <= checked


def test_rotating_is_never_a_circle() -> None:
    rng = np.random.default_rng(0)
    specs = [demo._sample_spec(rng, 0) for _ in range(400)]
    assert {s.motion for s in specs} == set(MOTIONS)
    assert not any(s.motion == "rotating" and s.shape == "circle" for s in specs)
    assert {s.shape for s in specs if s.motion == "rotating"} == {"square", "triangle", "cross"}


_SHAPE_OF_WORD = {
    word: shape
    for vocabulary in (demo._SHAPE_WORDS, demo._DOWNSTREAM_SHAPE_WORDS)
    for shape, words in vocabulary.items()
    for word in words
}
_MOTION_OF_PHRASE = {
    phrase: motion
    for vocabulary in (demo._MOTION_PHRASES, demo._DOWNSTREAM_MOTION_PHRASES)
    for motion, phrases in vocabulary.items()
    for phrase in phrases
}


def _caption_pattern(template: str) -> re.Pattern[str]:
    """A template as a regex over both splits' vocabulary, capturing the colour, shape and motion words."""
    sizes = "|".join(w for words in demo._SIZE_WORDS.values() for w in words)
    colours = "|".join(COLOURS)
    shapes = "|".join(map(re.escape, _SHAPE_OF_WORD))
    motions = "|".join(map(re.escape, _MOTION_OF_PHRASE))
    noun = f"(?:(?:{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})"
    parts = re.split(r"(\{det\}|\{noun\}|\{motion\})", template)
    pieces = {"{det}": "(?:a|an)", "{noun}": noun, "{motion}": f"(?P<motion>{motions})"}
    return re.compile("".join(pieces.get(p, re.escape(p)) for p in parts))


_PATTERNS = {t: _caption_pattern(t) for t in demo.TEMPLATES + demo.DOWNSTREAM_TEMPLATES}


def _parse(caption: str) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """(the one template that produced `caption`, its (colour, shape) pair, its (shape word, motion
    phrase)), read off the words."""
    found = [(t, m) for t, p in _PATTERNS.items() if (m := p.fullmatch(caption))]
    assert len(found) == 1, (caption, [t for t, _ in found])
    template, match = found[0]
    return template, (match["colour"], _SHAPE_OF_WORD[match["shape"]]), (match["shape"], match["motion"])


@pytest.fixture(scope="module")
def downstream_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("downstream"), kind="downstream", **SMALL)


def test_downstream_split_is_held_out_from_pretraining(
    small_demo: dict[str, Path], downstream_demo: dict[str, Path]
) -> None:
    """No caption phrasing, colour x shape pair, shape word or motion phrase of the downstream split
    occurs in pre-training."""
    pre = [_parse(r["caption"]) for split in ("train", "val") for r in _rows(small_demo[split])]
    down_rows = {split: _rows(downstream_demo[split]) for split in ("train", "val")}
    down = [_parse(r["caption"]) for rows in down_rows.values() for r in rows]
    pre_templates, down_templates = {t for t, _, _ in pre}, {t for t, _, _ in down}
    pre_pairs, down_pairs = {p for _, p, _ in pre}, {p for _, p, _ in down}
    assert len(pre_templates) >= 4 and len(down_templates) >= 4
    assert not pre_templates & down_templates
    assert len(pre_pairs) >= 8 and len(down_pairs) >= 5
    assert not pre_pairs & down_pairs, pre_pairs & down_pairs
    for i in (0, 1):  # shape words, then motion phrases
        pre_words, down_words = {w[i] for _, _, w in pre}, {w[i] for _, _, w in down}
        assert len(down_words) >= 5 and not pre_words & down_words, pre_words & down_words
    for (_, _, (_, phrase)), row in zip(down, down_rows["train"] + down_rows["val"], strict=True):
        assert _MOTION_OF_PHRASE[phrase] == row["label"]  # the new words still say what the clip shows
    # the same layout as the pre-training set: two captions of one clip per val video, motion labels
    assert len(down_rows["train"]) == SMALL["n_train"] and len(down_rows["val"]) == 2 * SMALL["n_val"]
    assert downstream_demo["classes"].read_text().splitlines() == list(MOTIONS)
    assert all(r["label"] in MOTIONS for rows in down_rows.values() for r in rows)
    # and its pixels show the colour its captions name
    root = downstream_demo["train"].parent
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
    for row in down_rows["train"][:8]:
        frame = _decode_all(root / row["video"])[0]
        mean = frame[_shape_mask(frame)].astype(np.float64).mean(axis=0)
        assert min(palette, key=lambda n: np.linalg.norm(palette[n] - mean)) == _colour_word(row["caption"])


def test_sampled_pairs_split_the_colour_shape_grid() -> None:
    """Over many draws pre-training covers every pair but the held-out ones, and downstream only those."""
    rng = np.random.default_rng(0)
    pre = {(s.colour, s.shape) for s in (demo._sample_spec(rng, 0) for _ in range(3000))}
    down = {(s.colour, s.shape) for s in (demo._sample_spec(rng, 0, held_out=True) for _ in range(3000))}
    grid = {(c, s) for c in COLOURS for s in demo.SHAPES}
    assert down == demo.HELD_OUT_PAIRS and len(down) == len(COLOURS)
    assert pre == grid - down
    assert {c for c, _ in down} == set(COLOURS) and {s for _, s in down} == set(demo.SHAPES)


# ------------------------------------------------------------------------------------------- relational
def _colour_centre(frame: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centre of the pixels of exactly that colour (rendered pixels, before encoding)."""
    ys, xs = np.nonzero((frame == np.array(COLOURS[colour], dtype=np.uint8)).all(axis=-1))
    assert len(xs) > 20, colour
    return np.array([xs.mean(), ys.mean()])


_DIRECTION = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
_RELATION_AXIS = {"above": (1, -1), "below": (1, 1), "left of": (0, -1), "right of": (0, 1)}  # (axis, sign)


def test_relational_clips_show_what_their_captions_say() -> None:
    """Two shapes of different colours and shapes; the named relation holds in every frame; only the
    moving shape moves, the way its motion says; the caption names both colours and both shapes."""
    rng = np.random.default_rng(0)
    seen_relations, seen_motions = set(), set()
    for i in range(60):
        spec = demo._sample_relational_spec(rng, i)
        other = spec.companion
        assert other is not None and other.colour != spec.colour and other.shape != spec.shape
        pixels = demo.render_clip(spec, 8, 112)
        mover = np.stack([_colour_centre(f, spec.colour) for f in pixels])
        still = np.stack([_colour_centre(f, other.colour) for f in pixels])
        assert np.abs(still - still[0]).max() < 1e-9  # the other shape never moves
        axis, sign = _RELATION_AXIS[other.relation]
        assert (sign * (mover[:, axis] - still[:, axis]) > 30).all(), (spec, mover, still)  # 0.46 apart
        if spec.motion in _DIRECTION:
            travelled = mover[-1] - mover[0]
            assert travelled @ np.array(_DIRECTION[spec.motion]) > 40, (spec.motion, travelled)
        caption = demo.caption_for(spec, rng)
        assert caption.count(spec.colour) == 1 and caption.count(other.colour) == 1, caption
        nouns = {name: demo._SHAPE_WORDS[name] for name in (spec.shape, other.shape)}
        assert all(any(w in caption for w in words) for words in nouns.values()), caption
        assert any(p in caption for p in demo._RELATION_PHRASES[other.relation]), caption
        assert any(p in caption for p in demo._MOTION_PHRASES[spec.motion]), caption
        seen_relations.add(other.relation)
        seen_motions.add(spec.motion)
    assert seen_relations == set(demo.RELATIONS) and seen_motions == set(MOTIONS)


def test_relational_demo_set_on_disk(tmp_path: Path) -> None:
    """Written as H.264 like the other kinds, labelled by the moving shape's motion; both named colours
    survive encoding."""
    out = write_demo_dataset(tmp_path / "rel", kind="relational", **{**SMALL, "n_train": 8, "n_val": 4})
    rows = _rows(out["train"])
    assert len(rows) == 8 and len(_rows(out["val"])) == 8 and all(r["label"] in MOTIONS for r in rows)
    assert json.loads((tmp_path / "rel" / "demo.json").read_text())["kind"] == "relational"
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
    for row in rows:
        frame = _decode_all(tmp_path / "rel" / row["video"])[0].astype(np.float64)
        named = [w for w in row["caption"].split() if w in COLOURS]
        assert len(named) == 2, row["caption"]
        for colour in named:
            close = np.linalg.norm(frame - palette[colour], axis=-1) < 40
            assert close.sum() > 30, (row["caption"], colour)
