"""PretrainedTokenizer: a Hugging Face tokenizer.json (e.g. BERT's WordPiece) behind minillm's interface."""
from __future__ import annotations

import json
import os
from typing import List

from tokenizers import Tokenizer as HFTokenizer

from minillm.tokenizers.hf import HFBackedTokenizer

# Token strings that conventionally play each special role.
_CANDIDATES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "bos": ("<s>", "<|bos|>", "<|endoftext|>"),
    "eos": ("</s>", "<|eos|>", "<|endoftext|>"),
}


class PretrainedTokenizer(HFBackedTokenizer):
    """Wraps a tokenizer.json. With add_special_tokens=True the file's own post-processor frames the
    text (``[CLS] ... [SEP]`` for BERT). Its baked-in padding and truncation are switched off:
    encode_batch decides both."""

    kind = "hf"

    @classmethod
    def from_file(cls, path) -> "PretrainedTokenizer":
        path = os.fspath(path)
        hf = HFTokenizer.from_file(path)
        specials = {}
        for name, options in _CANDIDATES.items():
            for token in options:
                if hf.token_to_id(token) is not None:
                    specials[name] = token
                    break
        tok = cls(hf, specials)
        return tok

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_many(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    chat_template = None  # a Jinja template of the model's chat format (set by loaders that have one: GGUF)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **extra):
        """The conversation `messages` ([{"role": ..., "content": ...}, ...]) in the model's chat format, as
        transformers renders it (a sandboxed Jinja environment, trim_blocks and lstrip_blocks); token ids with
        tokenize=True. `extra` reaches the template as variables."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise ImportError("chat templates need jinja2: pip install jinja2") from exc
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        specials = {f"{role}_token": token for role, token in self.special_tokens.items()}
        text = env.from_string(self.chat_template).render(messages=list(messages),
                                                          add_generation_prompt=add_generation_prompt,
                                                          **specials, **extra)
        return self.encode(text) if tokenize else text

    def save(self, path) -> None:
        """Writes the Hugging Face tokenizer.json itself, loadable by `tokenizers` and by minillm."""
        from minillm.utils import atomic_write_text

        atomic_write_text(path, self._tok.to_str())

    def _to_json(self) -> dict:
        return json.loads(self._tok.to_str())
