"""generate(): decoding against a KV cache gives what recomputing the whole sequence gives."""

import dataclasses

import pytest
import torch

from moda_cuda.generation import MoDAKVCache
from moda_cuda.layers import MoDAConfig, MoDAForCausalLM

CONFIG = MoDAConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=48, init_std=0.3)


def _model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return MoDAForCausalLM(config).double().eval()


@torch.no_grad()
def _greedy_by_recomputation(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, ffn_kv=False),
                                    dataclasses.replace(CONFIG, use_depth=False)],
                         ids=["moda", "no_ffn_kv", "baseline"])
def test_greedy_with_the_cache_is_greedy_by_recomputation(config):
    model = _model(config)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, 12)
    assert torch.equal(out, _greedy_by_recomputation(model, ids, 12))
    assert len(set(out[:, 9:].flatten().tolist())) > 3  # a non-degenerate continuation


@torch.no_grad()
def test_decode_logits_equal_the_full_forward():
    model = _model()
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    cache = MoDAKVCache(CONFIG.n_layers, 2, 20, CONFIG.n_kv_heads, CONFIG.head_dim)
    model(ids[:, :11], cache=cache)  # prefill 11 tokens
    cache.prefill = False
    cache.seqlens.fill_(11)
    steps = [model(ids[:, 11:15], cache=cache).logits]  # 4 tokens at once
    steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(15, 20)]
    assert torch.allclose(torch.cat(steps, 1), full[:, 11:], atol=1e-10)
    assert cache.seqlens.tolist() == [20, 20]


def test_prompts_of_different_lengths():
    model = _model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 40, (1, n), generator=g) for n in (4, 9, 1)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :p.shape[1]] = p[0]
        mask[b, :p.shape[1]] = 1
    out = model.generate(ids, 6, attention_mask=mask, eos_token_id=39)
    for b, p in enumerate(prompts):
        n = p.shape[1]
        want = _greedy_by_recomputation(model, p, 6)[0]
        ended = (want[n:] == 39).nonzero()
        if len(ended):  # a sequence that generated its end token keeps it from there on
            want[n + ended[0, 0]:] = 39
        assert torch.equal(out[b, :n + 6], want)
        assert (out[b, n + 6:] == 39).all()


def test_sampling_options():
    model = _model()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(ids, 8)
    assert torch.equal(model.generate(ids, 8, do_sample=True, top_k=1), greedy)
    a = model.generate(ids, 8, do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(ids, 8, do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a[:, :5], ids) and ((a >= 0) & (a < 40)).all()


def test_a_sequence_that_ended_keeps_its_end_token():
    model = _model()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(6))
    first = model.generate(ids, 1)[:, 5]
    out = model.generate(ids, 5, eos_token_id=int(first[0]))
    assert (out[0, 5:] == first[0]).all()


def test_bad_arguments():
    model = _model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model.generate(ids, 100)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="depth_chunk = 1"):
        _model(dataclasses.replace(CONFIG, depth_chunk=2)).generate(ids, 2)
    assert torch.equal(model.generate(ids, 0), ids)
    two = torch.zeros(2, 4, dtype=torch.long)
    for mask in ([[0, 0, 1, 1], [1, 1, 1, 1]], [[1, 0, 1, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 1]]):
        with pytest.raises(ValueError, match="right-padded"):  # left padding, a gap, an empty row
            model.generate(two, 2, attention_mask=torch.tensor(mask))
    for options, message in ((dict(top_k=0), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                             (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=message):
            model.generate(ids, 2, do_sample=True, **options)


def test_sampling_edges():
    """top_p keeps at least the most likely token; top_p = 1 and top_k >= vocab keep every token;
    temperature 0 samples greedily."""
    from moda_cuda.generation import _next_tokens

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert _next_tokens(logits, True, 1.0, None, 1e-9, g).tolist() == [1, 0]
    assert _next_tokens(logits, True, 0.0, None, None, g).tolist() == [1, 0]
    seen = {tuple(_next_tokens(logits, True, 5.0, 10, 1.0, g).tolist()) for _ in range(200)}
    assert {t[0] for t in seen} == {0, 1, 2}


@torch.no_grad()
def test_model_refuses_a_cache_it_cannot_serve():
    ids = torch.zeros(1, 4, dtype=torch.long)
    cache = MoDAKVCache(CONFIG.n_layers, 1, 8, CONFIG.n_kv_heads, CONFIG.head_dim)
    with pytest.raises(ValueError, match="depth_chunk = 1"):
        _model(dataclasses.replace(CONFIG, depth_chunk=2))(ids, cache=cache)
    with pytest.raises(ValueError, match="no cu_seqlens"):
        _model()(ids, cache=cache, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))


def test_prefill_with_gradient_checkpointing_fills_the_cache():
    """Checkpointing is for training steps: with a cache the blocks run plainly, so the cache is
    written (a recomputation would not replay the writes)."""
    model = MoDAForCausalLM(dataclasses.replace(CONFIG, gradient_checkpointing=True)).double().train()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(8))
    cache = MoDAKVCache(CONFIG.n_layers, 1, 8, CONFIG.n_kv_heads, CONFIG.head_dim)
    model(ids[:, :5], cache=cache)
    cache.prefill = False
    cache.seqlens.fill_(5)
    with torch.no_grad():
        step = model(ids[:, 5:], cache=cache).logits
        full = model(ids).logits
    assert torch.allclose(step[:, 0], full[:, 5], atol=1e-10)


def test_load_keeps_the_saved_dtype(tmp_path):
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "lm")
    loaded = MoDAForCausalLM.from_pretrained(tmp_path / "lm")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_and_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "lm")
    loaded = MoDAForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float64)
    assert loaded.config == model.config and loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.generate(ids, 5), model.generate(ids, 5))


def test_cuda_graph_is_ignored_off_cuda():
    model = _model()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.generate(ids, 6, cuda_graph=True), model.generate(ids, 6, cuda_graph=False))


def _ragged_prompts(device):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    mask = (torch.arange(9) < torch.tensor([9, 4, 1])[:, None]).long()
    return ids.to(device), mask.to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_decoding_gives_the_eager_tokens(dtype):
    """The graph replays the kernels the eager steps run, on the same shapes: same tokens,
    greedy and sampled, for prompts of different lengths; enough steps for warm-up, capture
    and several replays."""
    model = _model().to("cuda", dtype)
    ids, mask = _ragged_prompts("cuda")
    for options in (dict(), dict(do_sample=True, top_k=8, temperature=0.8)):
        runs = []
        for cuda_graph in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(10)
            runs.append(model.generate(ids, 14, attention_mask=mask, eos_token_id=39, generator=gen,
                                       cuda_graph=cuda_graph, **options))
        assert torch.equal(runs[0], runs[1]), options


@pytest.mark.cuda
def test_cuda_graph_decoding_equals_recomputation_in_float64():
    """float64 runs the reference decode (captured as well): exact against recomputation."""
    model = _model().to("cuda")
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    out = model.generate(ids, 12, cuda_graph=True)
    assert torch.equal(out, _greedy_by_recomputation(model, ids, 12))
