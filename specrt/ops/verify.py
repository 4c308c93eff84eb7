"""Lossless verification of draft trees (rejection sampling): :func:`verify_tree` and
its chain special case :func:`chain_verify` (re-exported by :mod:`specrt.ops`).

Each public function draws its uniforms (see "Random numbers" below) and calls its
custom op, ``torch.ops.specrt.verify_tree`` / ``torch.ops.specrt.chain_verify``; the
op's CPU/CUDA implementation validates the arguments and runs the backend.
Three implementations of one algorithm, picked by :func:`specrt.ops.backend_for`:
``cpu`` -> specrt._C (csrc/verify_cpu.cpp), ``triton`` -> specrt/kernels/verify.py, ``cuda`` ->
specrt._C CUDA code (csrc/verify_cuda.cu). All of them read the same uniform random
numbers, so given the same ``uniforms`` they agree (up to fp32 summation order).

Algorithm, per batch row (n = tree_lens[b] valid nodes, node 0 the root)::

    node = 0, path = [0], residual r = P[node], Z = 1
    visit the children c of node (parents[c] == node, c < n) in index order:
      greedy:        accept c iff tokens[c] == argmax P[node]
      sampled:       accept c iff u[c] * q_c(x_c) * Z < r(x_c)       [min(1, p/q)]
                     else r <- max(r / Z - q_c, 0), Z <- sum(r)       [residual]
      deterministic: accept c iff u[c] * Z < r(x_c)                   [q = one-hot]
                     else r(x_c) <- 0, Z <- Z - P[node](x_c)
      accepted: path += [c], node = c, r = P[c], Z = 1, repeat
    next_token = argmax P[node] (greedy) or the inverse-CDF draw with u[0] from r / sum(r)

Why it is lossless (sampled children, SpecInfer's recursive rejection): if x ~ q and is
accepted with prob min(1, p(x)/q(x)), then P(emit x) = min(p, q)(x) and P(reject) =
1 - sum min(p, q) = sum max(p - q, 0), so emitting x on acceptance and otherwise a draw
from norm(max(p - q, 0)) emits exactly p. The next sibling is an independent draw from q
and faces the residual distribution as its "p", so by induction over the siblings the
token leaving a node is distributed as P[node]; on acceptance the target continues from
P[child], the target's own distribution after that token.
Deterministic children are the case q = one-hot(x_c): accept prob = p(x_c) and the
residual is p with x_c removed, which is the same as drawing x ~ p once and following
the child whose token is x (the first one, for repeated tokens), else emitting x.

Random numbers: every non-greedy call consumes exactly one
``torch.rand((B, T), generator=generator, device=target_probs.device)`` (or the
``uniforms`` you pass): ``u[b, c]`` for ``c >= 1`` is the acceptance uniform of node c
(each node is tested at most once), ``u[b, 0]`` draws next_token. Greedy draws nothing.

Input probabilities are taken as normalised rows (as made by
:func:`specrt.sampling.logits_to_probs`); the residual masses are computed exactly.
"""
from __future__ import annotations

import torch

from specrt.ops._backend import LIB, backend_for, current_stream, native

__all__ = ["verify_tree", "chain_verify"]

_GREEDY, _SAMPLED, _DETERMINISTIC = 0, 1, 2
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------------------
# validation

