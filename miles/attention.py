"""Divided space-time attention of the Frozen-in-Time / MILES video encoder, behind one backend dispatch.

Tokens are `[B, 1 + F*K, D]`: one CLS token, then F frames of K spatial tokens (K = N on the full grid,
K < N when masked tokens are dropped). The CLS query attends to every token; every other query attends
either along time (same position, all frames) or along space (same frame, all positions), with the CLS
key and value prepended to each of those sequences, exactly as in the released model.

Backends (`attend`): `xformers` (`memory_efficient_attention`, CUDA only), `sdpa` (PyTorch
`scaled_dot_product_attention`) and `reference` (the einsum formulation of the released code, which the
fast paths are tested against). All take the xformers layout `[sequences, length, heads, head_dim]`, so
per-head projections are views and each attention direction is one large batched call: CLS as one call
over B sequences, time as one over B*K, space as one over B*F. `auto` picks xformers where it runs
(CUDA, a wheel built for this torch, and at least one of the model's call patterns served: each pattern
of dtype, frame bias and backward is probed once per device with a real call). A pattern xformers cannot
serve runs on SDPA from the start, never as a failure mid-run; sdpa everywhere else.

Variable frame counts: an optional `frame_mask [B, F]` (True = real frame) removes padded frames as keys
of the temporal and CLS attention. The CLS key is always valid, so no query ever sees only masked keys.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from miles.config import ConfigError

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "reference")  # what `model.attention` accepts
# Fused CUDA kernels launch one thread block row per sequence on a grid axis capped at 65535.
MAX_FUSED_SEQUENCES = 65535


@dataclass(frozen=True)
class AttentionChoice:
    """The backend that runs and why it was chosen (logged once per run, recorded in metrics.json)."""

    backend: str
    reason: str

    def describe(self) -> str:
        return f"{self.backend} ({self.reason})"


def _release(version: str) -> tuple[str, str]:
    """("2.14", "cu130") from "2.14.1+cu130": what binary compatibility of a compiled extension rests on."""
    base, _, local = version.partition("+")
    return ".".join(base.split(".")[:2]), local


@functools.cache
def xformers_build_mismatch() -> str | None:
    """Why the installed xformers wheel cannot load its CUDA kernels with this torch, read from the wheel's
    own build info (`xformers/cpp_lib.json`) without importing it; None when it was built for this torch
    (or is not installed, or does not say)."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    info_path = Path(next(iter(spec.submodule_search_locations))) / "cpp_lib.json"
    try:
        built = json.loads(info_path.read_text())["version"]
        built_torch, built_python = str(built["torch"]), str(built.get("python", "?"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _release(built_torch) == _release(torch.__version__):
        return None
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    running_python = ".".join(map(str, sys.version_info[:3]))
    return (
        f"the xformers {version} wheel was built for torch {built_torch} (Python {built_python}), this run "
        f"has torch {torch.__version__} (Python {running_python}), so its CUDA kernels cannot load"
    )


@dataclass(frozen=True)
class CallPattern:
    """One kind of attention call the model makes: what a kernel's dispatch depends on."""

    dtype: torch.dtype
    frame_bias: bool  # a key mask (padded frames) as an additive bias
    backward: bool  # the gradient is taken (training)

    def describe(self) -> str:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(self.dtype, "?")
        return f"{name}{' + frame bias' if self.frame_bias else ''} {'fwd+bwd' if self.backward else 'fwd'}"


# What the model calls: bf16 under autocast and fp32 (evaluation, train.precision=fp32), with and without
# the frame bias, forward alone (evaluation, the snapshot) and with its backward (training).
MODEL_PATTERNS = tuple(
    CallPattern(dtype, bias, backward)
    for dtype in (torch.bfloat16, torch.float32)
    for bias in (False, True)
    for backward in (False, True)
)
# Patterns xformers serves on each probed device; the others go to SDPA (decided before any work).
_XFORMERS_SERVES: dict[torch.device, frozenset[CallPattern]] = {}


def _probe_pattern(pattern: CallPattern, device: torch.device) -> str | None:
    """Run one pattern through our own xformers call at ViT-B's head size; None if it works, else why."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    # 2 sequences, 12 heads of 64, 13 keys: a key length that is not a multiple of 8, as the model's are
    q, k, v = (torch.randn(2, 13, 12, 64, generator=gen).to(device, pattern.dtype) for _ in range(3))
    mask = torch.ones(2, 13, dtype=torch.bool, device=device) if pattern.frame_bias else None
    if mask is not None:
        mask[1, 7:] = False
    try:
        if pattern.backward:
            q.requires_grad_(True)
            _xformers(q, k, v, 0.0, mask).float().sum().backward()
        else:
            with torch.no_grad():
                _xformers(q, k, v, 0.0, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # NotImplementedError (no kernel for these inputs), CUDA errors
        return f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
    return None


def probe_xformers_patterns(device: torch.device) -> dict[CallPattern, str | None]:
    """Each of the model's call patterns run once through xformers on `device`: None where it works,
    the error's first line where it does not. What works is recorded for `attend`'s dispatch."""
    results = {pattern: _probe_pattern(pattern, device) for pattern in MODEL_PATTERNS}
    _XFORMERS_SERVES[device] = frozenset(p for p, why in results.items() if why is None)
    return results


@functools.cache
def probe_xformers(device: torch.device) -> tuple[bool, str]:
    """(True, what runs) if xformers serves at least one of the model's call patterns on `device`, else
    (False, why). The patterns it cannot serve are named: they run on SDPA, decided here, never mid-run.

    A successful import is not enough (a wheel built for another torch imports but has no kernels), so
    on CUDA every pattern runs once; the answer is cached per device.
    """
    if device.type != "cuda":
        return False, f"xformers has no CPU kernels, device is {device}"
    mismatch = xformers_build_mismatch()
    if mismatch:  # the real reason, rather than the first line of a failed call's error
        return False, f"xformers unavailable on {device}: {mismatch}"
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, a broken extension
        return False, f"xformers unavailable on {device}: {type(exc).__name__}: {exc}"
    results = probe_xformers_patterns(device)
    failed = {p: why for p, why in results.items() if why is not None}
    if len(failed) == len(results):
        return False, f"xformers unavailable on {device}: {next(iter(failed.values()))}"
    detail = f"CUDA + xformers {xformers.__version__}"
    if failed:
        names = ", ".join(p.describe() for p in failed)
        detail += f"; SDPA serves the calls xformers cannot ({names}: {next(iter(failed.values()))})"
    return True, detail


def resolve_attention(name: str, device: torch.device | str) -> AttentionChoice:
    """Map `model.attention` to the backend that runs on `device`; refuse impossible choices up front."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"config key 'model.attention': must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name in ("sdpa", "reference"):
        return AttentionChoice(name, "set by model.attention")
    if name == "xformers" and device.type != "cuda":
        raise ConfigError(
            "config key 'model.attention': xformers has no CPU kernels and needs a CUDA device, but this "
            f"run is on {device}; set model.attention=auto (sdpa here) or model.attention=sdpa"
        )
    ok, detail = probe_xformers(device)
    if name == "xformers":
        if not ok:
            raise ConfigError(f"config key 'model.attention': {detail}; set model.attention=auto or sdpa")
        return AttentionChoice("xformers", f"set by model.attention, {detail}")
    return AttentionChoice("xformers" if ok else "sdpa", f"auto: {detail}")


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The backend name `resolve_attention` picks: xformers | sdpa | reference."""
    return resolve_attention(name, device).backend


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Point every DividedAttention inside `module` at `backend` (resolve `auto` once, then call this)."""
    for sub in module.modules():
        if isinstance(sub, DividedAttention):
            sub.backend = backend


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:])


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None
) -> torch.Tensor:
    sim = torch.einsum("nqhd,nkhd->nhqk", q * q.shape[-1] ** -0.5, k)
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = sim.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.einsum("nhqk,nkhd->nqhd", weights, v)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None
) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p
    )
    return out.transpose(1, 2)


