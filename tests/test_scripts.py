"""The shell scripts under scripts/: wheel builds (pure Python, fast) and setup.sh's checks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_BUILD = importlib.util.find_spec("build") is not None and importlib.util.find_spec("build.__main__") is not None
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored ones such as build/) under ``dest``."""
    files = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        res = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True)
        if res.returncode == 0:
            files = [f for f in res.stdout.split("\0") if f]
    if files is None:
        skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache")
        shutil.copytree(ROOT, dest, ignore=skip)
        return dest
    for name in files:
        src = ROOT / name
        if src.is_file():  # listed files deleted from the work tree are left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_wheel(checkout: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(checkout / "scripts/build_wheel.sh"), "--out", str(out)], cwd=checkout,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be the wheel path only, got {res.stdout!r}"
    wheel = Path(lines[0])
    assert wheel.parent == out.resolve() and wheel.is_file() and wheel.name.startswith("moda_cuda-")
    assert wheel.name.endswith("-py3-none-any.whl")  # MODA_SKIP_CUDA_BUILD=1: pure Python
    names = zipfile.ZipFile(wheel).namelist()
    assert "moda_cuda/__init__.py" in names and not any(n.startswith("moda_cuda/_C.") for n in names)
    return res


def wheel_env(tmp_path: Path, frontend: str) -> dict:
    env = dict(os.environ, MODA_SKIP_CUDA_BUILD="1", PYTHON=sys.executable)
    env.pop("MODA_FORCE_CUDA_BUILD", None)
    if frontend == "pip" and HAS_BUILD:
        # Hide the installed build package so that the script falls back to pip wheel.
        shim = tmp_path / "hide_build"
        (shim / "build").mkdir(parents=True)
        (shim / "build" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
        env["PYTHONPATH"] = str(shim) + os.pathsep + env.get("PYTHONPATH", "")
    return env


FRONTENDS = {"pip": "pip wheel", "build": "python -m build"}


@needs_bash
@pytest.mark.parametrize("frontend", [
    "pip",
    pytest.param("build", marks=pytest.mark.skipif(not HAS_BUILD, reason="the build package is not installed")),
])
def test_build_wheel_twice_in_one_checkout(tmp_path, frontend):
    # The first build leaves build/ in the checkout; the second must not mistake it for the
    # build frontend (without the build package, `import build` found the folder).
    checkout = copy_checkout(tmp_path / "src")
    env = wheel_env(tmp_path, frontend)
    first = build_wheel(checkout, tmp_path / "dist", env)
    assert (checkout / "build").is_dir()
    second = build_wheel(checkout, tmp_path / "dist", env)
    for res in (first, second):
        assert f"building the wheel with {FRONTENDS[frontend]}" in res.stderr


@needs_bash
def test_build_wheel_is_not_fooled_by_a_build_package_in_the_checkout(tmp_path):
    checkout = copy_checkout(tmp_path / "src")
    (checkout / "build").mkdir()
    (checkout / "build" / "__init__.py").write_text("")  # a package `build` without __main__
    build_wheel(checkout, tmp_path / "out", wheel_env(tmp_path, "default"))


# setup.sh with a stand-in interpreter (PYTHON=...): it records every call, answers the
# import checks from a list of "installed" modules and lets `pip install` add to that list,
# so the order of the checks and installs is seen without installing anything.
STUB = r'''#!{python}
import json, os, re, sys

state, log = os.environ["STUB_STATE"], os.environ["STUB_LOG"]
installed = set(open(state).read().split()) if os.path.exists(state) else set()
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(json.dumps({{"args": args, "installed": sorted(installed)}}) + "\n")
NAMES = {{"numpy": "numpy", "torch": "torch", "triton": "triton", "pytest": "pytest", "matplotlib": "matplotlib", "safetensors": "safetensors",
         "scikit-learn": "sklearn", "nvidia-cutlass": "cutlass_library", ".": "moda_cuda",
         "setuptools": "setuptools", "wheel": "wheel"}}
if args[:3] == ["-m", "pip", "install"]:
    installed.update(NAMES[re.split(r"[<>=]", a)[0]] for a in args[3:] if not a.startswith("-"))
    open(state, "w").write(" ".join(sorted(installed)))
    sys.exit(0)
if args[0] == "-c":
    code = args[1]
    if "sys.prefix" in code:  # the line setup.sh prints first
        os.execv({python!r}, [{python!r}, "-c", code])
    if "cuda.is_available" in code:  # no GPU here
        sys.exit(1 if "torch" in installed else 2)
    if "cutlass_library" in code:
        sys.exit(0 if "cutlass_library" in installed else 1)
    sys.exit(0 if re.match(r"import (\w+)", code).group(1) in installed else 1)
sys.exit(3)
'''


def run_setup(tmp_path: Path, installed: str = ""):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    state, log = tmp_path / "installed", tmp_path / "calls.jsonl"
    state.write_text(installed)
    env = dict(os.environ, PYTHON=str(stub), STUB_STATE=str(state), STUB_LOG=str(log))
    res = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    installs = [c for c in calls if c["args"][:3] == ["-m", "pip", "install"]]
    return res, calls, installs


def installs_of(installs, package):
    return [i for i, c in enumerate(installs) if any(re.split(r"[<>=]", a)[0] == package for a in c["args"][3:])]


@needs_bash
def test_setup_on_a_fresh_environment(tmp_path):
    res, calls, installs = run_setup(tmp_path)
    first = res.stdout.splitlines()[0]
    assert first.startswith("scripts/setup.sh: installing into the active Python environment ")
    assert sys.executable in first
    # numpy is there before anything imports torch (torch warns "Failed to initialize NumPy").
    (numpy,) = installs_of(installs, "numpy")
    (torch,) = installs_of(installs, "torch")
    assert numpy < torch
    cuda_check = next(c for c in calls if "cuda.is_available" in c["args"][-1])
    assert "numpy" in cuda_check["installed"]
    # nvidia-cutlass goes in without its requirements, after every install that resolves
    # dependencies (pip would otherwise report cutlass' missing requirements).
    (cutlass,) = installs_of(installs, "nvidia-cutlass")
    assert "--no-deps" in installs[cutlass]["args"]
    resolving = [i for i, c in enumerate(installs) if "--no-deps" not in c["args"]]
    assert resolving and max(resolving) < cutlass
    assert installs[-1]["args"][-2:] == ["-e", "."] and "--no-deps" in installs[-1]["args"]
    # A setuptools that builds wheels, for the editable install without build isolation.
    (setuptools,) = installs_of(installs, "setuptools")
    assert "wheel" in installs[setuptools]["args"] and setuptools < len(installs) - 1


@needs_bash
def test_setup_again_with_cutlass_present(tmp_path):
    # A later install that pulls in one of cutlass' requirements (scikit-learn: scipy) must not
    # end in pip's conflict report about the others.
    res, calls, installs = run_setup(tmp_path,
                                     "numpy torch triton pytest setuptools wheel matplotlib safetensors cutlass_library moda_cuda")
    assert [c["args"][-1] for c in installs] == ["scikit-learn", "."]
    assert "--no-warn-conflicts" in installs[0]["args"]
