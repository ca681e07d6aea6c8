"""Our import names and Hugging Face's `kernels` live side by side, from any folder, by any launch.

transformers (>= 5.25) imports the PyPI distribution `kernels` whenever it loads a model class. Our Triton
kernels sit in the folder `kernels/` but are imported as `miles_kernels` (a namespace package mapped onto
that folder; see pyproject.toml). These tests run real processes, because which package wins depends on
`sys.path[0]`: the checkout root for `python -m ...` started there, the venv's bin/ for the console script.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import run_miles

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "miles"

# One process: transformers' BERT and DistilBERT built and run, then one Triton kernel of ours (through the
# interpreter, on the CPU) against its PyTorch reference. It prints where each `kernels` came from.
TOGETHER = """
import json, torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel
from miles_kernels import ops
import kernels

torch.manual_seed(0)
ids = torch.randint(0, 100, (2, 7))
bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64))
distil = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
hidden = [bert(ids).last_hidden_state, distil(ids).last_hidden_state]

b, f, n, k, c = 2, 3, 16, 4, 8
x, pos, time = torch.randn(b, f, n, c), torch.randn(n, c), torch.randn(f, c)
_, visible = ops.tube_mask(b, (4, 4), 1 - k / n, seed=0, device="cpu")
fast = ops.drop_tokens(x, visible, pos, time, impl="triton")
reference = ops.drop_tokens(x, visible, pos, time, impl="reference")
print(json.dumps({
    "hf_kernels": kernels.__file__,
    "ops": ops.__file__,
    "text_shapes": [list(h.shape) for h in hidden],
    "kernel_max_abs_diff": (fast - reference).abs().max().item(),
    "kernel_shape": list(fast.shape),
}))
"""


def _hf_kernels_init() -> Path:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (the lock installs it with transformers)")
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


@pytest.mark.parametrize("where", ["checkout root", "another folder"])
def test_transformers_text_models_and_our_kernels_in_one_process(where: str, tmp_path: Path) -> None:
    hf_init = _hf_kernels_init()
    cwd = ROOT if where == "checkout root" else tmp_path
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", TOGETHER], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["hf_kernels"]).resolve() == hf_init  # theirs, not our folder
    assert Path(seen["ops"]).resolve() == ROOT / "kernels" / "ops.py"  # ours, from this checkout
    assert seen["text_shapes"] == [[2, 7, 32], [2, 7, 32]]
    assert seen["kernel_shape"] == [2, 3, 4, 8]
    assert seen["kernel_max_abs_diff"] == 0.0  # a gather and two adds: the kernel equals the reference


def test_python_dash_m_from_the_root_and_the_console_script_from_elsewhere(tmp_path: Path) -> None:
    """Both launches import the whole CLI (config, model, kernels dispatch) before printing help."""
    _hf_kernels_init()
    from_root = run_miles("pretrain", "--help", cwd=ROOT)
    elsewhere = run_miles("pretrain", "--help", cwd=tmp_path, installed=True)
    for proc in (from_root, elsewhere):
        assert "usage: miles pretrain" in proc.stdout


def _root_import_names() -> dict[str, bool]:
    """Every top-level name Python could import from the checkout root -> whether it is a regular package
    or module (True: it would win over an installed package of that name; False: a namespace folder)."""
    names: dict[str, bool] = {}
    for entry in ROOT.iterdir():
        if entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = (entry / "__init__.py").is_file()
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = True
    return names


def test_no_import_name_of_ours_is_shared_with_another_distribution() -> None:
    """Neither direction of shadowing can happen, for any installed distribution, not only `kernels`."""
    providers = {name: set(dists) for name, dists in importlib.metadata.packages_distributions().items()}
    ours = [name for name, dists in providers.items() if OUR_DISTRIBUTION in dists]
    assert {"miles", "miles_kernels", "data_dali"} <= set(ours), ours
    for name in ours:  # what the installed project imports: nobody else may provide it
        assert providers[name] == {OUR_DISTRIBUTION}, f"{name} is also provided by {providers[name]}"
    root_names = _root_import_names()
    assert root_names["kernels"] is False, "kernels/__init__.py would shadow Hugging Face's `kernels`"
    for name, wins in root_names.items():  # what a launch from the checkout root could import
        others = sorted(providers.get(name, set()) - {OUR_DISTRIBUTION})
        if wins:
            assert not others, f"the folder {name}/ at the checkout root shadows {others}; rename it"


def test_imports_point_down() -> None:
    """`miles` uses `data_dali` and `miles_kernels`; neither of them imports `miles` (nor the kernels the
    data layer, or the reverse): the layers can be read, tested and reused from the bottom up."""
    import ast

    root = Path(__file__).resolve().parents[1]
    forbidden = {"data_dali": {"miles", "miles_kernels"}, "kernels": {"miles", "data_dali"}}
    climbing = []
    for folder, above in forbidden.items():
        for path in sorted((root / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                climbing += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in above]
    assert not climbing, climbing
