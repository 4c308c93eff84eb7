"""Tree attention (specrt.ops.tree_attention) against a float64 dense reference.

The Triton kernels run under TRITON_INTERPRET=1 on CPU-only machines (the
``triton_backend`` fixture) and natively on a GPU when one is present (``device``).
The CPU torch path of specrt.ops is checked against the same reference.

Every case draws fresh random inputs; the seed is in each assertion message, so a
failure reproduces with ``_case(..., seed=<seed>)``.
"""
from __future__ import annotations

import math
import random

import os

import pytest
import torch

from specrt import ops

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


# ---------------------------------------------------------------------------
# inputs and reference, written from scratch (no specrt helpers)

def _random_parents(T: int, g: torch.Generator) -> list[int]:
    """parents[0] = -1, parents[i] uniform in [0, i): random trees, not only chains."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]


def _ancestor_mask(parents: list[int]) -> torch.Tensor:
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def _case(B, T, Hq, Hkv, D, dtype, bs, max_prefix, kind, ragged, device, seed=None):
    """Random paged cache, shuffled block tables, queries, tree masks.

    kind: "tree" (random parent arrays), "chain" (explicit lower-triangular mask)
    or "causal" (tree_mask=None).
    """
    seed = random.randrange(2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, max_prefix + 1, (B,), generator=g)
    if max_prefix > bs:                       # at least one prefix crosses a block boundary
        prefix[0] = bs + 1 + int(torch.randint(0, max_prefix - bs, (1,), generator=g))
        prefix[0] += int(prefix[0] % bs == 0)
        prefix[0] = min(int(prefix[0]), max_prefix)
    need = [math.ceil((int(p) + T) / bs) for p in prefix]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.randint(0, num_blocks, (B, max_blocks), generator=g, dtype=torch.int32)
    o = 0
    for b in range(B):                        # shuffled, non-contiguous block ids
        bt[b, :need[b]] = perm[o:o + need[b]].int()
        o += need[b]
    cache = torch.randn(num_blocks, 2, bs, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    if kind == "tree":
        mask = torch.stack([_ancestor_mask(_random_parents(T, g)) for _ in range(B)])
    elif kind == "chain":
        mask = torch.ones(B, T, T, dtype=torch.bool).tril()
    else:
        mask = None
    tree_lens = None
    if ragged:
        tree_lens = torch.randint(0, T + 1, (B,), generator=g)
        tree_lens[0] = T
        if B > 1:
            tree_lens[1] = max(1, T // 2)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return dict(q=q.to(device), kv_cache=cache.to(device), block_tables=bt.to(device),
                prefix_lens=prefix.to(device), tree_mask=to(mask),
                tree_lens=to(tree_lens)), seed


def _reference(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale, bf16=False):
    """Dense float64 attention with an explicit [T, L] mask, one sequence at a time.
    ``bf16``: the products of the CPU kernel's AMX variant: q, K and V rounded to bf16,
    and the unnormalised softmax weights rounded to bf16 for ``P V`` (their sum is not)."""
    if bf16:
        q, kv_cache = q.to(torch.bfloat16), kv_cache.to(torch.bfloat16)
    q, kv_cache = q.cpu().double(), kv_cache.cpu().double()
    bt, pl = block_tables.cpu().long(), prefix_lens.cpu()
    B, T, Hq, D = q.shape
    bs, Hkv = kv_cache.shape[2], kv_cache.shape[3]
    G = Hq // Hkv
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        P = int(pl[b])
        n = T if tree_lens is None else int(tree_lens[b])
        L = P + n
        if L == 0:                                                  # sees nothing: rows stay 0
            continue
        pos = torch.arange(L)
        kv = kv_cache[bt[b, pos // bs], :, pos % bs]                 # [L, 2, Hkv, D]
        k = kv[:, 0].repeat_interleave(G, dim=1)                    # [L, Hq, D]
        v = kv[:, 1].repeat_interleave(G, dim=1)
        tm = (torch.ones(T, T, dtype=torch.bool).tril() if tree_mask is None
              else tree_mask[b].cpu().bool())
        mask = torch.zeros(T, L, dtype=torch.bool)
        mask[:, :P] = True
        mask[:, P:] = tm[:, :n]
        mask[n:] = False
        s = torch.einsum("thd,lhd->htl", q[b], k) * scale
        s = s.masked_fill(~mask, float("-inf"))
        if bf16:
            e = torch.exp(s - s.amax(-1, keepdim=True)).nan_to_num(0.0)
            l = e.sum(-1, keepdim=True)
            p = (e.to(torch.bfloat16).double() / l).nan_to_num(0.0)
        else:
            p = torch.softmax(s, -1).nan_to_num(0.0)               # rows seeing nothing -> 0
        out[b] = torch.einsum("htl,lhd->thd", p, v)
    return out


def _check(inp, seed, dtype, *, num_splits=None, packed=False, scale=None, tag=""):
    q = inp["q"]
    D = q.shape[-1]
    scale_ref = 1.0 / math.sqrt(D) if scale is None else scale
    ref = _reference(**inp, scale=scale_ref)
    out = torch.full_like(q, float("nan"))                          # poison: unwritten rows show
    kw = dict(out=out)
    if num_splits is not None:
        kw["num_splits"] = num_splits
    args = dict(inp)
    if packed and args["tree_mask"] is not None:
        from specrt.kernels.attention import pack_tree_mask

        kw["packed_mask"] = pack_tree_mask(args["tree_mask"])
        args["tree_mask"] = None                                    # must come from the bits
    res = ops.tree_attention(**args, scale=scale, **kw)
    assert res.data_ptr() == out.data_ptr()
    atol, rtol = TOL[dtype]
    msg = (f"seed={seed} {tag} splits={num_splits} B,T,Hq,D={tuple(q.shape)} "
           f"prefix={inp['prefix_lens'].tolist()} tree_lens="
           f"{None if inp['tree_lens'] is None else inp['tree_lens'].tolist()}")
    assert not torch.isnan(out).any(), "unwritten (NaN) output; " + msg
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=rtol, msg=lambda m: msg + "\n" + m)


# (B, T, Hq, Hkv, D, dtype, block_size, max_prefix, kind, ragged)
CASES = {
    "decode_g4_d64_f32":      (3, 1, 8, 2, 64, torch.float32, 16, 90, "causal", False),
    "chain_g3_d128_f16":      (2, 5, 3, 1, 128, torch.float16, 16, 60, "causal", True),
    "tree5_g3_d64_f32":       (2, 5, 6, 2, 64, torch.float32, 8, 40, "tree", True),
    "tree16_g8_d64_f16":      (2, 16, 8, 1, 64, torch.float16, 16, 70, "tree", True),
    "tree16_g1_d128_f32":     (2, 16, 2, 2, 128, torch.float32, 16, 50, "tree", True),
    "tree5_g4_d128_f16":      (3, 5, 8, 2, 128, torch.float16, 16, 40, "tree", False),
    "tree64_g1_d64_f32":      (1, 64, 1, 1, 64, torch.float32, 16, 20, "tree", True),
    "tree64_g4_d64_f16":      (2, 64, 4, 1, 64, torch.float16, 16, 20, "tree", True),
    "chainmask16_g4_d64_f16": (1, 16, 4, 1, 64, torch.float16, 16, 40, "chain", False),
    "causal16_g4_d128_f16":   (1, 16, 4, 1, 128, torch.float16, 16, 40, "causal", True),
    "tree8_g8_d128_f32":      (2, 8, 16, 2, 128, torch.float32, 16, 40, "tree", True),
    "decode_g2_d256_f16":     (2, 1, 4, 2, 256, torch.float16, 16, 40, "tree", False),
    "tree3_g2_d16_f32_bs32":  (2, 3, 2, 1, 16, torch.float32, 32, 80, "tree", True),
    # a prefill: query blocks end inside key chunks (the kernel's causal early stop)
    "prefill75_g3_d64_f32":   (2, 75, 6, 2, 64, torch.float32, 16, 5, "causal", True),
}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_vs_reference(triton_backend, device, name, splits):
    B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged = CASES[name]
    inp, seed = _case(B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged, device)
    _check(inp, seed, dtype, num_splits=splits, tag=name)


@pytest.mark.parametrize("splits", [1, 2])
def test_triton_packed_mask_multiword(triton_backend, device, splits):
    """T = 70 > 64: two mask words per row, passed pre-packed (tree_mask=None)."""
    inp, seed = _case(1, 70, 1, 1, 64, torch.float32, 16, 20, "tree", True, device)
    _check(inp, seed, torch.float32, num_splits=splits, packed=True, tag="T70 packed")


def test_triton_many_splits_long_prefix(triton_backend, device):
    """Eight splits over a few-hundred-token prefix, custom scale, mixed empty splits."""
    inp, seed = _case(2, 4, 2, 1, 32, torch.float32, 16, 300, "tree", True, device)
    _check(inp, seed, torch.float32, num_splits=8, scale=0.3, tag="S8")


def test_triton_packed_equals_bool_mask(triton_backend, device):
    inp, seed = _case(2, 5, 6, 2, 64, torch.float16, 16, 30, "tree", True, device)
    _check(inp, seed, torch.float16, num_splits=1, packed=True, tag="packed")


def test_pack_tree_mask_bits():
    from specrt.kernels.attention import pack_tree_mask

    for T in (1, 5, 63, 64, 65, 130):
        m = torch.rand(3, T, T) < 0.5
        p = pack_tree_mask(m)
        assert p.shape == (3, T, (T + 63) // 64) and p.dtype == torch.int64
        for j in range(T):
            bit = (p[:, :, j // 64] >> (j % 64)) & 1
            assert torch.equal(bit.bool(), m[:, :, j]), (T, j)


def test_triton_prefix_zero_and_empty_tree(triton_backend, device):
    """prefix 0 (tree only) and a sequence with tree_len 0 (all-zero output)."""
    inp, seed = _case(3, 5, 4, 2, 64, torch.float32, 16, 0, "tree", True, device)
    inp["tree_lens"][2] = 0
    _check(inp, seed, torch.float32, num_splits=1, tag="prefix0")
    _check(inp, seed, torch.float32, num_splits=2, tag="prefix0")


def test_cpu_kernel_prefix_zero_empty_tree_and_bad_tables(monkeypatch):
    """specrt._C's CPU kernel: prefix 0, a row with tree_len 0 (all-zero output), and
    a block table too short for its sequence (an error, output untouched)."""
    monkeypatch.delenv("SPECRT_OPS_BACKEND", raising=False)
    inp, seed = _case(3, 5, 4, 2, 64, torch.float32, 16, 0, "tree", True, "cpu")
    inp["tree_lens"][2] = 0
    _check(inp, seed, torch.float32, tag="cpu prefix0")
    inp, seed = _case(2, 3, 2, 1, 16, torch.float32, 4, 30, "causal", False, "cpu")
    short = dict(inp, block_tables=inp["block_tables"][:, :2].contiguous(),
                 prefix_lens=torch.tensor([20, 3]))
    out = torch.full_like(inp["q"], 7.0)
    with pytest.raises(IndexError, match="blocks"):
        ops.tree_attention(**short, out=out)
    assert (out == 7.0).all()


def _cpu_flags():
    return open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []


@pytest.mark.parametrize("isa", ["", "avx2", "portable"])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_cpu_kernel_a_nodes_bits_do_not_depend_on_the_trees_size(monkeypatch, isa, D):
    """Bit for bit: node i's output is the same whether the tree holds i + 1 nodes or T
    (the nodes after i cannot be seen by i), whatever the vector path groups together:
    greedy speculative == plain decoding rests on it. Fresh random trees, ragged batch."""
    if isa == "avx2" and "avx2" not in _cpu_flags():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("SPECRT_ATTN_ISA", isa)
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "auto")
    T = 13
    inp, seed = _case(2, T, 6, 2, D, torch.float32, 16, 70, "tree", False, "cpu")
    full = ops.tree_attention(**inp)
    for i in range(T):
        part = ops.tree_attention(**dict(inp, tree_lens=torch.full((2,), i + 1)))
        assert torch.equal(part[:, i], full[:, i]), f"seed={seed} node {i} D={D} isa={isa!r}"


@pytest.mark.parametrize("impl", ["cpu", "cpu_avx2", "cpu_portable", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_paths_vs_reference(monkeypatch, name, impl):
    """CPU tensors: specrt._C's kernel over the blocks (the default: its best vector
    path; then capped to the AVX2 path and to the portable one with SPECRT_ATTN_ISA)
    and torch's gather + SDPA path, all against the float64 reference."""
    if impl == "cpu_avx2" and "avx2" not in _cpu_flags():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("SPECRT_ATTN_ISA", impl[4:] if impl.startswith("cpu_") else "")
    impl = "cpu" if impl.startswith("cpu") else impl
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "auto" if impl == "cpu" else "torch")
    B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged = CASES[name]
    inp, seed = _case(B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged, "cpu")
    plan = ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], T, bs,
                                   inp["tree_mask"], inp["tree_lens"])
    assert plan.backend == impl
    _check(inp, seed, dtype, tag=f"{impl} " + name)
    if kind == "tree":
        _check(inp, seed, dtype, packed=True, tag=f"{impl} packed " + name)


