"""The command line: ``python -m moda_cuda`` (demo) and ``python -m moda_cuda info``."""

import subprocess
import sys

import pytest

import moda_cuda
from moda_cuda.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "moda_cuda", *args], capture_output=True, text=True, timeout=600)


def test_demo_checks_against_reference():
    res = run("demo", "--seqlen", "64")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "backend" in res.stdout and "result     OK" in res.stdout


def test_demo_is_the_default_command_with_its_options():
    res = run("--seqlen", "32")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "result     OK" in res.stdout


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


def test_info_rejects_an_invalid_shape_without_a_traceback():
    bad = run("info", "--shape", "1,1024,8,3,64,4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m moda_cuda info: error: argument --shape:") and "Hq (8)" in last


@pytest.mark.parametrize("shape, says", [
    ("1,1024,8,3,64,4", "Hq (8) must be a multiple of Hk (3)"),
    ("0,16,8,2,64,4", "B must be >= 1, got 0"),
    ("1,-5,8,2,64,4", "T must be >= 1, got -5"),
    ("1,16,0,2,64,4", "Hq must be >= 1, got 0"),
    ("1,16,8,0,64,4", "Hk must be >= 1, got 0"),
    ("1,16,8,2,0,4", "D must be >= 1, got 0"),
    ("1,16,8,2,-64,4", "D must be >= 1, got -64"),
    ("1,16,8,2,64,-1", "L must be >= 0, got -1"),
    ("1,16,8,2,64", "six integers"),
    ("1,16,8,2,64,4,4", "six integers"),
    ("1,16,8,two,64,4", "six integers"),
    ("", "six integers"),
    ("99999999999999,99999999999,64,8,64,64", "too large"),
])
def test_info_shape_errors_are_usage_errors(capsys, shape, says):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--shape", shape])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m moda_cuda info: error: argument --shape:") and says in err[-1], err
    assert all(line.startswith(("usage:", " ", "python -m moda_cuda info: error:")) for line in err), err


def test_info_accepts_depth_zero(capsys):
    assert main(["info", "--shape", "1,16,8,2,64,0", "--dtype", "float32"]) == 0
    assert "backend for (1, 16, 8, 2, 64, 0) float32" in capsys.readouterr().out


def test_info_shape_check_in_python():
    with pytest.raises(ValueError, match=r"Hq \(8\) must be a multiple of Hk \(3\)"):
        moda_cuda.info(print_it=False, shape=(1, 1024, 8, 3, 64, 4))
    with pytest.raises(ValueError, match="T must be >= 1"):
        moda_cuda.info(print_it=False, shape=(1, -5, 8, 2, 64, 4))


@pytest.mark.parametrize("args, says", [
    (["--seqlen", "-5"], "argument --seqlen: wants an integer >= 1, got -5"),
    (["--seqlen", "0"], "argument --seqlen: wants an integer >= 1, got 0"),
    (["--seqlen", "x"], "argument --seqlen: wants an integer >= 1, got 'x'"),
    (["--seed", "1.5"], "argument --seed: wants an integer, got '1.5'"),
    (["--seed", str(2**64)], "argument --seed: wants an integer in"),
])
def test_demo_argument_errors_are_usage_errors(capsys, args, says):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m moda_cuda demo: error:") and says in last, last
