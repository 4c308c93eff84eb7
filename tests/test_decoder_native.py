"""The native decoder (csrc/decoder_cpu.cpp): every layer of a CPU fp32 forward in one
call. Its contract: the same states and the same cache writes as the model's op-by-op
path computed in float64, for ragged batches, tree masks, GQA, q/k/v biases and taps;
each row's result independent of the rows beside it; bad plans refused before anything
is written."""
import copy

import numpy as np
import pytest
import torch

from specrt.cache import PagedKVCache
from specrt.model import llama
from specrt.model.hf import load_hf_model
from specrt.ops._backend import native
from tests.tiny import make_tiny_model

pytest.importorskip("transformers")

CASES = [("llama", {}), ("llama", {"num_key_value_heads": 1, "num_hidden_layers": 3}),
         ("qwen2", {"intermediate_size": 100, "hidden_size": 48, "head_dim": 12,
                    "num_attention_heads": 4, "num_key_value_heads": 2})]


@pytest.fixture(scope="module", params=range(len(CASES)), ids=["llama", "llama_mqa", "qwen2_bias"])
def model(request, tmp_path_factory):
    kind, over = CASES[request.param]
    d = make_tiny_model(tmp_path_factory.mktemp(kind), kind, seed=10 + request.param, **over)
    return load_hf_model(d)


def fp64_copy(m):
    m64 = copy.deepcopy(m).double()
    for layer in m64.layers:  # no packed fp32 copies carried over
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            lin.__dict__.pop("_specrt_mm", None)
    m64.__dict__.pop("_fused", None)
    return m64


def run(m, dtype, tokens, prefix_tokens, tree_mask, tree_lens, taps, seed=0, poison=True):
    """Prefill each row's prefix, then one forward over ``tokens``; the cache is poisoned
    (NaN) first, so a read of an unwritten slot or a write to a wrong one shows (the
    float64 reference, torch's gather + SDPA, multiplies masked slots by 0: it gets
    zeros)."""
    a = m.args
    B, T = tokens.shape
    cache = PagedKVCache(a.num_hidden_layers, 48, 4, a.num_key_value_heads, a.head_dim,
                         dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(cache.allocator._free), generator=g).tolist()
    cache.allocator._free = [cache.allocator._free[i] for i in perm]   # scattered blocks
    cache.kv.fill_(float("nan") if poison else 0.0)
    P = torch.tensor([len(p) for p in prefix_tokens])
    for b in range(B):
        cache.add(b)
        cache.reserve(b, int(P[b]) + T)
    bt = cache.block_table(list(range(B)))
    with torch.no_grad():
        for b in range(B):
            n = int(P[b])
            m(prefix_tokens[b][None], torch.arange(n)[None], cache.kv, bt[b:b + 1],
              torch.tensor([0]))
        pos = P[:, None] + torch.arange(T)[None]
        out = m(tokens, pos, cache.kv, bt, P, tree_mask, tree_lens, taps=taps)
    return out, cache, bt, P


def random_tree(B, T, g):
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 0, 0] = True
        for i in range(1, T):
            parent = int(torch.randint(0, i, (1,), generator=g))
            mask[b, i] = mask[b, parent]
            mask[b, i, i] = True
    return mask


@pytest.mark.parametrize("T,ragged,tree", [(1, False, False), (5, True, True), (13, True, False),
                                           (3, False, True)])