def test_triton_noncontiguous_q(triton_backend, device):
    """q as a transposed view of [B, H_q, T, D] (only the last dim contiguous)."""
    inp, seed = _case(2, 5, 6, 2, 64, torch.float32, 16, 40, "tree", True, device)
    inp["q"] = inp["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inp["q"].is_contiguous()
    _check(inp, seed, torch.float32, num_splits=1, tag="noncontig q")


def test_custom_op_matches_function(triton_backend, device):
    inp, seed = _case(2, 5, 6, 2, 64, torch.float32, 16, 40, "tree", True, device)
    scale = 1.0 / 8.0
    a = ops.tree_attention(**inp, scale=scale)
    b = torch.ops.specrt.tree_attention(inp["q"], inp["kv_cache"], inp["block_tables"],
                                        inp["prefix_lens"], inp["tree_mask"], inp["tree_lens"],
                                        scale)
    torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"seed={seed}\n{m}")


def test_bad_shapes_raise(triton_backend, device):
    inp, _ = _case(1, 4, 2, 1, 64, torch.float32, 16, 10, "tree", False, device)
    with pytest.raises(ValueError):
        ops.tree_attention(**inp, out=torch.empty(1, 4, 2, 32, device=device))
    with pytest.raises(ValueError):
        ops.tree_attention(**{**inp, "tree_mask": None},
                           packed_mask=torch.zeros(1, 3, dtype=torch.int64, device=device))


