"""The tokenizer interface shared by CharTokenizer, BPETokenizer and pretrained Hugging Face tokenizers."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from minillm.tokenizers.loading import KINDS, load_tokenizer

PathLike = Union[str, os.PathLike]
SPECIAL_NAMES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")


class Tokenizer:
    """encode / decode / encode_batch, vocab_size, special-token ids, save / load as JSON.

    Subclasses implement `_encode`, `decode`, `token_to_id`, `vocab_size`, `_to_json`, `_from_json`.
    `special_tokens` maps the names in SPECIAL_NAMES to token strings; absent names give id None.
    """

    kind = ""
    special_tokens: Dict[str, str]

    def __init_subclass__(cls, **kwargs):
        # Each concrete kind registers for load_tokenizer (tokenizers/loading.py), which reads its files.
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):  # declared here, not inherited: a user's subclass keeps its parent's files
            KINDS[cls.kind] = cls

    # ---- implemented by subclasses ----
    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _to_json(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_json(cls, data: dict) -> "Tokenizer":
        raise NotImplementedError

    # ---- shared ----
    def special_id(self, name: str) -> Optional[int]:
        token = self.special_tokens.get(name)
        return self.token_to_id(token) if token is not None else None

    pad_token_id = property(lambda self: self.special_id("pad"))
    unk_token_id = property(lambda self: self.special_id("unk"))
    bos_token_id = property(lambda self: self.special_id("bos"))
    eos_token_id = property(lambda self: self.special_id("eos"))
    cls_token_id = property(lambda self: self.special_id("cls"))
    sep_token_id = property(lambda self: self.special_id("sep"))
    mask_token_id = property(lambda self: self.special_id("mask"))

    @property
    def all_special_ids(self) -> List[int]:
        return sorted({i for i in (self.special_id(n) for n in self.special_tokens) if i is not None})

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of `text`; with add_special_tokens, framed as BOS ... EOS (or CLS ... SEP)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode(text)
        return self._frame(ids) if add_special_tokens else ids

    def _frame(self, ids: List[int]) -> List[int]:
        first = self.bos_token_id if self.bos_token_id is not None else self.cls_token_id
        last = self.eos_token_id if self.eos_token_id is not None else self.sep_token_id
        return ([first] if first is not None else []) + ids + ([last] if last is not None else [])

    def _encode_many(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def encode_batch(self, texts: Iterable[str], max_length: Optional[int] = None,
                     padding: Union[bool, str] = "longest", truncation: bool = True,
                     add_special_tokens: bool = False, return_tensors: Optional[str] = "pt") -> Dict[str, object]:
        """Encodes many texts at once.

        Returns {"input_ids", "attention_mask"}: (B, N) int64 tensors with padding ("longest" or
        "max_length"; right side, pad id) or, with padding=False or return_tensors=None, lists.
        truncation cuts each sequence to max_length (keeping a final EOS/SEP when framed).
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if padding not in (True, False, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        seqs = self._encode_many(texts, add_special_tokens)
        if truncation and max_length is not None:
            last = self.eos_token_id if self.eos_token_id is not None else self.sep_token_id
            seqs = [
                s[: max_length - 1] + [s[-1]] if (add_special_tokens and len(s) > max_length and s[-1] == last)
                else s[:max_length]
                for s in seqs
            ]
        masks = [[1] * len(s) for s in seqs]
        if not padding or return_tensors is None:
            return {"input_ids": seqs, "attention_mask": masks}
        pad = self.pad_token_id
        if pad is None:
            raise ValueError(f"{type(self).__name__} has no pad token; build it with one or use padding=False")
        width = max_length if padding == "max_length" else max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = min(len(s), width)
            ids[i, :n] = torch.tensor(s[:n], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _ids_list(ids) -> List[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids (1-D), got shape {tuple(ids.shape)}")
            return ids.tolist()
        return [int(i) for i in ids]

    def save(self, path: PathLike) -> None:
        """Writes the tokenizer as one JSON file (atomically)."""
        from minillm.utils import atomic_write_text

        data = {"type": self.kind, "special_tokens": self.special_tokens, **self._to_json()}
        atomic_write_text(path, json.dumps(data, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Loads a tokenizer saved by any minillm tokenizer, or a Hugging Face tokenizer.json."""
        return load_tokenizer(path) if cls is Tokenizer else _check_kind(cls, load_tokenizer(path))


def _check_kind(cls, tok):
    if not isinstance(tok, cls):
        raise ValueError(f"the file holds a {type(tok).__name__}, not a {cls.__name__}; use minillm.tokenizers.load_tokenizer")
    return tok
