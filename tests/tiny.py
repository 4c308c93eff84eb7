"""Tiny random models saved as HF directories (with a small byte-level tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_config(kind: str = "llama", **over) -> dict:
    cfg = {
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if kind == "llama":
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"],
                   attention_bias=False, mlp_bias=False)
    elif kind == "qwen2":
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                   use_sliding_window=False, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    cfg.update(over)
    return cfg


def write_tokenizer(d: Path, vocab_size: int) -> None:
    """A word-level tokenizer over single characters: ids 0..2 special, then printable bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)][: vocab_size - 4]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}a:{% endif %}"}))


def make_tiny_model(d: Path, kind: str = "llama", seed: int = 0, **over) -> Path:
    """Save a random HF model (via transformers) plus tokenizer into ``d``."""
    import transformers

    cfg = tiny_config(kind, **over)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "llama":
        hf_cfg = transformers.LlamaConfig(**cfg)
        model = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Qwen2Config(**cfg)
        model = transformers.Qwen2ForCausalLM(hf_cfg)
    with torch.no_grad():  # larger than default init so logits are not all ~equal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.1)
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d, cfg["vocab_size"])
    return d
