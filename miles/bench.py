"""`miles bench`: run the pytest-benchmark suites that this machine can run and write the report.

The suites in `benchmarks/` follow one pairing convention (see `benchmarks/conftest.py`): the benchmark
group is the case, `extra_info["path"]` says reference / fast / yardstick / peak / peer and
`extra_info["label"]` names the variant. `write_report` turns any set of pytest-benchmark JSON files
into `REPORT.md` (one row per fast variant: its speed-up over the reference of the same case, same
inputs, same run) and `ratios.png`.
It is used on its own by `benchmarks/gpu_check.sh`, with the CUDA test results added.

Utilisation: the peak suite (`benchmarks/test_machine_peak.py`, path "peak") runs before the selected
suites, so every row can say how close its achieved GFLOP/s or GB/s (`extra_info` `flops` / `bytes` of one
call over the median time) comes to this machine's matching peak from the same run: the fp32 or bf16
matmul rate for compute, the copy bandwidth for memory. The peaks are pytest-benchmark cases rather than
numbers measured here so they share the suites' timer, JSON file, machine description and merging.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
PEAK_SUITE = ("peak", "test_machine_peak.py")  # always run, first, with whichever suites are selected
SUITES = {
    "kernels": "test_kernels.py",
    "attention": "test_attention.py",
    "data": "test_data_loading.py",
    "train_step": "test_train_step.py",
    "whole_run": "test_whole_run.py",
}
REPORT_NAME = "REPORT.md"
STATIC_KERNELS_NAME = "kernels_static.json"  # `python -m miles_kernels.aot --table`: no GPU needed
CHART_NAME = "ratios.png"
SPEEDUP_HEADER = "speed-up (reference time / fast time)"
PEER_HEADER = "peer code base (its time; its time / ref, / fast)"
ACHIEVED_HEADER = "achieved ref / fast"
PERCENT_HEADER = "% of peak ref / fast"
LIMIT_HEADER = "limit (peak)"
TABLE_HEADER = [
    "case",
    "fast variant",
    "reference",
    "fast",
    SPEEDUP_HEADER,
    PEER_HEADER,
    ACHIEVED_HEADER,
    PERCENT_HEADER,
    LIMIT_HEADER,
    "peak memory ref / fast",
    "machine",
    "date",
]
COMPUTE_DTYPES = ("fp32", "bf16")
MEMORY = "memory"
PEAK_LIMITS = (*(f"compute {d}" for d in COMPUTE_DTYPES), MEMORY)  # the limits a peak case measures
LIMITS = (*PEAK_LIMITS, "decode/I-O")  # what a case's extra_info["limit"] may say (benchmarks/conftest.py)
DASH = "–"
NO_PEAK = "(no peak measured)"


class BenchError(RuntimeError):
    """A suite or benchmark file that cannot be used, with what to do about it."""


@dataclass
class _Timing:
    fullname: str
    case: str
    path: str
    label: str
    median_s: float
    mean_s: float
    rounds: int
    extra: dict[str, Any]
    machine: str
    date: str
    stamp: str  # ISO datetime of the run, to keep the newest result of one test


@dataclass
class _Runs:
    timings: dict[str, _Timing] = field(default_factory=dict)
    # "<machine>::<test id>" -> timing / (reason, stamp): one machine's newest outcome of each test
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    machines: dict[str, str] = field(default_factory=dict)  # short name -> long description
    notes: list[str] = field(default_factory=list)  # what `run_suites` saved about a suite's run


def describe_machine(machine_info: dict[str, Any]) -> tuple[str, str]:
    """(short name for the table, long description) from pytest-benchmark's `machine_info`."""
    cpu = machine_info.get("cpu_model") or machine_info.get("cpu", {}).get("brand_raw") or "unknown CPU"
    cores = machine_info.get("cpu_count") or machine_info.get("cpu", {}).get("count")
    cpu_text = f"{cpu}, {cores} cores" if cores else str(cpu)
    gpu = machine_info.get("cuda_device")
    short = gpu or cpu_text
    parts = [f"GPU: {gpu} ({machine_info.get('cuda_memory_gb', '?')} GiB)"] if gpu else []
    parts.append(f"CPU: {cpu_text}")
    if machine_info.get("torch"):
        cuda = f", CUDA {machine_info['cuda_version']}" if machine_info.get("cuda_version") else ""
        parts.append(f"torch {machine_info['torch']}{cuda}")
    parts.append(f"Python {machine_info.get('python_version', '?')}")
    if machine_info.get("quick"):
        parts.append("quick run (MILES_BENCH_QUICK: one round per case on CPU)")
    return short, "; ".join(parts)


