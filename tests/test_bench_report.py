"""`miles bench`: the report from pytest-benchmark JSON (pairing, speed-ups, skipped cases, chart) and the
command end to end on a tiny suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import miles.bench as bench
from miles.bench import SPEEDUP_HEADER, TABLE_HEADER, BenchError, write_report
from miles.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
CPU_INFO = {"cpu_model": "Test CPU 9000", "cpu_count": 2, "torch": "2.x", "python_version": "3.11.7"}
GPU_INFO = {
    **CPU_INFO,
    "cuda_device": "NVIDIA H100 80GB HBM3",
    "cuda_memory_gb": 79.2,
    "cuda_version": "13.0",
}


def _bench(case: str, test: str, path: str, label: str, median: float, **extra) -> dict:
    return {
        "group": case,
        "name": test,
        "fullname": f"benchmarks/test_x.py::{test}",
        "param": label,
        "extra_info": {"path": path, "label": label, **extra},
        "stats": {"median": median, "mean": median, "rounds": 3},
    }


def _write(
    path: Path, benchmarks: list[dict], machine=CPU_INFO, when="2026-11-26T10:00:00", **outcomes
) -> Path:
    data = {"machine_info": machine, "datetime": when, "benchmarks": benchmarks, "version": "5.3.1"}
    path.write_text(json.dumps({**data, **outcomes}))
    return path


def _table(report: Path) -> list[list[str]]:
    """The first markdown table of the report, as rows of cells (header first, separator dropped)."""
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert all(set(cell) <= set("-:") for cell in block[1]), "second line must be the separator"
    return [block[0], *block[2:]]


def _synthetic(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "synthetic.json",
        [
            _bench(
                "attn", "t[ref]", "reference", "reference", 2.0, clips_per_s=4.0, peak_mem_bytes=2 * 2**30
            ),
            _bench("attn", "t[sdpa]", "fast", "sdpa", 0.5, clips_per_s=16.0, peak_mem_bytes=2**30),
            _bench("attn", "t[xformers]", "fast", "xformers", 0.25, clips_per_s=32.0),
            _bench("copy B=8", "t[copy]", "yardstick", "copy", 0.01, gb_per_s=100.0),
            _bench("drop B=8", "t[drop-ref]", "reference", "reference", 0.03, gb_per_s=10.0),
            _bench(
                "drop B=8", "t[drop-triton]", "fast", "triton", 0.0125, gb_per_s=85.0, yardstick="copy B=8"
            ),
            _bench("mask", "t[mask-ref]", "reference", "reference", 0.002),
        ],
        skipped=[{"fullname": "benchmarks/test_x.py::t[mask-triton]", "reason": "needs CUDA here"}],
        failed=[{"fullname": "benchmarks/test_x.py::t[boom]", "reason": "call: RuntimeError: boom"}],
    )


def test_pairs_fast_with_reference_and_computes_speedups(tmp_path: Path) -> None:
    report = write_report([_synthetic(tmp_path)], tmp_path / "out")
    table = _table(report)
    assert table[0] == TABLE_HEADER and SPEEDUP_HEADER in table[0]
    assert all(len(row) == len(TABLE_HEADER) for row in table)
    rows = {(row[0], row[1]): dict(zip(TABLE_HEADER, row, strict=True)) for row in table[1:]}
    assert set(rows) == {("attn", "sdpa"), ("attn", "xformers"), ("drop B=8", "triton"), ("mask", "–")}
    assert rows[("attn", "sdpa")][SPEEDUP_HEADER] == "**4.00x**"
    assert rows[("attn", "xformers")][SPEEDUP_HEADER] == "**8.00x**"
    assert rows[("drop B=8", "triton")][SPEEDUP_HEADER] == "**2.40x**"
    assert rows[("mask", "–")][SPEEDUP_HEADER] == "–" and "not run" in rows[("mask", "–")]["fast"]
    assert rows[("attn", "sdpa")]["reference"] == "2.00 s, 4 clips/s"
    assert rows[("attn", "sdpa")]["fast"] == "500.00 ms, 16 clips/s"
    assert rows[("attn", "sdpa")]["peak memory ref / fast"] == "2.00 / 1.00 GiB"
    assert rows[("attn", "xformers")]["peak memory ref / fast"] == "2.00 / – GiB"
    assert rows[("drop B=8", "triton")]["fast"] == "12.50 ms, 85 GB/s (85% of copy)"
    assert rows[("attn", "sdpa")]["machine"] == "Test CPU 9000, 2 cores"
    assert rows[("attn", "sdpa")]["date"] == "2026-11-26"
    text = report.read_text()
    assert "copy B=8 (copy): 10.00 ms, 100 GB/s" in text  # the yardstick is listed, not paired
    assert "`benchmarks/test_x.py::t[mask-triton]` (Test CPU 9000, 2 cores): needs CUDA here" in text
    assert "`benchmarks/test_x.py::t[boom]` (Test CPU 9000, 2 cores): call: RuntimeError: boom" in text


def test_chart_is_a_png(tmp_path: Path) -> None:
    report = write_report([_synthetic(tmp_path)], tmp_path / "out")
    chart = report.parent / "ratios.png"
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![speed-ups](ratios.png)" in report.read_text()


def test_newer_run_replaces_older_and_machines_stay_apart(tmp_path: Path) -> None:
    old = _write(
        tmp_path / "old.json",
        [
            _bench("attn", "t[ref]", "reference", "reference", 1.0),
            _bench("attn", "t[sdpa]", "fast", "sdpa", 1.0),
        ],
        when="2026-11-01T00:00:00",
        skipped=[{"fullname": "benchmarks/test_x.py::t[xformers]", "reason": "old skip"}],
    )
    new = _write(
        tmp_path / "new.json",
        [
            _bench("attn", "t[sdpa]", "fast", "sdpa", 0.25),
            _bench("attn", "t[xformers]", "fast", "xformers", 0.5),
        ],
        when="2026-11-20T00:00:00",
    )
    gpu = _write(
        tmp_path / "gpu.json",
        [
            _bench("attn", "t[ref]", "reference", "reference", 0.1),
            _bench("attn", "t[sdpa]", "fast", "sdpa", 0.01),
        ],
        machine=GPU_INFO,
    )
    report = write_report([new, old, gpu], tmp_path / "out")  # order of the files does not matter
    rows = {(r[1], r[6]): r for r in _table(report)[1:]}
    assert rows[("sdpa", "Test CPU 9000, 2 cores")][4] == "**4.00x**"  # new fast over old reference
    assert rows[("xformers", "Test CPU 9000, 2 cores")][4] == "**2.00x**"
    assert rows[("sdpa", "NVIDIA H100 80GB HBM3")][4] == "**10.00x**"
    assert rows[("sdpa", "Test CPU 9000, 2 cores")][7] == "2026-11-20"
    text = report.read_text()
    assert "old skip" not in text  # ran in the newer file
    assert "GPU: NVIDIA H100 80GB HBM3 (79.2 GiB)" in text and "CUDA 13.0" in text
    named = write_report([gpu], tmp_path / "named", machine="H100 SXM (lab 3)")
    assert _table(named)[1][6] == "H100 SXM (lab 3)"


def test_test_results_and_notes_are_reported(tmp_path: Path) -> None:
    junit = tmp_path / "tests.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad">'
        '<failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    report = write_report(
        [_synthetic(tmp_path)],
        tmp_path / "out",
        junit_paths=[junit, tmp_path / "absent.xml"],
        notes=["suite data: timed out after 60 s"],
    )
    text = report.read_text()
    assert "`tests.xml`: 1 passed, 1 failed, 1 skipped" in text
    assert "FAILED `tests.test_a::test_bad`: assert 1 == 2" in text
    assert "absent.xml`: missing" in text
    assert "- suite data: timed out after 60 s" in text


def test_real_cpu_results_file(tmp_path: Path) -> None:
    """The committed CPU train-step JSON (written before the pairing labels) still pairs by `path`."""
    source = REPO / "benchmarks" / "results" / "cpu.json"
    if not source.is_file():
        pytest.skip(f"{source} is not in this checkout")
    data = json.loads(source.read_text())
    report = write_report([source], tmp_path)
    rows = {r[0]: r for r in _table(report)[1:]}
    for case in {b["group"] for b in data["benchmarks"] if b["group"].startswith("train step")}:
        med = {
            b["extra_info"]["path"]: b["stats"]["median"] for b in data["benchmarks"] if b["group"] == case
        }
        assert rows[case][4] == f"**{med['reference'] / med['fast']:.2f}x**"
        assert rows[case][5].endswith(" GiB")


def test_bad_input_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(BenchError, match="broken.json"):
        write_report([broken], tmp_path / "out")
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(BenchError, match="other.json.*pytest-benchmark"):
        write_report([other], tmp_path / "out")
    with pytest.raises(BenchError, match="unknown suite 'nope'"):
        bench.suite_files(["nope"])


TINY_SUITE = """
import pytest
import torch

