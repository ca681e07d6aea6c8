"""Attention backends against the einsum reference: forward, backward, padded frames, dropout, resolution.

`tests/test_video_encoder.py` checks the reference's semantics (per-query loops, timm equivalence); here
every fast backend must equal the reference on `bert` (K = N) and `drop` (K < N) shapes.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types

import pytest
import torch

import miles.attention as attention
from miles.attention import (
    DividedAttention,
    attend,
    resolve_attention,
    resolve_attention_backend,
    set_attention_backend,
)
from miles.config import ConfigError, build_config
from miles.video_encoder import SpaceTimeTransformer

DIM, HEADS = 32, 4
N_VIT_B = 196  # ViT-B/16 at 224 px: patches per frame
N = 16  # a 4x4 grid: bert mode sees all 16 positions, drop mode at ratio 0.75 keeps 4
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max error relative to the reference's max


def _device_for(backend: str) -> torch.device:
    """CPU for the backends that run here; CUDA for xformers. On a CUDA machine with xformers installed,
    an xformers that cannot run fails the test (with the backend choice's reason): a skip there would
    leave a GPU run green with xformers never run. Without CUDA, or without xformers, it skips."""
    if backend != "xformers":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("xformers has no CPU kernels (no CUDA device here)")
    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed (README, xformers: make install XFORMERS=1)")
    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = attention.probe_xformers(device)
    if not ok:
        pytest.fail(f"xformers is installed but cannot run: {why}")
    return device


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def _frame_mask(batch: int, frames: int) -> torch.Tensor:
    """First clip: all frames real; others: only the leading half (at least one) real, the rest padding."""
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[0] = True
    mask[1:, : max(1, frames // 2)] = True
    return mask


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-frames", "frame-mask"])
@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("k_pos", [N, 4], ids=["bert", "drop"])
@pytest.mark.parametrize("along", ["time", "space"])
def test_divided_attention_backend_equals_reference(
    backend: str, dtype: torch.dtype, masked: bool, frames: int, k_pos: int, along: str
) -> None:
    device = _device_for(backend)
    torch.manual_seed(0)
    ref = DividedAttention(DIM, HEADS, backend="reference").to(device, dtype)
    fast = copy.deepcopy(ref)
    fast.backend = backend
    b = 3
    x = torch.randn(b, 1 + frames * k_pos, DIM, device=device, dtype=dtype)
    frame_mask = _frame_mask(b, frames).to(device) if masked else None
    grad_out = torch.randn_like(x)
    outs, grads = [], []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        out = layer(xi, frames, along, frame_mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [xi, *layer.parameters()], grad_out))
    tol = TOLERANCE[dtype]
    assert torch.isfinite(outs[1]).all()
    assert _rel_err(outs[1], outs[0]) <= tol
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert _rel_err(got, expected) <= tol


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_with_key_mask_equals_reference(backend: str, dtype: torch.dtype) -> None:
    """The raw dispatch, key lengths not a multiple of 8 (xformers' bias alignment), masked keys."""
    device = _device_for(backend)
    torch.manual_seed(1)
    q = torch.randn(2, 5, 7, 3, 8, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 5, 11, 3, 8, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 5, 11, 3, 8, device=device, dtype=dtype, requires_grad=True)
    key_mask = torch.rand(2, 5, 11, device=device) > 0.4
    key_mask[..., 0] = True  # every query keeps a key
    results = []
    for name in ("reference", backend):
        out = attend(q, k, v, name, key_mask=key_mask)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for got, expected in zip(results[1], results[0], strict=True):
        assert _rel_err(got, expected) <= TOLERANCE[dtype]
    # a masked key has no influence at all: changing its value changes nothing
    v2 = torch.where(key_mask[..., None, None], v, torch.full_like(v, 1e4)).detach()
    assert _rel_err(attend(q, k, v2, backend, key_mask=key_mask), results[1][0]) <= TOLERANCE[dtype]


def _model(backend: str) -> SpaceTimeTransformer:
    torch.manual_seed(2)
    model = SpaceTimeTransformer(
        img_size=16, patch_size=4, embed_dim=DIM, depth=2, num_heads=HEADS, num_frames=4, time_init="random"
    ).eval()
    set_attention_backend(model, backend)
    return model


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("mode", ["bert", "drop"])
def test_encoder_backend_equals_reference(backend: str, frames: int, mode: str) -> None:
    """Whole encoder, forward and parameter gradients, in both masking modes (fp32)."""
    device = _device_for(backend)
    ref = _model("reference").to(device)
    fast = copy.deepcopy(ref)
    set_attention_backend(fast, backend)
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, frames, 3, 16, 16, generator=g).to(device)
    visible = torch.stack([torch.randperm(N, generator=g)[:4].sort().values for _ in range(2)]).to(device)
    mask = torch.zeros(2, N, dtype=torch.bool, device=device)
    mask[:, :8] = True
    results = []
    for model in (ref, fast):
        if mode == "bert":
            feats = model.forward_features(video, mask)
        else:
            feats = model.forward_visible(video, visible)
        loss = feats.cls.square().sum() + feats.patches.sin().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)  # drop: no mask token
        results.append((feats.cls, feats.patches, *(g for g in grads if g is not None)))
    assert len(results[0]) == len(results[1]) >= len(list(ref.parameters()))
    assert _rel_err(results[1][0], results[0][0]) <= 1e-5 and _rel_err(results[1][1], results[0][1]) <= 1e-5
    # Gradients of cls_token / pos_embed sum over every token of both blocks, so fp32 rounding adds up: ~3e-5
    # on an AVX2 CPU. On an AVX-512 CPU PyTorch's fused CPU attention (flash) kernel is less exact still:
    # measured against an fp64 run of the reference (Xeon, 2026-12-06), cls_token's gradient is off by
    # 1.3e-4 through sdpa (1.8e-5 with SDPA's math backend, 1.1e-5 through the fp32 reference). A wrong
    # gradient is off by O(1); the layer-level test above holds backward to 1e-5.
    for got, expected in zip(results[1][2:], results[0][2:], strict=True):
        assert _rel_err(got, expected) <= 3e-4


