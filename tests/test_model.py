"""The Llama-family forward over the paged cache equals HF transformers' logits."""
import random

import pytest
import torch

from specrt.cache import PagedKVCache
from specrt.model.hf import load_hf_model
from tests.tiny import make_tiny_model

transformers = pytest.importorskip("transformers")

CASES = [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32},
               "tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("qwen2", {}),
]


@pytest.fixture(scope="module", params=range(len(CASES)), ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def tiny(request, tmp_path_factory):
    kind, over = CASES[request.param]
    d = make_tiny_model(tmp_path_factory.mktemp(kind), kind, seed=request.param, **over)
    cls = transformers.AutoModelForCausalLM
    ref = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    return d, ref


def shuffled_cache(model, block_size, num_blocks=128):
    a = model.args
    cache = PagedKVCache(a.num_hidden_layers, num_blocks, block_size, a.num_key_value_heads,
                         a.head_dim)
    random.shuffle(cache.allocator._free)  # non-contiguous block ids
    return cache


@torch.no_grad()
def test_prefill_and_paged_decode_match_hf(tiny):
    d, ref = tiny
    model = load_hf_model(d)
    V = model.args.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (23, 9)]
    prompt_len = 7
    cache = shuffled_cache(model, block_size=4)
    for sid, s in enumerate(seqs):
        want = ref(s[None]).logits[0]
        cache.add(sid)
        # prefill the first prompt_len tokens, then decode one token at a time
        cache.reserve(sid, len(s))
        bt = cache.block_table([sid])
        pos = torch.arange(prompt_len)[None]
        h = model(s[None, :prompt_len], pos, cache.kv, bt, torch.tensor([0]))
        got = [model.logits(h)[0]]
        for t in range(prompt_len, len(s)):
            h = model(s[None, t:t + 1], torch.tensor([[t]]), cache.kv, bt, torch.tensor([t]))
            got.append(model.logits(h)[0])
        got = torch.cat(got)
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"seq {sid}: max abs diff {err}"
        cache.set_length(sid, len(s))
    assert len(set(cache.seqs[0].blocks)) == 6


@torch.no_grad()
def test_batched_ragged_prefill_matches_hf(tiny):
    d, ref = tiny
    model = load_hf_model(d)
    lens = [11, 3, 8]
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(3, model.args.vocab_size, (3, max(lens)), generator=g)
    cache = shuffled_cache(model, block_size=4)
    for i, n in enumerate(lens):
        cache.add(i)
        cache.reserve(i, n)
    bt = cache.block_table([0, 1, 2])
    T = max(lens)
    h = model(toks, torch.arange(T).expand(3, T), cache.kv, bt, torch.zeros(3, dtype=torch.long),
              tree_lens=torch.tensor(lens))
    logits = model.logits(h)
    for i, n in enumerate(lens):
        want = ref(toks[i:i + 1, :n]).logits[0]
        err = (logits[i, :n] - want).abs().max().item()
        assert err < 1e-4, f"row {i}: {err}"


def test_rope_table_is_libm_cos_sin_of_the_fp32_angle_rounded_once():
    """Every entry is fp32(cos(fp32(p * inv_freq))) evaluated in float64 (bit for bit:
    torch's fp32 cos gave other bits in some processes, and greedy decoding with it);
    rows for positions past the first table grow it; ``[B, T, 1, D]`` in the dtype asked."""
    import math

    from specrt.model.llama import ModelArgs, RopeTable, rope_inv_freq
    args = ModelArgs(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    inv = rope_inv_freq(args)
    table = RopeTable()
    pos = torch.tensor([[0, 1, 7, 2047], [3000, 5, 100, 4095]])
    cos, sin = table(inv, pos, torch.float32)
    assert cos.shape == (2, 4, 1, 64) and sin.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            ang = (torch.tensor(float(pos[b, t])) * inv).double().tolist()
            want_c = torch.tensor([math.cos(a) for a in ang] * 2).float()
            want_s = torch.tensor([math.sin(a) for a in ang] * 2).float()
            assert torch.equal(cos[b, t, 0], want_c) and torch.equal(sin[b, t, 0], want_s), (b, t)
    assert table(inv, pos, torch.float64)[0].dtype == torch.float64


def test_prefill_groups_minimise_padded_rows_plus_forwards():
    """Exact against brute force over every split of the sorted lengths; groups cover every
    prompt once, ascending; close lengths stay one forward."""
    import itertools

    from specrt.model.prefill import prefill_groups
    rng = random.Random(7)
    for _ in range(40):
        lens = [rng.choice([rng.randint(1, 20), rng.randint(100, 500)])
                for _ in range(rng.randint(1, 7))]
        fr = rng.choice([0, 8, 32, 1000])
        groups = prefill_groups(lens, fr)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        assert all(g == sorted(g) for g in groups)
        cost = lambda gs: sum(fr + len(g) * max(lens[i] for i in g) for g in gs)  # noqa: E731
        order = sorted(range(len(lens)), key=lambda i: lens[i])
        splits = (cuts for r in range(len(lens))
                  for cuts in itertools.combinations(range(1, len(lens)), r))
        best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(lens),))])
                   for cuts in splits)
        assert cost(groups) == best, (lens, fr, groups)
    assert prefill_groups([40, 41, 45]) == [[0, 1, 2]]


