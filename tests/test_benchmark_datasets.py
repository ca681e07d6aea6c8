"""Benchmark adapters: each data set's own files, in its own layout, become manifests on its standard splits.

Every fixture is a scaled-down copy of a release's layout (empty files stand in for videos: the adapters
only check that a video exists), so these tests need no download and run in well under a second.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_dali.benchmark_sets import (
    BENCHMARKS,
    MSVD_SPLIT_SIZES,
    BenchmarkError,
    get_benchmark,
    hmdb_class_name,
    load_numpy_pickle,
    lsmdc_movie,
    ucf_class_name,
    write_benchmark_manifests,
)
from data_dali.manifest import read_manifest


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _captions(path: Path) -> list[str]:
    return [e.caption for e in read_manifest(path)]


# --- MSR-VTT ----------------------------------------------------------------------------------------

MSRVTT_LISTS = "high-quality/structured-symlinks"


def _msrvtt(root: Path, *, caption_index: object = None) -> Path:
    """10 videos with 3 captions each, interleaved in the annotation as in the real file."""
    annotations = [
        {"image_id": f"video{v}", "caption": f"video {v} caption {c}", "id": 10 * v + c}
        for c in range(3)
        for v in range(10)
    ]
    _write(root / "annotation" / "MSR_VTT.json", json.dumps({"annotations": annotations, "images": []}))
    lists = root / MSRVTT_LISTS
    split_ids = {
        "train_list_jsfusion.txt": range(0, 8),
        "val_list_jsfusion.txt": range(8, 10),
        "train_list_miech.txt": range(0, 7),
        "test_list_miech.txt": range(7, 10),
        "train_list_full.txt": range(0, 5),
        "val_list_full.txt": range(5, 7),
        "test_list_full.txt": range(7, 10),
    }
    for name, ids in split_ids.items():
        _write(lists / name, "".join(f"video{v}\n" for v in ids))
    if caption_index is None:
        caption_index = {"video8": np.int64(2), "video9": 1}
    (lists / "jsfusion_val_caption_idx.pkl").write_bytes(pickle.dumps(caption_index, protocol=2))
    for v in range(10):
        _touch(root / "videos" / "all" / f"video{v}.mp4")
    return root


def test_msrvtt_1k_a_uses_the_pickled_caption_choice(tmp_path: Path) -> None:
    root = _msrvtt(tmp_path / "msrvtt")
    report = write_benchmark_manifests("msrvtt", root, tmp_path / "out")
    assert report.split == "1k-A"
    assert dict(report) == {"train": tmp_path / "out" / "train.csv", "test": tmp_path / "out" / "test.csv"}
    assert report.rows == {"train": 24, "test": 2} and report.videos == {"train": 8, "test": 2}
    assert _captions(report["test"]) == ["video 8 caption 2", "video 9 caption 1"]
    train = read_manifest(report["train"])
    # all captions of each train video, in list order, then annotation order
    assert [e.caption for e in train[:3]] == [f"video 0 caption {c}" for c in range(3)]
    assert train[0].video == root / "videos" / "all" / "video0.mp4"
    assert all(e.label is None for e in train)
    assert list(_rows(report["test"])[0]) == ["video", "caption", "label"]
    assert report.missing_count == 0 and "missing videos: none" in report.summary()
    assert not (tmp_path / "out" / "missing_videos.txt").exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_msrvtt_caption_index_as_an_array_in_test_list_order(tmp_path: Path, protocol: int) -> None:
    root = _msrvtt(tmp_path / "msrvtt")
    index = np.array([0, 2], dtype=np.int64)
    (root / MSRVTT_LISTS / "jsfusion_val_caption_idx.pkl").write_bytes(pickle.dumps(index, protocol=protocol))
    report = write_benchmark_manifests("msrvtt", root, tmp_path / "out", split="1k-a")
    assert _captions(report["test"]) == ["video 8 caption 0", "video 9 caption 2"]


def test_msrvtt_miech_and_full_splits(tmp_path: Path) -> None:
    root = _msrvtt(tmp_path / "msrvtt")
    miech = write_benchmark_manifests("MSR-VTT", root, tmp_path / "out", split="miech")
    assert {k: p.name for k, p in miech.items()} == {"train": "train_miech.csv", "test": "test_miech.csv"}
    assert miech.rows == {"train": 21, "test": 9}  # all captions of the test videos
    full = write_benchmark_manifests("msrvtt", root, tmp_path / "out", split="full")
    assert full.rows == {"train": 15, "val": 6, "test": 9}
    assert _captions(full["val"])[:3] == [f"video 5 caption {c}" for c in range(3)]


def test_msrvtt_caption_index_out_of_range_is_refused(tmp_path: Path) -> None:
    root = _msrvtt(tmp_path / "msrvtt", caption_index={"video8": 3, "video9": 0})
    with pytest.raises(BenchmarkError, match="picks caption 3 of video8, which has 3 captions"):
        write_benchmark_manifests("msrvtt", root, tmp_path / "out")
    root = _msrvtt(tmp_path / "msrvtt2", caption_index={"video8": 0})
    with pytest.raises(BenchmarkError, match="no caption index for 1 of the 2"):
        write_benchmark_manifests("msrvtt", root, tmp_path / "out")


class _Payload:
    """Unpickling this calls ``func(*args)``: what a tampered caption index would do."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("how", ["open", "system", "nested"])
