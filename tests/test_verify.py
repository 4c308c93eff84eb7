"""verify_tree / chain_verify: exactness (chi-square), agreement with an independent
reference, greedy, chain equivalence, expected accepted length, bad input.

Implementations under test: "cpu" (specrt._C), "triton" (specrt/kernels/verify.py, run by
Triton's interpreter here: slow, ~5-10 ms per row, so its samples are smaller) and, on a
GPU, "cuda" (specrt._C CUDA code, compared with the CPU one given the same uniforms).
"""
from __future__ import annotations

import math

import pytest
import torch

from specrt import ops
from specrt.ops.verify import chain_verify, verify_tree

# ---------------------------------------------------------------------------
# independent reference (plain Python floats, float64; explicit normalised residuals)


def _argmax(row):
    best, idx = -math.inf, 0
    for v, x in enumerate(row):
        if x > best:
            best, idx = x, v
    return idx


def _norm(r):
    s = sum(r)
    return [x / s for x in r] if s > 0 else None


def _inverse_cdf(r, u):
    t = u * sum(r)
    cum, last = 0.0, -1
    for v, x in enumerate(r):
        if x > 0:
            cum += x
            last = v
            if cum > t:
                return v
    return last


def ref_verify_row(P, Q, tok, par, n, u, mode, bug=None):
    """One row. P, Q: lists [T][V]; mode 'greedy' | 'sampled' | 'deterministic'.

    ``u[c]`` decides child c, ``u[0]`` draws the final token (the documented layout).
    bug: None, 'correction_from_p' (sample the correction from the target row, not the
    residual) or 'no_residual' (never update the residual between siblings).
    """
    node, path = 0, [0]
    while True:
        row = P[node]
        r = _norm(list(row))
        am = _argmax(row)
        acc = None
        for c in range(node + 1, n):
            if par[c] != node:
                continue
            x = tok[c]
            if mode == "greedy":
                if x == am:
                    acc = c
                    break
                continue
            q = Q[c] if mode == "sampled" else [1.0 if v == x else 0.0 for v in range(len(row))]
            if u[c] * q[x] < r[x]:          # accept with prob min(1, r(x) / q(x))
                acc = c
                break
            if bug != "no_residual":
                nr = _norm([max(a - b, 0.0) for a, b in zip(r, q)])
                r = nr if nr is not None else [0.0] * len(r)
        if acc is not None:
            path.append(acc)
            node = acc
            continue
        if mode == "greedy":
            nxt = am
        else:
            src = row if bug == "correction_from_p" else r
            nxt = _inverse_cdf(src, u[0])
            if nxt < 0:
                nxt = _inverse_cdf(row, u[0])
        return path, nxt


def ref_verify(target, tokens, parents, lens, draft, u, mode, bug=None):
    B, T, _ = target.shape
    P = target.double().tolist()
    Q = draft.double().tolist() if draft is not None else [None] * B
    tk, pr, ln = tokens.tolist(), parents.tolist(), lens.tolist()
    U = u.double().tolist() if u is not None else [[0.0] * T] * B
    path = torch.full((B, T), -1, dtype=torch.int64)
    plen = torch.empty(B, dtype=torch.int64)
    nxt = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        p, x = ref_verify_row(P[b], Q[b], tk[b], pr[b], ln[b], U[b], mode, bug)
        path[b, :len(p)] = torch.tensor(p)
        plen[b] = len(p)
        nxt[b] = x
    return path, plen, nxt


# ---------------------------------------------------------------------------
# helpers