@pytest.mark.parametrize("backend", ["reference", "sdpa", "xformers"])
@pytest.mark.parametrize("mode", ["bert", "drop"])
def test_padded_frames_equal_the_shorter_clip(backend: str, mode: str) -> None:
    """2 real frames + 2 garbage frames, masked, give the 2-frame clip's CLS and real-frame features."""
    device = _device_for(backend)
    model = _model(backend).to(device)
    g = torch.Generator().manual_seed(4)
    video = torch.randn(2, 4, 3, 16, 16, generator=g).to(device)
    video[1, 2:] = 1e3 * torch.randn(2, 3, 16, 16, generator=g).to(device)  # padding: loud garbage
    frame_mask = torch.tensor([[True] * 4, [True, True, False, False]], device=device)
    visible = torch.tensor([[0, 5, 10, 15], [1, 2, 7, 12]], device=device)

    def run(clips: torch.Tensor, rows: slice, fm: torch.Tensor | None):  # noqa: ANN202
        if mode == "bert":
            return model.forward_features(clips, frame_mask=fm)
        return model.forward_visible(clips, visible[rows], frame_mask=fm)

    with torch.no_grad():
        padded = run(video, slice(0, 2), frame_mask)
        short = run(video[1:, :2], slice(1, 2), None)  # temporal embeddings 0 and 1, as in the padded clip
        full = run(video[:1], slice(0, 1), None)
    assert torch.isfinite(padded.patches).all()
    assert _rel_err(padded.cls[1:], short.cls) <= 1e-5
    assert _rel_err(padded.patches[1:, :2], short.patches) <= 1e-5
    assert _rel_err(padded.cls[:1], full.cls) <= 1e-5  # the unpadded clip in the same batch is untouched
    assert _rel_err(padded.patches[:1], full.patches) <= 1e-5
    without_mask = run(video, slice(0, 2), None)
    assert _rel_err(without_mask.cls[1:], short.cls) > 1e-2  # the mask is what removes the garbage