def local_machine() -> str:
    """This machine's short name, as `describe_machine` would give it (for a report with no JSON)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _load(paths: list[Path], machine: str | None) -> _Runs:
    runs, newest = _Runs(), {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BenchError(
                f"{path}: not a readable pytest-benchmark JSON ({err}); rerun `miles bench`"
            ) from err
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise BenchError(f"{path}: no 'benchmarks' key, so not a pytest-benchmark --benchmark-json file")
        short, long = describe_machine(data.get("machine_info", {}))
        if machine:
            short = machine
        stamp = str(data.get("datetime", ""))
        if stamp >= newest.get(short, ""):  # the newest file describes the machine (torch version etc.)
            runs.machines[short], newest[short] = long, stamp
        runs.notes.extend(str(n) for n in data.get("notes", []))
        date = stamp[:10] or "?"
        for b in data["benchmarks"]:
            extra = dict(b.get("extra_info") or {})
            fullname = b.get("fullname") or b["name"]
            _check_work(extra, f"{path}: benchmark {fullname}")
            old = runs.timings.get(f"{short}::{fullname}")
            if old is not None and old.stamp > stamp:
                continue
            runs.timings[f"{short}::{fullname}"] = _Timing(
                fullname=fullname,
                case=b.get("group") or b["name"],
                path=str(extra.get("path", "")),
                label=str(extra.get("label", b.get("param") or b["name"])),
                median_s=float(b["stats"]["median"]),
                mean_s=float(b["stats"]["mean"]),
                rounds=int(b["stats"].get("rounds", 0)),
                extra=extra,
                machine=short,
                date=date,
                stamp=stamp,
            )
        for key, target in (("skipped", runs.skipped), ("failed", runs.failed)):
            for item in data.get(key, []):
                name = f"{short}::{item['fullname']}"
                if name not in target or target[name][1] <= stamp:
                    target[name] = (str(item.get("reason", "")), stamp)
    # A test that has a newer timing than its skip / failure ran after all (and the other way round).
    for key in ("skipped", "failed"):
        target = getattr(runs, key)
        for name in list(target):
            timing = runs.timings.get(name)
            if timing is not None:
                if timing.stamp >= target[name][1]:
                    del target[name]
                else:
                    del runs.timings[name]
    return runs


def _check_work(extra: dict[str, Any], where: str) -> None:
    """The utilisation keys of one benchmark are usable, or a BenchError says which and how to fix it."""
    fix = "set them with benchmarks.conftest.record_work()"
    for key in ("flops", "bytes"):
        value = extra.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        ):
            raise BenchError(f"{where}: extra_info[{key!r}] = {value!r} is not a positive number; {fix}")
    dtype = extra.get("compute_dtype")
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise BenchError(
            f"{where}: extra_info['compute_dtype'] = {dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}"
        )
    if extra.get("flops") is not None and dtype is None:
        raise BenchError(f"{where}: extra_info has 'flops' but no 'compute_dtype' (fp32 or bf16); {fix}")
    limit = extra.get("limit")
    if limit is not None and limit not in LIMITS:
        raise BenchError(f"{where}: extra_info['limit'] = {limit!r}; use one of {', '.join(LIMITS)}")


def _achieved(t: _Timing) -> dict[str, float]:
    """Work per second at the median time, per limit it can be held against: {limit: FLOP/s or B/s}."""
    found = {}
    if t.extra.get("flops") is not None:
        found[f"compute {t.extra['compute_dtype']}"] = float(t.extra["flops"]) / t.median_s
    if t.extra.get("bytes") is not None:
        found[MEMORY] = float(t.extra["bytes"]) / t.median_s
    return found


def _machine_peaks(runs: _Runs) -> dict[tuple[str, str], tuple[float, _Timing]]:
    """(machine, limit) -> (the best rate among that machine's peak cases, the case)."""
    best: dict[tuple[str, str], tuple[float, _Timing]] = {}
    for t in runs.timings.values():
        if t.path != "peak":
            continue
        for limit, rate in _achieved(t).items():
            key = (t.machine, limit)
            if key not in best or rate > best[key][0]:
                best[key] = (rate, t)
    return best


@dataclass
class _Use:
    """One timing held against its limit: rate (FLOP/s or B/s) and fraction of the machine's peak."""

    limit: str
    rate: float | None
    fraction: float | None


def _use(t: _Timing | None, peaks: dict[tuple[str, str], tuple[float, _Timing]]) -> _Use | None:
    """The binding limit of a timing: the stated one, else the one closest to its peak (a roofline)."""
    if t is None:
        return None
    rates = _achieved(t)
    stated = t.extra.get("limit")
    if stated is not None:
        rates = {stated: rates[stated]} if stated in rates else {}
        if not rates:
            return _Use(stated, None, None)
    if not rates:
        return None
    uses = []
    for limit, rate in rates.items():
        peak = peaks.get((t.machine, limit))
        uses.append(_Use(limit, rate, rate / peak[0] if peak else None))
    # Binding: the largest fraction of its peak; without peaks, compute before memory.
    return max(uses, key=lambda u: (u.fraction if u.fraction is not None else -1.0, u.limit != MEMORY))


def _fmt_rate(values: list[float | None], limit: str) -> str:
    """'a / b unit' with one unit for both: GB/s for memory, GFLOP/s (TFLOP/s from 1e12) for compute."""
    present = [v for v in values if v is not None]
    if not present:
        return DASH
    if limit == MEMORY:
        unit, scale = "GB/s", 1e9
    else:
        unit, scale = ("TFLOP/s", 1e12) if max(present) >= 1e12 else ("GFLOP/s", 1e9)
    cells = [DASH if v is None else _fmt_number(v / scale) for v in values]
    return " / ".join(cells) + f" {unit}"


def _fmt_number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _fmt_percent(fraction: float | None) -> str:
    if fraction is None:
        return DASH
    percent = 100 * fraction
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _throughput(t: _Timing) -> tuple[str, float] | None:
    """(unit, value at the median time): the recorded value is work / mean time, so rescale it."""
    for key, unit in (("clips_per_s", "clips/s"), ("gb_per_s", "GB/s"), ("GB_per_s", "GB/s")):
        if isinstance(t.extra.get(key), (int, float)):
            return unit, float(t.extra[key]) * t.mean_s / t.median_s
    return None


def _fmt_timing(t: _Timing, yardsticks: dict[tuple[str, str], _Timing]) -> str:
    text = _fmt_time(t.median_s)
    tp = _throughput(t)
    if tp is not None:
        unit, value = tp
        text += f", {value:,.0f} {unit}" if value >= 1000 else f", {value:.3g} {unit}"
        bound = yardsticks.get((str(t.extra.get("yardstick", "")), t.machine))
        bound_tp = _throughput(bound) if bound is not None else None
        if unit == "GB/s" and bound_tp is not None and bound_tp[1] > 0:
            text += f" ({100 * value / bound_tp[1]:.0f}% of copy)"
    return text


def _peak(t: _Timing | None) -> str | None:
    if t is None:
        return None
    if isinstance(t.extra.get("peak_mem_bytes"), (int, float)):
        value = float(t.extra["peak_mem_bytes"]) / 2**30
    elif isinstance(t.extra.get("peak_memory_mb"), (int, float)):  # files written before the convention
        value = float(t.extra["peak_memory_mb"]) / 1024
    else:
        return None
    return None if math.isnan(value) else f"{value:.2f}"


def _peak_kind(timings: list[_Timing]) -> str:
    kinds = {str(t.extra.get("peak_mem_kind", "")) for t in timings if "peak_mem_kind" in t.extra}
    names = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS"}
    return " / ".join(names.get(k, k) for k in sorted(kinds)) or "CPU peak RSS or CUDA max allocated"


@dataclass
class ReportRow:
    """One table row: a fast variant of a case against that case's reference."""

    case: str
    label: str
    reference: str
    fast: str
    speedup: float | None
    peer: str
    achieved: str
    percent: str
    limit: str
    peak: str
    machine: str
    date: str


def _utilisation(
    ref: _Timing | None, fast: _Timing | None, peaks: dict[tuple[str, str], tuple[float, _Timing]]
) -> tuple[str, str, str]:
    """The achieved, % of peak and limit cells of a row (reference / fast; the limit is the fast side's)."""
    uses = (_use(ref, peaks), _use(fast, peaks))
    main = uses[1] or uses[0]
    if main is None:
        return DASH, DASH, DASH
    rated = [u for u in uses if u is not None and u.rate is not None]
    if not rated:
        achieved = DASH
    elif len({u.limit == MEMORY for u in rated}) == 1:  # one unit for both sides
        achieved = _fmt_rate([u.rate if u else None for u in uses], rated[-1].limit)
    else:  # compute on one side, memory on the other: each with its own unit
        achieved = " / ".join(_fmt_rate([u.rate], u.limit) if u else DASH for u in uses)
    fractions = [u.fraction if u else None for u in uses]
    percent = DASH if all(f is None for f in fractions) else " / ".join(_fmt_percent(f) for f in fractions)
    limit = main.limit
    if limit in PEAK_LIMITS:
        peak = peaks.get(((fast or ref).machine, limit))
        limit += f" ({_fmt_rate([peak[0]], limit)})" if peak else f" {NO_PEAK}"
    return achieved, percent, limit


def _rows(runs: _Runs) -> tuple[list[ReportRow], list[_Timing], list[_Timing]]:
    """Paired rows, the yardsticks, and timings that follow no convention (listed, never dropped)."""
    by_case: dict[tuple[str, str], dict[str, list[_Timing]]] = {}
    for t in runs.timings.values():
        by_case.setdefault((t.case, t.machine), {}).setdefault(t.path, []).append(t)
    yardsticks = {(t.case, t.machine): t for t in runs.timings.values() if t.path == "yardstick"}
    peers: dict[tuple[str, str], list[_Timing]] = {}
    for t in sorted(runs.timings.values(), key=lambda t: t.label):
        if t.path == "peer":
            peers.setdefault((t.case, t.machine), []).append(t)
    limits = _machine_peaks(runs)
    rows, unpaired = [], []
    for case, machine in sorted(by_case):
        sides = by_case[(case, machine)]
        refs, fasts = sides.get("reference", []), sorted(sides.get("fast", []), key=lambda t: t.label)
        ref = refs[0] if refs else None
        for extra_ref in refs[1:]:
            unpaired.append(extra_ref)
        for other in set(sides) - {"reference", "fast", "yardstick", "peak", "peer"}:
            unpaired.extend(sides[other])
        if ref is not None and not fasts:
            fasts = [None]
        for fast in fasts:
            if ref is None and fast is None:
                continue
            peaks = (_peak(ref), _peak(fast))
            peak = " / ".join(p or "–" for p in peaks) + " GiB" if any(peaks) else "–"
            main = fast or ref
            achieved, percent, limit = _utilisation(ref, fast, limits)
            rows.append(
                ReportRow(
                    case=case,
                    label=fast.label if fast else "–",
                    reference=_fmt_timing(ref, yardsticks) if ref else "missing (see skipped / failed)",
                    fast=_fmt_timing(fast, yardsticks) if fast else "not run (see skipped / failed)",
                    speedup=ref.median_s / fast.median_s if ref and fast else None,
                    peer=_fmt_peers(peers.get((case, machine), []), ref, fast),
                    achieved=achieved,
                    percent=percent,
                    limit=limit,
                    peak=peak,
                    machine=main.machine,
                    date=main.date,
                )
            )
    return rows, sorted(yardsticks.values(), key=lambda t: t.case), unpaired


def _fmt_peers(peers: list[_Timing], ref: _Timing | None, fast: _Timing | None) -> str:
    """Each peer's time and how many times faster our reference and fast paths are than it."""
    if not peers:
        return "–"
    cells = []
    for peer in peers:
        ratios = [f"{peer.median_s / ours.median_s:.2f}x" if ours else "–" for ours in (ref, fast)]
        cells.append(f"{peer.label}: {_fmt_timing(peer, {})}; {' / '.join(ratios)}")
    return "<br>".join(cells)


def _table(rows: list[ReportRow]) -> list[str]:
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|"
        + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] + ["---:"] * 2 + ["---", "---:"] + ["---"] * 2)
        + "|",
    ]
    for r in rows:
        speedup = f"**{r.speedup:.2f}x**" if r.speedup is not None else "–"
        cells = [
            r.case,
            r.label,
            r.reference,
            r.fast,
            speedup,
            r.peer,
            r.achieved,
            r.percent,
            r.limit,
            r.peak,
        ]
        cells += [r.machine, r.date]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def _outcome_lines(outcomes: dict[str, tuple[str, str]]) -> list[str]:
    lines = []
    for key, (reason, _) in sorted(outcomes.items()):
        machine, name = key.split("::", 1)
        lines.append(f"- `{name}` ({machine}): {reason}")
    return lines


