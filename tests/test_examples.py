"""Smoke runs of the training examples and the depth-stream benchmark (CPU, tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run(args, tmp_path, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    # Own process group: a timeout also ends the workers that torchrun started.
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{args} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{args} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def written(stdout: str) -> list:
    """The files an example says it wrote (``wrote PATH`` lines), in order."""
    return [Path(line[len("wrote "):]) for line in stdout.splitlines() if line.startswith("wrote ")]


def check_report(path: Path, rate_key: str) -> dict:
    report = json.loads(path.read_text())
    models = report["models"]
    assert set(models) == {"moda", "baseline"}
    for name, r in models.items():
        assert r["steps"] >= 6 and len(r["train_curve"]) == r["steps"], name
        assert r["val_curve"] and r["final_val"]["loss"] > 0, name
        assert r[rate_key] > 0, name
        losses = [v for _, v in r["train_curve"]]
        assert all(v == v for v in losses)  # no NaN
    # Matched parameter counts (within 1%) and the baseline switch really switched depth off.
    p_moda, p_base = models["moda"]["parameters"], models["baseline"]["parameters"]
    assert abs(p_moda - p_base) / p_moda < 0.01
    assert models["moda"]["config"]["use_depth"] and not models["baseline"]["config"]["use_depth"]
    return report


def test_lm_smoke(tmp_path):
    out = tmp_path / "lm"
    stdout = run([sys.executable, str(ROOT / "examples/train_lm.py"), "--smoke", "--out", str(out)], tmp_path)
    report = check_report(out / "lm_results.json", "tokens_per_s")
    for r in report["models"].values():
        curve = [v for _, v in r["train_curve"]]
        assert curve[-1] < curve[0]  # a few steps already help on real text
    assert (out / "lm_loss.png").exists() == HAS_MATPLOTLIB
    assert "tokens/s" in stdout
    assert written(stdout) == [out / "lm_results.json"] + ([out / "lm_loss.png"] if HAS_MATPLOTLIB else []) + \
        [out / "moda", out / "baseline"]
    # The trained model loads and completes a prompt (examples/generate.py).
    text = run([sys.executable, str(ROOT / "examples/generate.py"), "--model", str(out / "moda"), "--prompt", "def ",
                "--max-new-tokens", "12", "--device", "cpu"], tmp_path)
    assert text.startswith("def ") and "tokens/s" in text
    # More new tokens than the model's max_seq_len (32 in the smoke run): a usage error, up front.
    res = subprocess.run([sys.executable, str(ROOT / "examples/generate.py"), "--model", str(out / "moda"),
                          "--max-new-tokens", "200", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and "exceed the model's max_seq_len 32" in res.stderr


@pytest.mark.parametrize("script", ["train_lm.py", "train_vit.py"])
def test_steps_must_be_positive(tmp_path, script):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--smoke", "--steps", "0"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--steps: wants an integer >= 1, got 0" in res.stderr


def test_lm_smoke_packed_documents(tmp_path):
    out = tmp_path / "lm"
    run([sys.executable, str(ROOT / "examples/train_lm.py"), "--smoke", "--pack", "--out", str(out)], tmp_path)
    report = check_report(out / "lm_results.json", "tokens_per_s")
    assert report["args"]["pack"] is True


def test_packed_window_cuts_documents_and_pieces():
    """One packed row: documents cut into pieces of at most seqlen bytes, no target across pieces."""
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    from train_lm import packed_window

    data, starts = torch.arange(100), torch.tensor([0, 10, 13, 40, 90])
    ids, targets, options = packed_window(data, starts, 5, 40, 8, torch.device("cpu"))
    assert ids.tolist() == [list(range(5, 45))]
    # Pieces: [5, 8) [8, 10) of the first document, [10, 13), then [13, 40) in pieces of 8 from 13, then [40, ...
    assert options["cu_seqlens"].tolist() == [0, 3, 5, 8, 16, 24, 32, 35, 40] and options["max_seqlen"] == 8
    last_of_piece = {2, 4, 7, 15, 23, 31, 34}
    assert targets.tolist() == [[-100 if i in last_of_piece else 6 + i for i in range(40)]]


def test_lm_cuda_graph_refuses_what_it_cannot_capture(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/train_lm.py"), "--cuda-graph", "--pack", "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--cuda-graph captures a one-GPU step of fixed shapes: not with --pack" in proc.stderr


@pytest.mark.cuda
def test_graphed_training_steps_match_eager_steps():
    """The training loop with its step captured once and replayed trains as the eager loop
    does: the same losses, validation losses (evaluated between replays) and weights after
    the warm-up, the capture and several replays (bf16; the D = 64 backward's dQ atomics make
    neither path bit-exact run to run)."""
    import torch

    C = _examples_common()
    from moda_cuda.layers import MoDAConfig, MoDAForCausalLM

    dev = torch.device("cuda")
    cfg = MoDAConfig(d_model=256, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=128)
    gen = torch.Generator().manual_seed(0)
    def counting_rows():  # each row counts up from a random start: learnable within a few steps
        return ((torch.randint(0, 256, (4, 1), generator=gen) + torch.arange(129)) % 256).to(dev)
    batches = [counting_rows() for _ in range(GRAPHED_STEPS)]
    val = counting_rows()

    def evaluate(model):
        return {"loss": model(val[:, :-1], val[:, 1:]).loss.item()}

    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = MoDAForCausalLM(cfg).to(dev)
        spec = C.TrainSpec(steps=GRAPHED_STEPS, lr=3e-3, warmup=2, eval_every=2, log_every=2, timing_warmup=1,
                           cuda_graph=graphed)
        it = iter(batches)
        run = C.train(C.Dist(device=dev), "graphed" if graphed else "eager", model, spec,
                      lambda: (lambda ids: (ids[:, :-1], ids[:, 1:]))(next(it)), evaluate, torch.bfloat16, 512)
        weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        runs[graphed] = (torch.tensor([v for _, v in run["train_curve"]]),
                         torch.tensor([e["loss"] for e in run["val_curve"]]), weights)
    (eager_loss, eager_val, eager_w), (graph_loss, graph_val, graph_w) = runs[False], runs[True]
    assert len(graph_loss) == GRAPHED_STEPS and len(graph_val) == GRAPHED_STEPS // 2
    assert graph_loss[-1] < graph_loss[0] - 0.1  # it trains
    assert torch.allclose(graph_loss, eager_loss, rtol=0, atol=2e-2), (graph_loss, eager_loss)
    assert torch.allclose(graph_val, eager_val, rtol=0, atol=2e-2), (graph_val, eager_val)
    assert (graph_w - eager_w).norm() / eager_w.norm() < 2e-2


GRAPHED_STEPS = 8  # 3 eager warm-up steps, the capture, 4 more replays


def _examples_common():
    """examples/_common.py (the examples are scripts beside it, not a package)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import _common

    return _common