def run_impl(impl, *args, monkeypatch=None, **kw):
    """verify_tree through implementation impl ('cpu' | 'triton' | 'cuda' | 'ref')."""
    if impl == "ref":
        target, tokens, parents, lens, draft = args
        mode = "greedy" if kw.get("greedy") else ("sampled" if draft is not None
                                                   else "deterministic")
        u = kw.get("uniforms")
        if u is None and mode != "greedy":
            u = torch.rand(target.shape[:2], generator=kw.get("generator"))
        return ref_verify(target, tokens, parents, lens, draft, u, mode, kw.get("bug"))
    kw.pop("bug", None)
    monkeypatch.setenv("SPECRT_OPS_BACKEND", impl)
    try:
        return verify_tree(*args, **kw)
    finally:
        monkeypatch.delenv("SPECRT_OPS_BACKEND")


def chi2_pvalue(obs: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with expected < min_expected pooled."""
    obs = obs.double().flatten()
    n = obs.sum()
    exp = probs.double().flatten() * n
    assert abs(float(probs.sum()) - 1) < 1e-6
    small = exp < min_expected
    o = torch.cat([obs[~small], obs[small].sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = e > 0
    o, e = o[keep], e[keep]
    assert int(((o > 0) & (e == 0)).sum()) == 0
    stat = ((o - e) ** 2 / e).sum()
    df = o.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def random_probs(shape, gen, sharp=1.5):
    return torch.softmax(torch.randn(shape, generator=gen) * sharp, dim=-1)


def random_trees(B, T, V, gen, *, sampled_draft=True):
    """Random trees (random parents, tokens, lens) with random p and q (equality tests)."""
    parents = torch.full((B, T), -1, dtype=torch.int64)
    for i in range(1, T):
        parents[:, i] = torch.randint(0, i, (B,), generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    lens = torch.randint(1, T + 1, (B,), generator=gen)
    target = random_probs((B, T, V), gen)
    draft = random_probs((B, T, V), gen) if sampled_draft else None
    return target, tokens, parents, lens, draft


class ToyLM:
    """Target and draft distributions as functions of the context (up to 4 tokens).

    The tree's rows are looked up by each node's path, as a real model would give them,
    so the emitted sequence must follow the target's joint distribution.
    """

    def __init__(self, V, gen, max_ctx=4, sharp=1.5):
        self.V = V
        self.P = [random_probs((V ** k, V), gen, sharp) for k in range(max_ctx + 1)]
        self.Q = [random_probs((V ** k, V), gen, sharp) for k in range(max_ctx + 1)]

    def trees(self, parents, root_ids, root_len, mode, gen, lens=None):
        """Build [B, T] trees for root contexts ``root_ids`` (base-V ids, length root_len).

        mode 'sampled': children drawn i.i.d. from the draft at their parent; otherwise
        the children of a node take the draft's most likely tokens in sibling order.
        """
        B, T, V = root_ids.shape[0], len(parents), self.V
        ids = torch.zeros((B, T), dtype=torch.int64)
        depth = [0] * T
        tokens = torch.zeros((B, T), dtype=torch.int64)
        target = torch.empty((B, T, V))
        draft = torch.zeros((B, T, V)) if mode == "sampled" else None
        ids[:, 0] = root_ids
        target[:, 0] = self.P[root_len][root_ids]
        rank = [0] * T
        for i in range(1, T):
            p = parents[i]
            depth[i] = depth[p] + 1
            rank[i] = sum(1 for j in range(1, i) if parents[j] == p)
            k = root_len + depth[p]
            q = self.Q[k][ids[:, p]]
            if mode == "sampled":
                tokens[:, i] = torch.multinomial(q, 1, generator=gen)[:, 0]
                draft[:, i] = q
            else:
                tokens[:, i] = q.argsort(dim=-1, descending=True, stable=True)[:, rank[i]]
            ids[:, i] = ids[:, p] * V + tokens[:, i]
            target[:, i] = self.P[k + 1][ids[:, i]]
        par = torch.tensor(parents, dtype=torch.int64).expand(B, T).contiguous()
        if lens is None:
            lens = torch.randint(1, T + 1, (B,), generator=gen)
        return target, tokens, par, lens, draft


TREE = [-1, 0, 0, 0, 1, 1, 2, 4]       # depth 3, up to three siblings
SMALL_TREE = [-1, 0, 0, 1, 1]


def emitted_two(lm, impl, mode, B, gen, monkeypatch, parents=TREE, bug=None):
    """First two emitted tokens of B independent generations (two steps when the first
    step emits one token)."""
    V = lm.V
    args = lm.trees(parents, torch.zeros(B, dtype=torch.int64), 0, mode, gen)
    path, plen, nxt = run_impl(impl, *args, monkeypatch=monkeypatch, generator=gen, bug=bug,
                               greedy=(mode == "greedy"))
    tokens = args[1]
    first_node = path[:, 1].clamp(min=0)
    x1 = torch.where(plen >= 2, tokens.gather(1, first_node[:, None])[:, 0], nxt)
    second_node = path[:, 2].clamp(min=0)
    x2 = torch.where(plen >= 3, tokens.gather(1, second_node[:, None])[:, 0], nxt)
    short = plen == 1                       # one token emitted: the next step gives the 2nd
    if short.any():
        ns = int(short.sum())
        args2 = lm.trees(parents, x1[short], 1, mode, gen)
        p2, l2, n2 = run_impl(impl, *args2, monkeypatch=monkeypatch, generator=gen, bug=bug,
                              greedy=(mode == "greedy"))
        f2 = torch.where(l2 >= 2, args2[1].gather(1, p2[:, 1:2].clamp(min=0))[:, 0], n2)
        x2 = x2.clone()
        x2[short] = f2
        assert ns == f2.numel()
    return x1, x2


def check_two_tokens(lm, x1, x2):
    V = lm.V
    p1 = lm.P[0][0]
    joint = p1[:, None] * lm.P[1]                     # P(x1) P(x2 | x1)
    c1 = torch.bincount(x1, minlength=V)
    c12 = torch.bincount(x1 * V + x2, minlength=V * V)
    return chi2_pvalue(c1, p1), chi2_pvalue(c12, joint.flatten())


# ---------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_exact_distribution_cpu(mode, monkeypatch):
    gen = torch.Generator().manual_seed(1234)
    lm = ToyLM(6, gen)
    x1, x2 = emitted_two(lm, "cpu", mode, 200_000, gen, monkeypatch)
    p_first, p_pair = check_two_tokens(lm, x1, x2)
    print(f"cpu {mode}: p(first)={p_first:.3g} p(pair)={p_pair:.3g}")
    assert p_first > 1e-3 and p_pair > 1e-3


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_exact_distribution_triton(mode, monkeypatch):
    gen = torch.Generator().manual_seed(99)
    lm = ToyLM(5, gen, sharp=2.0)
    x1, x2 = emitted_two(lm, "triton", mode, 1200, gen, monkeypatch, parents=SMALL_TREE)
    p_first, p_pair = check_two_tokens(lm, x1, x2)
    print(f"triton {mode}: p(first)={p_first:.3g} p(pair)={p_pair:.3g}")
    assert p_first > 1e-3 and p_pair > 1e-3


@pytest.mark.parametrize("bug", ["correction_from_p", "no_residual"])
def test_wrong_sampler_is_caught(bug, monkeypatch):
    """The same test on a deliberately wrong sampler must fail (and the correct reference
    passes it)."""
    gen = torch.Generator().manual_seed(1234)
    lm = ToyLM(6, gen)
    x1, x2 = emitted_two(lm, "ref", "sampled", 40_000, gen, monkeypatch, bug=bug)
    p_first, p_pair = check_two_tokens(lm, x1, x2)
    print(f"wrong sampler {bug}: p(first)={p_first:.3g} p(pair)={p_pair:.3g}")
    assert min(p_first, p_pair) < 1e-9
    # the small-sample Triton design has power against the same bug
    gen = torch.Generator().manual_seed(99)
    lm = ToyLM(5, gen, sharp=2.0)
    x1, x2 = emitted_two(lm, "ref", "sampled", 1200, gen, monkeypatch, parents=SMALL_TREE,
                         bug=bug)
    p_first, p_pair = check_two_tokens(lm, x1, x2)
    print(f"wrong sampler {bug} (triton-sized): p(first)={p_first:.3g} p(pair)={p_pair:.3g}")
    assert min(p_first, p_pair) < 1e-3


def test_reference_passes(monkeypatch):
    gen = torch.Generator().manual_seed(1234)
    lm = ToyLM(6, gen)
    x1, x2 = emitted_two(lm, "ref", "sampled", 40_000, gen, monkeypatch)
    p_first, p_pair = check_two_tokens(lm, x1, x2)
    print(f"reference: p(first)={p_first:.3g} p(pair)={p_pair:.3g}")
    assert p_first > 1e-3 and p_pair > 1e-3


# ---------------------------------------------------------------------------
# agreement with the reference given the same uniforms


@pytest.mark.parametrize("impl,B", [("cpu", 3000), ("triton", 150)])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "deterministic"])
def test_matches_reference(impl, B, mode, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    target, tokens, parents, lens, draft = random_trees(B, 7, 6, gen)
    if mode == "greedy":
        # make argmax hits likely: children copy the parent's argmax half of the time
        am = target.argmax(-1)
        hit = torch.rand(B, 7, generator=gen) < 0.5
        tokens = torch.where(hit, am.gather(1, parents.clamp(min=0)), tokens)
    d = draft if mode == "sampled" else None
    u = None if mode == "greedy" else torch.rand(B, 7, generator=gen)
    got = run_impl(impl, target, tokens, parents, lens, d, monkeypatch=monkeypatch,
                   greedy=mode == "greedy", uniforms=u)
    want = run_impl("ref", target, tokens, parents, lens, d, greedy=mode == "greedy",
                    uniforms=u)
    same = (got[0] == want[0]).all(1) & (got[1] == want[1]) & (got[2] == want[2])
    if mode == "greedy":
        assert bool(same.all())
    else:   # fp32 vs float64 rounding can flip a decision sitting on a boundary
        assert float(same.double().mean()) >= 0.998
    assert bool((got[1] >= 1).all()) and bool((got[0][:, 0] == 0).all())
    pos = torch.arange(7)
    assert bool(((got[0] == -1) == (pos[None] >= got[1][:, None])).all())


@pytest.mark.parametrize("mode", ["greedy", "sampled", "deterministic"])
def test_triton_equals_cpu(mode, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    B, T, V = 120, 9, 37
    target, tokens, parents, lens, draft = random_trees(B, T, V, gen)
    am = target.argmax(-1)
    tokens = torch.where(torch.rand(B, T, generator=gen) < 0.5,
                         am.gather(1, parents.clamp(min=0)), tokens)
    d = draft if mode == "sampled" else None
    u = None if mode == "greedy" else torch.rand(B, T, generator=gen)
    a = run_impl("cpu", target, tokens, parents, lens, d, monkeypatch=monkeypatch,
                 greedy=mode == "greedy", uniforms=u)
    b = run_impl("triton", target, tokens, parents, lens, d, monkeypatch=monkeypatch,
                 greedy=mode == "greedy", uniforms=u)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, monkeypatch):
    """fp16 / bf16 inputs give exactly the fp32 result of their upcast values."""
    gen = torch.Generator().manual_seed(5)
    target, tokens, parents, lens, draft = random_trees(500, 6, 50, gen)
    u = torch.rand(500, 6, generator=gen)
    t16, d16 = target.to(dtype), draft.to(dtype)
    for d in (None, "q"):
        a = verify_tree(t16, tokens, parents, lens, d16 if d else None, uniforms=u)
        b = verify_tree(t16.float(), tokens, parents, lens, d16.float() if d else None,
                        uniforms=u)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_generator_reproducible():
    gen = torch.Generator().manual_seed(3)
    args = random_trees(64, 8, 20, gen)
    r1 = verify_tree(*args, generator=torch.Generator().manual_seed(42))
    r2 = verify_tree(*args, generator=torch.Generator().manual_seed(42))
    u = torch.rand((64, 8), generator=torch.Generator().manual_seed(42))
    r3 = verify_tree(*args, uniforms=u)    # documented: one torch.rand((B, T)) per call
    for x, y, z in zip(r1, r2, r3):
        assert torch.equal(x, y) and torch.equal(x, z)


# ---------------------------------------------------------------------------
# chains


def chain_inputs(B, K, V, gen):
    q = random_probs((B, K, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    p = random_probs((B, K + 1, V), gen)
    return q, ids, p


def chain_as_tree(q, ids, p):
    B, K, V = q.shape
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.int64), ids], 1)
    parents = (torch.arange(K + 1) - 1).expand(B, K + 1).contiguous()
    draft = torch.cat([torch.zeros(B, 1, V), q], 1)
    return p, tokens, parents, torch.full((B,), K + 1), draft


def test_chain_verify_equals_verify_tree():
    gen = torch.Generator().manual_seed(8)
    B, K, V = 2000, 5, 12
    q, ids, p = chain_inputs(B, K, V, gen)
    u = torch.rand(B, K + 1, generator=gen)
    out, acc, emi = chain_verify(q, ids, p, uniforms=u)
    path, plen, nxt = verify_tree(*chain_as_tree(q, ids, p), uniforms=u)
    assert out.dtype == acc.dtype == emi.dtype == torch.int32
    assert torch.equal(emi.long(), plen - 1)
    assert torch.equal(path, torch.where(torch.arange(K + 1) < plen[:, None],
                                         torch.arange(K + 1), -1))
    for b in range(B):
        e = int(emi[b])
        assert out[b, :e].tolist() == ids[b, :e].tolist()
        assert int(out[b, e]) == int(nxt[b])
        assert (out[b, e + 1:] == -1).all()
    # FlashInfer's accepted count: every position's own test u * q(x) < p(x)
    pi = p[:, :K].gather(2, ids[..., None])[..., 0]
    qi = q.gather(2, ids[..., None])[..., 0]
    assert torch.equal(acc.long(), (u[:, 1:] * qi < pi).sum(1))
    assert bool((acc >= emi).all())
    # in-place accumulation like FlashInfer
    a0 = torch.full((B,), 3, dtype=torch.int32)
    e0 = torch.full((B,), 1, dtype=torch.int32)
    _, a1, e1 = chain_verify(q, ids, p, a0, e0, uniforms=u)
    assert a1 is a0 and e1 is e0
    assert torch.equal(a0, acc + 3) and torch.equal(e0, emi + 1)
    # seed/offset reproducible
    o1 = chain_verify(q, ids, p, seed=5, offset=2)[0]
    o2 = chain_verify(q, ids, p, seed=5, offset=2)[0]
    assert torch.equal(o1, o2)


def test_chain_verify_one_hot_is_greedy():
    gen = torch.Generator().manual_seed(9)
    B, K, V = 500, 4, 10
    logits = torch.randn(B, K + 1, V, generator=gen)
    p = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    am = logits.argmax(-1)
    ids = torch.where(torch.rand(B, K, generator=gen) < 0.7, am[:, :K],
                      torch.randint(0, V, (B, K), generator=gen))
    q = torch.nn.functional.one_hot(ids, V).float()
    out, _, emi = chain_verify(q, ids, p, generator=gen)
    path, plen, nxt = verify_tree(*chain_as_tree(q, ids, p), greedy=True)
    assert torch.equal(emi.long(), plen - 1)
    assert torch.equal(out.long().gather(1, emi.long()[:, None])[:, 0], nxt)


def test_chain_verify_distribution(monkeypatch):
    """chain_verify and verify_tree on chains give the same token distribution."""
    gen = torch.Generator().manual_seed(10)
    V, K, B = 6, 3, 100_000
    p1 = random_probs((1, K + 1, V), gen).expand(B, K + 1, V).contiguous()
    q1 = random_probs((1, K, V), gen).expand(B, K, V).contiguous()
    ids = torch.multinomial(q1[0, 0], B * K, replacement=True, generator=gen).reshape(B, K)
    out, _, emi = chain_verify(q1, ids, p1, generator=gen)
    # per-position target rows are identical, so every emitted token is ~ p[0] = p[j]
    first = out[:, 0].long()
    assert chi2_pvalue(torch.bincount(first, minlength=V), p1[0, 0]) > 1e-3
    _, plen, nxt = verify_tree(*chain_as_tree(q1, ids, p1), generator=gen)
    a, b = torch.bincount(emi.long(), minlength=K + 1), torch.bincount(plen - 1, minlength=K + 1)
    # two-sample chi-square on the accepted-length histograms
    pooled = (a + b).double() / (2 * B)
    stat = (((a - pooled * B) ** 2 + (b - pooled * B) ** 2) / (pooled * B)).sum()
    assert float(torch.special.gammaincc(torch.tensor(K / 2.0, dtype=torch.float64),
                                         stat / 2)) > 1e-3


# ---------------------------------------------------------------------------
# expected accepted length


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_mean_accepted_length(mode):
    """Chain of K with identical p, q at every position: acceptance is i.i.d. with
    alpha = sum min(p, q) (sampled) or p(x) (deterministic draft x), so the tokens
    emitted per step (bonus included) average (1 - alpha^(K+1)) / (1 - alpha)."""
    gen = torch.Generator().manual_seed(21)
    V, K, B = 8, 5, 100_000
    p = random_probs((V,), gen, sharp=1.0)
    q = random_probs((V,), gen, sharp=1.0)
    target = p.expand(B, K + 1, V).contiguous()
    tokens = torch.zeros(B, K + 1, dtype=torch.int64)
    parents = (torch.arange(K + 1) - 1).expand(B, K + 1).contiguous()
    lens = torch.full((B,), K + 1)
    if mode == "sampled":
        tokens[:, 1:] = torch.multinomial(q, B * K, replacement=True, generator=gen).reshape(B, K)
        draft = q.expand(B, K + 1, V).contiguous()
        alpha = float(torch.minimum(p, q).sum())
    else:
        tokens[:, 1:] = int(p.argmax())
        draft = None
        alpha = float(p.max())
    _, plen, _ = verify_tree(target, tokens, parents, lens, draft, generator=gen)
    expect = (1 - alpha ** (K + 1)) / (1 - alpha)
    ks = torch.arange(1, K + 2, dtype=torch.float64)
    pk = torch.tensor([alpha ** (k - 1) * (1 - alpha) if k <= K else alpha ** K
                       for k in range(1, K + 2)], dtype=torch.float64)
    sd = math.sqrt(float((pk * ks ** 2).sum()) - expect ** 2)
    mean = float(plen.double().mean())
    print(f"{mode}: alpha={alpha:.3f} mean={mean:.4f} expected={expect:.4f}")
    assert abs(mean - expect) < 4 * sd / math.sqrt(B)


# ---------------------------------------------------------------------------
# bad input, custom ops


def test_bad_input():
    gen = torch.Generator().manual_seed(0)
    target, tokens, parents, lens, draft = random_trees(4, 5, 7, gen)
    with pytest.raises(ValueError, match="tokens"):
        verify_tree(target, tokens[:, :4], parents, lens)
    with pytest.raises(ValueError, match="parents"):
        verify_tree(target, tokens, parents[:3], lens)
    with pytest.raises(ValueError, match="tree_lens"):
        verify_tree(target, tokens, parents, lens[:3])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_tree(target, tokens, parents, lens, draft[:, :, :6])
    with pytest.raises(ValueError, match="target_probs"):
        verify_tree(target[0], tokens, parents, lens)
    with pytest.raises(ValueError, match="float32"):
        verify_tree(target.double(), tokens, parents, lens)
    bad = parents.clone()
    bad[1, 3] = 3
    with pytest.raises(ValueError, match="parents"):
        verify_tree(target, tokens, bad, torch.full((4,), 5))
    bad = parents.clone()
    bad[0, 0] = 0
    with pytest.raises(ValueError, match="root"):
        verify_tree(target, tokens, bad, lens)
    for bad_len in (0, 6):
        with pytest.raises(ValueError, match="tree_lens"):
            verify_tree(target, tokens, parents, torch.tensor([5, 5, bad_len, 5]))
    badt = tokens.clone()
    badt[2, 1] = 7
    with pytest.raises(ValueError, match="vocabulary"):
        verify_tree(target, badt, parents, torch.full((4,), 5))
    with pytest.raises(ValueError, match="uniforms"):
        verify_tree(target, tokens, parents, lens, uniforms=torch.rand(4, 4))
    with pytest.raises(ValueError, match="target_probs"):
        chain_verify(draft[:, 1:], tokens[:, 1:], target[:, :3])
    with pytest.raises(ValueError, match="draft_token_ids"):
        chain_verify(draft[:, 1:], tokens[:, 1:3], target)


def test_custom_ops_and_reexport():
    assert ops.verify_tree is verify_tree and ops.chain_verify is chain_verify
    gen = torch.Generator().manual_seed(2)
    target, tokens, parents, lens, draft = random_trees(32, 6, 9, gen)
    u = torch.rand(32, 6, generator=gen)
    a = torch.ops.specrt.verify_tree(target, tokens, parents, lens, draft, False, u)
    b = verify_tree(target, tokens, parents, lens, draft, uniforms=u)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    q, ids, p = draft[:, 1:], tokens[:, 1:], target
    c = torch.ops.specrt.chain_verify(q, ids, p, u)
    d = chain_verify(q, ids, p, uniforms=u)
    for x, y in zip(c, d):
        assert torch.equal(x, y)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        ft = mode.from_tensor(target)
        fpath, fl, fn = torch.ops.specrt.verify_tree(ft, mode.from_tensor(tokens),
                                                     mode.from_tensor(parents),
                                                     mode.from_tensor(lens), None, True, None)
        assert fpath.shape == (32, 6) and fl.shape == (32,) and fn.dtype == torch.int64


# ---------------------------------------------------------------------------
# GPU: CUDA and compiled Triton against the CPU implementation, same uniforms


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_cpu(impl, mode, dtype, monkeypatch):
    from specrt import _C

    if impl == "cuda" and not getattr(_C, "with_cuda", False):
        pytest.skip("specrt._C built without CUDA")
    gen = torch.Generator().manual_seed(17)
    B, T, V = 64, 16, 32000
    target, tokens, parents, lens, draft = random_trees(B, T, V, gen)
    am = target.argmax(-1)
    tokens = torch.where(torch.rand(B, T, generator=gen) < 0.6,
                         am.gather(1, parents.clamp(min=0)), tokens)
    target, draft = target.to(dtype), draft.to(dtype)
    d = draft if mode == "sampled" else None
    u = None if mode == "greedy" else torch.rand(B, T, generator=gen)
    a = run_impl("cpu", target, tokens, parents, lens, d, monkeypatch=monkeypatch,
                 greedy=mode == "greedy", uniforms=u)
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    b = run_impl(impl, target.cuda(), tokens.cuda(), parents.cuda(), lens.cuda(), cu(d),
                 monkeypatch=monkeypatch, greedy=mode == "greedy", uniforms=cu(u),
                 validate=True)
    same = ((a[0] == b[0].cpu()).all(1) & (a[1] == b[1].cpu()) & (a[2] == b[2].cpu()))
    # summation order differs between CPU and GPU: rare boundary flips are allowed
    assert float(same.double().mean()) >= (1.0 if mode == "greedy" else 0.95)