def test_caption_index_pickle_cannot_run_code(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    payload = {
        "open": _Payload(open, (str(marker), "w")),
        "system": _Payload(os.system, (f"touch {marker}",)),
        # hidden inside an otherwise valid mapping, as a value
        "nested": {"video8": _Payload(open, (str(marker), "w")), "video9": np.int64(0)},
    }[how]
    root = _msrvtt(tmp_path / "msrvtt", caption_index=payload)
    with pytest.raises(BenchmarkError, match=r"refusing to load .*jsfusion_val_caption_idx\.pkl|refusing"):
        write_benchmark_manifests("msrvtt", root, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "test.csv").exists()


def test_numpy_pickles_load_under_every_protocol(tmp_path: Path) -> None:
    obj = {"a": np.arange(4, dtype=np.int32), "b": np.float32(1.5), "c": [np.int64(7)]}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = load_numpy_pickle(path)
        assert back["a"].tolist() == [0, 1, 2, 3] and back["a"].dtype == np.int32
        assert back["b"] == np.float32(1.5) and back["c"] == [7]
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(BenchmarkError, match="cannot be read as a pickle"):
        load_numpy_pickle(tmp_path / "bad.pkl")


def test_msrvtt_missing_files_are_refused_naming_them(tmp_path: Path) -> None:
    root = _msrvtt(tmp_path / "msrvtt")
    (root / "annotation" / "MSR_VTT.json").unlink()
    with pytest.raises(BenchmarkError) as err:
        write_benchmark_manifests("msrvtt", root, tmp_path / "out")
    message = str(err.value)
    assert "MSR-VTT" in message and "MSR_VTT.json" in message and "MSRVTT.zip" in message
    (root / MSRVTT_LISTS / "test_list_miech.txt").unlink()
    with pytest.raises(BenchmarkError, match="test_list_miech.txt"):
        write_benchmark_manifests("msrvtt", root, tmp_path / "out", split="miech")


def test_missing_videos_are_counted_not_silently_dropped(tmp_path: Path, caplog) -> None:
    root = _msrvtt(tmp_path / "msrvtt")
    (root / "videos" / "all" / "video3.mp4").unlink()
    (root / "videos" / "all" / "video9.mp4").unlink()
    _touch(root / "videos" / "all" / "video5.webm")  # another extension is found
    (root / "videos" / "all" / "video5.mp4").unlink()
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        report = write_benchmark_manifests("msrvtt", root, out)
    assert report.missing_count == 2
    assert report.missing_videos == {
        "train": [root / "videos" / "all" / "video3.mp4"],
        "test": [root / "videos" / "all" / "video9.mp4"],
    }
    assert report.rows == {"train": 21, "test": 1} and report.videos == {"train": 7, "test": 1}
    assert any(e.video.name == "video5.webm" for e in read_manifest(report["train"]))
    listed = (out / "missing_videos.txt").read_text().splitlines()
    assert listed == [f"train\t{root / 'videos/all/video3.mp4'}", f"test\t{root / 'videos/all/video9.mp4'}"]
    summary = report.summary()
    assert "missing videos: 2 videos not found" in summary and "video9.mp4" in summary
    assert "2 videos not found" in caplog.text
    # all videos of a split missing: a wrong ROOT, refused
    (root / "videos" / "all" / "video8.mp4").unlink()
    with pytest.raises(BenchmarkError, match="none of the 2 videos of the test split is on disk"):
        write_benchmark_manifests("msrvtt", root, out)


def test_relative_video_paths_read_back(tmp_path: Path) -> None:
    root = _msrvtt(tmp_path / "data" / "msrvtt")
    out = tmp_path / "manifests"
    report = write_benchmark_manifests("msrvtt", root, out, relative=True)
    first = _rows(report["train"])[0]["video"]
    assert not Path(first).is_absolute() and first == "../data/msrvtt/videos/all/video0.mp4"
    assert all(e.video.is_file() for e in read_manifest(report["train"]))


# --- DiDeMo -----------------------------------------------------------------------------------------


def _didemo(root: Path) -> Path:
    def moment(video: str, text: str) -> dict:
        return {"video": video, "description": text, "times": [[0, 0]], "annotation_id": 0}

    train = [
        moment("a@N01_1.mov", "a man walks in."),
        moment("b@N02_2.mp4", "a dog, barking "),
        moment("a@N01_1.mov", ' he says "hi".'),
        moment("b@N02_2.mp4", "it runs away"),
    ]
    _write(root / "train_data.json", json.dumps(train))
    _write(root / "val_data.json", json.dumps([moment("c_3.mp4", "a car")]))
    _write(root / "test_data.json", json.dumps([moment("d_4", "a cat"), moment("d_4", "sleeps")]))
    _touch(root / "videos" / "a@N01_1.mp4")  # the .mov original, re-encoded
    _touch(root / "videos" / "b@N02_2.mp4")
    _touch(root / "videos" / "c_3.mp4")
    _touch(root / "videos" / "d_4.mp4")
    return root


def test_didemo_joins_a_videos_moments_into_one_paragraph(tmp_path: Path) -> None:
    report = write_benchmark_manifests("didemo", _didemo(tmp_path / "didemo"), tmp_path / "out")
    assert set(report) == {"train", "val", "test"}
    assert report.rows == {"train": 2, "val": 1, "test": 1}
    train = read_manifest(report["train"])
    assert [e.caption for e in train] == ['a man walks in. he says "hi".', "a dog, barking it runs away"]
    assert [e.video.name for e in train] == ["a@N01_1.mp4", "b@N02_2.mp4"]
    assert _captions(report["test"]) == ["a cat sleeps"]


def test_didemo_one_split_needs_only_its_file(tmp_path: Path) -> None:
    root = _didemo(tmp_path / "didemo")
    (root / "train_data.json").unlink()
    report = write_benchmark_manifests("didemo", root, tmp_path / "out", split="test")
    assert list(report) == ["test"]
    with pytest.raises(BenchmarkError, match=r"DiDeMo: .*train_data\.json not found.*DiDeMo annotations"):
        write_benchmark_manifests("didemo", root, tmp_path / "out")


# --- MSVD -------------------------------------------------------------------------------------------

MSVD_IDS = ["-4wsuPCjDBc_5_15", "zz_1_2", "aa_3_4", "mm_5_6", "bb_7_8", "cc_9_10", "dd_11_12"]


def _msvd(root: Path) -> Path:
    lines = ["# Microsoft Research Video Description Corpus", "# videoid description"]
    for k, vid in enumerate(MSVD_IDS):
        lines += [f"{vid} caption {k} a", f"{vid} caption {k}, b"]
    lines.insert(5, "")
    _write(root / "AllVideoDescriptions.txt", "\n".join(lines) + "\n")
    for vid in MSVD_IDS:
        _touch(root / "YouTubeClips" / f"{vid}.avi")
    return root


def test_msvd_split_by_order_of_appearance(tmp_path: Path) -> None:
    root = _msvd(tmp_path / "msvd")
    report = write_benchmark_manifests("msvd", root, tmp_path / "out", split_sizes=(3, 1, 3))
    assert report.rows == {"train": 6, "val": 2, "test": 6}
    assert report.videos == {"train": 3, "val": 1, "test": 3}
    stems = {part: list(dict.fromkeys(e.video.stem for e in read_manifest(p))) for part, p in report.items()}
    assert stems == {"train": MSVD_IDS[:3], "val": MSVD_IDS[3:4], "test": MSVD_IDS[4:]}
    assert _captions(report["val"]) == ["caption 3 a", "caption 3, b"]
    assert any("split by order (3/1/3 videos" in n for n in report.notes)
    assert MSVD_SPLIT_SIZES == (1200, 100, 670)
    with pytest.raises(BenchmarkError, match="lists 7 videos, but the split by order takes 1200/100/670"):
        write_benchmark_manifests("msvd", root, tmp_path / "out")


def test_msvd_youtube_mapping_order_and_split_lists(tmp_path: Path) -> None:
    root = _msvd(tmp_path / "msvd")
    order = list(reversed(MSVD_IDS))
    _write(
        root / "youtube_mapping.txt",
        "".join(f"{v} vid{k + 1}\n" for k, v in reversed(list(enumerate(order)))),
    )
    report = write_benchmark_manifests("msvd", root, tmp_path / "out", split="train", split_sizes=(2, 2, 3))
    assert [e.video.stem for e in read_manifest(report["train"])][::2] == order[:2]
    _write(root / "annotations" / "train_list.txt", "aa_3_4\n")
    _write(root / "annotations" / "val_list.txt", "zz_1_2\n")
    with pytest.raises(BenchmarkError, match="test_list.txt not found"):
        write_benchmark_manifests("msvd", root, tmp_path / "out")
    _write(root / "annotations" / "test_list.txt", "bb_7_8\ncc_9_10\n")
    report = write_benchmark_manifests("msvd", root, tmp_path / "out")
    assert report.videos == {"train": 1, "val": 1, "test": 2}


# --- LSMDC ------------------------------------------------------------------------------------------

LSMDC_CLIPS = [
    "0001_American_Beauty_00.00.51.926-00.00.54.129",
    "0001_American_Beauty_00.00.56.000-00.00.59.000",
    "1010_TITANIC_01.02.03.004-01.02.05.006",
]


def _lsmdc(root: Path) -> Path:
    def line(clip: str, sentence: str) -> str:
        return f"{clip}\t00.00.51.926\t00.00.54.129\t00.00.51.926\t00.00.54.129\t{sentence}\n"

    _write(
        root / "LSMDC16_annos_training.csv",
        line(LSMDC_CLIPS[0], 'SOMEONE says, "fine".') + line(LSMDC_CLIPS[1], "He walks away."),
    )
    _write(root / "LSMDC16_annos_val.csv", line(LSMDC_CLIPS[1], "Later, he sits."))
    _write(root / "LSMDC16_challenge_1000_publictect.csv", line(LSMDC_CLIPS[2], "The ship sails."))
    for clip in LSMDC_CLIPS:
        _touch(root / "avi" / lsmdc_movie(clip) / f"{clip}.avi")
    return root


def test_lsmdc_clips_in_movie_folders_and_quoted_captions(tmp_path: Path) -> None:
    assert lsmdc_movie(LSMDC_CLIPS[0]) == "0001_American_Beauty"
    assert lsmdc_movie("1010_TITANIC_01.02.03.004-01.02.05.006") == "1010_TITANIC"
    report = write_benchmark_manifests("lsmdc", _lsmdc(tmp_path / "lsmdc"), tmp_path / "out")
    assert report.rows == {"train": 2, "val": 1, "test": 1}
    train = read_manifest(report["train"])
    assert train[0].caption == 'SOMEONE says, "fine".'  # quoted by the csv writer, read back intact
    assert train[0].video == tmp_path / "lsmdc" / "avi" / "0001_American_Beauty" / f"{LSMDC_CLIPS[0]}.avi"
    assert _captions(report["test"]) == ["The ship sails."]


def test_lsmdc_missing_public_test_is_refused(tmp_path: Path) -> None:
    root = _lsmdc(tmp_path / "lsmdc")
    (root / "LSMDC16_challenge_1000_publictect.csv").unlink()
    with pytest.raises(
        BenchmarkError, match=r"LSMDC: .*LSMDC16_challenge_1000_publictect\.csv not found.*LSMDC 2016"
    ):
        write_benchmark_manifests("lsmdc", root, tmp_path / "out", split="test")


# --- UCF101 -----------------------------------------------------------------------------------------

UCF_CLASSES = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]


