"""Load an HF model directory (config.json, *.safetensors, tokenizer.json) into :class:`Llama`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from specrt.model.llama import Llama, ModelArgs, rope_inv_freq


def _read_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{d} is not a model directory: config.json is missing")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {d}")
    return files


def load_state_dict(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors files (one or sharded)."""
    sd = {}
    for f in _weight_files(d):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {f}: the file is truncated or not safetensors ({e})"
                             ) from None
    return sd


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Llama:
    """Build a :class:`Llama` from an HF directory.

    q/k/v and gate/up projections are fused into one matrix each at load time.
    Raises ``FileNotFoundError`` for a missing directory or files and ``ValueError``
    for unreadable or incomplete weights.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    args = ModelArgs.from_hf_config(_read_config(d))
    sd = load_state_dict(d)

    def take(name):
        if name not in sd:
            raise ValueError(f"{d}: weight {name!r} is missing")
        return sd.pop(name)

    with torch.device("meta"):
        model = Llama(args)
    new = {"embed.weight": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        new[f"layers.{i}.qkv.weight"] = torch.cat(
            [take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")])
        if args.attention_bias:
            new[f"layers.{i}.qkv.bias"] = torch.cat(
                [take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
        new[f"layers.{i}.o.weight"] = take(a + "o_proj.weight")
        new[f"layers.{i}.gate_up.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        new[f"layers.{i}.down.weight"] = take(p + "mlp.down_proj.weight")
        new[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        new[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
    if not args.tie_word_embeddings:
        if "lm_head.weight" in sd:
            new["lm_head.weight"] = take("lm_head.weight")
        else:  # some checkpoints omit the head although the config says untied
            new["lm_head.weight"] = new["embed.weight"]
    new = {k: v.to(dtype) for k, v in new.items()}
    model.load_state_dict(new, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(args)  # buffers are not in the state dict
    return model.to(device).eval()
