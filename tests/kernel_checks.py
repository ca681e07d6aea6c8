"""What the Triton kernel tests share: loading a kernel module for the interpreter, and the error they assert.

Triton decides when a kernel is decorated (when its module is imported) whether it runs compiled or through
the interpreter, reading TRITON_INTERPRET then. A CPU test therefore imports the kernel module with the
variable set, reloading it if another test module imported it compiled first, and puts the variable back
so that other test modules keep their own defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """TRITON_INTERPRET=1 while kernels are decorated inside the block, the previous value after it."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_interpreted(name: str) -> ModuleType:
    """The kernel module `name` (it defines INTERPRETED) with its kernels wrapped for the interpreter."""
    with _interpreting():
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the environment
            # Not a skip: every kernel test of the module would fold into one quiet skip line.
            raise ImportError(
                f"triton does not import ({type(exc).__name__}: {exc}); the kernel tests need it "
                "(requirements.lock pins it: make install)"
            ) from exc
        module = importlib.import_module(name)
        if not module.INTERPRETED:
            module = importlib.reload(module)
        return module


def interpreter_loop_bound_problem() -> str | None:
    """Why this Triton's interpreter cannot run a loop over a runtime bound (``range(0, n, BLOCK)`` with
    ``n`` a kernel argument), or None. Triton 3.6's interpreter turns ``n`` into a one-element array and
    calls ``int()`` on it, which NumPy 2 refuses; compiled kernels are unaffected."""
    with _interpreting():
        import triton
        import triton.language as tl

        @triton.jit
        def _sum_blocks(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
            acc = tl.full((BLOCK,), 0.0, tl.float32)
            for start in range(0, n, BLOCK):
                j = start + tl.arange(0, BLOCK)
                acc += tl.load(x_ptr + j, mask=j < n, other=0.0)
            tl.store(out_ptr + tl.arange(0, BLOCK), acc)

        out = torch.zeros(8)
        try:
            _sum_blocks[(1,)](torch.arange(20, dtype=torch.float32), out, 20, BLOCK=8)
        except Exception as exc:
            return f"Triton {triton.__version__}'s interpreter cannot loop over a runtime bound: {exc}"
        if out.sum().item() != 190.0:
            return f"Triton {triton.__version__}'s interpreter sums a runtime-bound loop wrongly"
        return None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in fp32); a NaN or inf in `actual` counts as inf."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.float(), expected.float()
    if not torch.isfinite(a).all():
        return float("inf")
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