def test_native_decoder_equals_float64_reference(model, T, ragged, tree, monkeypatch):
    g = torch.Generator().manual_seed(T * 7 + ragged)
    V = model.args.vocab_size
    B = 3
    prefixes = [torch.randint(3, V, (n,), generator=g) for n in (9, 1, 17)]
    tokens = torch.randint(3, V, (B, T), generator=g)
    lens = torch.tensor([T, max(1, T // 2), max(1, T - 1)]) if ragged else None
    mask = random_tree(B, T, g) if tree else None
    taps = (0, model.args.num_hidden_layers - 1)
    calls = []

    class Spy:  # counts the native decoder's calls
        def __getattr__(self, name):
            if name == "decoder_layers_cpu":
                calls.append(name)
            return getattr(native(), name)

    monkeypatch.setattr(llama, "native", lambda: Spy())
    (h, tapped), cache, bt, P = run(model, torch.float32, tokens, prefixes, mask, lens, taps)
    assert len(calls) == 4, "the fp32 forwards (3 prefills, 1 tree) ran the native decoder"
    (h64, tapped64), cache64, _, _ = run(fp64_copy(model), torch.float64, tokens, prefixes,
                                         mask, lens, taps, poison=False)
    assert len(calls) == 4, "the float64 reference ran the op-by-op path"
    valid = torch.ones(B, T, dtype=torch.bool) if lens is None else (
        torch.arange(T)[None] < lens[:, None])
    tol = dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(h[valid].double(), h64[valid], **tol)
    torch.testing.assert_close(tapped[valid].double(), tapped64[valid], **tol)
    assert torch.all(h[~valid] == 0) and torch.all(tapped[~valid] == 0)
    # the cache: every written slot equals the reference's, the rest stays poisoned
    for b in range(B):
        n = int(P[b]) + (T if lens is None else int(lens[b]))
        for pos in range(int(P[b]) + T):
            blk, off = int(bt[b, pos // 4]), pos % 4
            got, want = cache.kv[:, blk, :, off], cache64.kv[:, blk, :, off]
            if pos < n:
                torch.testing.assert_close(got.double(), want, **tol)
                assert torch.isfinite(got).all()
            else:
                assert torch.isnan(got).all(), f"row {b}: slot {pos} past the tree was written"


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_rows_result_does_not_depend_on_its_neighbours(model, weight_dtype):
    """Bit-for-bit: a sequence decoded alone, or beside others with padding, gives the
    same states (what greedy speculative == plain decoding relies on), with the weights
    streamed as fp32 or as bf16 (``Llama.use_weight_dtype``)."""
    g = torch.Generator().manual_seed(3)
    V = model.args.vocab_size
    prefixes = [torch.randint(3, V, (n,), generator=g) for n in (6, 11, 3, 8)]
    tokens = torch.randint(3, V, (4, 6), generator=g)
    lens = torch.tensor([6, 2, 5, 1])
    mask = random_tree(4, 6, g)
    model.use_weight_dtype(weight_dtype)
    try:
        h_all, *_ = run(model, torch.float32, tokens, prefixes, mask, lens, ())
        for b in range(4):
            n = int(lens[b])
            h_one, *_ = run(model, torch.float32, tokens[b:b + 1, :n], prefixes[b:b + 1],
                            mask[b:b + 1, :n, :n], None, (), seed=b + 5)
            assert torch.equal(h_one[0], h_all[b, :n]), f"sequence {b} changed with its batch"
    finally:
        model.use_weight_dtype(torch.float32)


def test_bad_plans_are_refused_before_anything_is_written(model):
    a = model.args
    cache = PagedKVCache(a.num_hidden_layers, 8, 4, a.num_key_value_heads, a.head_dim)
    cache.add(0)
    cache.reserve(0, 4)
    bt = cache.block_table([0])
    x = torch.randn(2, a.hidden_size)
    table = model._fused_table()
    cs = torch.ones(2, a.head_dim)
    kv_before = cache.kv.clone()
    empty = np.zeros(0, dtype=np.uint8)
    no_taps, no_tapped = np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0), dtype=np.float32)

    def call(bt_, prefix, lens, rows, T=2):
        native().decoder_layers_cpu(
            x.numpy(), table.numpy(), a.num_attention_heads, a.num_key_value_heads,
            a.intermediate_size, cs.numpy(), cs.numpy(), cache.kv.numpy(), bt_.numpy(),
            np.array(prefix, dtype=np.int64), empty, np.array(lens, dtype=np.int64),
            np.array(rows, dtype=np.int64), T, 1e-6, 0.25, no_taps, no_tapped, 1)

    x0 = x.clone()
    with pytest.raises(ValueError, match="outside its sequence"):
        call(bt, [0], [1], [0, 1])                      # row t=1 past tree_lens 1
    with pytest.raises(IndexError, match="needs 2 blocks"):
        call(bt, [3], [2], [0, 1])                      # positions 3, 4: a second block
    with pytest.raises(IndexError, match="block id out of range"):
        call(torch.tensor([[99]], dtype=torch.int32), [0], [2], [0, 1])
    with pytest.raises(TypeError):                       # a non-contiguous x is not copied
        native().decoder_layers_cpu(
            torch.randn(a.hidden_size, 2).t().numpy(), table.numpy(), a.num_attention_heads,
            a.num_key_value_heads, a.intermediate_size, cs.numpy(), cs.numpy(),
            cache.kv.numpy(), bt.numpy(), np.array([0]), empty, np.array([2]),
            np.array([0, 1]), 2, 1e-6, 0.25, no_taps, no_tapped, 1)
    assert torch.equal(x, x0)
    assert torch.equal(cache.kv.nan_to_num(), kv_before.nan_to_num())


def test_autograd_and_other_dtypes_take_the_op_path(model):
    plan = type("P", (), {"backend": "cpu"})()
    x, kv = torch.zeros(1), torch.zeros(1)
    with torch.enable_grad():
        assert not model._fusable(x, kv, plan)
    with torch.no_grad():
        assert model._fusable(x, kv, plan)
        assert not model._fusable(x.bfloat16(), kv, plan)
        assert not model._fusable(x, kv, type("P", (), {"backend": "torch"})())


def test_another_build_stands_in_within_using_native(model, tmp_path):
    """Benchmarks' before/after: a build loaded from its .so file serves every forward
    inside ``using_native`` (and only there); a missing or foreign file is refused."""
    from specrt import _C, ops

    other = ops.load_native(_C.__file__)
    assert other is not _C and hasattr(other, "decoder_layers_cpu")
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(other, name)

    g = torch.Generator().manual_seed(4)
    prefixes = [torch.randint(3, model.args.vocab_size, (5,), generator=g)]
    tokens = torch.randint(3, model.args.vocab_size, (1, 3), generator=g)
    want, *_ = run(model, torch.float32, tokens, prefixes, None, None, ())
    with ops.using_native(Spy()):
        got, *_ = run(model, torch.float32, tokens, prefixes, None, None, ())
    assert native() is _C, "restored on exit"
    assert "decoder_layers_cpu" in calls, "the forward ran on the stand-in"
    assert torch.equal(got, want), "the same build gives the same bits"
    with pytest.raises(ValueError, match="no such native build"):
        ops.load_native(str(tmp_path / "missing.so"))
    bad = tmp_path / "_C.so"
    bad.write_bytes(b"not an ELF file")
    with pytest.raises(ValueError, match="not a loadable build"):
        ops.load_native(str(bad))
