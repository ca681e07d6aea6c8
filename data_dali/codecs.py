"""What DALI's video decoders can decode: the CPU decoder's codec list and NVDEC's limits per GPU generation.

A clip outside these limits does not fail alone inside DALI: it fails the whole batch and throws the
pipeline away. So the loader screens every clip against this table before it reaches the decoder, and
sends the ones it rules out to the reference decoder (PyAV) directly.

NVDEC's limits are NVIDIA's own, from the NVDEC Application Note of the Video Codec SDK (13.0, "NVDEC
Hardware Capabilities") and the decoder capability table of the NVDECODE programming guide:

- Turing, GA100 (A100) and Hopper (H100, H200) share one NVDEC generation: no AV1, no H.264 High 10 or
  High 4:2:2, no HEVC 4:2:2. AV1 needs GA10x (every Ampere chip but GA100), Ada or Blackwell; H.264 High
  10 / 4:2:2 and HEVC 4:2:2 need Blackwell.
- Minimum sizes: 48x16 for H.264, VP8 and MPEG-4; 144x144 for HEVC; 128x128 for VP9 and AV1.
- Maximum sizes: H.264 4096x4096 (8192x8192 on Blackwell), MPEG-4 2032x2032, VP8 4096x4096, HEVC, VP9
  and AV1 8192x8192.

Where a row of the note says "present in select GPUs" (VP9 10/12-bit, 8K on Pascal), the clip is screened:
PyAV decodes it correctly, while a wrong guess would cost a failed batch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CPU_VIDEO_CODECS",
    "GENERATIONS",
    "NVDEC_CODECS",
    "VideoInfo",
    "decoder_rejects",
    "nvdec_generation",
    "nvdec_rejects",
]

# What DALI's CPU video decoder handles (FFmpeg codec names).
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of one video; ``frames`` is 0 when the container does not say.

    ``codec`` is FFmpeg's codec name ("av1", never the decoder's "libdav1d"); ``profile`` and ``pix_fmt``
    are FFmpeg's strings ("High 10", "yuv420p10le"), empty when the stream does not say.
    """

    codec: str
    frames: int
    height: int
    width: int
    profile: str = ""
    pix_fmt: str = ""


# NVDEC generations, oldest first (the note's columns that DALI runs on).
GENERATIONS = ("pascal_volta", "turing_ga100_hopper", "ga10x_ada", "blackwell")
_GENERATION_NAMES = {
    "pascal_volta": "Pascal/Volta",
    "turing_ga100_hopper": "Turing/GA100/Hopper",
    "ga10x_ada": "GA10x/Ada",
    "blackwell": "Blackwell",
}


@dataclass(frozen=True)
class _Limits:
    """One codec on NVDEC: the smallest (width, height), the largest side per first generation that has
    it, and the (chroma, bit depth) formats each generation adds."""

    min_size: tuple[int, int]
    max_side: tuple[tuple[str, int], ...]
    formats: tuple[tuple[str, frozenset[tuple[str, int]]], ...]

    def _since(self, generation: str, table: tuple[tuple[str, object], ...]) -> list[object]:
        rank = GENERATIONS.index(generation)
        return [value for first, value in table if GENERATIONS.index(first) <= rank]

    def formats_on(self, generation: str) -> frozenset[tuple[str, int]]:
        return frozenset().union(*self._since(generation, self.formats))  # type: ignore[arg-type]

    def max_side_on(self, generation: str) -> int:
        return max(self._since(generation, self.max_side), default=0)  # type: ignore[type-var]


def _fmts(*pairs: tuple[str, int]) -> frozenset[tuple[str, int]]:
    return frozenset(pairs)