def _ucf(root: Path) -> Path:
    lists = root / "ucfTrainTestlist"
    _write(lists / "classInd.txt", "".join(f"{k + 1} {c}\r\n" for k, c in enumerate(UCF_CLASSES)))
    videos = {
        "ApplyEyeMakeup": ["v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g08_c01"],
        "HandstandPushups": ["v_HandStandPushups_g01_c01", "v_HandStandPushups_g08_c01"],  # sic, as released
        "YoYo": ["v_YoYo_g01_c01", "v_YoYo_g08_c01"],
    }
    for n in (1, 2, 3):
        test = "".join(f"{c}/{vs[0]}.avi\r\n" for c, vs in videos.items())
        train = "".join(f"{c}/{vs[1]}.avi {k + 1}\r\n" for k, (c, vs) in enumerate(videos.items()))
        _write(lists / f"testlist0{n}.txt", test)
        _write(lists / f"trainlist0{n}.txt", train)
    for c, vs in videos.items():
        for v in vs:
            _touch(root / "UCF-101" / c / f"{v}.avi")
    return root


def test_ucf_class_names_are_readable() -> None:
    assert ucf_class_name("ApplyEyeMakeup") == "apply eye makeup"
    assert ucf_class_name("YoYo") == "yo yo"
    assert ucf_class_name("HandstandPushups") == "handstand pushups"
    assert ucf_class_name("PlayingTVGames") == "playing tv games"
    assert hmdb_class_name("brush_hair") == "brush hair"