# ---------------------------------------------------------------------------
# plan once per step, run per layer


def _layers_of(inp, n, seed):
    """n layers' caches over the same block tables (distinct random values)."""
    g = torch.Generator().manual_seed(seed)
    c = inp["kv_cache"]
    return [torch.randn(c.shape, generator=g).to(c.dtype).to(c.device) for _ in range(n)]


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("kind", ["tree", "causal"])
def test_plan_run_per_layer_equals_one_shot(impl, kind, monkeypatch, device):
    """One plan, run on three layers' caches (q and the cache only), equals the one-shot
    call per layer bit for bit, and the dense reference."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", {"cpu": "auto"}.get(impl, impl))
    dev = device if impl == "triton" else "cpu"
    inp, seed = _case(3, 5, 4, 2, 32, torch.float32, 8, 30, kind, True, dev)
    plan = ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], 5, 8,
                                   inp["tree_mask"], inp["tree_lens"])
    assert plan.backend == impl and (plan.B, plan.T, plan.block_size) == (3, 5, 8)
    g = torch.Generator().manual_seed(seed)
    for li, cache in enumerate(_layers_of(inp, 3, seed)):
        q = torch.randn(inp["q"].shape, generator=g).to(dev)
        got = plan.run(q, cache)
        want = ops.tree_attention(**{**inp, "q": q, "kv_cache": cache})
        assert torch.equal(got, want), f"seed={seed} layer {li}"
        ref = _reference(**{**inp, "q": q, "kv_cache": cache}, scale=1 / math.sqrt(32))
        torch.testing.assert_close(got.cpu().double(), ref, atol=2e-4, rtol=2e-4)
        out = torch.full_like(q, float("nan"))
        assert plan.run(q, cache, 0.3, out=out) is out
        torch.testing.assert_close(out, ops.tree_attention(**{**inp, "q": q, "kv_cache": cache},
                                                           scale=0.3), atol=0, rtol=0)


def test_plan_run_rejects_what_it_was_not_planned_for(monkeypatch):
    monkeypatch.delenv("SPECRT_OPS_BACKEND", raising=False)
    inp, _ = _case(2, 4, 4, 2, 32, torch.float32, 8, 20, "tree", False, "cpu")
    plan = ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], 4, 8,
                                   inp["tree_mask"])
    q, cache = inp["q"], inp["kv_cache"]
    with pytest.raises(ValueError, match="q must be"):
        plan.run(q[:, :3], cache)                                   # T differs
    with pytest.raises(ValueError, match="q must be"):
        plan.run(q[:1], cache)                                      # B differs
    with pytest.raises(ValueError, match="block_size=8"):
        plan.run(q, cache.view(cache.shape[0] * 2, 2, 4, *cache.shape[3:]))
    with pytest.raises(ValueError, match="incompatible"):
        plan.run(q[..., :16], cache)
    with pytest.raises(ValueError, match="tree_mask"):
        ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], 5, 8, inp["tree_mask"])
    with pytest.raises(ValueError, match="block_tables"):
        ops.plan_tree_attention(inp["block_tables"].long(), inp["prefix_lens"], 4, 8)


def test_backend_selection_is_honest(monkeypatch):
    """SPECRT_OPS_BACKEND=cuda never runs Triton for attention: specrt._C has no CUDA
    attention kernel, so it is the torch path (with a warning); the KV/verify ops need a
    specrt._C built with CUDA."""
    import types

    from specrt import _C
    from specrt.ops import _backend

    cpu_t, cuda_t = torch.zeros(1), types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("SPECRT_OPS_BACKEND", raising=False)
    assert ops.backend_for(cpu_t) == "cpu"
    assert ops.backend_for(cpu_t, "tree_attention") == "cpu"
    assert ops.backend_for(cuda_t) == "triton"
    assert ops.backend_for(cuda_t, "tree_attention") == "triton"
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="on the CPU"):
        ops.backend_for(cpu_t, "tree_attention")
    monkeypatch.setattr(_backend, "_warned_attention_cuda", False)
    with pytest.warns(RuntimeWarning, match="no CUDA tree-attention kernel"):
        assert ops.backend_for(cuda_t, "tree_attention") == "torch"
    if getattr(_C, "with_cuda", False):
        assert ops.backend_for(cuda_t) == "cuda"
    else:
        with pytest.raises(RuntimeError, match="without CUDA"):
            ops.backend_for(cuda_t)
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "cpu")
    assert ops.backend_for(cpu_t, "tree_attention") == "cpu"
    with pytest.raises(ValueError, match="on CUDA"):
        ops.backend_for(cuda_t, "tree_attention")
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "torch")       # the reference path, any device
    assert ops.backend_for(cpu_t, "tree_attention") == "torch"
    assert ops.backend_for(cuda_t, "tree_attention") == "torch"
    assert ops.backend_for(cpu_t) == "cpu" and ops.backend_for(cuda_t) == "triton"
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="expected one of"):
        ops.backend_for(cpu_t)


def test_run_ops_fake_and_compile(monkeypatch):
    """The per-layer ops have fake implementations: shapes under FakeTensorMode, and a
    model-style layer (append_kv + plan.run) compiles as one graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv("SPECRT_OPS_BACKEND", raising=False)
    inp, _ = _case(2, 3, 4, 2, 16, torch.float32, 4, 9, "tree", False, "cpu")
    plan = ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], 3, 4,
                                   inp["tree_mask"])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq = mode.from_tensor(inp["q"])
        o = torch.ops.specrt.gathered_tree_attention(
            fq, mode.from_tensor(inp["kv_cache"]), plan.gather_blocks, plan.gather_offsets,
            plan.visible, plan.zero_rows, plan.causal, 0.25)
        assert o.shape == inp["q"].shape and o.dtype == torch.float32
        o = torch.ops.specrt.tree_attention(fq, mode.from_tensor(inp["kv_cache"]),
                                            inp["block_tables"], inp["prefix_lens"],
                                            inp["tree_mask"], None, 0.25)
        assert o.shape == inp["q"].shape
    k = torch.randn(2, 3, 2, 16)

    def layer(q, cache, k):
        ops.append_kv(cache, plan.block_tables, plan.prefix_lens, k, k)
        return plan.run(q, cache) * 2

    want = layer(inp["q"], inp["kv_cache"].clone(), k)
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(inp["q"],
                                                                     inp["kv_cache"].clone(), k)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_cuda_backend_attention_is_the_torch_path(monkeypatch):
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "cuda")
    inp, seed = _case(2, 5, 6, 2, 64, torch.float16, 16, 40, "tree", True, "cuda")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # the once-per-process note
        plan = ops.plan_tree_attention(inp["block_tables"], inp["prefix_lens"], 5, 16,
                                       inp["tree_mask"], inp["tree_lens"])
        assert plan.backend == "torch" and plan.gather_blocks.is_cuda
        _check(inp, seed, torch.float16, tag="cuda backend (torch path)")


