"""context_parallel_moda_attention: the ring over gloo (CPU processes) against the one-process op.

Each world (2 and 4 ranks) is spawned once and runs every case of its table: every rank
computes the whole-sequence op itself (float64, same seed), runs the ring on its shard, and
records the largest difference of out, lse and the five gradients (through a loss that
weights both out and lse) against its shard of the whole-sequence results. The tests then
read those records, one test per case. Process start-up dominates the run time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moda_cuda
from helpers import Case, make_inputs
from moda_cuda.distributed import ContextParallel, context_parallel_moda_attention, sequence_positions, shard_sequence

TOLERANCE = 1e-10
T = 24  # pieces: contiguous 12 (W=2) / 6 (W=4), zigzag 6 / 3; depth_chunk 3 divides them all


@dataclass(frozen=True)
class Spec:
    case: Case
    layout: str = "contiguous"
    pairs: bool = False  # two groups of 2 ranks (new_group) instead of the whole world

    def __str__(self) -> str:
        return f"{self.layout}-{self.case}" + ("-pair-groups" if self.pairs else "")


def _table():
    base = Case(B=1, T=T, Hq=4, Hk=2, D=8, L=3)
    specs = [Spec(base.but(causal=causal, chunk=chunk), layout)
             for layout in ("contiguous", "zigzag") for causal in (True, False) for chunk in (1, 3)]
    specs += [
        Spec(base.but(seq=False, chunk=3), "zigzag"),  # depth-only
        Spec(base.but(seq=False, L=0), "contiguous"),  # nothing to see: out 0, lse -inf
        Spec(base.but(L=0), "zigzag"),  # sequence only
        Spec(base.but(B=2, Hq=2, Hk=2, chunk=3, causal=False), "contiguous"),
    ]
    return specs


WORLD2 = _table()
WORLD4 = _table() + [Spec(Case(T=T, Hq=4, Hk=2, D=8, L=2, chunk=3), "zigzag", pairs=True)]


# ----------------------------------------------------------------------------- in each rank


def _masked_lse(lse):
    """lse with -inf (nothing visible) as 0, so that a weighted sum of it stays finite."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _max_diff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return math.inf
    return (_masked_lse(a) - _masked_lse(b)).abs().max().item() if a.numel() else 0.0