_FIRST = GENERATIONS[0]
NVDEC_CODECS: dict[str, _Limits] = {
    "h264": _Limits(
        (48, 16),
        ((_FIRST, 4096), ("blackwell", 8192)),
        ((_FIRST, _fmts(("420", 8))), ("blackwell", _fmts(("420", 10), ("422", 8), ("422", 10)))),
    ),
    "hevc": _Limits(
        (144, 144),
        ((_FIRST, 8192),),
        (
            (_FIRST, _fmts(("420", 8), ("420", 10), ("420", 12))),
            ("turing_ga100_hopper", _fmts(("444", 8), ("444", 10), ("444", 12))),
            ("blackwell", _fmts(("422", 8), ("422", 10), ("422", 12))),
        ),
    ),
    "vp8": _Limits((48, 16), ((_FIRST, 4096),), ((_FIRST, _fmts(("420", 8))),)),
    "vp9": _Limits((128, 128), ((_FIRST, 8192),), ((_FIRST, _fmts(("420", 8))),)),
    "av1": _Limits((128, 128), (("ga10x_ada", 8192),), (("ga10x_ada", _fmts(("420", 8), ("420", 10))),)),
    "mpeg4": _Limits((48, 16), ((_FIRST, 2032),), ((_FIRST, _fmts(("420", 8))),)),
    # DALI lists MJPEG for its mixed decoder; NVDEC's tables give it no size row.
    "mjpeg": _Limits((1, 1), ((_FIRST, 1 << 15),), ((_FIRST, _fmts(("420", 8), ("422", 8), ("444", 8))),)),
}


def nvdec_generation(capability: tuple[int, int]) -> str:
    """The NVDEC generation of a GPU from its CUDA compute capability (the note's column headings)."""
    major, minor = capability
    if major >= 10:
        return "blackwell"
    if major == 9 or (major, minor) in ((7, 5), (8, 0)):
        return "turing_ga100_hopper"
    if major == 8:
        return "ga10x_ada"  # 8.6 / 8.7 (GA10x), 8.9 (Ada)
    return "pascal_volta"


def _chroma_and_depth(pix_fmt: str) -> tuple[str, int] | None:
    """("420", 10) from "yuv420p10le"; None for formats NVDEC never takes (RGB, 4:1:1, gray, alpha)."""
    fmt = "yuv" + pix_fmt[4:] if pix_fmt.startswith("yuvj") else pix_fmt  # full-range JPEG variants
    if fmt.startswith("yuv"):
        fmt = fmt[3:]
    elif fmt in ("nv12", "nv21"):
        return "420", 8
    elif fmt.startswith(("p010", "p016")):
        return "420", 10 if fmt.startswith("p010") else 16
    else:
        return None
    chroma, _, rest = fmt.partition("p")
    if chroma not in ("420", "422", "444") or (rest and not rest[:2].isdigit()):
        return None
    return chroma, int(rest[:2]) if rest else 8


def nvdec_rejects(info: VideoInfo, capability: tuple[int, int]) -> str | None:
    """Why NVDEC on a GPU of this compute capability cannot decode the clip, or None if it can."""
    limits = NVDEC_CODECS.get(info.codec)
    if limits is None:
        return f"{info.codec or 'an unknown codec'} is not a codec DALI's GPU video decoder reads"
    generation = nvdec_generation(capability)
    where = f"{_GENERATION_NAMES[generation]} GPUs (compute capability {capability[0]}.{capability[1]})"
    formats = limits.formats_on(generation)
    if not formats:
        return f"NVDEC on {where} has no {info.codec} decoder"
    if (_chroma_and_depth(info.pix_fmt) if info.pix_fmt else ("420", 8)) not in formats:
        profile = f" {info.profile}" if info.profile else ""
        return f"NVDEC on {where} does not decode {info.codec}{profile} in {info.pix_fmt}"
    min_w, min_h = limits.min_size
    if info.width < min_w or info.height < min_h:
        return f"{info.width}x{info.height} is below NVDEC's {info.codec} minimum of {min_w}x{min_h}"
    side = limits.max_side_on(generation)
    if max(info.width, info.height) > side:
        return f"{info.width}x{info.height} is above NVDEC's {info.codec} maximum of {side}x{side} on {where}"
    return None


def decoder_rejects(info: VideoInfo, capability: tuple[int, int] | None) -> str | None:
    """Why DALI's video decoder cannot decode the clip, or None if it can: the CPU decoder's codec list
    when ``capability`` is None, else NVDEC's limits for a GPU of that CUDA compute capability."""
    if capability is not None:
        return nvdec_rejects(info, capability)
    if info.codec not in CPU_VIDEO_CODECS:
        readable = ", ".join(sorted(CPU_VIDEO_CODECS))
        return f"DALI's CPU video decoder has no {info.codec} (it reads {readable})"
    return None
