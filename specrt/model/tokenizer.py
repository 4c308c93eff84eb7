"""Tokenizer (``tokenizers``) with the model's chat template and incremental detokenization."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Encode/decode, chat template, end-of-sequence ids of one model directory."""

    def __init__(self, model_dir: str | Path, eos_ids: list[int] | None = None):
        d = Path(model_dir)
        f = d / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{d}: tokenizer.json is missing")
        try:
            self.tok = _HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read {f}: {e}") from None
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        ids = set(eos_ids or [])
        gen = d / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([e] if isinstance(e, int) else (e or []))
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            ids.add(self.tok.token_to_id(self.eos_token))
        self.eos_ids = sorted(ids)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_token:
            bos = self.tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, prompt: str | list[dict]) -> str:
        """Render a user prompt (or a message list) with the model's chat template,
        ending with the assistant's generation prompt."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; generate with chat=False")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token or "",
                                     eos_token=self.eos_token or "")

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt, through the chat template when ``chat`` and one exists."""
        if chat and self.chat_template:
            # the template writes special tokens (bos, <|im_start|>) itself
            return self.encode(self.apply_chat_template(prompt), add_special=False)
        return self.encode(prompt)


def _token_str(t) -> str | None:
    if isinstance(t, dict):  # {"content": "<s>", ...}
        return t.get("content")
    return t


class Detokenizer:
    """Incremental decoding of a growing id list: :meth:`push` returns the new text.

    Text is held back while the tail decodes to an incomplete UTF-8 character.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return delta
