"""Bad manifests are refused with the file, the line and the fix; valid ones read as before."""

from __future__ import annotations

import codecs
import json
import pwd
from pathlib import Path

import pytest

from data_dali.manifest import ManifestEntry, ManifestError, read_manifest


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as e:
        read_manifest(path, **kwargs)  # type: ignore[arg-type]
    return str(e.value)


# ---------------------------------------------------------------- A: rows with more fields than the header


def test_csv_row_with_unquoted_comma_names_line_and_fix(tmp_path: Path) -> None:
    manifest = tmp_path / "train.csv"
    manifest.write_text(
        "video,caption,label\n"  # line 1
        'a.mp4,"a caption that\nspans two lines",pets\n'  # lines 2-3: csv line_num keeps counting
        "\n"  # line 4, blank
        "b.mp4,a cat, sitting on a mat,pets\n"  # line 5: the unquoted comma
        "c.mp4,fine,pets\n"
    )
    message = _error(manifest)
    assert message == (
        f"manifest {manifest} line 5 has 4 fields but the header has 3 (video, caption, label); "
        "the extra: 'pets'; a value that holds a comma must be quoted, "
        'e.g. a.mp4,"a cat, sitting on a mat"'
    )


def test_quoted_multiline_row_with_extra_field_names_its_first_line(tmp_path: Path) -> None:
    manifest = tmp_path / "train.csv"
    manifest.write_text('video,caption\na.mp4,ok\nb.mp4,"two\nlines",extra\n')
    message = _error(manifest)
    assert message.startswith(
        f"manifest {manifest} line 3 has 3 fields but the header has 2 (video, caption) "
        "(the row spans lines 3-4); the extra: 'extra'"
    )


def test_tsv_row_with_extra_tab_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "train.tsv"
    manifest.write_text("video\tcaption\na.mp4\ta cat\nb.mp4\ta dog\tbarking\tloud\n")
    message = _error(manifest)
    assert message == (
        f"manifest {manifest} line 3 has 4 fields but the header has 2 (video, caption); "
        "the extra: 'barking', 'loud'; a value that holds a tab must be quoted, or the tab removed"
    )


def test_trailing_empty_field_is_not_an_extra_value(tmp_path: Path) -> None:
    # A trailing delimiter carries no value (nothing of the caption is lost): accepted, as before.
    manifest = tmp_path / "train.csv"
    manifest.write_text("video,caption\na.mp4,a cat,\n")
    assert read_manifest(manifest) == [ManifestEntry(tmp_path.absolute() / "a.mp4", "a cat", None)]


def test_short_row_missing_caption_names_its_physical_line(tmp_path: Path) -> None:
    manifest = tmp_path / "train.csv"
    manifest.write_text('video,caption\na.mp4,"multi\nline"\n\nb.mp4\n')
    message = _error(manifest)
    assert message == (
        f"manifest {manifest} line 5 has no value for 'caption' (the row has 1 of the header's 2 fields); "
        "fill it in or remove the row"
    )


def test_short_row_without_the_optional_label_is_kept(tmp_path: Path) -> None:
    manifest = tmp_path / "train.csv"
    manifest.write_text("video,caption,label\na.mp4,a cat\n")
    assert read_manifest(manifest) == [ManifestEntry(tmp_path.absolute() / "a.mp4", "a cat", None)]


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "train.jsonl"
    rows = [{"video": "a.mp4", "caption": "x"}, {"video": " ", "caption": "y"}]
    manifest.write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps(rows[1]) + "\n")
    assert _error(manifest) == (
        f"manifest {manifest} line 4 has no value for 'video'; fill it in or remove the row"
    )


def test_valid_manifests_read_as_before(tmp_path: Path) -> None:
    """BOM, CRLF line ends, quoted delimiters and line breaks, blank lines, TSV, JSONL with a BOM."""
    base = tmp_path.absolute()
    csv_file = tmp_path / "a.csv"
    csv_file.write_bytes(
        codecs.BOM_UTF8
        + b'video,caption,label\r\nx.mp4,"a, b",pets\r\n\r\ny.mp4,"two\r\nlines",\r\n'
        + "z.mp4,café,\n".encode()
    )
    assert read_manifest(csv_file) == [
        ManifestEntry(base / "x.mp4", "a, b", "pets"),
        ManifestEntry(base / "y.mp4", "two\r\nlines", None),
        ManifestEntry(base / "z.mp4", "café", None),
    ]
    tsv_file = tmp_path / "b.tsv"
    tsv_file.write_text('video\tcaption\nx.mp4\t"tab\there"\n')
    assert read_manifest(tsv_file) == [ManifestEntry(base / "x.mp4", "tab\there", None)]
    jsonl_file = tmp_path / "c.jsonl"
    row = json.dumps({"video": "v.mp4", "caption": "ü"}, ensure_ascii=False)
    jsonl_file.write_bytes(codecs.BOM_UTF8 + row.encode() + b"\r\n")
    assert read_manifest(jsonl_file) == [ManifestEntry(base / "v.mp4", "ü", None)]


