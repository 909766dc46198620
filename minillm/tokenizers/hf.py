"""Shared base of the tokenizers backed by Hugging Face `tokenizers` (Rust): encoding in batches
releases the GIL and runs in parallel."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer as HFTokenizer

from minillm.tokenizers.base import Tokenizer


class HFBackedTokenizer(Tokenizer):
    def __init__(self, hf: HFTokenizer, special_tokens: Dict[str, str]):
        hf.no_padding()
        hf.no_truncation()  # padding and truncation are encode_batch's job, the same for every tokenizer
        self._tok = hf
        self.special_tokens = dict(special_tokens)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        seqs = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [self._frame(s) for s in seqs] if add_special_tokens else seqs

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = True) -> str:
        ids = self._ids_list(ids)
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
