"""specrt's kernel API: paged-KV attention over draft trees, KV movement, verification.

Every function takes torch tensors on CPU or CUDA and returns the same result
(within dtype tolerance) on both. :func:`backend_for` documents which
implementation runs where and how ``SPECRT_OPS_BACKEND=triton|cuda|cpu|auto``
(default ``auto``) forces one; ``triton`` with ``TRITON_INTERPRET=1`` runs the Triton
kernels of :mod:`specrt.kernels` on CPU tensors (how CI checks them without a GPU).

Layout of one layer's paged cache (FlashInfer's NHD layout):
``kv_cache`` ``[num_blocks, 2, block_size, H_kv, D]``, index 0 = K, 1 = V;
``block_tables`` ``[B, max_blocks]`` int32, block ids of each sequence in order;
position ``p`` of sequence ``b`` is in block ``block_tables[b, p // block_size]`` at
offset ``p % block_size``.

Modules, one per op family:

* :mod:`specrt.ops.attention`: :func:`plan_tree_attention` (once per step) ->
  :class:`TreeAttentionPlan`, whose :meth:`~TreeAttentionPlan.run` attends one layer;
  :func:`tree_attention` (plan + run in one call); :func:`build_tree_mask`;
  :func:`amx_attention_available` (the CPU kernel's bf16 products on AMX tiles).
* :mod:`specrt.ops.kv`: :func:`append_kv`, :func:`commit_kv`.
* :mod:`specrt.ops.verify`: :func:`verify_tree`, :func:`chain_verify` (lossless
  rejection sampling; the proof and the random-number contract are in its docstring).
* :mod:`specrt.ops._backend`: :func:`backend_for`, the native module, the
  ``torch.ops.specrt`` library.

Every public function dispatches through a ``torch.ops.specrt.*`` custom op (defined
with ``torch.library``, with fake implementations, so code under ``torch.compile``
and other stacks can call them): ``append_kv``, ``commit_kv``, ``verify_tree``,
``chain_verify``, ``tree_attention`` (one shot), ``paged_tree_attention`` and
``gathered_tree_attention`` (the per-layer runs of a Triton / torch plan). The op
implementations, registered for the CPU and CUDA dispatch keys, pick the backend.
"""
from specrt.ops._backend import backend_for, load_native, using_backend, using_native
from specrt.ops.attention import (TreeAttentionPlan, amx_attention_available, build_tree_mask,
                                  plan_tree_attention, tree_attention)
from specrt.ops.kv import append_kv, commit_kv
from specrt.ops.verify import chain_verify, verify_tree

__all__ = ["using_backend", "append_kv", "commit_kv", "tree_attention", "plan_tree_attention",
           "TreeAttentionPlan", "verify_tree", "chain_verify", "backend_for",
           "build_tree_mask", "load_native", "using_native", "amx_attention_available"]
