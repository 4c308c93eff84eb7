"""Triton rejection sampling over draft trees (specrt.ops.verify_tree / chain_verify).

The algorithm, acceptance rules and the use of the uniform random numbers are those of
csrc/verify_cpu.cpp (see specrt/ops/verify.py): one program per batch row walks the tree
node by node; the O(V) work (argmax, residual update, inverse-CDF draw) streams over the
vocabulary in BLOCK_V chunks. The sampled-children residual lives in a ``[B, V]`` fp32
workspace (one row per batch element); no ``[B, T, V]`` temporary is made. Random
numbers come from the ``[B, T]`` uniform tensor the caller drew with its torch.Generator
(graph-safe, reproducible); nothing synchronises with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_GREEDY, _SAMPLED, _DETERMINISTIC = 0, 1, 2


@triton.jit
def _verify_tree_kernel(P, Q, TOK, PAR, LENS, U, WS, PATH, PLEN, NEXT,
                        T, V, TQ, q_shift,
                        MODE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LENS + b)
    n = tl.minimum(tl.maximum(n, 1), T).to(tl.int32)
    toffs = tl.arange(0, BLOCK_T)
    tok_vec = tl.load(TOK + b * T + toffs, mask=toffs < n, other=-1).to(tl.int32)
    tl.store(PATH + b * T + toffs, tl.where(toffs == 0, 0, -1).to(tl.int64), mask=toffs < T)
    voffs = tl.arange(0, BLOCK_V)
    wsrow = WS + b * V

    tin = toffs < n
    par_vec = tl.load(PAR + b * T + toffs, mask=tin, other=-2).to(tl.int32)
    tok_ok = tin & (tok_vec >= 0) & (tok_vec < V)
    if MODE == 2:
        u_vec = tl.load(U + b * T + toffs, mask=tin, other=1.0)
    BIG: tl.constexpr = 2147483647

    node = tl.full([], 0, dtype=tl.int32)
    pl = tl.full([], 1, dtype=tl.int32)
    go = tl.full([], 1, dtype=tl.int32)
    has_ws = tl.full([], 0, dtype=tl.int32)
    Z = tl.full([], 1.0, dtype=tl.float32)
    rej = tl.full([BLOCK_T], 0, dtype=tl.int32)
    am = tl.full([], 0, dtype=tl.int32)
    while go != 0:
        row = P + (b * T + node.to(tl.int64)) * V
        is_child = (par_vec == node) & tok_ok & (toffs > node)
        has_ws = tl.full([], 0, dtype=tl.int32)
        Z = tl.full([], 1.0, dtype=tl.float32)
        acc = tl.full([], -1, dtype=tl.int32)
        if MODE == 0:
            # greedy: the first child whose token is the argmax (first max on ties)
            best = tl.full([], float("-inf"), dtype=tl.float32)
            am = tl.full([], 0, dtype=tl.int32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + voffs
                val = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                cm, ci = tl.reduce((val, voffs), 0, tl.standard._argmax_combine_tie_break_left)
                ci = (ci + v0).to(tl.int32)
                upd = cm > best
                am = tl.where(upd, ci, am)
                best = tl.where(upd, cm, best)
            first = tl.reduce(tl.where(is_child & (tok_vec == am), toffs, BIG), 0,
                              tl.standard._elementwise_min)
            acc = tl.where(first < BIG, first, -1).to(tl.int32)
        elif MODE == 2:
            # deterministic children, all tests at once: child c (first of its token) is
            # accepted iff u[c] * (1 - mass of earlier rejected tokens) < p(x_c) and no
            # earlier child was, i.e. the first c that passes its test.
            px = tl.load(row + tok_vec, mask=is_child, other=0.0).to(tl.float32)
            same = (is_child[None, :] & (tok_vec[None, :] == tok_vec[:, None])
                    & (toffs[None, :] < toffs[:, None]))
            firsttok = is_child & (tl.reduce(same.to(tl.int32), 1, tl.standard._sum_combine) == 0)
            contrib = tl.where(firsttok, px, 0.0)
            zc = 1.0 - (tl.associative_scan(contrib, 0, tl.standard._sum_combine) - contrib)
            ok = firsttok & (u_vec * zc < px)
            first = tl.reduce(tl.where(ok, toffs, BIG), 0, tl.standard._elementwise_min)
            acc = tl.where(first < BIG, first, -1).to(tl.int32)
            rej = (is_child & ((toffs < acc) | (acc < 0))).to(tl.int32)
        else:
            # sampled children: recursive rejection, one child at a time
            for c in range(node + 1, n):
                pc = tl.load(PAR + b * T + c).to(tl.int32)
                x = tl.load(TOK + b * T + c).to(tl.int32)
                if (pc == node) & (acc < 0) & (x >= 0) & (x < V):
                    u = tl.load(U + b * T + c)
                    qrow = Q + (b * TQ + (c - q_shift)) * V
                    qx = tl.load(qrow + x).to(tl.float32)
                    px = tl.load(row + x).to(tl.float32)
                    if has_ws != 0:
                        px = tl.load(wsrow + x)
                    if u * qx * Z < px:
                        acc = c + tl.full([], 0, dtype=tl.int32)
                    elif Z > 0.0:
                        tl.debug_barrier()  # ws[x] read everywhere before it is rewritten
                        s = tl.full([BLOCK_V], 0, dtype=tl.float32)
                        for v0 in range(0, V, BLOCK_V):
                            offs = v0 + voffs
                            m = offs < V
                            qv = tl.load(qrow + offs, mask=m, other=0.0).to(tl.float32)
                            if has_ws != 0:
                                cur = tl.load(wsrow + offs, mask=m, other=0.0)
                            else:
                                cur = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                            r = tl.where(m, tl.maximum(cur / Z - qv, 0.0), 0.0)
                            tl.store(wsrow + offs, r, mask=m)
                            s += r
                        Z = tl.reduce(s, 0, tl.standard._sum_combine)
                        has_ws = tl.full([], 1, dtype=tl.int32)
                        tl.debug_barrier()  # publish ws to every thread of the program
        if acc >= 0:
            tl.store(PATH + b * T + pl, acc.to(tl.int64))
            pl = pl + 1
            node = acc
        else:
            go = tl.full([], 0, dtype=tl.int32)

    if MODE == 0:
        nxt = am
    else:
        row = P + (b * T + node.to(tl.int64)) * V
        u0 = tl.load(U + b * T)
        # residual value at offs (fp32, >= 0): sampled -> ws row (after a rejection at
        # this node), deterministic -> the target row minus rejected tokens; raw != 0
        # (residual without mass, a rounding corner) -> the target row itself.
        raw = tl.full([], 0, dtype=tl.int32)
        zs = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + voffs
            m = offs < V
            if MODE == 1:
                if has_ws != 0:
                    val = tl.load(wsrow + offs, mask=m, other=0.0)
                else:
                    val = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            else:
                val = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                hitv = (offs[:, None] == tok_vec[None, :]) & (rej[None, :] != 0)
                ex = tl.reduce(hitv.to(tl.int32), 1, tl.standard._sum_combine)
                val = tl.where(ex > 0, 0.0, val)
            zs += tl.where(m, tl.maximum(val, 0.0), 0.0)
        Zt = tl.reduce(zs, 0, tl.standard._sum_combine)
        if Zt <= 0.0:
            raw = tl.full([], 1, dtype=tl.int32)
            zs = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + voffs
                m = offs < V
                val = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                zs += tl.where(m, tl.maximum(val, 0.0), 0.0)
            Zt = tl.reduce(zs, 0, tl.standard._sum_combine)
        target = u0 * Zt
        found = tl.full([], -1, dtype=tl.int32)
        last = tl.full([], -1, dtype=tl.int32)
        cum = tl.full([], 0.0, dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            if found < 0:
                offs = v0 + voffs
                m = offs < V
                if MODE == 1:
                    if (has_ws != 0) & (raw == 0):
                        val = tl.load(wsrow + offs, mask=m, other=0.0)
                    else:
                        val = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                else:
                    val = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                    if raw == 0:
                        hitv = (offs[:, None] == tok_vec[None, :]) & (rej[None, :] != 0)
                        ex = tl.reduce(hitv.to(tl.int32), 1, tl.standard._sum_combine)
                        val = tl.where(ex > 0, 0.0, val)
                val = tl.where(m, tl.maximum(val, 0.0), 0.0)
                cs = tl.associative_scan(val, 0, tl.standard._sum_combine) + cum
                hit = (val > 0.0) & (cs > target)
                first = tl.reduce(tl.where(hit, offs, 2147483647), 0,
                                  tl.standard._elementwise_min)
                found = tl.where(first < V, first, found)
                last = tl.maximum(last, tl.reduce(tl.where(val > 0.0, offs, -1), 0,
                                                  tl.standard._elementwise_max))
                cum += tl.reduce(val, 0, tl.standard._sum_combine)
        nxt = tl.where(found >= 0, found, last)
    nxt = tl.maximum(nxt, 0)
    tl.store(NEXT + b, nxt.to(tl.int64))
    tl.store(PLEN + b, pl.to(tl.int64))


def verify_tree(target: torch.Tensor, draft: torch.Tensor | None, tokens: torch.Tensor,
                parents: torch.Tensor, lens: torch.Tensor, uniforms: torch.Tensor | None,
                q_shift: int, mode: int, path: torch.Tensor, path_lens: torch.Tensor,
                next_token: torch.Tensor) -> None:
    """Launch the kernel. Inputs validated and contiguous (see specrt/ops/verify.py).

    target ``[B, T, V]`` fp32/fp16/bf16; draft ``[B, Tq, V]`` (node j's q is row
    ``j - q_shift``) or None unless ``mode == 1``; tokens, parents ``[B, T]`` int64;
    lens ``[B]`` int64; uniforms ``[B, T]`` fp32 (None when greedy); mode 0 greedy,
    1 sampled children, 2 deterministic children. Writes path ``[B, T]``, path_lens
    ``[B]`` and next_token ``[B]`` (int64) in place.
    """
    B, T, V = target.shape
    if B == 0:
        return
    block_t = max(2, triton.next_power_of_2(T))
    # deterministic mode compares each chunk with the node tokens ([BLOCK_V, BLOCK_T]):
    # keep that tile at 8k elements
    cap = 2048 if mode != _DETERMINISTIC else max(128, 8192 // block_t)
    block_v = min(cap, triton.next_power_of_2(V))
    ws = (torch.empty((B, V), dtype=torch.float32, device=target.device) if mode == _SAMPLED
          else torch.empty((1,), dtype=torch.float32, device=target.device))
    q = draft if draft is not None else target
    tq = draft.shape[1] if draft is not None else 0
    u = uniforms if uniforms is not None else ws
    _verify_tree_kernel[(B,)](target, q, tokens, parents, lens, u, ws, path, path_lens,
                              next_token, T, V, tq, q_shift, MODE=mode, BLOCK_V=block_v,
                              BLOCK_T=block_t, num_warps=4 if V <= 8192 else 8)