def _compare(spec: Spec, group, rank: int, world: int, seed: int) -> dict:
    case = spec.case
    inputs = make_inputs(case, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(case.B, case.T, case.Hq, case.D, generator=g, dtype=torch.float64)
    w_lse = torch.randn(case.B, case.Hq, case.T, generator=g, dtype=torch.float64)
    options = dict(causal=case.causal, depth_chunk=case.chunk, return_lse=True)

    whole = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out, lse = moda_cuda.moda_attention(*whole, **options)
    loss = (out * w_out).sum() + (_masked_lse(lse) * w_lse).sum()
    present = [t for t in whole if t is not None]
    grads = dict(zip((i for i, t in enumerate(whole) if t is not None), torch.autograd.grad(loss, present)))

    def shard(x, dim=1):
        return shard_sequence(x.detach(), rank, world, spec.layout, dim)

    local = [None if t is None else shard(t).requires_grad_() for t in inputs]
    l_out, l_lse = context_parallel_moda_attention(*local, group=group, layout=spec.layout, **options)
    l_loss = (l_out * shard(w_out)).sum() + (_masked_lse(l_lse) * shard(w_lse, dim=2)).sum()
    l_present = [t for t in local if t is not None]
    l_grads = dict(zip((i for i, t in enumerate(local) if t is not None), torch.autograd.grad(l_loss, l_present)))

    errors = {"out": _max_diff(l_out, shard(out)), "lse": _max_diff(l_lse, shard(lse, dim=2))}
    for i, name in enumerate(("dq", "dk", "dv", "ddepth_k", "ddepth_v")):
        if inputs[i] is not None:
            errors[name] = _max_diff(l_grads[i], shard(grads[i]))
    return errors


def _raises(fn) -> str:
    """'ExceptionName: message' of what ``fn()`` raises ('' when it returns)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test compares the type)
        return f"{type(e).__name__}: {e}"
    return ""


def _bad_calls(world: int) -> dict:
    """Calls that must raise before any communication (every rank makes the same call)."""
    case = Case(T=T, Hq=2, Hk=1, D=8, L=2)
    q, k, v, dk, dv = (shard_sequence(t, dist.get_rank(), world) for t in make_inputs(case, torch.float64))
    piece = T // world // 2  # zigzag piece
    odd = [t[:, :-1] for t in (q, k, v, dk, dv)]
    calls = {
        "chunk_crosses_shard": lambda: context_parallel_moda_attention(q, k, v, dk, dv, depth_chunk=5),
        "chunk_crosses_zigzag_piece": lambda: context_parallel_moda_attention(q, k, v, dk, dv, layout="zigzag",
                                                                              depth_chunk=2 * piece),
        "zigzag_odd_shard": lambda: context_parallel_moda_attention(*odd, layout="zigzag"),
        "bad_layout": lambda: context_parallel_moda_attention(q, k, v, layout="ring"),
        "bad_group_type": lambda: context_parallel_moda_attention(q, k, v, group="world"),
        "bad_shape": lambda: context_parallel_moda_attention(q, k[:, :-1], v[:, :-1]),
        "bad_return_lse": lambda: context_parallel_moda_attention(q, k, v, return_lse=1),
    }
    if world > 2:
        outsiders = dist.new_group([0, 1])  # every rank creates it; ranks 2.. are not members
        if dist.get_rank() >= 2:
            calls["not_a_member"] = lambda: context_parallel_moda_attention(q, k, v, group=outsiders)
    return {name: _raises(fn) for name, fn in calls.items()}


def _helpers_agree(world: int) -> bool:
    """ContextParallel's shard and positions match the free functions, in both layouts."""
    x = torch.arange(T)[None]
    for layout in ("contiguous", "zigzag"):
        cp = ContextParallel(layout=layout)
        mine = cp.shard(x)
        if not torch.equal(mine[0], cp.positions(mine.shape[1])):
            return False
        if not torch.equal(mine, shard_sequence(x, dist.get_rank(), world, layout)):
            return False
    return True


def _worker(rank: int, world: int, init_file: str, specs, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    # Groups of two ranks, {0, 1} and {2, 3}, for the "pairs" cases (every rank creates every group).
    pair_groups = [dist.new_group([r, r + 1]) for r in range(0, world, 2)] if world > 2 else []
    results = {}
    for i, spec in enumerate(specs):
        if spec.pairs:
            group = pair_groups[rank // 2]
            results[str(spec)] = _compare(spec, group, rank % 2, 2, seed=i)
        else:
            results[str(spec)] = _compare(spec, None, rank, world, seed=i)
    results["bad_calls"] = _bad_calls(world)
    results["helpers_agree"] = _helpers_agree(world)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn(world: int, specs, tmp: Path) -> list:
    """Every rank's results (a list indexed by rank)."""
    mp.spawn(_worker, args=(world, str(tmp / "init"), specs, str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(2, WORLD2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(4, WORLD4, tmp_path_factory.mktemp("world4"))


# ----------------------------------------------------------------------------- tests


def _check(results, spec):
    for rank, record in enumerate(results):
        errors = record[str(spec)]
        bad = {name: err for name, err in errors.items() if not err <= TOLERANCE}
        assert not bad, f"rank {rank}: {bad}"
    expected = {"out", "lse", "dq", "ddepth_k", "ddepth_v"} | ({"dk", "dv"} if spec.case.seq else set())
    assert set(results[0][str(spec)]) == expected


@pytest.mark.parametrize("spec", WORLD2, ids=str)
def test_world2_matches_one_process(world2, spec):
    _check(world2, spec)


@pytest.mark.parametrize("spec", WORLD4, ids=str)
def test_world4_matches_one_process(world4, spec):
    _check(world4, spec)


def test_bad_calls_raise_before_communicating(world2, world4):
    for results in world2 + world4:
        bad = results["bad_calls"]
        assert bad["chunk_crosses_shard"].startswith("ValueError: depth_chunk 5 would cross a piece boundary")
        assert bad["chunk_crosses_zigzag_piece"].startswith("ValueError: depth_chunk")
        assert bad["zigzag_odd_shard"].startswith("ValueError: a zigzag shard holds 2 equal pieces")
        assert bad["bad_layout"].startswith("ValueError: layout must be one of")
        assert bad["bad_group_type"].startswith("TypeError: group must be")
        assert bad["bad_shape"].startswith("ValueError: k must have shape")
        assert bad["bad_return_lse"].startswith("TypeError: return_lse must be a bool")
    for rank, results in enumerate(world4):
        if rank >= 2:
            assert results["bad_calls"]["not_a_member"] == "ValueError: this rank is not a member of the given group"


def test_context_parallel_helpers(world2, world4):
    assert all(r["helpers_agree"] for r in world2 + world4)


def test_needs_an_initialised_process_group():
    q = torch.zeros(1, 4, 2, 8)
    assert not dist.is_initialized()  # the ranks run in processes of their own
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        context_parallel_moda_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="layout must be one of"):
        context_parallel_moda_attention(q, q, q, layout="zig-zag")


def test_sequence_layouts():
    """Zigzag: rank r holds pieces r and 2W-1-r; every position is held exactly once."""
    assert sequence_positions(4, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert sequence_positions(4, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert sequence_positions(3, 2, 4, "contiguous").tolist() == [6, 7, 8]
    for layout in ("contiguous", "zigzag"):
        held = torch.cat([sequence_positions(6, r, 4, layout) for r in range(4)])
        assert sorted(held.tolist()) == list(range(24))
        x = torch.arange(24)[None]
        for r in range(4):
            assert torch.equal(shard_sequence(x, r, 4, layout)[0], sequence_positions(6, r, 4, layout))


# ----------------------------------------------------------------------------- the LM example


def _checkpointed_grad_error(cfg, ids) -> float:
    """Largest gradient difference of a context-parallel LM with activation checkpointing (the
    recomputation runs the ring again inside the backward) against one process."""
    from moda_cuda.layers import MoDAForCausalLM

    cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    torch.manual_seed(0)
    one = MoDAForCausalLM(cfg).double().train()
    torch.manual_seed(0)
    sharded = MoDAForCausalLM(cfg).double().train()
    cp = sharded.enable_context_parallel(layout="contiguous")
    one(ids[:, :-1], ids[:, 1:]).loss.backward()
    sharded(cp.shard(ids[:, :-1]), cp.shard(ids[:, 1:])).loss.backward()
    error = 0.0
    for a, b in zip(one.parameters(), sharded.parameters()):
        dist.all_reduce(b.grad)  # the sum of the shards' mean-loss gradients: W times the mean's
        error = max(error, (b.grad / cp.world_size - a.grad).abs().max().item())
    sharded.disable_context_parallel()  # whole sequences on every rank again: one process's loss
    with torch.no_grad():
        assert torch.allclose(sharded(ids[:, :-1], ids[:, 1:]).loss, one(ids[:, :-1], ids[:, 1:]).loss)
    return error


def _lm_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Two steps of examples/train_lm.py's loop: FSDP2 + context parallelism against one process."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import _common as C
    from _parallel import parallelize, setup_parallelism, unwrap
    from moda_cuda.layers import MoDAConfig, MoDAForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    d = C.Dist(rank, world, rank, torch.device("cpu"), True)
    cfg = MoDAConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, depth_chunk=2, vocab_size=64, max_seq_len=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2)]
    spec = C.TrainSpec(steps=2, lr=1e-2, eval_every=10, log_every=10, timing_warmup=0)

    def train(dist_info, model):
        feed = iter(batches)

        def next_batch():
            window = next(feed)
            return window[:, :-1], window[:, 1:]

        run = C.train(dist_info, "lm", model, spec, next_batch, lambda m: {}, torch.float32, 1)
        return [loss for _, loss in run["train_curve"]]

    def build():
        torch.manual_seed(0)
        return MoDAForCausalLM(cfg).double()

    one_losses = train(C.Dist(), one := build())
    par = setup_parallelism(d, fsdp=True, context_parallel=world, layout="zigzag")
    sharded = parallelize(build(), d, par)
    losses = train(d, sharded)
    checkpointed_error = _checkpointed_grad_error(cfg, batches[0])
    params = dict(unwrap(sharded).named_parameters())
    with torch.no_grad():  # each rank computed its shard of the positions only
        local_len = sharded(batches[0][:, :-1], batches[0][:, 1:]).logits.shape[1]
    diffs = {name: (params[name].full_tensor() - p).abs().max().item() for name, p in one.named_parameters()}
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "losses": losses, "one_process_losses": one_losses, "param_diffs": diffs,
        "sharded_types": sorted({type(p).__name__ for p in params.values()}), "local_len": local_len,
        "checkpointed_grad_error": checkpointed_error,
    }))


def test_lm_training_steps_fsdp_and_context_parallel_match_one_process(tmp_path):
    mp.spawn(_lm_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sharded_types"] == ["DTensor"]  # FSDP2 really sharded every parameter
        assert record["local_len"] == 16 // 2  # and the sequence was sharded
        assert record["losses"] == pytest.approx(record["one_process_losses"], rel=1e-6)  # float32 in the log
        assert max(record["param_diffs"].values()) < 1e-10, record["param_diffs"]
        assert record["checkpointed_grad_error"] < 1e-12