def test_ucf101_zero_shot_splits_and_classes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = write_benchmark_manifests("ucf101", _ucf(tmp_path / "ucf"), out)
    assert list(report) == ["test1", "test2", "test3", "train1", "train2", "train3"]
    assert report.classes == out / "classes.txt"
    assert report.classes.read_text().splitlines() == ["apply eye makeup", "handstand pushups", "yo yo"]
    entries = read_manifest(report["test1"], require_label_column=True)
    assert [(e.caption, e.label) for e in entries] == [
        ("apply eye makeup", "apply eye makeup"),
        ("handstand pushups", "handstand pushups"),
        ("yo yo", "yo yo"),
    ]
    assert entries[1].video.name == "v_HandStandPushups_g01_c01.avi"
    assert [e.label for e in read_manifest(report["train2"])] == [
        "apply eye makeup",
        "handstand pushups",
        "yo yo",
    ]
    one = write_benchmark_manifests("ucf101", tmp_path / "ucf", tmp_path / "out1", split="TEST1")
    assert list(one) == ["test1"] and one.rows == {"test1": 3}


def test_ucf101_missing_split_list_is_refused(tmp_path: Path) -> None:
    root = _ucf(tmp_path / "ucf")
    (root / "ucfTrainTestlist" / "classInd.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"UCF101: .*classInd\.txt not found.*UCF101TrainTestSplits"):
        write_benchmark_manifests("ucf101", root, tmp_path / "out", split="test1")


# --- HMDB51 -----------------------------------------------------------------------------------------


def _hmdb(root: Path) -> Path:
    splits = root / "testTrainMulti_7030_splits"
    for cls in ("brush_hair", "fall_floor"):
        videos = [f"{cls}_clip{k}.avi" for k in range(4)]
        for v in videos:
            _touch(root / "hmdb51" / cls / v)
        for n in (1, 2, 3):
            codes = ["1", "2", "0", "1"] if n == 1 else ["2", "1", "1", "0"]
            _write(
                splits / f"{cls}_test_split{n}.txt",
                "".join(f"{v} {c} \n" for v, c in zip(videos, codes, strict=True)),
            )
    return root


def test_hmdb51_split_codes_and_classes(tmp_path: Path) -> None:
    report = write_benchmark_manifests("hmdb51", _hmdb(tmp_path / "hmdb"), tmp_path / "out")
    assert report.rows == {"test1": 2, "test2": 2, "test3": 2, "train1": 4, "train2": 4, "train3": 4}
    assert report.classes is not None
    assert report.classes.read_text().splitlines() == ["brush hair", "fall floor"]
    test1 = read_manifest(report["test1"])
    assert [(e.video.name, e.caption, e.label) for e in test1] == [
        ("brush_hair_clip1.avi", "brush hair", "brush hair"),
        ("fall_floor_clip1.avi", "fall floor", "fall floor"),
    ]
    assert [e.video.name for e in read_manifest(report["train1"])][:2] == [
        "brush_hair_clip0.avi",
        "brush_hair_clip3.avi",
    ]


def test_hmdb51_missing_split_files_are_refused(tmp_path: Path) -> None:
    root = _hmdb(tmp_path / "hmdb")
    (root / "testTrainMulti_7030_splits" / "fall_floor_test_split2.txt").unlink()
    assert write_benchmark_manifests("hmdb51", root, tmp_path / "out", split="test1").rows == {"test1": 2}
    with pytest.raises(
        BenchmarkError, match=r"fall_floor_test_split2\.txt not found.*test_train_splits\.rar"
    ):
        write_benchmark_manifests("hmdb51", root, tmp_path / "out", split="train2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match="testTrainMulti_7030_splits"):
        write_benchmark_manifests("hmdb51", empty, tmp_path / "out")


# --- the registry -----------------------------------------------------------------------------------


def test_registry_names_splits_and_refusals(tmp_path: Path) -> None:
    assert list(BENCHMARKS) == ["msrvtt", "didemo", "msvd", "lsmdc", "ucf101", "hmdb51"]
    assert get_benchmark("UCF-101") is BENCHMARKS["ucf101"]
    assert BENCHMARKS["msrvtt"].splits == ("1k-A", "miech", "full")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'kinetics'; choose one of msrvtt, didemo"):
        write_benchmark_manifests("kinetics", tmp_path, tmp_path / "out")
    with pytest.raises(BenchmarkError, match="MSR-VTT has no split '7k'; choose one of 1k-A, miech, full"):
        write_benchmark_manifests("msrvtt", tmp_path, tmp_path / "out", split="7k")
    with pytest.raises(BenchmarkError, match="split_sizes applies only to data sets split by order"):
        write_benchmark_manifests("didemo", tmp_path, tmp_path / "out", split_sizes=(1, 1, 1))
    with pytest.raises(BenchmarkError, match="ROOT .* is not a folder"):
        write_benchmark_manifests("msvd", tmp_path / "absent", tmp_path / "out")


def test_miles_data_command_writes_the_manifests_and_refuses_a_wrong_root(tmp_path: Path, capsys) -> None:
    from miles.cli import main

    out = tmp_path / "out"
    assert main(["data", "ucf101", str(_ucf(tmp_path / "ucf")), str(out), "--split", "test1"]) == 0
    assert "test1" in capsys.readouterr().out
    assert [e.label for e in read_manifest(out / "test1.csv")] == [
        "apply eye makeup",
        "handstand pushups",
        "yo yo",
    ]
    assert main(["data", "ucf101", str(tmp_path / "nowhere"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "classInd.txt" in err and "Traceback" not in err
