"""The two install profiles: the default lock, and the xformers profile that pairs xformers' wheel with the
torch it was built for. Checked against the installed wheel's own build info, not against our notes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages the xformers profile may move: torch, its companions and their CUDA libraries.
TORCH_STACK = re.compile(
    r"^(torch|torchvision|triton|xformers|cuda-bindings|cuda-toolkit|nvidia-(cublas|cuda-[a-z]+|cudnn-cu1[0-9]|"
    r"cufft|cufile|curand|cusolver|cusparse|cusparselt-cu1[0-9]|nccl-cu1[0-9]|nvjitlink|nvshmem-cu1[0-9]|nvtx)"
    r"(-cu12)?)$"
)


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_xformers_profile_pairs_the_wheel_with_the_torch_it_was_built_for() -> None:
    default, profile = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-xformers.lock")
    spec = importlib.util.find_spec("xformers")
    assert spec is not None and spec.submodule_search_locations, "xformers is in requirements.lock"
    installed = importlib.metadata.version("xformers")
    assert profile["xformers"] == default["xformers"] == installed  # the same wheel in both profiles
    built = json.loads((Path(next(iter(spec.submodule_search_locations))) / "cpp_lib.json").read_text())
    built_torch, built_cuda = built["version"]["torch"], int(built["version"]["cuda"])  # "2.10.0+cu128", 1208
    assert profile["torch"] == built_torch.partition("+")[0]
    cuda = f"{built_cuda // 100}.{built_cuda % 100}"  # 1208 -> "12.8"
    assert profile["nvidia-cuda-runtime-cu12"].startswith(cuda + "."), "the torch wheel's CUDA is the build's"
    # The default lock's torch is not the one xformers was built for: that is why the profile exists.
    assert default["torch"].rsplit(".", 1)[0] != profile["torch"].rsplit(".", 1)[0]
    # Everything else is the default lock's, version for version.
    same = {n for n in default if not TORCH_STACK.match(n)}
    assert {n: profile.get(n) for n in same} == {n: default[n] for n in same}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_xformers_uses_its_own_venv_and_lock() -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "test", "XFORMERS=1"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "-c requirements-xformers.lock" in plan and ".venv-xformers/bin/python -m pytest" in plan
    assert "requirements.lock" not in plan.replace("requirements-xformers.lock", "")
    default = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "-c requirements.lock" in default and ".venv/bin/python -m pytest" in default