def test_cr_only_line_ends_read_and_counted(tmp_path: Path) -> None:
    """Old Mac / Excel-for-Mac CSVs end lines with a lone CR: read as before, and counted as lines."""
    manifest = tmp_path / "mac.csv"
    manifest.write_bytes(b"video,caption\ra.mp4,a cat\rb.mp4,a dog\r")
    assert [e.caption for e in read_manifest(manifest)] == ["a cat", "a dog"]
    manifest.write_bytes(b"video,caption\ra.mp4,a cat\rb.mp4,a, dog\r")
    assert _error(manifest).startswith(f"manifest {manifest} line 3 has 3 fields but the header has 2")


# ---------------------------------------------------------------- B1: bytes that are not UTF-8


def test_latin1_csv_names_line_column_and_fix(tmp_path: Path) -> None:
    manifest = tmp_path / "train.csv"
    manifest.write_bytes(
        codecs.BOM_UTF8
        + b"video,caption\n"
        + b'a.mp4,"first\nrow"\n'  # lines 2-3
        + b"b.mp4,caf\xe9 au lait\n"  # line 4, 0xe9 is latin1 for e-acute
    )
    message = _error(manifest)
    fixed = tmp_path / "train.utf8.csv"
    assert message == (
        f"manifest {manifest} line 4 is not valid UTF-8 (byte 0xe9 at column 10, after 'b.mp4,caf'); "
        f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {manifest} > {fixed}` "
        "(use the encoding it was written in if not latin1) and point the config at the new file"
    )


def test_bad_byte_far_into_a_large_jsonl_gives_its_line(tmp_path: Path) -> None:
    """The line (not a position inside an internal read chunk) of a bad byte thousands of lines in."""
    manifest = tmp_path / "big.jsonl"
    good = (json.dumps({"video": "a.mp4", "caption": "é" * 40}) + "\n").encode()
    manifest.write_bytes(good * 5000 + b'{"video": "b.mp4", "caption": "\xff"}\n' + good)
    message = _error(manifest)
    assert message.startswith(
        f"manifest {manifest} line 5001 is not valid UTF-8 (byte 0xff at column 32, "
        'after \'"video": "b.mp4", "caption": "\'); re-save it as UTF-8'  # the last 30 characters
    )
    assert "codec can't decode" not in message


def test_bad_byte_on_the_first_line_after_a_bom(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(codecs.BOM_UTF8 + b"vid\xe9o,caption\na.mp4,x\n")
    assert f"manifest {manifest} line 1 is not valid UTF-8 (byte 0xe9 at column 4, after 'vid')" in (
        _error(manifest)
    )


# ---------------------------------------------------------------- B2: ~user paths


def test_unknown_user_in_video_path_names_line_value_and_fix(tmp_path: Path) -> None:
    user = "nosuchuser_miles_test"
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    manifest = tmp_path / "train.csv"
    manifest.write_text(f"video,caption\n~/fine.mp4,ok\n~{user}/x.mp4,a cat\n")
    assert _error(manifest) == (
        f"manifest {manifest} line 3: video path '~{user}/x.mp4' starts with the home folder of user "
        f"'{user}', who does not exist on this machine; write the full path instead, or the right user "
        "name after '~'"
    )
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n" + json.dumps({"video": f"~{user}/y.mp4", "caption": "c"}) + "\n")
    assert f"manifest {jsonl} line 2: video path '~{user}/y.mp4'" in _error(jsonl)


# ---------------------------------------------------------------- B3: a folder given as the manifest


def test_folder_given_as_manifest(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")
    assert _error(videos) == (
        f"manifest {videos} is a folder, not a manifest file; give a CSV, TSV or JSONL file of video and "
        "caption columns, or a folder written by `miles prepare` (a ready-made dataset: "
        "data_dali.demo.write_demo_dataset)"
    )
    (videos / "train.csv").write_text("video,caption\na.mp4,x\n")
    (videos / "val.jsonl").write_text("")
    message = _error(videos)
    assert message.startswith(f"manifest {videos} is a folder, not a manifest file; give a CSV, TSV or JSONL")
    assert "caption columns (this folder holds train.csv, val.jsonl), or a folder written by" in message


def test_shard_folder_given_as_manifest(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.jsonl").write_text("")
    assert _error(shards) == (
        f"manifest {shards} is a folder of frame shards written by `miles prepare`, not a manifest file; "
        "train or evaluate from it directly (the data path may name such a folder), or give the original "
        "CSV/TSV/JSONL manifest"
    )


def test_csv_unclosed_quote_names_the_rows_lines(tmp_path: Path) -> None:
    """A quote that never closes swallows the rest of the file until csv's field size limit stops it."""
    manifest = tmp_path / "m.csv"
    manifest.write_text('video,caption\na.mp4,x\nb.mp4,"unclosed\n' + ("c.mp4," + "y" * 94 + "\n") * 2000)
    message = _error(manifest)
    assert message.startswith(f"manifest {manifest} lines 3-")
    assert "cannot be read as CSV (field larger than field limit" in message
    assert message.endswith(
        "check the quotes on that row: a quote that opens a value must close it, and a quote inside a "
        'quoted value is written ""'
    )
