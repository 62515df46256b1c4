"""The source distribution: it must hold every file a build from it reads (`python -m build`
and pip build the wheel from the sdist, not from this tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_OUTPUTS = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".benchmarks"}


def _source_files(root: Path, folder: str, suffixes: tuple[str, ...]) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in (root / folder).rglob("*")
        if p.is_file() and p.suffix in suffixes and not BUILD_OUTPUTS & set(p.relative_to(root).parts)
    }


def test_sdist_holds_everything_the_build_and_the_package_need(tmp_path):
    # Built from a copy, so the tree under test is not written to, and without CUDA: the CUDA
    # sources must travel also when the machine that makes the sdist has no nvcc.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS, "*.egg-info", "*.so"))
    env = dict(os.environ, PTL_FUSED_WITH_CUDA="0")
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", hook, str(tmp_path)], cwd=tree, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        top = name.removesuffix(".tar.gz")
        shipped = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}

    needed = (
        _source_files(tree, "csrc", (".cpp", ".h", ".cu", ".cuh"))
        | _source_files(tree, "ptl_fused", (".py", ".yaml", ".typed"))
        | _source_files(tree, "python_ref", (".py",))
        | _source_files(tree, "tests", (".py", ".cpp", ".h"))
        | _source_files(tree, "bench", (".py",))
        | _source_files(tree, "examples", (".py",))
        | {"setup.py", "pyproject.toml", "README.md"}
    )
    assert any(f.endswith(".cuh") for f in needed) and "ptl_fused/py.typed" in needed  # the globs work
    missing = sorted(needed - shipped)
    assert not missing, f"the sdist lacks {len(missing)} files the build or the tests read: {missing[:20]}"
    assert not {f for f in shipped if f.endswith((".so", ".pyc")) or f.startswith("bench/results/")}, (
        "the sdist ships build outputs or benchmark results"
    )
