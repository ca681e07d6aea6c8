"""Procedural video-text demo dataset: coloured shapes that move, with captions from the same parameters.

The demo exists so that the whole pipeline (decode, train, retrieval eval) runs without downloads on a
CPU-only machine, and so that a working model shows retrieval far above chance: every caption word
(colour, shape, size, motion) is visible in the pixels, and motion is only visible across frames.
The `relational` kind puts a second, still shape in every clip and names both and where the moving one
is: telling its captions apart needs local detail (which colour belongs to which shape, which one moves),
which the one-shape clips never ask for.
Clips are real H.264 files so the same decoders that read WebVid-style data read the demo.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

__all__ = [
    "COLOURS",
    "DEMO_KINDS",
    "DOWNSTREAM_TEMPLATES",
    "HELD_OUT_PAIRS",
    "MOTIONS",
    "RELATIONAL_TEMPLATES",
    "RELATIONS",
    "SHAPES",
    "TEMPLATES",
    "ClipSpec",
    "Companion",
    "caption_for",
    "render_clip",
    "write_demo_dataset",
]

# Well separated in RGB so they survive yuv420p chroma subsampling and a colour test can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 245),
    "yellow": (240, 230, 30),
    "purple": (150, 40, 210),
    "cyan": (30, 225, 235),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MOTIONS: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "rotating",
)
SIZES: tuple[str, ...] = ("small", "large")

# Colour x shape pairs that only the downstream split shows (one per colour, two per shape), so that
# retrieval on it needs the composition of words the pre-training split taught only apart.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)
DEMO_KINDS: tuple[str, ...] = ("pretrain", "downstream", "relational")
# Where a relational clip's moving shape is, relative to its still one (the whole clip long).
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Base half-extent as a fraction of the frame side.
_BASE_RADIUS = {"small": 0.10, "large": 0.17}
_FORMAT_VERSION = 2  # 2: the pre-training split leaves out HELD_OUT_PAIRS; kind=downstream

_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
_MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "moving left": (
        "moves to the left",
        "slides left",
        "travels leftward",
        "drifts to the left",
        "goes left",
    ),
    "moving right": (
        "moves to the right",
        "slides right",
        "travels rightward",
        "drifts to the right",
        "goes right",
    ),
    "moving up": ("moves up", "drifts upward", "rises", "floats up", "slides upward"),
    "moving down": ("moves down", "falls", "drops downward", "sinks", "slides down"),
    "growing": ("grows bigger", "expands", "gets larger", "grows", "swells up"),
    "shrinking": ("shrinks", "gets smaller", "contracts", "shrinks in size", "becomes smaller"),
    "rotating": ("spins around", "rotates", "turns around", "is rotating", "spins"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# The downstream split names shapes and motions in words the pre-training split never uses.
_DOWNSTREAM_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("orb", "round spot"),
    "square": ("tile", "slab"),
    "triangle": ("pyramid", "wedge"),
    "cross": ("plus mark", "crosshair"),
}
_DOWNSTREAM_MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "moving left": ("heads left", "glides leftward"),
    "moving right": ("heads right", "glides rightward"),
    "moving up": ("climbs", "ascends"),
    "moving down": ("descends", "plunges"),
    "growing": ("inflates", "balloons outward"),
    "shrinking": ("deflates", "dwindles"),
    "rotating": ("twirls", "revolves"),
}
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "above": ("above", "over"),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
TEMPLATES: tuple[str, ...] = (
    "{det} {noun} {motion}",
    "the {noun} {motion}",
    "{det} {noun} {motion} on a dark background",
    "video of {det} {noun} that {motion}",
    "here {det} {noun} {motion}",
    "in this clip {det} {noun} {motion}",
)
# The downstream split's captions: phrasings the pre-training split never uses.
DOWNSTREAM_TEMPLATES: tuple[str, ...] = (
    "footage of {det} {noun} that {motion}",
    "watch {det} {noun} as it {motion}",
    "someone filmed {det} {noun} that {motion}",
    "on screen, {det} {noun} {motion}",
    "look: {det} {noun} {motion} in the frame",
)
# Relational captions: {noun} is the moving shape, {other} the still one.
RELATIONAL_TEMPLATES: tuple[str, ...] = (
    "{det} {noun} {relation} {det2} {other} {motion}",
    "the {noun} {relation} the {other} {motion}",
    "{det} {noun} {motion} {relation} {det2} {other}",
    "{det2} {other} stays still while {det} {noun} {relation} it {motion}",
    "video of {det} {noun} {relation} {det2} {other} that {motion}",
)


@dataclass(frozen=True)
class Companion:
    """The still second shape of a `relational` clip (small, unrotated)."""

    shape: str
    colour: str
    cx: float
    cy: float
    relation: str  # where the clip's moving shape is relative to this one: one of RELATIONS


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip's pixels and its captions."""

    motion: str
    shape: str
    colour: str
    size: str
    # Centre at rest, in [0, 1] frame coordinates (translations start from here).
    cx: float
    cy: float
    angle0: float
    noise_seed: int
    companion: Companion | None = None