def test_frame_mask_shape_is_checked() -> None:
    layer = DividedAttention(DIM, HEADS)
    with pytest.raises(ValueError, match=r"frame_mask must be a bool tensor \[batch, frames\] = \[2, 4\]"):
        layer(torch.randn(2, 1 + 4 * 3, DIM), 4, "time", torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "xformers"])
def test_dropout_is_unbiased_in_training_and_off_in_eval(backend: str) -> None:
    """Same seeds do not align across backends, so check what dropout must do statistically."""
    device = _device_for(backend)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 6, 2, 8, device=device) for _ in range(3))
    key_mask = torch.tensor([[True, True, True, True, False, True]], device=device)
    exact = attend(q, k, v, "reference", key_mask=key_mask)
    copies = 4000  # independent dropout draws, one per sequence, in a single call
    rep = [z.expand(copies, *z.shape[1:]) for z in (q, k, v)]
    dropped = attend(*rep, backend, dropout_p=0.3, key_mask=key_mask.expand(copies, -1))
    assert (dropped - exact).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every draw differs from the exact
    assert (dropped.mean(0, keepdim=True) - exact).abs().max() < 0.05  # ~10 standard errors: unbiased
    assert torch.isfinite(dropped).all()

    layer = DividedAttention(DIM, HEADS, attn_drop=0.5, backend=backend).to(device)
    x = torch.randn(2, 1 + 2 * 4, DIM, device=device)
    plain = copy.deepcopy(layer)
    plain.attn_drop = 0.0
    layer.eval()
    assert torch.equal(layer(x, 2, "time"), plain(x, 2, "time"))  # eval ignores attention dropout
    layer.train()
    assert (layer(x, 2, "time") - plain(x, 2, "time")).abs().max() > 1e-3