# ---------------------------------------------------------------------------
# CPU-only machines: compile the kernels for sm_90 (no GPU needed) so that errors only
# the real compiler sees (the interpreter is permissive) and register spills show in CI.

_COMPILE_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specrt.kernels import attention as att, kv_cache as kvc

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DIV16 = {"Q", "KV", "BT", "PREFIX", "TLEN", "MASK", "OUT", "WS_ACC", "WS_M", "WS_L", "START",
         "K", "V", "LENS", "PATH", "PLEN", "sq_b", "sq_t", "sq_h", "so_b", "so_t", "so_h",
         "s_blk", "s_kv", "s_pos"}
SPILL_OK = int(sys.argv[1]) if len(sys.argv) > 1 else 64

def build(fn, types, consts, num_warps):
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in DIV16}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=2))
    if os.path.exists(PTXAS):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        os.unlink(f.name)
        m = re.search(r"(\d+) bytes spill stores", r.stderr)
        assert r.returncode == 0, r.stderr
        # a few bytes of spill are harmless; hundreds mean a tile choice is too big
        assert m and int(m.group(1)) <= SPILL_OK, f"{fn.__name__} {consts} spills: {r.stderr}"
        print(fn.__name__, num_warps, consts, "spill bytes", m.group(1))

for dtype in TY:
    t = TY[dtype]
    for D in (64, 128, 256):
        for rows, S, causal in ((4, 1, True), (64, 4, False), (256, 1, False)):
            bm, bn, nw = att.tile_config(rows, D, dtype)
            types = dict(Q="*" + t, KV="*" + t, OUT="*" + t, BT="*i32", PREFIX="*i64",
                         TLEN="*i64", MASK="*i64", WS_ACC="*fp32", WS_M="*fp32", WS_L="*fp32",
                         scale="fp32")
            build(att._tree_attn_kernel, types,
                  dict(BLOCK_SIZE=16, G=4, D=D, BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=S,
                       CAUSAL=causal, HAS_TLEN=True,
                       DOT_PREC="ieee" if dtype == torch.float32 else "tf32"), nw)
    build(att._merge_kernel, dict(WS_ACC="*fp32", WS_M="*fp32", WS_L="*fp32", OUT="*" + t,
                                  TLEN="*i64"),
          dict(NUM_SPLITS=5, S_PAD=8, D=128, HAS_TLEN=True), 4)
    ptrs = dict(KV="*" + t, BT="*i32", START="*i64", K="*" + t, V="*" + t, LENS="*i64",
                PREFIX="*i64", PATH="*i64", PLEN="*i64")
    build(kvc._append_kv_kernel, ptrs, dict(BLOCK_SIZE=16, BLOCK=1024), 4)
    build(kvc._commit_kv_kernel, ptrs, dict(BLOCK_SIZE=16, BLOCK=1024), 4)