def _sample_spec(rng: np.random.Generator, noise_seed: int, held_out: bool = False) -> ClipSpec:
    """Motion first, then a shape it is visible on (a rotating circle looks still), then a colour: one of
    the shape's HELD_OUT_PAIRS if `held_out` (the downstream split), else any other."""
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    shapes = [s for s in SHAPES if not (motion == "rotating" and s == "circle")]
    shape = shapes[int(rng.integers(len(shapes)))]
    colours = [c for c in COLOURS if ((c, shape) in HELD_OUT_PAIRS) == held_out]
    colour = colours[int(rng.integers(len(colours)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    jitter = rng.uniform(-0.08, 0.08, size=2)
    if motion == "moving left":
        cx, cy = 0.75 + jitter[0] * 0.3, 0.5 + jitter[1] * 2
    elif motion == "moving right":
        cx, cy = 0.25 + jitter[0] * 0.3, 0.5 + jitter[1] * 2
    elif motion == "moving up":
        cx, cy = 0.5 + jitter[0] * 2, 0.75 + jitter[1] * 0.3
    elif motion == "moving down":
        cx, cy = 0.5 + jitter[0] * 2, 0.25 + jitter[1] * 0.3
    else:
        cx, cy = 0.5 + jitter[0], 0.5 + jitter[1]
    angle0 = float(rng.uniform(-0.3, 0.3))
    return ClipSpec(motion, shape, colour, size, float(cx), float(cy), angle0, noise_seed)


def _sample_relational_spec(rng: np.random.Generator, noise_seed: int) -> ClipSpec:
    """A small moving shape and a small still one of another shape and colour, on opposite sides of the
    frame. The relation's axis is across the motion's (a shape moving left is above or below the other),
    so it holds in every frame."""
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    shapes = [s for s in SHAPES if not (motion == "rotating" and s == "circle")]
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    other_shapes = [s for s in SHAPES if s != shape]
    other_shape = other_shapes[int(rng.integers(len(other_shapes)))]
    other_colours = [c for c in COLOURS if c != colour]
    other_colour = other_colours[int(rng.integers(len(other_colours)))]
    if motion in ("moving left", "moving right"):
        relations = RELATIONS[:2]
    elif motion in ("moving up", "moving down"):
        relations = RELATIONS[2:]
    else:
        relations = RELATIONS
    relation = relations[int(rng.integers(len(relations)))]
    near, far = 0.27, 0.73  # the two shapes' centres on the relation's axis
    start = {"moving left": 0.75, "moving right": 0.25, "moving up": 0.75, "moving down": 0.25}
    along = start.get(motion, 0.5) + float(rng.uniform(-0.04, 0.04))  # the mover, across the relation
    other_along = 0.5 + float(rng.uniform(-0.08, 0.08))
    if relation in ("above", "below"):
        cy, other_cy = (near, far) if relation == "above" else (far, near)
        cx, other_cx = along, other_along
    else:
        cx, other_cx = (near, far) if relation == "left of" else (far, near)
        cy, other_cy = along, other_along
    companion = Companion(other_shape, other_colour, other_cx, other_cy, relation)
    angle0 = float(rng.uniform(-0.3, 0.3))
    return ClipSpec(motion, shape, colour, "small", cx, cy, angle0, noise_seed, companion)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(
    spec: ClipSpec, rng: np.random.Generator, template: int | None = None, downstream: bool = False
) -> str:
    """One paraphrase of the clip; size is mentioned only sometimes, as in real captions. `downstream`:
    in the downstream split's phrasings and shape and motion words, none of which pre-training uses."""
    shape_words = (_DOWNSTREAM_SHAPE_WORDS if downstream else _SHAPE_WORDS)[spec.shape]
    motions = (_DOWNSTREAM_MOTION_PHRASES if downstream else _MOTION_PHRASES)[spec.motion]
    templates = DOWNSTREAM_TEMPLATES if downstream else TEMPLATES
    shape_word = shape_words[int(rng.integers(len(shape_words)))]
    motion = motions[int(rng.integers(len(motions)))]
    if spec.companion is not None:
        return _relational_caption(spec, spec.companion, shape_word, motion, rng, template)
    words = [spec.colour, shape_word]
    if rng.random() < 0.5:
        words.insert(0, _SIZE_WORDS[spec.size][int(rng.integers(len(_SIZE_WORDS[spec.size])))])
    noun = " ".join(words)
    t = int(rng.integers(len(templates))) if template is None else template
    return templates[t].format(det=_article(noun), noun=noun, motion=motion)


def _relational_caption(
    spec: ClipSpec,
    other: Companion,
    shape_word: str,
    motion: str,
    rng: np.random.Generator,
    template: int | None,
) -> str:
    other_words = _SHAPE_WORDS[other.shape]
    noun = f"{spec.colour} {shape_word}"
    other_noun = f"{other.colour} {other_words[int(rng.integers(len(other_words)))]}"
    phrases = _RELATION_PHRASES[other.relation]
    relation = phrases[int(rng.integers(len(phrases)))]
    t = int(rng.integers(len(RELATIONAL_TEMPLATES))) if template is None else template
    return RELATIONAL_TEMPLATES[t].format(
        det=_article(noun),
        noun=noun,
        relation=relation,
        det2=_article(other_noun),
        other=other_noun,
        motion=motion,
    )


def _shape_mask(
    shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, angle: float
) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) with half-extent r (pixels), rotated by angle."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    if shape == "square":
        h = 0.85 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "cross":
        w = 0.32 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if shape == "triangle":
        # Equilateral triangle pointing up (in image coordinates, up is -v), inscribed in radius r.
        # Inside = below the base line and inside both slanted edges.
        base = v <= 0.5 * r
        sqrt3 = np.sqrt(3.0)
        left = sqrt3 * u - v <= r
        right = -sqrt3 * u - v <= r
        return base & left & right
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(spec: ClipSpec, frames: int, size: int) -> np.ndarray:
    """Pixels of one clip, uint8 [frames, size, size, 3]; pure numpy so it is fast and exact."""
    noise_rng = np.random.default_rng(spec.noise_seed)
    tint = noise_rng.integers(8, 28, size=3)
    background = (tint[None, None, :] + noise_rng.integers(0, 14, size=(size, size, 1))).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    r0 = _BASE_RADIUS[spec.size] * size
    travel = 0.5 * size  # translations cross half the frame
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    still = background.copy()
    if spec.companion is not None:
        other = spec.companion
        r_other = _BASE_RADIUS["small"] * size
        inside = _shape_mask(other.shape, xx, yy, other.cx * size, other.cy * size, r_other, 0.0)
        still[inside] = np.array(COLOURS[other.colour], dtype=np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        cx, cy = spec.cx * size, spec.cy * size
        r, angle = r0, spec.angle0
        if spec.motion == "moving left":
            cx -= a * travel
        elif spec.motion == "moving right":
            cx += a * travel
        elif spec.motion == "moving up":
            cy -= a * travel
        elif spec.motion == "moving down":
            cy += a * travel
        elif spec.motion == "growing":
            r = r0 * (0.7 + 0.7 * a)  # x2 over the clip
        elif spec.motion == "shrinking":
            r = r0 * (1.4 - 0.7 * a)
        elif spec.motion == "rotating":
            angle = spec.angle0 + a * np.pi  # half a turn
        out[t] = still
        out[t][_shape_mask(spec.shape, xx, yy, cx, cy, r, angle)] = colour
    return out


def _encode_clip(job: tuple[str, ClipSpec, int, int, int]) -> None:
    """Render and encode one clip to a temporary name, then rename, so a partial file never survives."""
    path_str, spec, frames, size, fps = job
    path = Path(path_str)
    pixels = render_clip(spec, frames, size)
    tmp = path.with_name(path.stem + ".partial.mp4")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        # Small GOP keeps seeking cheap; crf 18 keeps the colours; 1 thread because we parallelise clips.
        stream.options = {"crf": "18", "preset": "veryfast", "g": "8", "keyint_min": "8", "threads": "1"}
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(pixels[t], format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    os.replace(tmp, path)


def _write_csv_atomic(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "label"])
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_complete(out_dir: Path, params: dict, outputs: dict[str, Path]) -> bool:
    """The dataset is reusable only if its parameters match and every file the CSVs name exists."""
    meta = out_dir / "demo.json"
    if not meta.is_file() or not all(p.is_file() for p in outputs.values()):
        return False
    try:
        if json.loads(meta.read_text(encoding="utf-8")) != params:
            return False
    except (OSError, ValueError):
        return False
    for split in ("train", "val"):
        with outputs[split].open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        expected = params[f"n_{split}"] * (2 if split == "val" else 1)
        if len(rows) != expected or not all((out_dir / row.get("video", "")).is_file() for row in rows):
            return False
    return True


def write_demo_dataset(
    out_dir: Path,
    n_train: int = 1200,
    n_val: int = 200,
    seed: int = 0,
    frames: int = 16,
    size: int = 112,
    fps: int = 8,
    workers: int | None = None,
    kind: str = "pretrain",
) -> dict[str, Path]:
    """Write the demo clips and manifests (or reuse them) so training can start from one command.

    `kind`: "pretrain" (any colour x shape pair but HELD_OUT_PAIRS, captions from TEMPLATES),
    "downstream" (a retrieval task the first does not cover: only HELD_OUT_PAIRS, captions from
    DOWNSTREAM_TEMPLATES with shape and motion words of their own; its own random stream) or
    "relational" (two shapes a clip, one still, captions from RELATIONAL_TEMPLATES naming both and where
    the moving one is; its own random stream), each with its train and val split; the label is the
    moving shape's motion.
    Returns the paths of the "train" and "val" manifests and of "classes" (motion class names).
    A second call with the same parameters returns at once; an interrupted call is redone because the
    manifests and demo.json are written last, atomically.
    """
    out_dir = Path(out_dir)
    if size % 2:
        raise ValueError(f"demo size must be even for yuv420p, got {size}")
    if kind not in DEMO_KINDS:
        raise ValueError(f"demo kind must be one of {', '.join(DEMO_KINDS)}, got {kind!r}")
    downstream = kind == "downstream"
    relational = kind == "relational"
    params = {
        "version": _FORMAT_VERSION,
        "kind": kind,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "frames": frames,
        "size": size,
        "fps": fps,
    }
    outputs = {"train": out_dir / "train.csv", "val": out_dir / "val.csv", "classes": out_dir / "classes.txt"}
    if _is_complete(out_dir, params, outputs):
        return outputs

    (out_dir / "demo.json").unlink(missing_ok=True)
    rng = np.random.default_rng([seed, DEMO_KINDS.index(kind)] if kind != "pretrain" else seed)
    jobs: list[tuple[str, ClipSpec, int, int, int]] = []
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": []}
    for split, n, captions_per_clip in (("train", n_train, 1), ("val", n_val, 2)):
        video_dir = out_dir / "videos" / split
        video_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise_seed = int(rng.integers(2**31))
            if relational:
                spec = _sample_relational_spec(rng, noise_seed)
            else:
                spec = _sample_spec(rng, noise_seed, held_out=downstream)
            rel = f"videos/{split}/{i:05d}.mp4"
            jobs.append((str(out_dir / rel), spec, frames, size, fps))
            captions: list[str] = []
            while len(captions) < captions_per_clip:
                caption = caption_for(spec, rng, downstream=downstream)

                if caption not in captions:
                    captions.append(caption)
            rows[split].extend((rel, c, spec.motion) for c in captions)

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    desc = f"writing demo clips to {out_dir}"
    with tqdm(total=len(jobs), desc=desc, unit="clip") as bar:
        if workers <= 1:
            for job in jobs:
                _encode_clip(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_encode_clip, jobs, chunksize=16):
                    bar.update()

    _write_text_atomic(outputs["classes"], "".join(f"{m}\n" for m in MOTIONS))
    _write_csv_atomic(outputs["train"], rows["train"])
    _write_csv_atomic(outputs["val"], rows["val"])
    _write_text_atomic(out_dir / "demo.json", json.dumps(params, indent=1, sort_keys=True))
    return outputs
