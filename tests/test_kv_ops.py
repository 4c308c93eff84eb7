"""append_kv / commit_kv (specrt.ops) on the cpu (specrt._C) and triton backends.

Checked against pure-python references on shuffled, non-contiguous block tables,
with every cache slot poisoned beforehand so that a write to an untouched slot (or
a missing write) shows. Triton runs under TRITON_INTERPRET=1 without a GPU; data
movement is dtype-agnostic, so bf16 is fine in the interpreter here.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from specrt import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch, device):
    """(backend name, device): cpu runs specrt._C on CPU tensors; triton runs the
    Triton kernels (interpreted on CPU, native on CUDA)."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", request.param)
    return request.param, ("cpu" if request.param == "cpu" else device)


def _setup(B, bs, Hkv, D, dtype, lens_needed, seed, extra_blocks=3):
    """Poisoned cache (distinct random values everywhere) and shuffled block tables
    with room for ``lens_needed[b]`` positions of sequence b."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / bs) for n in lens_needed]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32)
    o = 0
    for b in range(B):
        bt[b, :need[b]] = perm[o:o + need[b]].int()
        o += need[b]
    bt[bt < 0] = perm[-1].int()               # spare entries: a valid but unused block
    cache = torch.randn(num_blocks, 2, bs, Hkv, D, generator=g).to(dtype)
    return cache, bt, g


def _ref_append(cache, bt, start, k, v, lens):
    cache = cache.clone()
    bs = cache.shape[2]
    for b in range(k.shape[0]):
        for t in range(int(lens[b])):
            p = int(start[b]) + t
            blk = int(bt[b, p // bs])
            cache[blk, 0, p % bs] = k[b, t]
            cache[blk, 1, p % bs] = v[b, t]
    return cache


def _ref_commit(cache, bt, prefix, path, path_lens):
    """new[prefix + i] = old[prefix + path[i]]; everything else unchanged."""
    old, new = cache, cache.clone()
    bs = cache.shape[2]
    for b in range(path.shape[0]):
        for i in range(int(path_lens[b])):
            s, d = int(prefix[b]) + int(path[b, i]), int(prefix[b]) + i
            new[int(bt[b, d // bs]), :, d % bs] = old[int(bt[b, s // bs]), :, s % bs]
    return new


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_kv(backend, dtype):
    name, dev = backend
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 3, 7, 4, 2, 16
    g0 = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 14, (B,), generator=g0)
    start[0] = 6                                          # crosses block boundaries
    lens = torch.tensor([T, 3, 0])                        # ragged, including nothing
    cache, bt, g = _setup(B, bs, Hkv, D, dtype, (start + T).tolist(), seed)
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    ref = _ref_append(cache, bt, start, k, v, lens)
    c = cache.to(dev)
    ops.append_kv(c, bt.to(dev), start.to(dev), k.to(dev), v.to(dev), lens.to(dev))
    assert torch.equal(c.cpu(), ref), f"seed={seed} backend={name}"
    # lens=None writes all T; Python-int start_pos
    ref = _ref_append(cache, bt, torch.full((B,), 2), k, v, torch.full((B,), T))
    c = cache.to(dev)
    ops.append_kv(c, bt.to(dev), 2, k.to(dev), v.to(dev))
    assert torch.equal(c.cpu(), ref), f"seed={seed} backend={name} lens=None"


PATHS = {
    "overlap":        ([0, 2, 3, 5], 0),      # sources and destinations overlap
    "identity":       ([0, 1, 2], 0),          # nothing moves
    "cross_blocks":   ([0, 3, 6, 9, 10], 0),   # with block_size 4 and prefix 6: many blocks
    "single":         ([0], 0),
    "late_nodes":     ([0, 4, 5, 6, 7, 11], 0),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_commit_kv(backend, dtype):
    name, dev = backend
    seed = random.randrange(2**31)
    rows = list(PATHS.values())
    B, T, bs, Hkv, D = len(rows), 12, 4, 2, 8
    P = max(len(p) for p, _ in rows) + 1
    path = torch.zeros(B, P, dtype=torch.int64)
    plen = torch.zeros(B, dtype=torch.int64)
    for b, (p, _) in enumerate(rows):
        path[b, :len(p)] = torch.tensor(p)
        path[b, len(p):] = 99                             # garbage beyond path_lens
        plen[b] = len(p)
    g0 = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 11, (B,), generator=g0)
    prefix[2] = 6
    cache, bt, _ = _setup(B, bs, Hkv, D, dtype, (prefix + T).tolist(), seed)
    ref = _ref_commit(cache, bt, prefix, path, plen)
    c = cache.to(dev)
    ops.commit_kv(c, bt.to(dev), prefix.to(dev), path.to(dev), plen.to(dev))
    assert torch.equal(c.cpu(), ref), f"seed={seed} backend={name} prefix={prefix.tolist()}"


def test_commit_kv_random_paths(backend):
    """Random increasing paths of random length, random prefixes, wider rows."""
    name, dev = backend
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 4, 16, 8, 3, 32
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 30, (B,), generator=g)
    path = torch.zeros(B, T, dtype=torch.int64)
    plen = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        nodes = sorted(torch.randperm(T - 1, generator=g)[:int(torch.randint(0, T, (1,),
                                                                            generator=g))].add(1).tolist())
        p = [0] + nodes
        path[b, :len(p)] = torch.tensor(p)
        plen[b] = len(p)
    cache, bt, _ = _setup(B, bs, Hkv, D, torch.float16, (prefix + T).tolist(), seed)
    ref = _ref_commit(cache, bt, prefix, path, plen)
    c = cache.to(dev)
    ops.commit_kv(c, bt.to(dev), prefix.to(dev), path.to(dev), plen.to(dev))
    assert torch.equal(c.cpu(), ref), f"seed={seed} backend={name} path={path.tolist()}"


def test_append_then_commit_roundtrip(backend):
    """Write a tree with append_kv, commit a path, read the committed positions back."""
    name, dev = backend
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 2, 6, 4, 1, 16
    prefix = torch.tensor([5, 3])
    cache, bt, g = _setup(B, bs, Hkv, D, torch.float32, (prefix + T).tolist(), seed)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    path = torch.tensor([[0, 1, 4, 5], [0, 3, 0, 0]])
    plen = torch.tensor([4, 2])
    c, bt_d = cache.to(dev), bt.to(dev)
    ops.append_kv(c, bt_d, prefix.to(dev), k.to(dev), v.to(dev))
    ops.commit_kv(c, bt_d, prefix.to(dev), path.to(dev), plen.to(dev))
    c = c.cpu()
    for b in range(B):
        for i in range(int(plen[b])):
            p = int(prefix[b]) + i
            got = c[int(bt[b, p // bs]), :, p % bs]
            node = int(path[b, i])
            assert torch.equal(got[0], k[b, node]) and torch.equal(got[1], v[b, node]), \
                f"seed={seed} backend={name} b={b} i={i}"


def test_bad_input_cpu_raises_and_leaves_cache(monkeypatch):
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "cpu")
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 2, 4, 4, 2, 8
    cache, bt, g = _setup(B, bs, Hkv, D, torch.float16, [8, 8], seed)
    before = cache.clone()
    k = torch.randn(B, T, Hkv, D, generator=g).to(torch.float16)
    # sequence 1 writes positions 8..11, beyond its 3-entry block table (max_blocks 3 -> 12
    # positions fit); use start 10 so positions reach 13 > 12
    with pytest.raises((IndexError, ValueError), match="beyond its block table"):
        ops.append_kv(cache, bt, torch.tensor([0, 10]), k, k)
    assert torch.equal(cache, before), f"seed={seed}: failed append_kv modified the cache"
    with pytest.raises((IndexError, ValueError), match="increasing"):
        ops.commit_kv(cache, bt, torch.tensor([0, 0]), torch.tensor([[0, 2, 1], [0, 1, 2]]),
                      torch.tensor([3, 3]))
    assert torch.equal(cache, before), f"seed={seed}: failed commit_kv modified the cache"
    with pytest.raises((IndexError, ValueError), match="increasing"):
        ops.commit_kv(cache, bt, torch.tensor([0, 0]), torch.tensor([[0, 1, 2], [0, 2, 2]]),
                      torch.tensor([3, 3]))
    assert torch.equal(cache, before)
    with pytest.raises((IndexError, ValueError), match="beyond its block table"):
        ops.commit_kv(cache, bt, torch.tensor([0, 10]), torch.tensor([[0, 1], [0, 3]]),
                      torch.tensor([2, 2]))
    assert torch.equal(cache, before)


def test_triton_out_of_table_positions_are_not_written(triton_backend, device):
    """The Triton kernels skip (cannot raise on) positions beyond the block table
    instead of writing out of bounds; the rest of the cache is untouched."""
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 1, 4, 4, 1, 16
    cache, bt, g = _setup(B, bs, Hkv, D, torch.float32, [8], seed)
    k = torch.randn(B, T, Hkv, D, generator=g)
    c = cache.to(device)
    ops.append_kv(c, bt.to(device), torch.tensor([10]).to(device), k.to(device), k.to(device))
    ref = _ref_append(cache, bt, torch.tensor([10]), k, k, torch.tensor([2]))  # 10, 11 fit
    assert torch.equal(c.cpu(), ref), f"seed={seed}"


def test_custom_ops_match(backend):
    name, dev = backend
    seed = random.randrange(2**31)
    B, T, bs, Hkv, D = 2, 5, 4, 2, 8
    start = torch.tensor([3, 7])
    cache, bt, g = _setup(B, bs, Hkv, D, torch.float32, (start + T).tolist(), seed)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    lens = torch.tensor([5, 2])
    a, b_ = cache.to(dev), cache.to(dev)
    args = [x.to(dev) for x in (bt, start, k, v, lens)]
    ops.append_kv(a, *args)
    torch.ops.specrt.append_kv(b_, *args)
    assert torch.equal(a, b_), f"seed={seed}"
    path, plen = torch.tensor([[0, 2, 4], [0, 1, 0]]), torch.tensor([3, 2])
    args = [x.to(dev) for x in (bt, start, path, plen)]
    ops.commit_kv(a, *args)
    torch.ops.specrt.commit_kv(b_, *args)
    assert torch.equal(a, b_), f"seed={seed}"
