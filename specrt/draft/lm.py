"""The small causal LM drafter architecture (``arch = "lm"``).

``k`` Llama decoder layers over the target's token embedding, then a final norm and the
target's LM head restricted to ``vocab_ids`` (all in :class:`~specrt.draft.net.DraftNet`);
usually initialised from the target's first ``k`` layers. It reads nothing of the
target but its tokens, so it also has an HF form (:meth:`LMNet.export_hf`), e.g. as the
assistant model of HF assisted generation.

Between steps (:class:`LMDrafting`): a node's K/V depends only on its token and position,
so the scratch K/V of the accepted tree nodes that were forwarded while drafting is
appended to the drafter's paged cache at :meth:`~specrt.draft.model.ModelDrafter.update`
(equal to recomputing them); only the rest (the bonus token, nodes never forwarded) is
run at the next call.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from specrt import ops
from specrt.cache.paged import OutOfBlocks
from specrt.draft.net import ArchDrafting, DraftNet


class LMNet(DraftNet):
    """The plain causal LM network (arguments as for :class:`DraftNet`)."""

    arch = "lm"

    def embed_input(self, tokens: torch.Tensor, prev: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The token embedding ``[B, T, hidden]`` (``prev`` is ignored)."""
        return F.embedding(tokens, self.embed_weight)

    def drafting(self) -> "LMDrafting":
        return LMDrafting(self)

    def export_hf(self, out_dir: str | Path, target_dir: str | Path) -> Path:
        """Write the drafter as an HF ``LlamaForCausalLM`` directory (its layers, norm,
        the target's embedding and full tied head, the target's tokenizer), e.g. for HF
        assisted generation. LoRA adapters are merged into the copy."""
        import shutil

        from safetensors.torch import save_file

        net = copy.deepcopy(self)
        if net.lora:
            net.merge_lora()
        a, out, td = net.args, Path(out_dir), Path(target_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((td / "config.json").read_text())
        cfg.update(num_hidden_layers=a.num_hidden_layers, tie_word_embeddings=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        qd, kvd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        sd = {"model.embed_tokens.weight": net.embed_weight, "model.norm.weight": net.norm}
        for i, L in enumerate(net.layers):
            p = f"model.layers.{i}."
            q, k, v = L.qkv.weight.split((qd, kvd, kvd))
            g, u = L.gate_up.weight.chunk(2)
            sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                       p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": L.o.weight,
                       p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u,
                       p + "mlp.down_proj.weight": L.down.weight,
                       p + "input_layernorm.weight": L.attn_norm,
                       p + "post_attention_layernorm.weight": L.mlp_norm})
        save_file({k: t.detach().float().contiguous().cpu() for k, t in sd.items()},
                  str(out / "model.safetensors"))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (td / f).is_file():
                shutil.copy(td / f, out / f)
        return out


class LMDrafting(ArchDrafting):
    """Per-request ``scratch``: the last drafted tree's ``{"col": node -> scratch column,
    "kv": per layer (K, V) [S, H_kv, D]}``, or None."""

    state_keys = ("scratch",)

    def begin(self, st: dict, prompt_hidden: torch.Tensor | None) -> None:
        st["scratch"] = None

    def keep_tree(self, st: dict, col: dict | None, kv: list | None) -> None:
        st["scratch"] = None if kv is None else {"col": col, "kv": kv}

    def update(self, drafter, seq, result) -> None:
        """Append the scratch K/V of the accepted, already-forwarded path nodes to the
        drafter's paged cache (same tokens, same positions: equal to recomputing)."""
        st = seq.state
        scratch, st["scratch"] = st.get("scratch"), None
        if scratch is None or len(result.path) < 2:
            return
        cols = []
        for node in result.path[1:]:
            c = scratch["col"].get(node)
            if c is None:
                break
            cols.append(c)
        if not cols:
            return
        cache = drafter.cache
        dlen = st["dlen"]
        n = len(cols)
        try:
            cache.reserve(seq.seq_id, dlen + n)
        except OutOfBlocks:  # the accepted tokens stay pending and are recomputed
            return
        bt = cache.block_table([seq.seq_id])
        idx = torch.tensor(cols, device=drafter.device)
        for li, (k, v) in enumerate(scratch["kv"]):
            ops.append_kv(cache.kv[li], bt, torch.tensor([dlen]),
                          k[None, idx].contiguous(), v[None, idx].contiguous())
        st["dlen"] = dlen + n
        cache.set_length(seq.seq_id, dlen + n)
