"""Import names: the checkout never shadows an installed distribution.

``kernels/`` and ``bench/`` each hold one package named as it is imported (``kernels/attn_kernels``,
``bench/attn_bench``) and no ``__init__.py`` of their own. Python started in the checkout root (``python
-c``, ``python -m``, a notebook, ``python -m pytest``) puts that root first on ``sys.path``; a regular
package there named ``kernels`` hid Hugging Face's ``kernels``, which Transformers imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"attention_variants", "attn_bench", "attn_kernels"}


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _python(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_no_top_level_folder_is_a_package() -> None:
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert tops <= {"attention_variants"}, f"top-level folders importable under their own name: {tops}"


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_checkout_root_does_not_shadow_installed_kernels_or_bench(tmp_path: Path, how: str) -> None:
    # Stand-ins for PyPI's `kernels` and `bench`, installed elsewhere on the path.
    site = tmp_path / "site"
    for name in ("kernels", "bench"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("WHO = 'installed'\n")
    code = (
        "import sys, kernels, bench, attn_kernels, attn_bench\n"
        f"assert sys.path[0] in ('', {str(ROOT)!r}), sys.path[:2]\n"  # the checkout root comes first
        "assert kernels.WHO == 'installed', kernels\n"
        "assert bench.WHO == 'installed', bench\n"
        "print('ok')\n"
    )
    if how == "-m":
        (site / "probe_names.py").write_text(code)
        args = ["-m", "probe_names"]
    else:
        args = ["-c", code]
    out = _python(args, cwd=ROOT, pythonpath=site)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_transformers_hub_kernels_import_from_checkout_root() -> None:
    pytest.importorskip("transformers")
    code = (
        "import pathlib, kernels\n"
        "import transformers.integrations.hub_kernels\n"
        f"ours = pathlib.Path({str(ROOT / 'kernels')!r})\n"
        "f = getattr(kernels, '__file__', None)\n"
        "assert f is None or not pathlib.Path(f).is_relative_to(ours), f\n"
        "print('ok')\n"
    )
    out = _python(["-c", code], cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


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
        f"ours = pathlib.Path({str(ROOT / 'kernels' / 'attn_kernels')!r})\n"
        "assert pathlib.Path(attn_kernels.__file__).parent == ours, attn_kernels.__file__\n"
        "print('ok')\n"
    )
    for cwd in (tmp_path, ROOT):  # outside the checkout, and in its root
        out = _python(["-c", code], cwd=cwd, pythonpath=target)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (cwd, out.stderr[-2000:])


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
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert tops == OUR_PACKAGES, tops
    assert "attn_bench/sweep/presets.toml" in names  # package data travels with the package