@torch.no_grad()
def test_grouped_prefill_gives_the_bits_of_one_forward(tiny, monkeypatch):
    """Prompts of very different lengths run as several padded forwards; every prompt's
    states (and tapped layers) and cache writes are the bits of one forward over all."""
    from specrt.model import prefill
    d, _ = tiny
    model = load_hf_model(d)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist()
            for n in (3, 70, 5, 66, 2)]
    taps = (0, model.args.num_hidden_layers - 1)
    outs = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(prefill, "prefill_groups", lambda lens: [list(range(len(lens)))])
        else:
            assert len(prefill.prefill_groups([len(s) for s in seqs])) > 1
        cache = shuffled_cache(model, block_size=4)
        for i, s in enumerate(seqs):
            cache.add(i)
            cache.reserve(i, len(s))
        h, tapped = prefill.ragged_prefill(model, seqs, cache.kv,
                                           cache.block_table(list(range(5))), taps)
        outs.append((h, tapped, cache.block_table(list(range(5))), cache.kv.clone()))
    (h1, t1, bt1, kv1), (h2, t2, bt2, kv2) = outs
    for i, s in enumerate(seqs):
        n = len(s)
        assert torch.equal(h1[i, :n], h2[i, :n]) and torch.equal(t1[i, :n], t2[i, :n]), i
        for p in range(n):
            blk1, blk2 = bt1[i, p // 4], bt2[i, p // 4]
            assert torch.equal(kv1[:, blk1, :, p % 4], kv2[:, blk2, :, p % 4]), (i, p)


@torch.no_grad()
def test_forward_plans_once_and_runs_each_layer(tiny, monkeypatch):
    """The op-by-op path (autograd, other dtypes, the torch backend; CPU fp32 inference
    runs every layer in one native call, tests/test_decoder_native.py): one tree-attention
    plan per forward, run once per layer with q and that layer's cache through
    torch.ops.specrt; the removed ``layers=`` argument is rejected."""
    from specrt import ops
    from specrt.model import llama

    monkeypatch.setattr(llama.Llama, "_fusable", lambda *a: False)

    d, ref = tiny
    model = load_hf_model(d)
    L = model.args.num_hidden_layers
    plans, runs = [], []
    plan_fn, run_fn = ops.plan_tree_attention, ops.TreeAttentionPlan.run
    kernel = torch.ops.specrt.cpu_tree_attention.default   # the CPU plan's op
    calls = []

    def plan_spy(*a, **k):
        plans.append(plan_fn(*a, **k))
        return plans[-1]

    def run_spy(self, q, kv_cache, *a, **k):
        runs.append((self, kv_cache.data_ptr()))
        return run_fn(self, q, kv_cache, *a, **k)

    def op_spy(*a):
        calls.append(a[1].data_ptr())
        return kernel(*a)

    monkeypatch.setattr(ops, "plan_tree_attention", plan_spy)
    monkeypatch.setattr(ops.TreeAttentionPlan, "run", run_spy)
    monkeypatch.setattr("specrt.ops.attention._cpu_op", op_spy)
    cache = shuffled_cache(model, block_size=4)
    cache.add(0)
    cache.reserve(0, 6)
    toks = torch.randint(3, model.args.vocab_size, (1, 6))
    h = model(toks, torch.arange(6)[None], cache.kv, cache.block_table([0]), torch.tensor([0]))
    assert len(plans) == 1 and len(runs) == L
    assert all(p is plans[0] for p, _ in runs)
    layer_ptrs = [cache.kv[li].data_ptr() for li in range(L)]
    assert [ptr for _, ptr in runs] == layer_ptrs and calls == layer_ptrs
    torch.testing.assert_close(model.logits(h)[0], ref(toks).logits[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError):
        model(toks, torch.arange(6)[None], cache.kv, cache.block_table([0]), torch.tensor([0]),
              layers=range(1))
