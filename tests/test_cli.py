"""The command line: ``python -m moda_cuda`` (demo) and ``python -m moda_cuda info``."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "moda_cuda", *args], capture_output=True, text=True, timeout=600)


def test_demo_checks_against_reference():
    res = run("demo", "--seqlen", "64")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "backend" in res.stdout and "result     OK" in res.stdout


def test_info():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert "reference" in res.stdout and "torch" in res.stdout
    assert "cuda extension" in res.stdout and "cuda extension archs" in res.stdout
    assert "cuda extension built with" in res.stdout


def test_info_names_the_backend_for_a_shape():
    res = run("info", "--shape", "1,16384,64,8,64,64", "--dtype", "float64")
    assert res.returncode == 0, res.stderr
    assert "backend for (1, 16384, 64, 8, 64, 64) float64" in res.stdout
    assert res.stdout.rstrip().endswith("reference")  # float64 is reference-only
    assert "backward for (1, 16384, 64, 8, 64, 64) float64" in res.stdout
    bad = run("info", "--shape", "1,2,3")
    assert bad.returncode != 0 and "six integers" in bad.stderr
