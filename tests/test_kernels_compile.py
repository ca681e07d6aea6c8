"""Every Triton kernel compiled for the GPUs it targets, without one: sm_90 (H100 / H200) and sm_80 (A100).

`miles_kernels.aot` calls each wrapper at the training shapes (ViT-B/16, 224 px, 4 frames, batches 8 / 32 /
64, bf16 and fp32, the snapshot, pixel and HOG target widths), captures the launches the wrapper makes on
CUDA, specialises them as Triton's launcher would, and compiles them with the real compiler and `ptxas`.
It runs in a subprocess: the kernel modules must be imported compiled, not for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "kernel_resources.json"
KERNELS = {
    "_tube_keys_kernel",
    "_tube_rank_kernel",
    "_tube_visible_kernel",
    "_gather_rows_kernel",
    "_scatter_rows_kernel",
    "_loss_fwd_kernel",
    "_loss_bwd_kernel",
}
BULK = {"_gather_rows_kernel", "_scatter_rows_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel"}
ROW_STORES = {"_gather_rows_kernel", "_scatter_rows_kernel", "_loss_bwd_kernel"}  # fwd writes one partial


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "miles_kernels.aot", "--json", str(out / "builds.json"), "--record",
         str(out / "record.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads((out / "builds.json").read_text())
    for b in built:
        b["record"] = json.loads((out / "record.json").read_text())
    return built


def test_every_kernel_compiles_for_hopper_and_ampere(builds: list[dict]) -> None:
    assert {(b["kernel"], b["arch"]) for b in builds} == {(k, a) for k in KERNELS for a in ("sm_90", "sm_80")}
    cases = {b["case"] for b in builds}
    for needed in ("hog", "snapshot", "bfloat16", "float32", "tube_mask block", "tube_mask random"):
        assert any(needed in c for c in cases), needed


def test_nothing_spills(builds: list[dict]) -> None:
    spilled = [
        f"{b['kernel']} {b['arch']} {b['constexprs']}: {b['spill_stores']} B stored, "
        f"{b['spill_loads']} B loaded, {b['registers']} registers ({b['case']})"
        for b in builds
        if b["spill_stores"] or b["spill_loads"] or b["stack_bytes"]
    ]
    assert not spilled, "\n".join(spilled)


def _widest_possible(row_bytes: int) -> int:
    """Bits of the widest access every row allows: rows start aligned to their width's power-of-two part."""
    return 8 * min(16, row_bytes & -row_bytes)


def test_bulk_traffic_moves_in_the_widest_vectors_the_rows_allow(builds: list[dict]) -> None:
    """128-bit (16-byte) loads and stores wherever a row is a multiple of 16 bytes (every training width in
    bf16 and fp32, and HOG's 108 columns in fp32); HOG's bf16 rows of 216 bytes allow 64 bits."""
    narrow = []
    for b in (b for b in builds if b["kernel"] in BULK):
        want = _widest_possible(b["row_bytes"])
        stores = b["widest_store_bits"] if b["kernel"] in ROW_STORES else want
        if b["widest_load_bits"] < want or stores < want:
            narrow.append(
                f"{b['kernel']} {b['arch']} rows of {b['row_bytes']} B: widest load {b['widest_load_bits']}"
                f" / store {b['widest_store_bits']} bits, {want} possible ({b['case']})"
            )
    assert not narrow, "\n".join(narrow)
    widths = {b["widest_load_bits"] for b in builds if b["kernel"] in BULK}
    assert 128 in widths and 64 in widths  # both kinds of rows are covered


def _locked_triton() -> str:
    """The Triton version of requirements.lock: the compiler the committed record was written with."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.startswith("triton=="):
            return line.partition("==")[2].strip()
    raise AssertionError("requirements.lock pins no triton")


def test_registers_and_spills_match_the_committed_record(builds: list[dict]) -> None:
    """A change that adds registers shows in the diff of benchmarks/results/kernel_resources.json.

    Register counts are the compiler's choice: the record holds those of the locked Triton. Another
    Triton (the xformers profile's 3.6, a GPU image's) is held to the other tests here instead: every
    kernel compiles, nothing spills, bulk traffic uses the widest vectors."""
    import triton

    if triton.__version__ != _locked_triton():
        pytest.skip(
            f"the record is of Triton {_locked_triton()} (requirements.lock); this is {triton.__version__}"
        )
    current = builds[0]["record"]
    committed = json.loads(RECORD.read_text())
    changed = sorted(f"{k}: {committed.get(k)} -> {v}" for k, v in current.items() if committed.get(k) != v)
    gone = sorted(set(committed) - set(current))
    assert not changed and not gone, (
        "kernel resources differ from benchmarks/results/kernel_resources.json; if intended, rewrite it with "
        "`python -m miles_kernels.aot --record benchmarks/results/kernel_resources.json`:\n"
        + "\n".join(changed[:20] + [f"{k}: no longer built" for k in gone[:10]])
    )
