"""bench/bench_varlen.py's pure parts: document lengths, the provider list, the summary table
(the timing itself needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_varlen as bv  # noqa: E402


@pytest.mark.parametrize("name", list(bv.PROBLEMS))
def test_document_lengths_fill_the_tokens(name):
    N, docs = bv.PROBLEMS[name][:2]
    lengths = bv.document_lengths(N, docs)
    assert len(lengths) == docs and sum(lengths) == N and min(lengths) >= 1
    assert lengths == bv.document_lengths(N, docs)  # seeded


def test_summary_table_with_providers_left_out():
    ours = {"impl": "moda_cuda[cuda] cu_seqlens", "fwd_ms": 1.0, "fwd_bwd_ms": 4.0}
    bare = {"impl": bv.FLEX_LABELS["flex"], "fwd_ms": 0.8, "fwd_bwd_ms": 5.0}
    table = bv.summary_table([{"name": "p", "results": [ours, bare]}, {"name": "q", "results": [ours]}])
    assert "| p | 1.25x, 0.80x | not timed |" in table
    assert "| q | not timed | not timed |" in table


def test_unknown_provider_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bv.main(["--out", str(tmp_path), "--providers", "cuda,flex2"])
