"""bench/bench_sweep.py's pure parts: the points, the arithmetic, slices, merge, table and plots
(the measuring itself needs a GPU)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_sweep as bs  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_points_count_and_dedup():
    points = bs.build_points()
    # Per centre: split 5 + group 6 + depth 6 + causal 2 + chunk 2 + long 3 = 24 sweep entries,
    # of which 5 beyond the first are the centre itself: 19 points.
    assert len(points) == 38
    assert sum(len(p.sweeps) for p in points) == 48
    assert len({p.key() for p in points}) == len(points) == len({p.id for p in points})
    for c in bs.CENTRES:
        centre = [p for p in points if p.centre == c and p.is_centre()]
        assert len(centre) == 1
        assert sorted(s for s, _ in centre[0].sweeps) == sorted(bs.SWEEPS)  # one measurement serves them all
    # Coincidences other than the centre: none at these sizes.
    assert all(len(p.sweeps) == 1 for p in points if not p.is_centre())


def test_each_sweep_contains_its_centre_value():
    points = bs.build_points()
    for c in bs.CENTRES:
        for sweep, values in bs.SWEEPS.items():
            members = {x: p for p in points if p.centre == c for s, x in p.sweeps if s == sweep}
            assert set(members) == {x for x, _ in values}
            assert sum(p.is_centre() for p in members.values()) == 1, (c, sweep)
            assert members[bs.centre_value(c, sweep)].is_centre()
    # the expected axes
    d64 = {s: {x: p for p in points if p.centre == "d64" for ss, x in p.sweeps if ss == s} for s in bs.SWEEPS}
    assert d64["group"]["32"].Hq == 256 and d64["group"]["32"].Hk == 8
    assert d64["depth"]["0"].L == 0 and d64["depth"]["256"].L == 256
    assert not d64["causal"]["non-causal"].causal and d64["chunk"]["64"].chunk == 64
    assert (d64["long"]["1x65536"].B, d64["long"]["1x65536"].T) == (1, 65536)
    assert all(p.B * p.T == 16384 for p in d64["split"].values())
    assert [bs.centre_value("d128", s) for s in ("split", "group", "depth", "long")] == ["4x4096", "4", "32", "4x4096"]


def test_narrowed_points():
    points = bs.build_points(["d128"], ["causal", "chunk"])
    assert [p.label() for p in points] == ["d128 centre", "d128 causal=non-causal", "d128 chunk=64"]


def test_flops_by_hand():
    # T = 4, L = 2, causal, chunk 1: pairs 1+2+3+4 = 10, depth 4*2 = 8.
    assert bs.visible_pairs(4, True) == 10 and bs.visible_pairs(4, False) == 16
    assert bs.depth_pairs(4, 2, True, 1) == 8 and bs.depth_pairs(4, 2, False, 1) == 8
    # T = 5, chunk 2, L = 3: causal positions seen 1,2,1,2,1 = 7 -> 21; non-causal 2,2,2,2,1 = 9 -> 27.
    assert bs.depth_pairs(5, 3, True, 2) == 21
    assert bs.depth_pairs(5, 3, False, 2) == 27
    # 4 * B * Hq * D * (pairs + depth pairs): B=2, Hq=3, D=8
    assert bs.useful_flops(2, 4, 3, 8, 2) == 4 * 2 * 3 * 8 * (10 + 8)
    assert bs.useful_flops(2, 5, 3, 8, 3, causal=False, chunk=2) == 4 * 2 * 3 * 8 * (25 + 27)
    # depth_k + depth_v in bf16: 2 tensors * B*T*L*Hk*D * 2 bytes
    assert bs.depth_bytes(2, 4, 3, 1, 8) == 2 * 2 * 4 * 3 * 1 * 8 * 2
    p = bs.centre_point("d64")
    assert p.depth_bytes() == 2 * 4 * 4096 * 64 * 8 * 64 * 2 == 2 * 2**30
    # agrees with bench_moda's Shape.flops for chunk 1, causal
    assert p.flops() == p.shape.flops()


def test_slices_partition():
    points = bs.build_points()
    for n in (1, 2, 3, 4, 5):
        ids = [[p.id for p in bs.slice_points(points, i, n)] for i in range(1, n + 1)]
        flat = [x for s in ids for x in s]
        assert sorted(flat) == sorted(p.id for p in points) and len(flat) == len(set(flat))
        assert max(map(len, ids)) - min(map(len, ids)) <= 1
        # the two most expensive points (64k tokens in one sequence) land in different slices
        if n > 1:
            heavy = sorted(points, key=bs.estimated_cost)[-2:]
            assert sum(any(h.id in s for h in heavy) for s in ids) == 2
    with pytest.raises(ValueError):
        bs.slice_points(points, 0, 4)
    assert bs.parse_slice("2/4") == (2, 4)


def test_list_cli(capsys):
    assert bs.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("38 points") and "d64 centre" in out and "d128 long=1x65536" in out
    assert bs.main(["--list", "--slice", "1/4", "--centres", "d64", "--sweeps", "depth"]) == 0
    assert capsys.readouterr().out.startswith("2 points (of 6)")


def test_no_gpu_exit_code(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bs.main(["--out", str(tmp_path), "--slice", "1/4"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _record(p, auto, cuda, triton, cudnn, bw=2e12):
    """A measured point as measure_point writes it, with made-up times (fwd, fwd+bwd)."""
    def prov(t):
        return {"fwd_ms": t[0], "fwd_bwd_ms": t[1], "fwd_error": None, "fwd_bwd_error": None} if t else \
            {"fwd_ms": None, "fwd_bwd_ms": None, "fwd_error": "ValueError: refused", "fwd_bwd_error": "ValueError"}

    providers = {"auto": prov(auto), "cuda": prov(cuda), "triton": prov(triton), bs.CUDNN: prov(cudnn)}
    rec = bs.point_record(p, {"copy_bytes_per_s": bw}, providers)
    assert rec["summary"] == bs.summarize(json.loads(json.dumps(rec)))  # as merge recomputes it
    return rec


def test_summary_ratios():
    p = bs.centre_point("d64")  # depth 2 GiB; at 2e12 B/s: fwd 1.074 ms, fwd+bwd 4.295 ms of streaming
    rec = _record(p, (1.2, 5.0), (1.1, 5.2), (1.5, 6.0), (0.5, 4.4))
    fwd, fb = rec["summary"]["fwd"], rec["summary"]["fwd_bwd"]
    stream = 2 * 2**30 / 2e12 * 1e3
    assert fwd["bound_by"] == "depth bytes" and fwd["bound_ms"] == pytest.approx(stream)
    assert fb["bound_by"] == "cudnn" and fb["bound_ms"] == 4.4  # 4 x stream = 4.29 ms < 4.4
    assert fwd["best_backend"] == "cuda" and fwd["auto_over_best"] == pytest.approx(1.2 / 1.1)
    assert fwd["auto_slow"] and not fb["auto_slow"]  # 1.09 > 1.03; fwd+bwd auto beats both
    assert fwd["auto_over_bound"] == pytest.approx(1.2 / stream)
    assert fwd["auto_tflops"] == pytest.approx(p.flops() / 1.2e-3 / 1e12)
    assert fb["auto_tflops"] == pytest.approx(3.5 * p.flops() / 5.0e-3 / 1e12)
    # a refusing backend and a missing cuDNN time: no best from it, no bound
    rec = _record(p, (1.2, 5.0), None, (1.5, 6.0), None)
    assert rec["summary"]["fwd"]["best_backend"] == "triton" and rec["summary"]["fwd"]["bound_ms"] is None
    assert rec["summary"]["fwd"]["auto_over_bound"] is None
    assert "cuda fwd: ValueError: refused" in bs.format_table([rec])
    failed = bs.point_record(p, {"copy_bytes_per_s": 2e12}, {}, error="out of memory")
    assert failed["summary"]["fwd_bwd"]["auto_ms"] is None
    assert "| d64 centre | - | - | - | - | - | - | - | - | - | - | point failed: out of memory |" in \
        bs.format_table([failed])


def test_merge_table_and_pngs(tmp_path, capsys):
    everything = bs.build_points(["d64"], ["causal", "depth"])  # centre, non-causal, 5 more depths
    slices = []
    for i in (1, 2):
        pts = bs.slice_points(everything, i, 2)
        recs = [_record(p, (1.0 + 0.1 * j, 4.0), (1.0, 4.1), (1.2, 4.5), (0.8, 3.5)) for j, p in enumerate(pts)]
        rep = {"meta": {"gpu": "Test GPU", "torch": torch.__version__, "copy_bytes_per_s": 2e12, "slice": f"{i}/2"},
               "points_expected": [p.id for p in everything], "points": recs}
        path = tmp_path / f"bench_sweep_slice{i}of2.json"
        path.write_text(json.dumps(rep))
        slices.append(path)
    # leave one point out of slice 2: the merge says it is missing
    rep2 = json.loads(slices[1].read_text())
    dropped = rep2["points"].pop()["id"]
    slices[1].write_text(json.dumps(rep2))

    out = tmp_path / "merged"
    assert bs.main(["--merge", str(tmp_path / "bench_sweep_slice*of2.json"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    merged = json.loads((out / "bench_sweep.json").read_text())
    assert merged["missing"] == [dropped] and merged["meta"]["gpu"] == "Test GPU"
    assert [r["id"] for r in merged["points"]] == [p.id for p in everything if p.id != dropped]  # listed order
    assert "| point | fwd auto ms | best | cuDNN | bound | auto/bound |" in text
    assert "| d64 centre |" in text and "(cuda)" in text and "auto > 1.03x best (fwd)" in text

    labels, series = bs.sweep_series(merged["points"], "d64", "depth")
    assert labels == ["0", "8", "32", "64", "128", "256"]
    assert series["auto/bound fwd"][3] is not None  # the centre, measured once, is in the depth sweep
    labels, series = bs.sweep_series(merged["points"], "d64", "causal")
    assert labels == ["causal", "non-causal"] and all(v is not None for v in series["best/bound fwd_bwd"])

    pngs = sorted(p.name for p in out.glob("*.png"))
    if HAS_MPL:
        assert pngs == ["bench_sweep_d64.png"]
        assert (out / "bench_sweep_d64.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert pngs == [] and "matplotlib is not installed" in text


def test_pngs_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rec = _record(bs.centre_point("d128"), (1.0, 4.0), (1.0, 4.0), (1.1, 4.4), (0.9, 3.9))
    paths, why = bs.draw_pngs({"meta": {}, "points": [rec]}, str(tmp_path))
    assert paths == [] and "matplotlib is not installed" in why


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_png_drawn_for_both_centres(tmp_path):
    recs = [_record(p, (1.0, 4.0), (1.0, 4.0), (1.1, 4.4), (0.9, 3.9)) for p in bs.build_points(sweeps=["chunk"])]
    paths, why = bs.draw_pngs({"meta": {"gpu": "Test GPU"}, "points": recs}, str(tmp_path))
    assert why is None and [Path(p).name for p in paths] == ["bench_sweep_d64.png", "bench_sweep_d128.png"]
