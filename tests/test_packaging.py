"""The wheel: built from the tree, installed non-editable into a fresh venv, run from outside the checkout.
The profiles and benchmark suites travel as package data, so names (`--config cpu`, `plan --profile
nvidia-h200`, `bench --suite cpu`) work as they do in the checkout. The fresh venv reuses this venv's
site-packages for the dependencies (a .pth line), not its editable install of glm-serve."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "server", "backends", "glm_kernels", "benchmarks", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "tree"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "results", "figures")
            )
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / name)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work),
            str(tree),
        ]
    )
    [wheel] = work.glob("glm_serve-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)])
    return env_dir


def run(argv: list[str], cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done.stdout


COMMANDS = [
    (["plan", "--profile", "nvidia-h200", "--model", "glm-5"], "FITS"),
    (["serve", "--help"], "--speculative-config"),
    (["bench", "--suite", "cpu", "--help"], "--suite"),
    (["usage", "--help"], "usage"),
    (["config", "show", "--config", "nvidia-h200"], "site-packages/configs/nvidia-h200.yaml"),
]


@pytest.mark.parametrize(
    ("args", "expected"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_installed_wheel_works_outside_the_checkout(installed, tmp_path, args, expected):
    out = run([str(installed / "bin" / "glm-serve"), *args], cwd=tmp_path)
    assert expected in out


def test_the_installed_code_is_the_wheel_not_the_checkout(installed, tmp_path):
    code = "import server.config as c; print(c.__file__); print(sorted(p.name for p in c.CONFIG_DIR.glob('*.yaml')))"
    out = run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path)
    assert str(installed) in out.splitlines()[0] and "cpu.yaml" in out


def test_bench_suite_by_name_loads_from_the_wheel(installed, tmp_path):
    code = "from benchmarks.bench.suite import SUITES_DIR; print(SUITES_DIR, sorted(p.name for p in SUITES_DIR.glob('*.yaml')))"
    out = run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path)
    assert str(installed) in out and "cpu.yaml" in out