from benchmarks.conftest import pair

x = torch.arange(20000, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["reference", "fast", "cuda"])
def test_sum(benchmark, impl):
    if impl == "cuda":
        pytest.skip("tiny suite: no CUDA case here")
    pair(benchmark, "sum", "reference" if impl == "reference" else "fast", impl)
    fn = (lambda: sum(x.tolist())) if impl == "reference" else (lambda: x.sum())
    benchmark.pedantic(fn, rounds=3, iterations=1)
"""

TINY_CONFTEST = """
from benchmarks.conftest import (  # noqa: F401
    device,
    pytest_benchmark_update_json,
    pytest_benchmark_update_machine_info,
    pytest_runtest_logreport,
)
"""


def test_cli_end_to_end_on_a_tiny_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "conftest.py").write_text(TINY_CONFTEST)
    (suites / "test_tiny.py").write_text(TINY_SUITE)
    monkeypatch.setattr(bench, "BENCH_DIR", suites)
    monkeypatch.setattr(bench, "SUITES", {"kernels": "test_tiny.py", "data": "test_absent.py"})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "results"

    assert cli_main(["bench", "--suite", "all", "--quick", "--out", str(out)]) == 0
    saved = json.loads((out / "kernels.json").read_text())
    assert {b["extra_info"]["path"] for b in saved["benchmarks"]} == {"reference", "fast"}
    assert saved["machine_info"]["quick"] is True
    text = (out / "REPORT.md").read_text()
    row = next(r for r in _table(out / "REPORT.md")[1:] if r[0] == "sum")
    assert row[1] == "fast" and float(row[4].strip("*x")) > 1  # torch.sum beats a Python loop
    assert "test_sum[cuda]` " in text and "tiny suite: no CUDA case here" in text
    assert "suite data: test_absent.py does not exist in this checkout, not run" in text
    assert (out / "ratios.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sum | fast |" in capsys.readouterr().out

    assert cli_main(["bench", "--suite", "data", "--out", str(out)]) == 2
    assert "test_absent.py does not exist" in capsys.readouterr().err