def _tests_section(junit_paths: list[Path]) -> list[str]:
    lines = ["## Tests", ""]
    for path in junit_paths:
        path = Path(path)
        if not path.is_file():
            lines.append(f"- `{path}`: missing (the test stage did not finish; see its log)")
            continue
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            lines.append(f"- `{path}`: unreadable JUnit XML ({err})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = sum(int(s.get("tests", 0)) for s in suites)
        bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        lines.append(f"- `{path.name}`: {total - bad - skipped} passed, {bad} failed, {skipped} skipped")
        for case in root.iter("testcase"):
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    message = (node.get("message") or "").strip().splitlines()
                    first = message[0][:200] if message else tag
                    lines.append(f"  - FAILED `{case.get('classname')}::{case.get('name')}`: {first}")
    return lines + [""]


def _peaks_section(runs: _Runs, rows: list[ReportRow]) -> list[str]:
    """Each machine's peaks with what measured them, and the machines of the table that have none."""
    by_machine: dict[str, list[str]] = {}
    dates: dict[str, str] = {}
    limits = _machine_peaks(runs)
    for limit in PEAK_LIMITS:
        for (machine, kind), (rate, t) in sorted(limits.items()):
            if kind == limit:
                text = f"{limit} {_fmt_rate([rate], limit)} ({t.label}, {_fmt_time(t.median_s)})"
                by_machine.setdefault(machine, []).append(text)
                dates[machine] = max(dates.get(machine, ""), t.date)
    lines = [f"- {m}, {dates[m]}: " + "; ".join(parts) for m, parts in sorted(by_machine.items())]
    for machine in sorted({r.machine for r in rows if r.limit.endswith(NO_PEAK)} - set(by_machine)):
        lines.append(
            f"- {machine}: no peak measured (`miles bench` there runs the peak suite with any suite)"
        )
    if not lines:
        return []
    return [
        "Peaks (`benchmarks/test_machine_peak.py`, run by `miles bench` before the suites):",
        "",
        *lines,
        "",
    ]


def write_chart(rows: list[ReportRow], path: Path) -> Path:
    """Horizontal bars of the speed-ups with a line at 1.0 (parity); an empty chart says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = [r for r in rows if r.speedup is not None]
    fig, ax = plt.subplots(figsize=(8, 0.4 * max(len(paired), 3) + 1.2))
    if paired:
        labels = [f"{r.case} ({r.label})" for r in paired]
        values = [r.speedup for r in paired]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ax.barh(range(len(paired)), values, color=colors)
        ax.set_yticks(range(len(paired)), labels, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.2)
    else:
        ax.text(0.5, 0.5, "no paired cases ran on this machine", ha="center", va="center")
        ax.set_yticks([])
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel(SPEEDUP_HEADER)
    machines = sorted({r.machine for r in paired})
    ax.set_title(
        "MILES fast paths vs reference" + (f" ({'; '.join(machines)})" if machines else ""), fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _static_kernels_section(path: Path) -> list[str]:
    """The kernels compiled for sm_90 here, with the time they cannot beat on an H100 / H200."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    lines = [
        "## Kernels compiled for the GPU (static, batch 32, sm_90)",
        "",
        "Compiled here by `python -m miles_kernels.aot`, through the wrappers, at the launch configuration "
        "they pick on CUDA. Bytes = what a perfect kernel reads and writes per call. **The lower bounds are "
        "not measurements**: bytes / copy bandwidth (H100 about 3.0 TB/s, H200 about 4.3 TB/s); a measured "
        "time on that GPU belongs beside its bound.",
        "",
        "| case | kernel | programs | registers | spilled B | MB moved | >= us H100 | >= us H200 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | `{r['kernel']}` | {r['programs']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['bytes'] / 1e6:.2f} | {r['lower_bound_us_H100']:.2f} | {r['lower_bound_us_H200']:.2f} |"
        )
    return [*lines, ""]


