"""CharTokenizer: one id per character, vocabulary built from the text (as nanoGPT's shakespeare_char)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from minillm.tokenizers.base import Tokenizer

DEFAULT_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "mask": "<mask>"}


class CharTokenizer(Tokenizer):
    """Characters get ids 0..n-1 in sorted order (nanoGPT's ids); special tokens follow them.

    ``CharTokenizer.from_texts(texts)`` or ``CharTokenizer().train(texts)`` builds the vocabulary;
    pass ``special_tokens={}`` for exactly nanoGPT's vocabulary. Unknown characters map to <unk>
    (an error when there is no unk token).
    """

    kind = "char"

    def __init__(self, chars: Optional[Iterable[str]] = None, special_tokens: Optional[Dict[str, str]] = None):
        self.special_tokens = dict(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
        self._set_chars(chars or [])

    def _set_chars(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        for c in chars:
            if len(c) != 1:
                raise ValueError(f"CharTokenizer vocabulary entries are single characters, got {c!r}")
        self.itos: List[str] = chars + [t for t in self.special_tokens.values() if t not in chars]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self._n_chars = len(chars)

    def train(self, texts: Union[str, Iterable[str]]) -> "CharTokenizer":
        """Builds the vocabulary from the characters of `texts` (a string or an iterable of strings)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        self._set_chars(set().union(*map(set, texts)) if texts else set())
        return self

    @classmethod
    def from_texts(cls, texts: Union[str, Iterable[str]], special_tokens: Optional[Dict[str, str]] = None):
        return cls(special_tokens=special_tokens).train(texts)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.stoi.get(token)

    def _encode(self, text: str) -> List[int]:
        stoi, unk = self.stoi, self.unk_token_id
        try:
            return [stoi[c] for c in text]
        except KeyError:
            if unk is None:
                missing = sorted({c for c in text if c not in stoi})
                raise ValueError(f"characters {missing[:10]} are not in the vocabulary and there is no <unk>") from None
            return [stoi.get(c, unk) for c in text]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = True) -> str:
        ids = self._ids_list(ids)
        n = len(self.itos)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {n})")
        if skip_special_tokens:
            return "".join(self.itos[i] for i in ids if i < self._n_chars)
        return "".join(self.itos[i] for i in ids)

    def _to_json(self) -> dict:
        return {"chars": self.itos[: self._n_chars]}

    @classmethod
    def _from_json(cls, data: dict) -> "CharTokenizer":
        return cls(chars=data["chars"], special_tokens=data.get("special_tokens", {}))
