"""The Nsight Compute harness's parsing and table (the profiling itself needs a GPU and ncu)."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import profile_ncu  # noqa: E402

RAW = '''==PROF== Connected to process 123
"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread"
"","","nsecond","register/thread"
"0","_moda_fwd_kernel(float *, int)","5843870","168"
"1","_bwd_kv_kernel(float *)","16718834","255"
'''


def test_parse_and_table():
    rows = profile_ncu.parse_ncu_csv(RAW)
    assert [r["Kernel Name"] for r in rows] == ["_moda_fwd_kernel(float *, int)", "_bwd_kv_kernel(float *)"]
    assert rows[0]["gpu__time_duration.sum__unit"] == "nsecond"
    text = profile_ncu.table(rows, ["gpu__time_duration.sum", "launch__registers_per_thread"])
    assert "| _moda_fwd_kernel | 5843.9 | 168 |" in text
    assert "| _bwd_kv_kernel | 16718.8 | 255 |" in text


def test_shape_argument():
    assert profile_ncu.parse_shape("1,16384,64,8,64,64") == dict(B=1, T=16384, Hq=64, Hk=8, D=64, L=64)
    with pytest.raises(argparse.ArgumentTypeError, match="six integers"):
        profile_ncu.parse_shape("1,2,3")


def test_known_metrics_keeps_launch_attributes(tmp_path):
    """--query-metrics lists hardware metrics only; launch__* attributes are always there."""
    fake = tmp_path / "ncu"
    fake.write_text('#!/bin/sh\necho \'"Metric Name","Description"\'\n'
                    'echo \'"gpu__time_duration","time"\'\n'
                    'echo \'"smsp__average_warps_issue_stalled_barrier_per_issue_active","stall"\'\n')
    fake.chmod(0o755)
    wanted = ["gpu__time_duration.sum", "launch__registers_per_thread", "dram__throughput.avg.pct_of_peak",
              "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
    assert profile_ncu.known_metrics(str(fake), wanted) == [wanted[0], wanted[1], wanted[3]]
    text = profile_ncu.table([{"Kernel Name": "k(int)", wanted[3]: "1.5"}], [wanted[3]])
    assert "| kernel | stall barrier |" in text and "| k | 1.5 |" in text


def test_depth_only_reaches_the_profiled_process(tmp_path):
    """--depth-only is passed on to the profiled child and names the report."""
    fake = tmp_path / "ncu"
    args_file = tmp_path / "args.txt"
    fake.write_text('#!/bin/sh\ncase "$*" in *--query-metrics*) echo \'"Metric Name","Description"\'; '
                    'echo \'"gpu__time_duration","time"\'; exit 0;; esac\n'
                    f'echo "$@" > {args_file}\n'
                    f"cat <<'CSV'\n{RAW}CSV\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    assert profile_ncu.main(["--backend", "cuda", "--direction", "fwd", "--shape", "1,4096,64,8,64,64",
                             "--depth-only", "--ncu", str(fake), "--out", str(out)]) == 0
    assert "--depth-only" in args_file.read_text().split()
    report = out / "ncu_cuda_fwd_B1_T4096_Hq64_Hk8_D64_L64_depth_only.md"
    assert report.is_file() and "| _moda_fwd_kernel | 5843.9 |" in report.read_text()
