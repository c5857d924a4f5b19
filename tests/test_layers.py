"""The import layers: the contract (pyproject's [tool.importlinter], checked by `lint-imports` in
scripts/test.sh) covers every package, and the planning side imports no torch, Ray or DeepSpeed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_package_and_top_module_has_its_layer():
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    named = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    present = {p.name for p in (REPO / "ckd_ray").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    present |= {p.stem for p in (REPO / "ckd_ray").glob("*.py") if p.stem != "__init__"}
    assert present - named == set(), f"add these to a layer in pyproject's [tool.importlinter]: {sorted(present - named)}"
    assert named - present == set(), f"layers name modules that do not exist: {sorted(named - present)}"
    # A folder of modules without __init__.py is a namespace package: the import graph misses it.
    missing = [str(p.relative_to(REPO)) for p in (REPO / "ckd_ray").rglob("*") if p.is_dir() and p.name != "__pycache__"
               and any(p.glob("*.py")) and not (p / "__init__.py").exists()]
    assert missing == []


def test_the_planner_and_every_config_check_import_without_torch_ray_or_deepspeed():
    """What the driver needs to say what will run (plans, step plans, the config tree, its checks,
    the tune space) loads no training library: `ckd-ray config check` stays fast."""
    modules = ["ckd_ray.cascade.plan", "ckd_ray.cascade.steps", "ckd_ray.train.plan", "ckd_ray.config.checks",
               "ckd_ray.config.loader", "ckd_ray.tune.space", "ckd_ray.tune.checks"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