print("COMPILED")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """All kernel variants the host code can launch compile for sm_90 (Triton's own
    compiler and ptxas, no GPU needed) with zero register spills."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests compile and run the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0 and ("ASTSource" in r.stderr or "GPUTarget" in r.stderr) \
            and "TypeError" in r.stderr:
        pytest.skip("this Triton's ahead-of-time compile API differs: " + r.stderr[-300:])
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------
# GPU only (bf16 tl.dot is wrong in the interpreter; realistic shapes; auto split)

@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("kind", ["tree", "causal"])
def test_gpu_bf16(triton_backend, kind, splits):
    inp, seed = _case(3, 16, 12, 4, 128, torch.bfloat16, 16, 200, kind, True, "cuda")
    _check(inp, seed, torch.bfloat16, num_splits=splits, tag="bf16 " + kind)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_shapes_auto_split(triton_backend, dtype):
    """Llama-3-8B heads (32/8, D=128), long prefix, B=1: the heuristic picks split-KV."""
    from specrt.kernels.attention import choose_num_splits

    inp, seed = _case(1, 32, 32, 8, 128, dtype, 16, 4000, "tree", False, "cuda")
    assert choose_num_splits(1, 8, 1, 4000, torch.device("cuda")) > 1
    _check(inp, seed, dtype, tag="llama auto")
    inp, seed = _case(4, 64, 32, 8, 128, dtype, 16, 1500, "tree", True, "cuda")
    _check(inp, seed, dtype, tag="llama auto B4 T64")


# ---------------------------------------------------------------------------
# the CPU kernel's bf16 products on AMX tiles (csrc/attention_amx.cpp)

needs_amx = pytest.mark.skipif(not ops.amx_attention_available(64),
                               reason="this CPU (or OS) has no AMX tiles / AVX512-BF16")

# fp32 cases whose head dim the AMX variant takes, and a few of its own
AMX_CASES = {n: c for n, c in CASES.items() if c[5] is torch.float32 and c[4] in (32, 64, 128)}
AMX_CASES.update({
    "smollm_verify32_d64":    (1, 32, 9, 3, 64, torch.float32, 16, 300, "tree", False),
    "tree40_g3_d32_bs8":      (3, 40, 6, 2, 32, torch.float32, 8, 100, "tree", True),
    "decode_b5_g3_d64":       (5, 1, 9, 3, 64, torch.float32, 16, 200, "causal", True),
    "tree7_g4_d128_bs32":     (3, 7, 8, 2, 128, torch.float32, 32, 95, "tree", True),
    "prefill200_g3_d64":      (2, 200, 9, 3, 64, torch.float32, 16, 3, "causal", True),
})


@needs_amx
@pytest.mark.parametrize("name", list(AMX_CASES))
def test_amx_attention_vs_bf16_reference(monkeypatch, name):
    """``bf16=True`` against the float64 reference of the same products (q, K, V and the
    softmax weights rounded to bf16): every output written (NaN-poisoned); at most 2% of
    the rows (query, head; or one row) more than 1e-4 away anywhere, none more than
    2e-2. The kernel's scores are fp32 sums, so now and then a weight at a bf16 rounding
    boundary rounds the other way: one such flip moves its row by up to 2^-8 * |v|. The
    fp32 kernel misses the 1e-4 bar on 40-100% of the rows of these cases."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "auto")
    B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged = AMX_CASES[name]
    inp, seed = _case(B, T, Hq, Hkv, D, dtype, bs, mp, kind, ragged, "cpu")
    out = torch.full_like(inp["q"], float("nan"))
    res = ops.tree_attention(**inp, out=out, bf16=True)
    assert res.data_ptr() == out.data_ptr()
    msg = f"seed={seed} {name} prefix={inp['prefix_lens'].tolist()}"
    assert not torch.isnan(out).any(), "unwritten (NaN) output; " + msg
    ref = _reference(**inp, scale=1.0 / math.sqrt(D), bf16=True)
    err = (out.double() - ref).abs()
    assert err.max() <= 2e-2, f"max error {err.max():.2e}; " + msg
    bad, rows = int((err.amax(-1) > 1e-4).sum()), err[..., 0].numel()
    assert bad <= max(1, 0.02 * rows), f"{bad} of {rows} rows > 1e-4; " + msg


