"""The installed import names: ``kernels/`` and ``bench/`` install as ``attn_kernels`` and
``attn_bench``, so Hugging Face's ``kernels`` package (which Transformers uses) and this project
import side by side, and a wheel of this project writes nothing under ``kernels/`` or ``bench/``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_hf_kernels_and_this_project_import_side_by_side(tmp_path: Path) -> None:
    target = tmp_path / "site"
    res = _pip("install", "--quiet", "--no-deps", "--target", str(target), "kernels")
    if res.returncode != 0:
        pytest.skip(f"Hugging Face's kernels package could not be installed here: {res.stderr.strip()[-300:]}")
    code = (
        "import kernels, attn_kernels, attn_bench, attention_variants, pathlib\n"
        "from kernels import get_kernel\n"  # Hugging Face's API, not ours
        "from attn_kernels.flash_attention import flash_attention\n"
        "from attn_bench.cli import main\n"
        f"assert pathlib.Path(kernels.__file__).is_relative_to({str(target)!r}), kernels.__file__\n"
        f"ours = pathlib.Path({str(ROOT / 'kernels')!r})\n"
        "assert pathlib.Path(attn_kernels.__file__).parent == ours, attn_kernels.__file__\n"
        "print('ok')\n"
    )
    # cwd outside the checkout: the source folders must not be what Python finds.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_wheel_installs_only_distinct_names(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ next to the sources.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("attention_variants", "kernels", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = _pip("wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), str(src))
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert tops == {"attention_variants", "attn_bench", "attn_kernels"}, tops