def write_static_kernels(out_dir: Path) -> str | None:
    """Compile the kernels for sm_90 in a fresh process (they must not be imported for the interpreter) and
    write the static table; a note when that failed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "miles_kernels.aot", "--table", str(out_dir / STATIC_KERNELS_NAME)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"static kernel table: `{' '.join(cmd[1:])}` failed: {proc.stderr.strip()[-300:]}"
    return None


def write_report(
    benchmark_json_paths: list[Path] | list[str],
    out_dir: Path | str,
    machine: str | None = None,
    junit_paths: list[Path] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write `REPORT.md` and `ratios.png` into `out_dir` from pytest-benchmark JSON files; return the report.

    Later runs of the same test replace earlier ones, so files of several runs merge. `machine` names
    the machine in the table instead of the JSON's CPU / GPU; `junit_paths` adds test results (the CUDA
    tests of gpu_check.sh); `notes` are stage failures worth a line (a suite that crashed or timed out).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = _load([Path(p) for p in benchmark_json_paths], machine)
    rows, yardsticks, unpaired = _rows(runs)
    all_timings = list(runs.timings.values())
    lines = ["# MILES benchmark report", ""]
    lines.append(f"Written {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by `miles bench`.")
    lines.append("")
    for short, long in sorted(runs.machines.items()):
        lines.append(f"- **{short}**: {long}")
    if not runs.machines:
        lines.append(f"- **{machine or local_machine()}**: no benchmark ran")
    lines += [
        "",
        "Fast path against reference, same inputs in the same run. Times are the median per round "
        "(throughput at that time); speed-up = reference time / fast time, above 1 means the fast path "
        "is faster. Peer code base: the same case done the way other code bases do it (the decord loader "
        "of Frozen-in-Time / UMT / VindLU; torchcodec, PyTorch's decoder), each with its time over ours "
        "(above 1: ours is faster). "
        "Achieved = the work of one call (FLOPs counted by torch.utils.flop_counter, or the "
        "bytes a perfect kernel reads and writes) / the median time; % of peak = achieved / this "
        "machine's peak for the case's limit (compute fp32 or bf16: torch.matmul; memory: a large copy), "
        "measured in the same run (Peaks, below the table; above 100% of memory, the case's data stays in "
        "cache). Limit is the bound that applies, with its peak in brackets. "
        f"Peak memory per case: {_peak_kind(all_timings)}.",
        "",
        *_table(rows),
        "",
    ]
    lines += _peaks_section(runs, rows)
    if yardsticks:
        lines += ["Yardsticks (bounds, not paired):", ""]
        lines += [f"- {t.case} ({t.label}): {_fmt_timing(t, {})}, {t.machine}, {t.date}" for t in yardsticks]
        lines.append("")
    if unpaired:
        lines += ["Timings outside the pairing convention:", ""]
        lines += [f"- `{t.fullname}` (group {t.case!r}): {_fmt_timing(t, {})}" for t in unpaired]
        lines.append("")
    lines += _static_kernels_section(out_dir / STATIC_KERNELS_NAME)
    if runs.failed:
        lines += ["## Failed cases", ""]
        lines += _outcome_lines(runs.failed)
        lines.append("")
    lines += ["## Skipped cases", ""]
    lines += _outcome_lines(runs.skipped) or ["- none"]
    lines.append("")
    if junit_paths:
        lines += _tests_section(junit_paths)
    notes = [*runs.notes, *[n for n in notes or [] if n not in runs.notes]]
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    chart = write_chart(rows, out_dir / CHART_NAME)
    lines += [f"![speed-ups]({chart.name})", ""]
    report = out_dir / REPORT_NAME
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report


def suite_files(names: list[str]) -> tuple[dict[str, Path], list[str]]:
    """The suites to run (the peak suite first, whatever is asked) and notes on those not in this checkout."""
    if not BENCH_DIR.is_dir():
        raise BenchError(f"{BENCH_DIR}: no benchmarks folder; run `miles bench` from a MILES source checkout")
    peak_name, peak_file = PEAK_SUITE
    wanted = list(SUITES) if "all" in names else [n for n in names if n != peak_name]
    found, notes = {}, []
    if (BENCH_DIR / peak_file).is_file():
        found[peak_name] = BENCH_DIR / peak_file
    else:
        notes.append(
            f"suite {peak_name}: {peak_file} does not exist in this checkout, not run (no % of peak)"
        )
    for name in wanted:
        if name not in SUITES:
            choices = ", ".join([*SUITES, peak_name, "all"])
            raise BenchError(f"unknown suite {name!r}; choose from: {choices}")
        path = BENCH_DIR / SUITES[name]
        if path.is_file():
            found[name] = path
        elif "all" in names:
            notes.append(f"suite {name}: {path.name} does not exist in this checkout, not run")
        else:
            raise BenchError(f"suite {name!r}: {path} does not exist in this checkout")
    return found, notes


def _outcomes_from_junit(path: Path) -> dict[str, list[dict[str, str]]]:
    """Skipped and failed tests of a JUnit XML file, in the benchmark JSON's "skipped" / "failed" form."""
    found: dict[str, list[dict[str, str]]] = {"skipped": [], "failed": []}
    if not path.is_file():
        return found
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").replace(".", "/")
        fullname = f"{module}.py::{case.get('name')}"
        for tag, key in (("skipped", "skipped"), ("failure", "failed"), ("error", "failed")):
            node = case.find(tag)
            if node is not None:
                reason = (node.get("message") or tag).strip().splitlines()
                found[key].append({"fullname": fullname, "reason": reason[0] if reason else tag})
    return found