@needs_amx
@pytest.mark.parametrize("D", [32, 64, 128])
def test_amx_attention_a_nodes_bits_do_not_depend_on_its_tree_batch_or_threads(monkeypatch, D):
    """Bit for bit, as for the fp32 kernel: node i's output is the same in a tree of i + 1
    nodes or of T, alone in the batch or beside others, on 1 thread or 2 (16-query
    tiles, 16 / 32-key chunks and the split of a pair's tiles between threads all
    change with these). Greedy speculative == plain decoding of the bf16 model rests on it."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "auto")
    T = 21
    inp, seed = _case(3, T, 9, 3, D, torch.float32, 16, 90, "tree", False, "cpu")
    full = ops.tree_attention(**inp, bf16=True)
    for i in range(T):
        part = ops.tree_attention(**dict(inp, tree_lens=torch.full((3,), i + 1)), bf16=True)
        assert torch.equal(part[:, i], full[:, i]), f"seed={seed} node {i} D={D}"
    for b in range(3):
        one = {k: (v[b:b + 1] if torch.is_tensor(v) and k != "kv_cache" else v)
               for k, v in inp.items()}
        assert torch.equal(ops.tree_attention(**one, bf16=True)[0], full[b]), f"seed={seed} b={b}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.tree_attention(**inp, bf16=True), full), f"seed={seed} 1 thread"
    finally:
        torch.set_num_threads(threads)


def test_bf16_attention_is_refused_where_it_cannot_run(monkeypatch):
    """``bf16=True`` off the CPU kernel (the torch backend), at a head dim it lacks, or on
    a CPU without AMX: a ValueError that says so, nothing written."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "torch")
    inp, _ = _case(1, 3, 2, 1, 64, torch.float32, 16, 20, "tree", False, "cpu")
    out = torch.full_like(inp["q"], 7.0)
    with pytest.raises(ValueError, match="bf16 attention"):
        ops.tree_attention(**inp, out=out, bf16=True)
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "auto")
    inp, _ = _case(1, 3, 2, 1, 48, torch.float32, 16, 20, "tree", False, "cpu")
    with pytest.raises(ValueError, match="head dim 48"):
        ops.tree_attention(**inp, bf16=True)
    assert (out == 7.0).all()