def _xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None
) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if key_mask is not None:
        n, sk = key_mask.shape
        # The kernel needs every bias stride but the last to be 16-byte aligned: pad the key axis, slice.
        padded = q.new_zeros(n, 1, 1, -(-sk // 8) * 8)
        padded[..., :sk].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
        bias = padded[..., :sk].expand(n, q.shape[2], q.shape[1], sk)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)


def _xformers_or_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """xformers for the call patterns its probe served on this device, SDPA for the others."""
    if q.device not in _XFORMERS_SERVES:
        probe_xformers_patterns(q.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if CallPattern(q.dtype, key_mask is not None, grad) in _XFORMERS_SERVES[q.device]:
        return _xformers(q, k, v, dropout_p, key_mask)
    return _sdpa(q, k, v, dropout_p, key_mask)


_KERNELS = {"reference": _reference, "sdpa": _sdpa, "xformers": _xformers_or_sdpa}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    dropout_p: float = 0.0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v per sequence and head; q [..., Lq, H, dh], k/v [..., Lk, H, dh].

    `key_mask [..., Lk]` (True = may be attended) hides keys; every query needs at least one visible key.
    `dropout_p` drops attention weights (pass 0 in eval). `backend="auto"` resolves by the tensors' device.
    """
    if backend == "auto":
        backend = resolve_attention_backend("auto", q.device)
    kernel = _KERNELS.get(backend)
    if kernel is None:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    lead = q.shape[:-3]
    q, k, v = _flat(q), _flat(k), _flat(v)
    mask = None if key_mask is None else key_mask.reshape(-1, key_mask.shape[-1])
    if backend == "reference" or q.shape[0] <= MAX_FUSED_SEQUENCES:
        out = kernel(q, k, v, dropout_p, mask)
    else:  # split the sequence axis so no fused launch exceeds the grid limit
        step = MAX_FUSED_SEQUENCES
        out = torch.cat(
            [
                kernel(
                    q[i : i + step],
                    k[i : i + step],
                    v[i : i + step],
                    dropout_p,
                    None if mask is None else mask[i : i + step],
                )
                for i in range(0, q.shape[0], step)
            ]
        )
    return out.reshape(*lead, *out.shape[1:])


def _check_frame_mask(frame_mask: torch.Tensor, batch: int, frames: int) -> None:
    if frame_mask.shape != (batch, frames) or frame_mask.dtype != torch.bool:
        raise ValueError(
            f"frame_mask must be a bool tensor [batch, frames] = [{batch}, {frames}] (True = real frame), "
            f"got {frame_mask.dtype} {tuple(frame_mask.shape)}"
        )


class DividedAttention(nn.Module):
    """Multi-head attention along time or space, CLS over everything (the released `VarAttention`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def zero_init(self) -> None:
        """The released `time_init='zeros'`: qkv = 0 so the branch outputs 0 until it learns."""
        nn.init.zeros_(self.qkv.weight)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.ones_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, x: torch.Tensor, frames: int, along: str, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, 1 + F*K, D] -> [B, 1 + F*K, D]; `frame_mask [B, F]` (True = real) hides padded frames."""
        if along not in ("time", "space"):
            raise ValueError(f"along must be 'time' or 'space', got {along!r}")
        b, t, d = x.shape
        h = self.num_heads
        dh = d // h
        k_pos = (t - 1) // frames
        if k_pos * frames != t - 1:
            raise ValueError(f"{t - 1} patch tokens do not split into {frames} frames")
        q, k, v = self.qkv(x).reshape(b, t, 3, h, dh).unbind(2)  # views, [B, T, H, dh]
        drop = self.attn_drop if self.training else 0.0
        real = None
        if frame_mask is not None:
            _check_frame_mask(frame_mask, b, frames)
            real = torch.cat([frame_mask.new_ones(b, 1), frame_mask], dim=1)  # [B, 1 + F], CLS first

        cls_mask = (
            None if real is None else torch.cat([real[:, :1], real[:, 1:].repeat_interleave(k_pos, 1)], 1)
        )
        cls_out = attend(q[:, :1], k, v, self.backend, drop, cls_mask)  # one call over B sequences

        def lines(z: torch.Tensor) -> torch.Tensor:  # time: [B, K, F, H, dh]; space: [B, F, K, H, dh]
            z = z[:, 1:].unflatten(1, (frames, k_pos))
            return z.transpose(1, 2) if along == "time" else z

        qg, kg, vg = lines(q), lines(k), lines(v)
        groups, length = qg.shape[1:3]

        def with_cls(z: torch.Tensor, zg: torch.Tensor) -> torch.Tensor:  # [B*groups, 1 + length, H, dh]
            return torch.cat([z[:, None, :1].expand(b, groups, 1, h, dh), zg], dim=2).flatten(0, 1)

        line_mask = None
        if real is not None and along == "time":
            line_mask = real[:, None].expand(b, groups, 1 + frames).reshape(b * groups, 1 + frames)
        out = attend(
            qg.reshape(b * groups, length, h, dh),
            with_cls(k, kg),
            with_cls(v, vg),
            self.backend,
            drop,
            line_mask,
        )
        out = out.unflatten(0, (b, groups))
        merged = cls_out.new_empty(b, t, h, dh)
        merged[:, :1] = cls_out
        merged[:, 1:].unflatten(1, (frames, k_pos)).copy_(out.transpose(1, 2) if along == "time" else out)
        return self.proj_drop(self.proj(merged.reshape(b, t, d)))