def test_fused_calls_split_oversized_sequence_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the 65535-sequence grid limit the call is split; here the limit is lowered to see it work."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(10, 5, 2, 8) for _ in range(3))
    key_mask = torch.rand(10, 5) > 0.3
    key_mask[:, 0] = True
    whole = attend(q, k, v, "sdpa", key_mask=key_mask)
    calls = []
    original = attention._KERNELS["sdpa"]
    monkeypatch.setitem(attention._KERNELS, "sdpa", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    monkeypatch.setattr(attention, "MAX_FUSED_SEQUENCES", 4)
    split = attend(q, k, v, "sdpa", key_mask=key_mask)
    assert calls == [4, 4, 2]
    assert torch.equal(split, whole)


def test_divided_attention_makes_one_call_per_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLS over B sequences, then time over B*K (or space over B*F): two large calls, not many small."""
    calls: list[tuple[int, ...]] = []
    original = attention._KERNELS["sdpa"]
    monkeypatch.setitem(
        attention._KERNELS, "sdpa", lambda *a: calls.append(tuple(a[0].shape)) or original(*a)
    )
    layer = DividedAttention(DIM, HEADS, backend="sdpa")
    b, f, k_pos = 2, 4, 5
    x = torch.randn(b, 1 + f * k_pos, DIM)
    layer(x, f, "time")
    layer(x, f, "space")
    dh = DIM // HEADS
    assert calls == [
        (b, 1, HEADS, dh),
        (b * k_pos, f, HEADS, dh),
        (b, 1, HEADS, dh),
        (b * f, k_pos, HEADS, dh),
    ]


def test_auto_resolves_to_sdpa_on_cpu_and_forced_xformers_is_refused() -> None:
    choice = resolve_attention("auto", "cpu")
    assert choice.backend == "sdpa" and resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"
    assert choice.describe() == "sdpa (auto: xformers has no CPU kernels, device is cpu)"
    assert resolve_attention("reference", "cpu").backend == "reference"
    with pytest.raises(
        ConfigError, match=r"model\.attention.*xformers has no CPU kernels.*model\.attention=auto"
    ):
        resolve_attention("xformers", "cpu")
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_attention("flash", "cpu")
    torch.manual_seed(7)
    q, k, v = (torch.randn(3, 4, 2, 8) for _ in range(3))
    assert torch.equal(attend(q, k, v, "auto"), attend(q, k, v, "sdpa"))


def test_config_accepts_the_four_names_and_defaults_to_auto() -> None:
    assert build_config("smoke").model.attention == "auto"
    for name in ("auto", "xformers", "sdpa", "reference"):
        assert build_config("smoke", overrides=[f"model.attention={name}"]).model.attention == name
    with pytest.raises(ConfigError, match="model.attention.*'auto', 'xformers', 'sdpa' or 'reference'"):
        build_config("smoke", overrides=["model.attention=flash"])


def test_pretraining_refuses_xformers_without_cuda_before_any_work(tmp_path) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only runs")
    from miles.pretrain import run_pretraining

    data_root = tmp_path / "data"
    cfg = build_config(
        "smoke",
        overrides=[
            "model.attention=xformers",
            f"data.root={data_root}",
            f"data.train_manifest={data_root}/train.csv",
            f"data.val_manifest={data_root}/val.csv",
        ],
    )
    with pytest.raises(ConfigError, match="xformers has no CPU kernels"):
        run_pretraining(cfg, tmp_path / "run")
    assert not data_root.exists() and not (tmp_path / "run").exists()  # nothing was generated or written


def test_the_xformers_reason_names_the_torch_its_wheel_was_built_for(tmp_path, monkeypatch) -> None:
    """Read from the installed wheel's own build info (xformers/cpp_lib.json), not from a failed call."""
    import importlib.machinery
    import importlib.util
    import json
    from pathlib import Path

    from miles.attention import _release, xformers_build_mismatch

    spec = importlib.util.find_spec("xformers")
    assert spec is not None, "xformers is in requirements.lock"
    built = json.loads((Path(next(iter(spec.submodule_search_locations))) / "cpp_lib.json").read_text())
    built_torch = built["version"]["torch"]
    xformers_build_mismatch.cache_clear()
    reason = xformers_build_mismatch()
    if _release(built_torch) == _release(torch.__version__):
        assert reason is None
    else:
        assert f"wheel was built for torch {built_torch}" in reason
        assert f"this run has torch {torch.__version__}" in reason

    # a wheel built for this very torch: nothing to say
    (tmp_path / "xformers").mkdir()
    info = {"version": {"torch": torch.__version__, "python": "3.11"}}
    (tmp_path / "xformers" / "cpp_lib.json").write_text(json.dumps(info))
    fake = importlib.machinery.ModuleSpec("xformers", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path / "xformers")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake)
    xformers_build_mismatch.cache_clear()
    try:
        assert xformers_build_mismatch() is None
    finally:
        monkeypatch.undo()
        xformers_build_mismatch.cache_clear()


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-frames", "frame-mask"])
@pytest.mark.parametrize("along", ["time", "space"])
def test_vit_b_attention_under_autocast_equals_reference(backend: str, masked: bool, along: str) -> None:
    """The model's real calls: ViT-B's width (768, 12 heads of 64), the `bert` grid of 4 frames x 196
    patches + CLS (785 keys for CLS), under bf16 autocast as in training, forward and backward."""
    device = _device_for(backend)
    torch.manual_seed(4)
    ref = DividedAttention(768, 12, backend="reference").to(device)
    fast = copy.deepcopy(ref)
    fast.backend = backend
    b, frames = 2, 4
    x = torch.randn(b, 1 + frames * N_VIT_B, 768, device=device)
    frame_mask = _frame_mask(b, frames).to(device) if masked else None
    grad_out = torch.randn(b, 1 + frames * N_VIT_B, 768, device=device, dtype=torch.bfloat16)
    outs, grads = [], []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer(xi, frames, along, frame_mask)
        assert out.dtype == torch.bfloat16
        outs.append(out)
        grads.append(torch.autograd.grad(out, [xi, *layer.parameters()], grad_out))
    assert torch.isfinite(outs[1]).all()
    assert _rel_err(outs[1], outs[0]) <= TOLERANCE[torch.bfloat16]
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert _rel_err(got, expected) <= TOLERANCE[torch.bfloat16]