def _machine_info() -> dict[str, Any]:
    """The conftest's machine facts, for a suite where no benchmark ran (so pytest-benchmark wrote none)."""
    info: dict[str, Any] = {"cpu_model": local_machine().rsplit(",", 1)[0], "cpu_count": os.cpu_count()}
    info["python_version"] = platform.python_version()
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run_suites(
    names: list[str], out_dir: Path, quick: bool = False, timeout_s: float | None = None
) -> tuple[list[Path], list[str], bool]:
    """Run each suite in its own pytest process (one crash cannot take the others down).

    Returns the benchmark JSON files written (`<out_dir>/<suite>.json`), notes on suites that failed,
    timed out or timed nothing, and whether every suite passed. A suite that timed nothing still gets a
    JSON (no timings, its skipped / failed cases from pytest's JUnit XML), so no stale file survives.
    """
    suites, notes = suite_files(names)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # started from a pytest-xdist worker (the test suite), a suite would take itself for one and
    # pytest-benchmark would switch timing off: the suites run as plain pytest
    for key in [k for k in env if k.startswith("PYTEST_XDIST_")]:
        del env[key]
    if quick:
        env["MILES_BENCH_QUICK"] = "1"
    written, ok = [], True
    if "kernels" in suites:
        note = write_static_kernels(out_dir)
        if note:
            notes.append(note)
    for name, path in suites.items():
        target = out_dir / f"{name}.json"
        fresh, junit = out_dir / f".{name}.json.tmp", out_dir / f".{name}.junit.xml"
        fresh.unlink(missing_ok=True)
        junit.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-rs", str(path)]
        cmd += [
            f"--benchmark-json={fresh}",
            f"--junitxml={junit}",
            "--benchmark-columns=min,median,mean,rounds",
        ]
        print(f"== suite {name}: {' '.join(cmd[1:])}", flush=True)
        try:
            code = subprocess.run(cmd, cwd=BENCH_DIR.parent, env=env, timeout=timeout_s).returncode
            if code != 0:
                notes.append(f"suite {name}: pytest exit code {code}")
        except subprocess.TimeoutExpired:
            notes.append(f"suite {name}: timed out after {timeout_s:.0f} s")
            code = -1
        ok = ok and code == 0
        if not fresh.is_file():
            notes.append(f"suite {name}: no case was timed (all skipped or failed, or pytest stopped early)")
            data = {"machine_info": _machine_info(), "datetime": datetime.now().isoformat(), "benchmarks": []}
            fresh.write_text(json.dumps({**data, **_outcomes_from_junit(junit)}, indent=2))
        junit.unlink(missing_ok=True)
        suite_notes = [n for n in notes if n.startswith(f"suite {name}:")]
        if suite_notes:  # kept in the JSON, so a later report (gpu_check.sh's last stage) still says so
            data = json.loads(fresh.read_text())
            fresh.write_text(json.dumps({**data, "notes": suite_notes}, indent=2))
        fresh.replace(target)
        written.append(target)
    return written, notes, ok


def existing_results(out_dir: Path) -> list[Path]:
    """The pytest-benchmark JSON files already in `out_dir` (older runs of suites not rerun now)."""
    found = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
            found.append(path)
    return found


def main(
    suites: list[str],
    out_dir: Path,
    quick: bool = False,
    timeout_s: float | None = None,
    junit_paths: list[Path] | None = None,
    machine: str | None = None,
    report_only: bool = False,
    notes: list[str] | None = None,
) -> int:
    """Run the suites (unless `report_only`), then report every result file in `out_dir`; print the table.

    Returns the exit code: 1 when a suite failed or timed out (the report is written all the same).
    """
    notes, ok = list(notes or []), True
    if not report_only:
        names = [n.strip() for arg in suites for n in arg.split(",") if n.strip()]
        _, run_notes, ok = run_suites(names, out_dir, quick=quick, timeout_s=timeout_s)
        notes += run_notes
    report = write_report(
        existing_results(out_dir), out_dir, machine=machine, junit_paths=junit_paths, notes=notes
    )
    print(report.read_text())
    print(f"report: {report}\nchart: {report.parent / CHART_NAME}")
    return 0 if ok else 1
