"""Fused tree-attention verification over a paged KV cache (Triton).

One kernel computes, for every draft-tree query of every sequence, attention over
the sequence's committed prefix (no mask: every query sees all of it) followed by
the tree's own tokens (a T x T ancestor mask, read as bits). Call it through
:func:`specrt.ops.tree_attention`; this module is the Triton backend.

Layout (see ``specrt.ops``): ``kv_cache`` ``[num_blocks, 2, block_size, H_kv, D]``
(0 = K, 1 = V), ``block_tables`` ``[B, max_blocks]`` int32; the K/V of position
``p`` of sequence ``b`` is in block ``block_tables[b, p // block_size]`` at offset
``p % block_size``. Tree node ``j`` sits at position ``prefix_lens[b] + j``.

Design:

* **GQA row packing.** One program owns one KV head and a tile of ``BLOCK_M``
  "rows"; row ``r`` is query node ``t = r // G`` of query head ``kv_head * G + r % G``
  (``G = H_q / H_kv``), i.e. the ``T * G`` rows of a KV-head group laid out
  node-major, padded to a power of two >= 16 (``tl.dot`` needs dims >= 16). Every
  K/V tile is therefore loaded once for all query heads that share it.
* **Prefix, then tree.** The prefix loop masks only the ragged tail of the range;
  the tree loop (at most ``ceil(T / BLOCK_N)`` tiles) applies the ancestor mask.
* **Mask bits.** :func:`pack_tree_mask` turns the ``[B, T, T]`` bool mask into
  ``[B, T, W]`` int64 words (``W = ceil(T / 64)``; bit ``j % 64`` of word ``j // 64``
  of row ``(b, i)`` is ``tree_mask[b, i, j]``). It is built once per step and shared
  by every head and layer. ``BLOCK_N`` divides 64, so a tree tile starting at column
  ``j0`` reads a single word per row, ``word[b, t, j0 // 64]``, and tests bit
  ``(word >> (j % 64)) & 1``. ``tree_mask=None`` (causal) needs no bits.
* **Online softmax** in fp32 (running max ``m``, sum ``l``, accumulator ``acc``).
* **Split-KV (flash-decoding).** With few programs (``B * H_kv * row tiles`` well
  below the SM count) and a long prefix, grid axis 2 splits each sequence's prefix
  into ``num_splits`` chunks (chunk = ``ceil(prefix / S)`` rounded up to
  ``BLOCK_N``, computed per sequence inside the kernel, so no host sync); the last
  split also handles the tree. Each split writes its partial ``(m, l, acc)`` to an
  fp32 workspace, and :func:`_merge_kernel` combines them with a log-sum-exp merge.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["tree_attention", "pack_tree_mask", "choose_num_splits", "tile_config"]

_NEG = tl.constexpr(-1.0e30)   # "minus infinity" that keeps exp() and subtraction finite
_MAX_SPLITS = 64


# ---------------------------------------------------------------------------
# mask packing

def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tree mask into int64 bit words, one row of words per node.

    Args:
        tree_mask: ``[B, T, T]`` bool (any dtype convertible to bool);
            ``tree_mask[b, i, j]`` true iff node ``j`` is visible to node ``i``.

    Returns:
        ``[B, T, W]`` int64 on ``tree_mask``'s device, ``W = ceil(T / 64)`` (so one word
        per row for ``T <= 64``): bit ``j % 64`` of ``packed[b, i, j // 64]`` is
        ``tree_mask[b, i, j]``. Build it once per decoding step and pass it as
        ``packed_mask=`` to every layer's :func:`tree_attention`.
    """
    if tree_mask.dim() != 3 or tree_mask.shape[1] != tree_mask.shape[2]:
        raise ValueError(f"tree_mask must be [B, T, T], got {tuple(tree_mask.shape)}")
    B, T, _ = tree_mask.shape
    W = max(1, triton.cdiv(T, 64))
    m = tree_mask.bool()
    if W * 64 != T:
        m = torch.nn.functional.pad(m, (0, W * 64 - T))
    m = m.reshape(B, T, W, 64).to(torch.int64)
    shifts = torch.arange(64, device=m.device, dtype=torch.int64)
    # distinct bits: the int64 sum is the bitwise OR (bit 63 wraps to the sign bit)
    return (m << shifts).sum(-1).contiguous()