class _FakeXformersOps(types.ModuleType):
    """`xformers.ops` as 0.0.35 behaves on a GPU its cutlass kernels were not built for (sm_100): the
    call patterns with an fp32 bias have no kernel (NotImplementedError), the others compute attention."""

    def __init__(self) -> None:
        super().__init__("xformers.ops")
        self.calls: list[tuple[torch.dtype, bool]] = []

    def memory_efficient_attention(self, q, k, v, attn_bias=None, p=0.0):  # noqa: ANN001, ANN201
        if q.dtype == torch.float32 and attn_bias is not None:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        self.calls.append((q.dtype, attn_bias is not None))
        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, dropout_p=p
        )
        return out.transpose(1, 2)


@pytest.fixture
def fake_xformers(monkeypatch: pytest.MonkeyPatch) -> _FakeXformersOps:
    ops = _FakeXformersOps()
    package = types.ModuleType("xformers")
    package.__version__ = "0.0.35"  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention, "_XFORMERS_SERVES", {})
    return ops


def test_xformers_probe_runs_every_call_pattern_the_model_makes(
    fake_xformers: _FakeXformersOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 and fp32, with and without the frame bias, forward and backward: 8 patterns, each run once;
    the two fp32-with-bias ones fail and are named in the backend choice's reason."""
    results = attention.probe_xformers_patterns(torch.device("cpu"))
    assert set(results) == set(attention.MODEL_PATTERNS) and len(results) == 8
    failed = sorted(p.describe() for p, why in results.items() if why is not None)
    assert failed == ["fp32 + frame bias fwd", "fp32 + frame bias fwd+bwd"]
    assert all("NotImplementedError: No operator found" in str(results[p]) for p in results if results[p])
    monkeypatch.setattr(attention, "xformers_build_mismatch", lambda: None)
    monkeypatch.setattr(attention, "probe_xformers_patterns", lambda device: results)
    ok, why = attention.probe_xformers.__wrapped__(torch.device("cuda", 0))
    assert ok and why.startswith("CUDA + xformers 0.0.35; SDPA serves the calls xformers cannot (")
    assert "fp32 + frame bias fwd, fp32 + frame bias fwd+bwd: NotImplementedError" in why


def test_xformers_patterns_it_cannot_serve_run_on_sdpa_from_the_start(
    fake_xformers: _FakeXformersOps,
) -> None:
    """Evaluation in fp32 with padded frames (a pattern xformers cannot serve) goes to SDPA for those
    calls and to xformers for the others, equal to the reference, with no error at the first real call."""
    attention.probe_xformers_patterns(torch.device("cpu"))
    torch.manual_seed(0)
    layer = DividedAttention(DIM, HEADS).eval()
    x = torch.randn(3, 1 + 4 * N, DIM)
    mask = _frame_mask(3, 4)
    ref_layer = copy.deepcopy(layer)
    set_attention_backend(ref_layer, "reference")
    set_attention_backend(layer, "xformers")
    with torch.no_grad():
        for along in ("time", "space"):
            fake_xformers.calls.clear()
            got = layer(x, 4, along, frame_mask=mask)
            assert _rel_err(got, ref_layer(x, 4, along, frame_mask=mask)) < TOLERANCE[torch.float32]
            # the masked calls (CLS; time lines) went to SDPA; unmasked ones (space lines) to xformers
            assert fake_xformers.calls == ([] if along == "time" else [(torch.float32, False)])
        fake_xformers.calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, 4, "time", frame_mask=mask)
        assert fake_xformers.calls == [(torch.bfloat16, True), (torch.bfloat16, True)]  # bf16 + bias: served
