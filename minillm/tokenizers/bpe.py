"""BPETokenizer: byte-level BPE (GPT-2 style), trained and run by Hugging Face `tokenizers`."""
from __future__ import annotations

import json
from typing import Dict, Iterable, Optional, Union

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minillm.tokenizers.hf import HFBackedTokenizer

DEFAULT_SPECIALS = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|bos|>", "eos": "<|eos|>", "mask": "<|mask|>"}


class BPETokenizer(HFBackedTokenizer):
    """Byte-level BPE: any Unicode string encodes without unknown tokens, and
    ``decode(encode(s), skip_special_tokens=False) == s`` always (with the default decode too when
    `s` holds no special-token string). Special tokens are never split.

        tok = BPETokenizer(vocab_size=8000); tok.train(texts); ids = tok.encode("hello")
    """

    kind = "bpe"

    def __init__(self, vocab_size: int = 8000, special_tokens: Optional[Dict[str, str]] = None,
                 min_frequency: int = 2):
        specials = dict(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
        alphabet = len(pre_tokenizers.ByteLevel.alphabet())
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < alphabet + len(specials):
            raise ValueError(f"vocab_size must be an int >= {alphabet + len(specials)} (256 bytes + "
                             f"{len(specials)} special tokens), got {vocab_size!r}")
        self.target_vocab_size, self.min_frequency = vocab_size, min_frequency
        super().__init__(self._new_hf(), specials)
        self._tok.add_special_tokens(list(specials.values()))

    @staticmethod
    def _new_hf() -> HFTokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    def train(self, texts: Union[str, Iterable[str]], show_progress: bool = False) -> "BPETokenizer":
        """Learns merges from `texts` (a string or an iterable of strings) up to vocab_size tokens."""
        texts = [texts] if isinstance(texts, str) else texts
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size, min_frequency=self.min_frequency,
            special_tokens=list(self.special_tokens.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
        )
        hf = self._new_hf()
        hf.train_from_iterator(texts, trainer)
        super().__init__(hf, self.special_tokens)
        return self

    def _to_json(self) -> dict:
        return {"vocab_size": self.target_vocab_size, "min_frequency": self.min_frequency,
                "tokenizer": json.loads(self._tok.to_str())}

    @classmethod
    def _from_json(cls, data: dict) -> "BPETokenizer":
        tok = cls(vocab_size=data["vocab_size"], special_tokens=data["special_tokens"],
                  min_frequency=data.get("min_frequency", 2))
        HFBackedTokenizer.__init__(tok, HFTokenizer.from_str(json.dumps(data["tokenizer"])), data["special_tokens"])
        return tok
