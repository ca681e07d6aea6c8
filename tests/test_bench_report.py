"""`miles bench`: the report from pytest-benchmark JSON (pairing, speed-ups, utilisation against the
machine's peaks, skipped cases, chart), the work-counting helpers, and the command end to end on a tiny
suite with the real peak suite."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import miles.bench as bench
from miles.bench import (
    ACHIEVED_HEADER,
    LIMIT_HEADER,
    PERCENT_HEADER,
    SPEEDUP_HEADER,
    TABLE_HEADER,
    BenchError,
    write_report,
)
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


def _records(report: Path) -> list[dict[str, str]]:
    """The table's rows keyed by the header's column names."""
    header, *rows = _table(report)
    return [dict(zip(header, row, strict=True)) for row in rows]


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
            _bench("attn", "t[peer]", "peer", "theirs", 1.0, clips_per_s=8.0),
            _bench("attn", "t[peer2]", "peer", "another", 0.5, clips_per_s=16.0),
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
    peer = bench.PEER_HEADER
    another = "another: 500.00 ms, 16 clips/s; 0.25x"  # every peer of the case, by name
    theirs = "theirs: 1.00 s, 8 clips/s; 0.50x"
    assert rows[("attn", "sdpa")][peer] == f"{another} / 1.00x<br>{theirs} / 2.00x"
    assert rows[("attn", "xformers")][peer] == f"{another} / 2.00x<br>{theirs} / 4.00x"
    assert rows[("drop B=8", "triton")][peer] == "–"
    assert rows[("attn", "xformers")]["peak memory ref / fast"] == "2.00 / – GiB"
    assert rows[("drop B=8", "triton")]["fast"] == "12.50 ms, 85 GB/s (85% of copy)"
    assert rows[("attn", "sdpa")]["machine"] == "Test CPU 9000, 2 cores"
    assert rows[("attn", "sdpa")]["date"] == "2026-11-26"
    text = report.read_text()
    assert "copy B=8 (copy): 10.00 ms, 100 GB/s" in text  # the yardstick is listed, not paired
    assert "`benchmarks/test_x.py::t[mask-triton]` (Test CPU 9000, 2 cores): needs CUDA here" in text
    assert "`benchmarks/test_x.py::t[boom]` (Test CPU 9000, 2 cores): call: RuntimeError: boom" in text


def _cpu_peaks() -> list[dict]:
    """200 GFLOP/s fp32 (a slower fp32 case beside it is not the peak), 400 bf16, 20 GB/s copy."""
    return [
        _bench("peak matmul fp32", "p[fp32]", "peak", "torch.matmul 2048^3", 0.01, flops=2 * 10**9,
               compute_dtype="fp32"),
        _bench("peak matmul fp32", "p[fp32-small]", "peak", "torch.matmul 1024^3", 0.01, flops=10**9,
               compute_dtype="fp32"),
        _bench("peak matmul bf16", "p[bf16]", "peak", "torch.matmul 2048^3", 0.01, flops=4 * 10**9,
               compute_dtype="bf16"),
        _bench("peak memory copy", "p[copy]", "peak", "copy_ of 512 MiB", 0.05, bytes=10**9),
    ]  # fmt: skip


def test_utilisation_from_known_flops_and_bytes(tmp_path: Path) -> None:
    work = {"flops": 10**9, "compute_dtype": "fp32", "bytes": 160 * 10**6}
    cpu = _write(
        tmp_path / "cpu.json",
        [
            *_cpu_peaks(),
            _bench("gemm", "g[ref]", "reference", "reference", 0.02, flops=10**9, compute_dtype="fp32"),
            _bench("gemm", "g[bf16]", "fast", "bf16", 0.005, flops=10**9, compute_dtype="bf16"),
            _bench("drop", "d[ref]", "reference", "reference", 0.01, bytes=7_400_000, compute_dtype="fp32"),
            _bench("fused", "f[ref]", "reference", "reference", 0.04, **work),
            _bench("fused", "f[fast]", "fast", "fused", 0.01, **work),
            _bench("loading", "l[ref]", "reference", "PyAV", 2.0, limit="decode/I-O"),
            _bench("loading", "l[dali]", "fast", "DALI", 0.5, limit="decode/I-O"),
            _bench("plain", "x[ref]", "reference", "reference", 0.2),
            _bench("plain", "x[fast]", "fast", "fast", 0.1),
        ],
    )
    gpu = _write(
        tmp_path / "gpu.json",
        [
            _bench("gemm", "g[ref]", "reference", "reference", 0.01, flops=10**12, compute_dtype="bf16"),
            _bench("gemm", "g[bf16]", "fast", "bf16", 0.0025, flops=10**12, compute_dtype="bf16"),
        ],
        machine=GPU_INFO,
    )
    report = write_report([cpu, gpu], tmp_path / "out")
    rows = {(r["case"], r["machine"]): r for r in _records(report)}
    cpu_name, gpu_name = "Test CPU 9000, 2 cores", "NVIDIA H100 80GB HBM3"
    assert not any(case.startswith("peak ") for case, _ in rows)  # the peaks are not table rows

    def cells(case: str, machine: str = cpu_name) -> tuple[str, str, str]:
        row = rows[(case, machine)]
        return row[ACHIEVED_HEADER], row[PERCENT_HEADER], row[LIMIT_HEADER]

    # 1e9 FLOPs in 20 ms = 50 GFLOP/s of the 200 fp32 peak; in 5 ms = 200 of the 400 bf16 peak.
    assert cells("gemm") == ("50 / 200 GFLOP/s", "25% / 50%", "compute bf16 (400 GFLOP/s)")
    assert rows[("gemm", cpu_name)][SPEEDUP_HEADER] == "**4.00x**"
    # 7.4 MB in 10 ms = 0.74 GB/s = 3.7 % of the 20 GB/s copy; no fast variant ran.
    assert cells("drop") == ("0.74 / – GB/s", "3.7% / –", "memory (20 GB/s)")
    # Both FLOPs and bytes: 16 GB/s is 80 % of copy, 100 GFLOP/s only 50 % of fp32, so memory binds.
    assert cells("fused") == ("4 / 16 GB/s", "20% / 80%", "memory (20 GB/s)")
    assert cells("loading") == ("–", "–", "decode/I-O")
    assert cells("plain") == ("–", "–", "–")
    assert cells("gemm", gpu_name) == ("100 / 400 TFLOP/s", "–", "compute bf16 (no peak measured)")
    text = report.read_text()
    assert (
        f"- {cpu_name}, 2026-11-26: compute fp32 200 GFLOP/s (torch.matmul 2048^3, 10.00 ms); "
        "compute bf16 400 GFLOP/s (torch.matmul 2048^3, 10.00 ms); "
        "memory 20 GB/s (copy_ of 512 MiB, 50.00 ms)"
    ) in text
    assert f"- {gpu_name}: no peak measured" in text
    assert "outside the pairing convention" not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"flops": 10**9}, "extra_info has 'flops' but no 'compute_dtype'"),
        (
            {"flops": 10**9, "compute_dtype": "fp16"},
            r"extra_info\['compute_dtype'\] = 'fp16'; use one of fp32, bf16",
        ),
        ({"bytes": -5}, r"extra_info\['bytes'\] = -5 is not a positive number"),
        ({"flops": "many", "compute_dtype": "fp32"}, r"extra_info\['flops'\] = 'many'"),
        ({"limit": "network"}, r"extra_info\['limit'\] = 'network'; use one of compute fp32"),
    ],
)
def test_bad_work_keys_name_the_file_and_benchmark(tmp_path: Path, extra: dict, message: str) -> None:
    path = _write(tmp_path / "bad.json", [_bench("c", "t[bad]", "fast", "x", 0.1, **extra)])
    with pytest.raises(BenchError, match=rf"bad\.json: benchmark benchmarks/test_x\.py::t\[bad\]: {message}"):
        write_report([path], tmp_path / "out")


def test_count_flops_and_record_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.conftest import count_flops, record_work

    x = torch.randn(8, 16, requires_grad=True)
    linear = torch.nn.Linear(16, 32)
    assert count_flops(lambda: torch.mm(x.detach(), linear.weight.detach().T)) == 2 * 8 * 16 * 32
    # forward, then the input and the weight gradients: three products of the same size
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * 2 * 8 * 16 * 32

    class Bench:
        extra_info: dict = {}

    bench_ = Bench()
    record_work(bench_, flops=10, nbytes=20, compute_dtype=torch.bfloat16)
    assert bench_.extra_info == {"flops": 10, "bytes": 20, "compute_dtype": "bf16"}
    record_work(bench_, limit="decode/I-O")
    assert bench_.extra_info["limit"] == "decode/I-O"
    with pytest.raises(ValueError, match="flops need compute_dtype"):
        record_work(bench_, flops=10)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        record_work(bench_, flops=10, compute_dtype="fp16")
    with pytest.raises(ValueError, match="compute_dtype torch.float16 has no peak"):
        record_work(bench_, nbytes=10, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="bytes must be a positive int"):
        record_work(bench_, nbytes=0)
    with pytest.raises(ValueError, match="limit must be one of"):
        record_work(bench_, limit="network")


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
    rows = {(r["fast variant"], r["machine"]): r for r in _records(report)}
    assert rows[("sdpa", "Test CPU 9000, 2 cores")][SPEEDUP_HEADER] == "**4.00x**"  # new fast, old reference
    assert rows[("xformers", "Test CPU 9000, 2 cores")][SPEEDUP_HEADER] == "**2.00x**"
    assert rows[("sdpa", "NVIDIA H100 80GB HBM3")][SPEEDUP_HEADER] == "**10.00x**"
    assert rows[("sdpa", "Test CPU 9000, 2 cores")]["date"] == "2026-11-20"
    text = report.read_text()
    assert "old skip" not in text  # ran in the newer file
    assert "GPU: NVIDIA H100 80GB HBM3 (79.2 GiB)" in text and "CUDA 13.0" in text
    named = write_report([gpu], tmp_path / "named", machine="H100 SXM (lab 3)")
    assert _records(named)[0]["machine"] == "H100 SXM (lab 3)"


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


def test_committed_train_step_results(tmp_path: Path) -> None:
    """The committed CPU train-step JSON (docs/benchmarks.md's table) pairs into the report: each
    one-variant case's speed-up is its reference median over its fast median."""
    source = REPO / "benchmarks" / "results" / "train_step.json"
    data = json.loads(source.read_text())
    report = write_report([source], tmp_path)
    rows = {(r["case"], r["fast variant"]): r for r in _records(report)}
    checked = 0
    for case in {b["group"] for b in data["benchmarks"]}:
        timed = [b for b in data["benchmarks"] if b["group"] == case]
        fast = [b for b in timed if b["extra_info"]["path"] == "fast"]
        (reference,) = (b["stats"]["median"] for b in timed if b["extra_info"]["path"] == "reference")
        for b in fast:
            row = rows[(case, b["extra_info"]["label"])]
            assert row[SPEEDUP_HEADER].strip("*") == f"{reference / b['stats']['median']:.2f}x", case
            assert row["peak memory ref / fast"].endswith(" GiB")
            checked += 1
    assert checked >= 4


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

from benchmarks.conftest import pair, record_work

x = torch.arange(20000, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["reference", "fast", "cuda"])
def test_sum(benchmark, impl):
    if impl == "cuda":
        pytest.skip("tiny suite: no CUDA case here")
    pair(benchmark, "sum", "reference" if impl == "reference" else "fast", impl)
    fn = (lambda: sum(x.tolist())) if impl == "reference" else (lambda: x.sum())
    benchmark.pedantic(fn, rounds=3, iterations=1)
    record_work(benchmark, nbytes=x.numel() * x.element_size())  # reads x once
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
    shutil.copyfile(REPO / "benchmarks" / bench.PEAK_SUITE[1], suites / bench.PEAK_SUITE[1])  # the real one
    monkeypatch.setattr(bench, "BENCH_DIR", suites)
    monkeypatch.setattr(bench, "SUITES", {"kernels": "test_tiny.py", "data": "test_absent.py"})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "results"

    assert cli_main(["bench", "--suite", "all", "--quick", "--out", str(out)]) == 0
    saved = json.loads((out / "kernels.json").read_text())
    assert {b["extra_info"]["path"] for b in saved["benchmarks"]} == {"reference", "fast"}
    assert saved["machine_info"]["quick"] is True
    text = (out / "REPORT.md").read_text()
    row = next(r for r in _records(out / "REPORT.md") if r["case"] == "sum")
    assert row["fast variant"] == "fast" and float(row[SPEEDUP_HEADER].strip("*x")) > 1  # sum beats a loop
    assert "test_sum[cuda]` " in text and "tiny suite: no CUDA case here" in text
    assert "suite data: test_absent.py does not exist in this checkout, not run" in text
    # the kernels suite also compiles the real kernels for sm_90 and reports them with their lower bounds
    assert "## Kernels compiled for the GPU (static, batch 32, sm_90)" in text and "not measurements" in text
    static = json.loads((out / bench.STATIC_KERNELS_NAME).read_text())
    assert {r["kernel"] for r in static} >= {"_tube_keys_kernel", "_gather_rows_kernel", "_loss_bwd_kernel"}
    assert all(r["spill_bytes"] == 0 for r in static)
    assert all(0 < r["lower_bound_us_H200"] < r["lower_bound_us_H100"] for r in static)
    drop = next(r for r in static if r["case"] == "drop_tokens bfloat16 B=32")
    assert f"| drop_tokens bfloat16 B=32 | `_gather_rows_kernel` | {drop['programs']} |" in text
    assert (out / "ratios.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| sum | fast |" in printed
    assert printed.index("== suite peak") < printed.index("== suite kernels")  # the peaks first, same run

    # The row's achieved GB/s and % of the copy peak, from the two JSON files of this run.
    peaks = json.loads((out / "peak.json").read_text())["benchmarks"]
    assert {b["group"] for b in peaks} == {"peak matmul fp32", "peak matmul bf16", "peak memory copy"}
    copy = next(b for b in peaks if b["group"] == "peak memory copy")
    copy_rate = copy["extra_info"]["bytes"] / copy["stats"]["median"]
    rates = [
        b["extra_info"]["bytes"] / b["stats"]["median"]
        for path in ("reference", "fast")
        for b in saved["benchmarks"]
        if b["extra_info"]["path"] == path
    ]

    def number(value: float) -> str:
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"

    def percent(value: float) -> str:
        return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"

    assert row[ACHIEVED_HEADER] == " / ".join(number(r / 1e9) for r in rates) + " GB/s"
    assert row[PERCENT_HEADER] == " / ".join(percent(100 * r / copy_rate) for r in rates)
    assert row[LIMIT_HEADER] == f"memory ({number(copy_rate / 1e9)} GB/s)"
    for limit in ("compute fp32", "compute bf16", "memory"):
        assert f"; {limit} " in text or f": {limit} " in text  # the peaks section names all three

    assert cli_main(["bench", "--suite", "data", "--out", str(out)]) == 2
    assert "test_absent.py does not exist" in capsys.readouterr().err