def _check_probs(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, V] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.dtype not in _DTYPE_CODE:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _validate(target_probs, tokens, parents, tree_lens, draft_probs, q_shift, uniforms,
              values: bool):
    _check_probs(target_probs, "target_probs")
    B, T, V = target_probs.shape
    if T < 1 or V < 1:
        raise ValueError(f"target_probs needs T >= 1 and V >= 1, got {tuple(target_probs.shape)}")
    for name, t in (("tokens", tokens), ("parents", parents)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be [B={B}, T={T}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if not isinstance(tree_lens, torch.Tensor) or tuple(tree_lens.shape) != (B,):
        raise ValueError(f"tree_lens must be [B={B}], got "
                         f"{tuple(tree_lens.shape) if isinstance(tree_lens, torch.Tensor) else type(tree_lens)}")
    if tree_lens.dtype.is_floating_point:
        raise ValueError(f"tree_lens must be an integer tensor, got {tree_lens.dtype}")
    dev = target_probs.device
    for name, t in (("tokens", tokens), ("parents", parents), ("tree_lens", tree_lens)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, target_probs on {dev}")
    if draft_probs is not None:
        _check_probs(draft_probs, "draft_probs")
        want = (B, T - q_shift, V)
        if tuple(draft_probs.shape) != want:
            raise ValueError(f"draft_probs must be {list(want)} like target_probs, got "
                             f"{tuple(draft_probs.shape)}")
        if draft_probs.dtype != target_probs.dtype:
            raise ValueError(f"draft_probs dtype {draft_probs.dtype} differs from "
                             f"target_probs dtype {target_probs.dtype}")
        if draft_probs.device != dev:
            raise ValueError(f"draft_probs is on {draft_probs.device}, target_probs on {dev}")
    if uniforms is not None:
        if (not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (B, T)
                or uniforms.dtype != torch.float32 or uniforms.device != dev):
            raise ValueError(f"uniforms must be a [B={B}, T={T}] float32 tensor on {dev}")
    if not values:
        return
    # value checks (host-side; skipped on CUDA unless validate=True: they synchronise)
    lens = tree_lens.long()
    if bool(((lens < 1) | (lens > T)).any()):
        raise ValueError(f"tree_lens must be in [1, T={T}], got {lens.tolist()[:16]}")
    par = parents.long()
    idx = torch.arange(T, device=dev)
    valid = idx[None, :] < lens[:, None]
    if bool((par[:, 0] != -1).any()):
        raise ValueError("parents[:, 0] must be -1 (node 0 is the root)")
    inner = valid.clone()
    inner[:, 0] = False
    bad = inner & ((par < 0) | (par >= idx[None, :]))
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"parents[{b}, {i}] = {int(par[b, i])}: every node i >= 1 needs "
                         f"0 <= parents[i] < i")
    tok = tokens.long()
    badt = inner & ((tok < 0) | (tok >= V))
    if bool(badt.any()):
        b, i = (int(v) for v in badt.nonzero()[0])
        raise ValueError(f"tokens[{b}, {i}] = {int(tok[b, i])} is outside the vocabulary [0, {V})")


# ---------------------------------------------------------------------------
# dispatch

def _half_view(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint16) if x.dtype in (torch.float16, torch.bfloat16) else x


def _run(target_probs, tokens, parents, tree_lens, draft_probs, q_shift, mode, uniforms):
    """Run one implementation. All tensors validated; returns (path, path_lens, next)."""
    B, T, V = target_probs.shape
    dev = target_probs.device
    target_probs = target_probs.contiguous()
    tok = tokens.to(torch.int64).contiguous()
    par = parents.to(torch.int64).contiguous()
    lens = tree_lens.to(torch.int64).contiguous()
    q = draft_probs.contiguous() if (mode == _SAMPLED) else None
    path = torch.empty((B, T), dtype=torch.int64, device=dev)
    plen = torch.empty((B,), dtype=torch.int64, device=dev)
    nxt = torch.empty((B,), dtype=torch.int64, device=dev)
    if B == 0:
        return path, plen, nxt
    u = uniforms.contiguous() if uniforms is not None else None
    backend = backend_for(target_probs)
    if backend == "triton":
        from specrt.kernels import verify as kern

        kern.verify_tree(target_probs, q, tok, par, lens, u, q_shift, mode, path, plen, nxt)
    elif backend == "cuda":
        ws = (torch.empty((B, V), dtype=torch.float32, device=dev) if mode == _SAMPLED
              else None)
        native().verify_tree_cuda(
            target_probs.data_ptr(), 0 if q is None else q.data_ptr(),
            _DTYPE_CODE[target_probs.dtype], tok.data_ptr(), par.data_ptr(), lens.data_ptr(),
            0 if u is None else u.data_ptr(), 0 if ws is None else ws.data_ptr(),
            path.data_ptr(), plen.data_ptr(), nxt.data_ptr(), B, T, V,
            0 if q is None else q.shape[1], q_shift, mode,
            current_stream(dev))
    else:
        dummy = torch.zeros((1, 1, 1), dtype=target_probs.dtype)
        qq = q if q is not None else dummy
        uu = u if u is not None else torch.zeros((1, 1), dtype=torch.float32)
        native().verify_tree(_half_view(target_probs).numpy(), _half_view(qq).numpy(),
                             _DTYPE_CODE[target_probs.dtype], tok.numpy(), par.numpy(),
                             lens.numpy(), uu.numpy(), mode, q_shift, path.numpy(),
                             plen.numpy(), nxt.numpy())
    return path, plen, nxt


def _draw_uniforms(B, T, device, generator):
    return torch.rand((B, T), generator=generator, device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------
# public API

def verify_tree(target_probs: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                tree_lens: torch.Tensor, draft_probs: torch.Tensor | None = None, *,
                greedy: bool = False, generator: torch.Generator | None = None,
                uniforms: torch.Tensor | None = None, validate: bool | None = None):
    """Accept a path of a draft tree and sample the token after it, losslessly.

    Args:
        target_probs: ``[B, T, V]`` float32 (float16 / bfloat16 accepted, read as fp32):
            the target's processed distribution of the token *after* node i.
        tokens: ``[B, T]`` int: token of each node (``tokens[:, 0]``, the root, is unused).
        parents: ``[B, T]`` int: ``parents[:, 0] = -1``; ``0 <= parents[b, i] < i``
            for ``1 <= i < tree_lens[b]``.
        tree_lens: ``[B]`` int in ``[1, T]``: valid nodes per row (the rest is ignored).
        draft_probs: ``[B, T, V]`` (target's dtype) or None. Row ``j >= 1`` is the
            distribution node j's token was drawn from (i.i.d. siblings share one row
            value); row 0 is unused. None: children were chosen deterministically
            (top-k / n-gram / greedy drafting).
        greedy: accept while a child's token is the target's argmax (first max on ties);
            next_token = argmax. Needs no random numbers; draft_probs is ignored.
        generator: ``torch.Generator`` on target_probs' device for the uniforms.
        uniforms: ``[B, T]`` float32 in ``[0, 1)`` to use instead of drawing them
            (``u[b, c]`` decides node c, ``u[b, 0]`` draws next_token).
        validate: check values (parents < index, tree_lens range, tokens in vocabulary);
            default True on CPU, False on CUDA (the checks synchronise with the host).

    Returns:
        ``(path, path_lens, next_token)``: ``path`` ``[B, T]`` int64, the accepted node
        indices in order (``path[b, 0] = 0``, ``-1`` from ``path_lens[b]`` on);
        ``path_lens`` ``[B]`` int64 ``>= 1`` (root included); ``next_token`` ``[B]``
        int64, sampled from the target's residual after the last accepted node. The
        emitted tokens are ``tokens[b, path[b, 1:path_lens[b]]]`` then ``next_token[b]``.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, and (when validating) on
        parents not in ``[0, i)``, tree_lens outside ``[1, T]``, tokens outside ``[0, V)``.
    """
    _check_probs(target_probs, "target_probs")
    if not greedy and uniforms is None:
        B, T, _ = target_probs.shape
        uniforms = _draw_uniforms(B, T, target_probs.device, generator)
    return _verify_tree_op(target_probs, tokens, parents, tree_lens, draft_probs, bool(greedy),
                           uniforms, None if validate is None else bool(validate))


def _chain_generator(device, generator, seed, offset):
    if generator is not None or seed is None:
        return generator
    s = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    o = 0 if offset is None else (int(offset.item()) if isinstance(offset, torch.Tensor)
                                  else int(offset))
    g = torch.Generator(device=device)
    g.manual_seed((s * 0x9E3779B1 + o) & 0xFFFF_FFFF_FFFF)
    return g


def chain_verify(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                 target_probs: torch.Tensor,
                 maybe_output_accepted_token_num: torch.Tensor | None = None,
                 maybe_output_emitted_draft_token_num: torch.Tensor | None = None,
                 deterministic: bool = True, generator: torch.Generator | None = None,
                 seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None,
                 *, uniforms: torch.Tensor | None = None, validate: bool | None = None):
    """Drop-in for ``flashinfer.sampling.chain_speculative_sampling`` (chains of K drafts).

    Args:
        draft_probs: ``[B, K, V]`` float32 (fp16/bf16 accepted): the draft distribution
            each draft token was sampled from.
        draft_token_ids: ``[B, K]`` int: the draft tokens.
        target_probs: ``[B, K + 1, V]``, target's dtype as draft_probs: row i is the
            target distribution after i draft tokens.
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: ``[B]``
            int tensors or None; if given, this call's counts are *added* to them in place
            (FlashInfer's behaviour) and they are returned.
        deterministic: accepted for compatibility (this implementation is always
            deterministic given its random numbers).
        generator: ``torch.Generator`` for the uniforms. ``seed`` / ``offset`` (when no
            generator): seed a fresh generator from them (not FlashInfer's Philox stream;
            tensors are read on the host).
        uniforms: ``[B, K + 1]`` float32 to use instead of drawing: ``u[:, i]`` (i >= 1)
            decides draft token i - 1, ``u[:, 0]`` samples the final token; the same layout
            as :func:`verify_tree` on the chain tree (root = node 0, draft i -> node i + 1).

    Returns:
        ``(output_token_ids, output_accepted_token_num, output_emitted_draft_token_num)``:
        ``[B, K + 1]`` int32, the accepted draft tokens, then the correction / bonus token,
        then ``-1`` padding; ``[B]`` int32, the draft tokens that pass their own acceptance
        test ``u * q(x) < p(x)`` against the raw target row, counted independently of
        earlier rejections (FlashInfer's metric); ``[B]`` int32, the length of the
        accepted prefix (the draft tokens actually emitted).
    """
    del deterministic
    B, K, _ = _check_chain(draft_probs, draft_token_ids, target_probs)
    if uniforms is None:
        dev = target_probs.device
        uniforms = _draw_uniforms(B, K + 1, dev, _chain_generator(dev, generator, seed, offset))
    out, accepted, emitted = _chain_verify_op(draft_probs, draft_token_ids, target_probs,
                                              uniforms, None if validate is None else bool(validate))
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num.add_(accepted.to(maybe_output_accepted_token_num.dtype))
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num.add_(
            emitted.to(maybe_output_emitted_draft_token_num.dtype))
        emitted = maybe_output_emitted_draft_token_num
    return out, accepted, emitted


def _check_chain(draft_probs, draft_token_ids, target_probs) -> tuple[int, int, int]:
    if not isinstance(draft_probs, torch.Tensor) or draft_probs.dim() != 3:
        raise ValueError("draft_probs must be [B, K, V]")
    if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 3:
        raise ValueError("target_probs must be [B, K + 1, V]")
    B, K, V = draft_probs.shape
    if tuple(target_probs.shape) != (B, K + 1, V):
        raise ValueError(f"target_probs must be [B={B}, K+1={K + 1}, V={V}], got "
                         f"{tuple(target_probs.shape)}")
    if not isinstance(draft_token_ids, torch.Tensor) or tuple(draft_token_ids.shape) != (B, K):
        raise ValueError(f"draft_token_ids must be [B={B}, K={K}]")
    if draft_token_ids.device != target_probs.device:
        raise ValueError(f"draft_token_ids is on {draft_token_ids.device}, target_probs on "
                         f"{target_probs.device}")
    return B, K, V


# ---------------------------------------------------------------------------
# torch.ops.specrt implementations (CPU and CUDA dispatch keys)

def _mode(greedy: bool, draft_probs) -> int:
    if greedy:
        return _GREEDY
    return _SAMPLED if draft_probs is not None else _DETERMINISTIC


def _verify_tree_impl(target_probs, tokens, parents, tree_lens, draft_probs, greedy, uniforms,
                      validate=None):
    if validate is None:
        validate = not target_probs.is_cuda
    _validate(target_probs, tokens, parents, tree_lens, None if greedy else draft_probs, 0,
              uniforms, validate)
    mode = _mode(greedy, draft_probs)
    if mode != _GREEDY and uniforms is None:             # a direct op call: default generator
        B, T, _ = target_probs.shape
        uniforms = _draw_uniforms(B, T, target_probs.device, None)
    return _run(target_probs, tokens, parents, tree_lens,
                draft_probs if mode == _SAMPLED else None, 0, mode,
                uniforms if mode != _GREEDY else None)


def _chain_verify_impl(draft_probs, draft_token_ids, target_probs, uniforms, validate=None):
    B, K, V = _check_chain(draft_probs, draft_token_ids, target_probs)
    dev = target_probs.device
    T = K + 1
    ids = draft_token_ids.to(torch.int64)
    tokens = torch.cat([torch.zeros((B, 1), dtype=torch.int64, device=dev), ids], dim=1)
    parents = (torch.arange(T, device=dev, dtype=torch.int64) - 1).expand(B, T).contiguous()
    lens = torch.full((B,), T, dtype=torch.int64, device=dev)
    if validate is None:
        validate = not target_probs.is_cuda
    _validate(target_probs, tokens, parents, lens, draft_probs, 1, uniforms, validate)
    if uniforms is None:                                 # a direct op call: default generator
        uniforms = _draw_uniforms(B, T, dev, None)
    path, plen, nxt = _run(target_probs, tokens, parents, lens, draft_probs, 1, _SAMPLED,
                           uniforms)
    emitted = plen - 1                                             # [B]
    pos = torch.arange(T, device=dev)
    padded = torch.cat([ids, ids.new_full((B, 1), -1)], 1)
    out = torch.where(pos[None, :] < emitted[:, None], padded,
                      torch.where(pos[None, :] == emitted[:, None], nxt[:, None],
                                  torch.full_like(padded, -1)))
    # FlashInfer's accepted count: each draft token's own test, ignoring earlier rejections
    safe = ids.clamp(0, V - 1)[..., None]
    p = target_probs[:, :K].gather(2, safe)[..., 0].float()
    q = draft_probs.gather(2, safe)[..., 0].float()
    accepted = (uniforms[:, 1:] * q < p).sum(1).to(torch.int32)
    return out.to(torch.int32), accepted, emitted.to(torch.int32)


LIB.define("verify_tree(Tensor target_probs, Tensor tokens, Tensor parents, Tensor tree_lens, "
           "Tensor? draft_probs, bool greedy, Tensor? uniforms, bool? validate=None) "
           "-> (Tensor, Tensor, Tensor)")
LIB.define("chain_verify(Tensor draft_probs, Tensor draft_token_ids, Tensor target_probs, "
           "Tensor? uniforms, bool? validate=None) -> (Tensor, Tensor, Tensor)")
for _key in ("CPU", "CUDA"):
    LIB.impl("verify_tree", _verify_tree_impl, _key)
    LIB.impl("chain_verify", _chain_verify_impl, _key)


@torch.library.register_fake("specrt::verify_tree", lib=LIB)
def _(target_probs, tokens, parents, tree_lens, draft_probs, greedy, uniforms, validate=None):
    _validate(target_probs, tokens, parents, tree_lens, None if greedy else draft_probs, 0,
              uniforms, False)
    B, T, _ = target_probs.shape
    return (target_probs.new_empty((B, T), dtype=torch.int64),
            target_probs.new_empty((B,), dtype=torch.int64),
            target_probs.new_empty((B,), dtype=torch.int64))


@torch.library.register_fake("specrt::chain_verify", lib=LIB)
def _(draft_probs, draft_token_ids, target_probs, uniforms, validate=None):
    B, K, _ = _check_chain(draft_probs, draft_token_ids, target_probs)
    return (draft_probs.new_empty((B, K + 1), dtype=torch.int32),
            draft_probs.new_empty((B,), dtype=torch.int32),
            draft_probs.new_empty((B,), dtype=torch.int32))


_verify_tree_op = torch.ops.specrt.verify_tree.default
_chain_verify_op = torch.ops.specrt.chain_verify.default