def test_lm_smoke_under_torchrun(tmp_path):
    out = tmp_path / "lm"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "examples/train_lm.py"), "--smoke", "--steps", "6", "--models", "moda,baseline", "--out", str(out)],
        tmp_path)
    assert check_report(out / "lm_results.json", "tokens_per_s")["world_size"] == 1


def test_lm_smoke_fsdp_and_context_parallel_under_torchrun(tmp_path):
    """Two processes: FSDP2, and every sequence sharded over both (zigzag); the saved model loads."""
    out = tmp_path / "lm"
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(ROOT / "examples/train_lm.py"), "--smoke", "--fsdp", "--context-parallel", "2", "--out", str(out)],
                 tmp_path)
    report = check_report(out / "lm_results.json", "tokens_per_s")
    assert report["world_size"] == 2 and report["fsdp"] and report["context_parallel"] == 2
    assert report["tokens_per_step"] == 4 * 32  # one data-parallel group: both ranks hold the same sequences
    assert "tokens/s per process" in stdout
    from moda_cuda.layers import MoDAForCausalLM

    assert MoDAForCausalLM.from_pretrained(out / "moda").config.n_layers == 2


def test_vit_smoke(tmp_path):
    out = tmp_path / "vit"
    data = "digits" if HAS_SKLEARN else "synthetic"
    stdout = run([sys.executable, str(ROOT / "examples/train_vit.py"), "--smoke", "--data", data, "--out", str(out)],
                 tmp_path)
    report = check_report(out / "vit_results.json", "images_per_s")
    for r in report["models"].values():
        assert 0.0 <= r["final_val"]["accuracy"] <= 1.0
    assert (out / "vit_curves.png").exists() == HAS_MATPLOTLIB
    assert written(stdout) == [out / "vit_results.json"] + ([out / "vit_curves.png"] if HAS_MATPLOTLIB else [])


@pytest.mark.parametrize("script, out, files", [
    ("train_lm.py", "out/lm", ("lm_results.json", "lm_loss.png")),
    ("train_vit.py", "out/vit", ("vit_results.json", "vit_curves.png")),
])
def test_example_help_shows_defaults(tmp_path, script, out, files):
    stdout = " ".join(run([sys.executable, str(ROOT / "examples" / script), "--help"], tmp_path).split())
    assert f"(default: {out})" in stdout and all(f in stdout for f in files)
    assert "(default: moda,baseline)" in stdout and "(default: auto)" in stdout
    assert "(default: None)" not in stdout and "(default: False)" not in stdout


def test_bench_smoke(tmp_path):
    stdout = run([sys.executable, str(ROOT / "bench/bench_depth_stream.py"), "--smoke", "--out", str(tmp_path)],
                 tmp_path)
    report = json.loads((tmp_path / "depth_stream_smoke.json").read_text())
    assert set(report["variants"]) == {"stream", "stream_read", "stack", "none"}
    assert report["correctness"]["max_rel_grad_diff_stream"] < 1e-5
    assert report["correctness"]["max_rel_grad_diff_stream_read"] < 1e-5
    assert report["summary"]["depth_state_memory_ratio_analytic"] == pytest.approx((4 * 3 / 2) / 3)
    assert "speedup_step" in stdout


def test_bench_decode_help(tmp_path):
    stdout = " ".join(run([sys.executable, str(ROOT / "bench/bench_decode.py"), "--help"], tmp_path).split())
    assert "--out OUT" in stdout and "memory roofline" in stdout and "--cache-lens" in stdout
