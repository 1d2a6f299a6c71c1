"""bench/bench_generate.py runs end to end (tiny models on the CPU) and reports what it timed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_generate  # noqa: E402


def test_smoke_reports_both_models_per_batch(tmp_path, capsys):
    report = bench_generate.main(["--smoke", "--batches", "1,3", "--rounds", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_generate.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert all(len(rates) == 2 and min(rates) > 0 for rates in row["tokens_per_s"].values())
        assert row["ratio"] == row["median_tokens_per_s"]["moda"] / row["median_tokens_per_s"]["baseline"]
    assert report["config"]["moda"]["use_depth"] and not report["config"]["baseline"]["use_depth"]
    assert "| 3 | 8 |" in capsys.readouterr().out