# ---------------------------------------------------------------------------
# kernels

@triton.jit
def _tree_attn_kernel(
    Q, KV, BT, PREFIX, TLEN, MASK, OUT, WS_ACC, WS_M, WS_L,
    sq_b, sq_t, sq_h,
    so_b, so_t, so_h,
    s_blk, s_kv, s_pos,
    max_blocks, T, Hq, Hkv, n_words, scale,
    BLOCK_SIZE: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    t = offs_m // G                      # query node of each row
    h = kvh * G + offs_m % G             # query head of each row
    row_in = offs_m < T * G
    if HAS_TLEN:
        tlen = tl.load(TLEN + b).to(tl.int32)
    else:
        tlen = T
    row_ok = row_in & (t < tlen)

    q_ptrs = Q + b64 * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    prefix = tl.load(PREFIX + b).to(tl.int32)
    if NUM_SPLITS == 1:
        lo = 0
        hi = prefix
    else:
        chunk = tl.cdiv(tl.cdiv(prefix, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = tl.minimum(split * chunk, prefix)
        hi = tl.minimum(lo + chunk, prefix)

    bt_row = BT + b64 * max_blocks
    kv_head = KV + kvh * D

    # ---- prefix: every row sees every column; only the range tail is masked
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        col_ok = pos < hi
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
        base = blk * s_blk + (pos % BLOCK_SIZE) * s_pos                      # [BLOCK_N]
        kt = tl.load(kv_head + base[None, :] + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(kv_head + s_kv + base[:, None] + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
        s = tl.where(col_ok[None, :], s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # ---- tree: columns j < tree_len at positions prefix + j, ancestor mask
    tree_hi = tlen
    if CAUSAL:
        # rows of this tile are nodes <= last_t; causal columns beyond it are invisible
        last_t = (pid_m * BLOCK_M + BLOCK_M - 1) // G
        tree_hi = tl.minimum(tree_hi, last_t + 1)
    if NUM_SPLITS > 1:
        tree_hi = tl.where(split == NUM_SPLITS - 1, tree_hi, 0)
    mask_row = MASK + (b64 * T + t) * n_words                                 # [BLOCK_M]
    for j0 in range(0, tree_hi, BLOCK_N):
        j = j0 + offs_n
        col_ok = j < tree_hi
        pos = prefix + j
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
        base = blk * s_blk + (pos % BLOCK_SIZE) * s_pos
        kt = tl.load(kv_head + base[None, :] + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(kv_head + s_kv + base[:, None] + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
        if CAUSAL:
            vis = t[:, None] >= j[None, :]
        else:
            # BLOCK_N divides 64: the whole tile lies in word j0 // 64 of each row
            word = tl.load(mask_row + j0 // 64, mask=row_ok, other=0)         # int64 [BLOCK_M]
            sh = (j % 64).to(tl.int64)
            vis = ((word[:, None] >> sh[None, :]) & 1) != 0
        vis = vis & col_ok[None, :]
        s = tl.where(vis, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        p = tl.where(vis, p, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o = tl.where((row_ok & (l_i > 0))[:, None], o, 0.0)
        o_ptrs = OUT + b64 * so_b + t[:, None] * so_t + h[:, None] * so_h + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_in[:, None])
    else:
        # workspace [B, T, Hq, NUM_SPLITS, (D)] fp32
        ws_row = ((b64 * T + t) * Hq + h) * NUM_SPLITS + split
        tl.store(WS_M + ws_row, m_i, mask=row_in)
        tl.store(WS_L + ws_row, l_i, mask=row_in)
        tl.store(WS_ACC + ws_row[:, None] * D + offs_d[None, :], acc, mask=row_in[:, None])


@triton.jit
def _merge_kernel(
    WS_ACC, WS_M, WS_L, OUT, TLEN,
    so_b, so_t, so_h, T, Hq,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, HAS_TLEN: tl.constexpr,
):
    pid = tl.program_id(0)               # over B * T * Hq, (b, t, h) row-major
    h = pid % Hq
    t = (pid // Hq) % T
    b = pid // (Hq * T)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < NUM_SPLITS
    row = pid.to(tl.int64) * NUM_SPLITS + offs_s
    m = tl.load(WS_M + row, mask=s_ok, other=_NEG)
    l = tl.load(WS_L + row, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_ok, tl.exp(m - m_max), 0.0)
    l_tot = tl.sum(l * w, 0)
    acc = tl.load(WS_ACC + row[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0)
    if HAS_TLEN:
        tlen = tl.load(TLEN + b).to(tl.int32)
    else:
        tlen = T
    ok = (l_tot > 0) & (t < tlen)
    o = tl.where(ok, o / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    tl.store(OUT + b.to(tl.int64) * so_b + t * so_t + h * so_h + offs_d,
             o.to(OUT.dtype.element_ty))


# ---------------------------------------------------------------------------
# host side

def tile_config(rows: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Tile sizes for ``rows = T * G`` packed query rows and head dim ``D``.

    Returns:
        ``(BLOCK_M, BLOCK_N, num_warps)``. ``BLOCK_M`` = rows padded to a power of two,
        at least 16 and at most 128 for fp16/bf16 (64 for ``D = 256``), 32 for fp32 (16
        for ``D = 256``). ``BLOCK_N`` = 64 for fp16/bf16 (32 for ``D = 256``) and 16 for
        fp32, whose "ieee" ``tl.dot`` runs on FMAs and is register-hungry; it always
        divides 64, which the mask-word read relies on. Checked with ``ptxas -v`` for
        sm_90: no register spills for these choices.
    """
    if dtype == torch.float32:
        cap, block_n, warp_at = (32 if D <= 128 else 16), 16, 32 * 128
    else:
        cap, block_n, warp_at = (128 if D <= 128 else 64), (64 if D <= 128 else 32), 64 * max(D, 128)
    block_m = min(cap, max(16, triton.next_power_of_2(rows)))
    num_warps = 8 if block_m * D >= warp_at else 4
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(B: int, Hkv: int, n_row_tiles: int, max_prefix: int,
                      device: torch.device) -> int:
    """Split-KV factor picked when ``num_splits=None``.

    Args:
        B, Hkv, n_row_tiles: the single-pass grid is ``B * Hkv * n_row_tiles`` programs.
        max_prefix: an upper bound on the prefix length (host-side, no device sync).
        device: q's device.

    Returns:
        1 (single pass) on non-CUDA devices, when the single-pass grid already fills
        half the SMs, or when the prefix is shorter than 1024; otherwise enough splits
        for about two programs per SM, with chunks of at least 256 positions, at most 64.
    """
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    progs = B * Hkv * n_row_tiles
    if 2 * progs > sms or max_prefix < 1024:
        return 1
    return max(1, min(triton.cdiv(2 * sms, progs), max_prefix // 256, _MAX_SPLITS))


def tree_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None,
                   tree_lens: torch.Tensor | None, scale: float, *,
                   packed_mask: torch.Tensor | None = None, num_splits: int | None = None,
                   out: torch.Tensor | None = None, max_prefix_len: int | None = None
                   ) -> torch.Tensor:
    """Tree attention over a paged KV cache (Triton backend of ``specrt.ops.tree_attention``).

    Args:
        q: ``[B, T, H_q, D]`` fp16, bf16 or fp32 (last dim contiguous; other strides
            free). ``D`` a power of two in 16..256; ``H_q`` a multiple of ``H_kv``.
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``, q's dtype, contiguous; the
            tree tokens' K/V already written at ``prefix_lens[b] + j``, ``j < T``.
        block_tables: ``[B, max_blocks]`` int32, contiguous.
        prefix_lens: ``[B]`` int64 on q's device: committed positions, all visible.
        tree_mask: ``[B, T, T]`` bool or None (causal). Ignored if ``packed_mask`` given.
        tree_lens: ``[B]`` int64 on q's device, or None (all T valid). Rows
            ``t >= tree_lens[b]`` output 0; tree columns ``>= tree_lens[b]`` are ignored.
        scale: softmax scale (float).
        packed_mask: ``[B, T, W]`` (or ``[B, T]`` when ``T <= 64``) int64 from
            :func:`pack_tree_mask`; takes precedence over ``tree_mask``.
        num_splits: split-KV factor; None picks with :func:`choose_num_splits`
            (always 1 off CUDA); 1 forces the single-pass kernel; ``S > 1`` the
            split + merge kernels (at most 64).
        out: optional preallocated ``[B, T, H_q, D]`` in q's dtype (last dim
            contiguous); every element is written.
        max_prefix_len: optional host-side bound on ``prefix_lens`` used only by the
            split heuristic (default ``max_blocks * block_size``, no device sync).

    Returns:
        ``out``: ``[B, T, H_q, D]`` in q's dtype; fp32 accumulation.
    """
    B, T, Hq, D = q.shape
    _, _, bs, Hkv, Dk = kv_cache.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"q heads/dim {Hq}x{D} incompatible with cache {Hkv}x{Dk}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or kv_cache.dtype != q.dtype:
        raise ValueError(f"q/kv_cache dtypes {q.dtype}/{kv_cache.dtype}: expected the same "
                         "fp16, bf16 or fp32")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    G = Hq // Hkv
    dev = q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=dev)
    elif (tuple(out.shape) != (B, T, Hq, D) or out.dtype != q.dtype or out.device != dev
          or out.stride(-1) != 1):
        raise ValueError(f"out must be [{B}, {T}, {Hq}, {D}] {q.dtype} on {dev} with a "
                         f"contiguous last dim, got {tuple(out.shape)} {out.dtype}")
    if B == 0 or T == 0:
        return out
    block_tables = block_tables.contiguous()
    prefix = prefix_lens.to(device=dev, dtype=torch.int64).contiguous()
    has_tlen = tree_lens is not None
    tlen = tree_lens.to(device=dev, dtype=torch.int64).contiguous() if has_tlen else prefix

    causal = packed_mask is None and tree_mask is None
    W = max(1, triton.cdiv(T, 64))
    if causal:
        packed = prefix                            # never read
    else:
        packed = pack_tree_mask(tree_mask.to(dev)) if packed_mask is None else packed_mask
        if packed.dim() == 2:
            packed = packed.unsqueeze(-1)
        if tuple(packed.shape) != (B, T, W) or packed.dtype != torch.int64:
            raise ValueError(f"packed_mask must be [B={B}, T={T}, {W}] int64, got "
                             f"{tuple(packed.shape)} {packed.dtype}")
        packed = packed.to(dev).contiguous()

    rows = T * G
    block_m, block_n, num_warps = tile_config(rows, D, q.dtype)
    n_m = triton.cdiv(rows, block_m)
    if num_splits is None:
        bound = max_prefix_len if max_prefix_len is not None else block_tables.shape[1] * bs
        num_splits = choose_num_splits(B, Hkv, n_m, int(bound), dev)
    S = int(num_splits)
    if not 1 <= S <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{_MAX_SPLITS}, got {S}")
    prec = "ieee" if q.dtype == torch.float32 else "tf32"

    if S > 1:
        ws_acc = torch.empty((B, T, Hq, S, D), dtype=torch.float32, device=dev)
        ws_m = torch.empty((B, T, Hq, S), dtype=torch.float32, device=dev)
        ws_l = torch.empty((B, T, Hq, S), dtype=torch.float32, device=dev)
    else:
        ws_acc = ws_m = ws_l = out                 # never touched
    grid = (B * Hkv, n_m, S)
    _tree_attn_kernel[grid](
        q, kv_cache, block_tables, prefix, tlen, packed, out, ws_acc, ws_m, ws_l,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_tables.shape[1], T, Hq, Hkv, W, float(scale),
        BLOCK_SIZE=bs, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=S,
        CAUSAL=causal, HAS_TLEN=has_tlen, DOT_PREC=prec,
        num_warps=num_warps, num_stages=2,
    )
    if S > 1:
        _merge_kernel[(B * T * Hq,)](
            ws_acc, ws_m, ws_l, out, tlen,
            out.stride(0), out.stride(1), out.stride(2), T, Hq,
            NUM_SPLITS=S, S_PAD=max(2, triton.next_power_of_2(S)), D=D, HAS_TLEN=has_tlen,
            num_warps=4 if D >= 128 else 2,
        )
    return out
