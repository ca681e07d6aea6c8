"""The Triton kernels compiled ahead of time for a named GPU, through their own wrappers, with no GPU here.

The wrappers (`tube_mask_triton`, `drop_tokens_triton`, ...) are called on CPU tensors at the training
shapes while every `kernel[grid](...)` launch is captured instead of run. Each captured launch is then
specialised exactly as Triton's launcher would on a CUDA device (its argument binder: integer and pointer
divisibility, constexprs, num_warps) and compiled for the target (`sm_90`: H100 / H200, `sm_80`: A100).
`ptxas -v` (shipped in the triton wheel) reports registers, shared memory and spills; the PTX shows whether
bulk traffic is 128-bit vectorized. Run as `python -m miles_kernels.aot [--arch sm_90 ...]` for the table.

The kernel modules must be imported compiled (TRITON_INTERPRET unset), so this runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
PTXAS_ARCH = {"sm_90": "sm_90a", "sm_80": "sm_80"}
# Copy bandwidth (read + write) used for the lower-bound times: H100 SXM and H200 (vendor figures).
COPY_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}

# The training shapes: ViT-B/16 at 224 px, 4 frames (N = 196 patches, K = 49 visible at ratio 0.75), width
# 768 (the predictor 384), batches 8 / 32 / 64; MVM targets: snapshot features (768), pixels (768), HOG (108).
FRAMES, GRID, RATIO_DROP, RATIO_BERT = 4, (14, 14), 0.75, 0.5
BATCHES = (8, 32, 64)
TARGET_WIDTHS = {"snapshot": 768, "pixel": 768, "hog": 108}


@dataclass
class Launch:
    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Build:
    """One kernel at one launch configuration, compiled for one GPU."""

    case: str  # the wrapper call it came from
    kernel: str
    arch: str
    dtypes: str  # of the tensor arguments, in order
    row_bytes: int  # one row (last dimension) of the first tensor argument
    grid: tuple[int, ...]
    num_warps: int
    constexprs: dict[str, Any]
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    global_loads: int
    global_stores: int
    widest_load_bits: int  # the widest global load / store in the PTX (128 = 16-byte vectors)
    widest_store_bits: int
    bytes_moved: int  # what the launch must read and write at the least (from its tensor arguments)


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Every `kernel[grid](...)` made inside is recorded instead of launched."""
    launches: list[Launch] = []
    original = JITFunction.__getitem__

    def record(self: JITFunction, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            launches.append(Launch(self, tuple(grid) if isinstance(grid, tuple) else (grid,), args, kwargs))

        return launch

    JITFunction.__getitem__ = record  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.__getitem__ = original  # type: ignore[method-assign]


def compile_launch(launch: Launch, arch: str) -> Any:
    """The kernel as Triton's CUDA launcher would compile it for these arguments, on `arch`."""
    fn = launch.kernel
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("kernel modules were imported for the interpreter: unset TRITON_INTERPRET")
    target = TARGETS[arch]
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def _ptxas_report(ptx: str, arch: str) -> dict[str, int]:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [str(ptxas), f"-arch={PTXAS_ARCH[arch]}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = proc.stderr + proc.stdout

    def grab(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "shared_bytes": grab(r"(\d+) bytes smem"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


def _access_bits(instruction: str) -> int:
    """Bits moved by one PTX global access such as `ld.global.v4.b32` or `st.global.b16`."""
    lanes = re.search(r"\.v(\d)\.", instruction)
    width = re.search(r"\.[bfus](8|16|32|64)$", instruction)
    return (int(lanes.group(1)) if lanes else 1) * (int(width.group(1)) if width else 0)


def _vector_counts(ptx: str) -> dict[str, int]:
    loads = [_access_bits(i) for i in re.findall(r"ld\.global[\w.]*", ptx)]
    stores = [_access_bits(i) for i in re.findall(r"st\.global[\w.]*", ptx)]
    return {
        "global_loads": len(loads),
        "global_stores": len(stores),
        "widest_load_bits": max(loads, default=0),
        "widest_store_bits": max(stores, default=0),
    }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes_moved(launch: Launch) -> int:
    """What a perfect kernel must read and write for this launch (the benchmarks' definition)."""
    name, a = launch.kernel.__name__, launch.args
    if name == "_gather_rows_kernel":  # read the kept rows, write them
        return 2 * _nbytes(a[4])
    if name == "_scatter_rows_kernel":  # read the kept rows, write the full grid
        return _nbytes(a[0]) + _nbytes(a[5])
    if name == "_loss_fwd_kernel":  # the selected pred and target rows
        pred, rows, c = a[0], a[8], a[7]
        return 2 * rows * c * pred.element_size()
    if name == "_loss_bwd_kernel":  # the selected pred and target rows, the whole gradient grid
        count, grad, frames = a[2], a[4], a[5]
        return 2 * int((count > 0).sum()) * frames * grad.shape[-1] * grad.element_size() + _nbytes(grad)
    return sum(_nbytes(t) for t in a if isinstance(t, torch.Tensor))  # the mask kernels: their buffers


def _constexprs(launch: Launch) -> dict[str, Any]:
    """The launch's compile-time constants, by name (keyword or positional)."""
    out = {}
    for i, param in enumerate(launch.kernel.params):
        if param.is_constexpr:
            out[param.name] = launch.kwargs[param.name] if param.name in launch.kwargs else launch.args[i]
    return out


def _tensors(launch: Launch) -> list[torch.Tensor]:
    return [a for a in launch.args if isinstance(a, torch.Tensor)]


def build(case: str, launch: Launch, arch: str) -> Build:
    compiled = compile_launch(launch, arch)
    ptx = compiled.asm["ptx"]
    first = _tensors(launch)[0]
    return Build(
        case=case,
        kernel=launch.kernel.__name__,
        arch=arch,
        dtypes=",".join(str(t.dtype).removeprefix("torch.") for t in _tensors(launch)),
        row_bytes=first.shape[-1] * first.element_size() if first.dim() else first.element_size(),
        grid=launch.grid,
        num_warps=int(launch.kwargs.get("num_warps", 4)),
        constexprs=_constexprs(launch),
        **_ptxas_report(ptx, arch),
        **_vector_counts(ptx),
        bytes_moved=_bytes_moved(launch),
    )


def training_cases() -> dict[str, Callable[[], None]]:
    """Wrapper calls at the training shapes, forward and backward, on CPU tensors (launches captured)."""
    from miles_kernels.masked_feature_loss_triton import masked_feature_loss_triton
    from miles_kernels.tokens_triton import drop_tokens_triton, restore_tokens_triton
    from miles_kernels.tube_mask import num_hidden
    from miles_kernels.tube_mask_triton import tube_mask_triton

    n = GRID[0] * GRID[1]
    k = n - num_hidden(n, RATIO_DROP)
    cases: dict[str, Callable[[], None]] = {}
    for b in BATCHES:
        for blockwise in (True, False):
            kind = "block" if blockwise else "random"
            cases[f"tube_mask {kind} B={b}"] = lambda b=b, bw=blockwise: tube_mask_triton(
                b, GRID, RATIO_DROP, seed=0, device="cpu", blockwise=bw
            )
        visible = torch.arange(k).repeat(b, 1)
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")

            def drop(b: int = b, dtype: torch.dtype = dtype, visible: torch.Tensor = visible) -> None:
                x = torch.zeros(b, FRAMES, n, 768, dtype=dtype, requires_grad=True)
                pos, time = (
                    torch.zeros(n, 768, requires_grad=True),
                    torch.zeros(FRAMES, 768, requires_grad=True),
                )
                drop_tokens_triton(x, visible, pos, time).backward(
                    torch.zeros(b, FRAMES, k, 768, dtype=dtype)
                )

            def restore(b: int = b, dtype: torch.dtype = dtype, visible: torch.Tensor = visible) -> None:
                y = torch.zeros(b, FRAMES, k, 384, dtype=dtype, requires_grad=True)
                token = torch.zeros(384, requires_grad=True)
                pos, time = (
                    torch.zeros(n, 384, requires_grad=True),
                    torch.zeros(FRAMES, 384, requires_grad=True),
                )
                out = restore_tokens_triton(y, visible, token, pos, time)
                out.backward(torch.zeros(b, FRAMES, n, 384, dtype=dtype))

            cases[f"drop_tokens {name} B={b}"] = drop
            cases[f"restore_tokens {name} B={b}"] = restore
            for target, c in TARGET_WIDTHS.items():
                for kind in ("mse", "smooth_l1"):

                    def loss(b: int = b, dtype: torch.dtype = dtype, c: int = c, kind: str = kind) -> None:
                        pred = torch.zeros(b, FRAMES, n, c, dtype=dtype, requires_grad=True)
                        target = torch.zeros(b, FRAMES, n, c, dtype=dtype)
                        hidden = torch.arange(n - k).repeat(b, 1)
                        masked_feature_loss_triton(pred, target, hidden, kind=kind).backward()

                    cases[f"masked_feature_loss {target} {kind} {name} B={b}"] = loss
    return cases


def capture(cases: dict[str, Callable[[], None]]) -> list[tuple[str, Launch]]:
    out = []
    for case, call in cases.items():
        with captured_launches() as launches:
            call()  # the outputs stay uninitialised: nothing downstream of a launch looks at their values
        out.extend((case, launch) for launch in launches)
    return out


def unique_launches(captured: list[tuple[str, Launch]]) -> list[tuple[str, Launch]]:
    """One launch per distinct compiled kernel (same kernel, constexprs, warps and argument dtypes)."""
    seen, out = set(), []
    for case, launch in captured:
        dtypes = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
        constexprs = tuple(sorted(_constexprs(launch).items()))
        key = (launch.kernel.__name__, constexprs, launch.kwargs.get("num_warps"), dtypes)
        if key not in seen:
            seen.add(key)
            out.append((case, launch))
    return out


def record(builds: list[Build]) -> dict[str, dict[str, int]]:
    """What a change to a kernel should show in a diff: registers, shared memory and spills per build."""
    out = {}
    for b in builds:
        key = f"{b.kernel} {b.arch} warps={b.num_warps} {json.dumps(b.constexprs, sort_keys=True)} {b.dtypes}"
        out[key] = {
            "registers": b.registers,
            "shared_bytes": b.shared_bytes,
            "spill_stores": b.spill_stores,
            "spill_loads": b.spill_loads,
        }
    return dict(sorted(out.items()))


def all_builds(archs: list[str] | None = None) -> list[Build]:
    """Every distinct kernel of the training cases, compiled for each target."""
    launches = unique_launches(capture(training_cases()))
    return [build(case, launch, arch) for case, launch in launches for arch in (archs or sorted(TARGETS))]


def static_table(batch: int = 32, arch: str = "sm_90") -> list[dict[str, Any]]:
    """Per kernel launch of the training cases at `batch`: registers, spills, programs, bytes moved and the
    lower-bound time at each GPU's copy bandwidth (a bound, not a measurement)."""
    cases = {k: v for k, v in training_cases().items() if k.endswith(f"B={batch}")}
    rows = []
    for case, launch in capture(cases):
        b = build(case, launch, arch)
        rows.append(
            {
                "case": case,
                "kernel": b.kernel,
                "arch": arch,
                "programs": math.prod(b.grid),
                "registers": b.registers,
                "spill_bytes": b.spill_stores + b.spill_loads,
                "bytes": b.bytes_moved,
                **{f"lower_bound_us_{gpu}": 1e6 * b.bytes_moved / bw for gpu, bw in COPY_BANDWIDTH.items()},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miles_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(TARGETS))
    parser.add_argument("--json", type=Path, help="write every build as JSON here")
    parser.add_argument(
        "--record", type=Path, help="write the registers / spills record (kernel_resources.json)"
    )
    parser.add_argument(
        "--table", type=Path, help="write the static table (batch 32, sm_90) as JSON, and stop"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the kernels must be imported compiled")
    if args.table:
        args.table.write_text(json.dumps(static_table(), indent=1))
        return 0
    builds = all_builds(args.arch)
    if args.json:
        args.json.write_text(json.dumps([asdict(b) for b in builds], indent=1))
    if args.record:
        args.record.write_text(json.dumps(record(builds), indent=1) + "\n")
    for b in builds:
        shape = json.dumps(b.constexprs)
        print(
            f"{b.kernel:24s} {b.arch} warps={b.num_warps} {shape:44s} regs={b.registers:3d} "
            f"spill={b.spill_stores}/{b.spill_loads} widest ld/st={b.widest_load_bits}/{b.widest_store_bits} "
            f"({b.case})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
