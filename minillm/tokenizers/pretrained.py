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

    def save(self, path) -> None:
        """Writes the Hugging Face tokenizer.json itself, loadable by `tokenizers` and by minillm."""
        from minillm.utils import atomic_write_text

        atomic_write_text(path, self._tok.to_str())

    def _to_json(self) -> dict:
        return json.loads(self._tok.to_str())
