"""Model configuration: one dataclass for the three architectures, built from the seed's plain dicts."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

MODEL_TYPES = ("encoder_only", "decoder_only", "transformer")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORM_POSITIONS = ("pre", "post")
NORM_TYPES = ("layernorm", "rmsnorm")
POSITION_EMBEDDINGS = ("learned", "rope")

# Per-architecture defaults where the three differ: BERT is post-norm with an embedding LayerNorm
# and token types; GPT (nanoGPT) and the encoder-decoder are pre-norm.
_DEFAULTS = {
    "encoder_only": {"norm_position": "post", "norm_eps": 1e-12, "type_vocab_size": 2, "embedding_norm": True},
    "decoder_only": {"norm_position": "pre", "norm_eps": 1e-5, "type_vocab_size": 0, "embedding_norm": False},
    "transformer": {"norm_position": "pre", "norm_eps": 1e-5, "type_vocab_size": 0, "embedding_norm": False},
}


@dataclass
class ModelConfig:
    """Hyper-parameters of a minillm model.

    The seed's keys (model_type, vocab_size, d_model, num_heads, num_layers, d_ff, max_seq_len,
    dropout) plus what each architecture needs. `None` fields take the architecture's default.
    ``dropout`` applies to embeddings, residual branches and the MLP; attention probabilities are
    not dropped, so the fused attention kernel runs in training too.
    """

    model_type: str = "decoder_only"
    vocab_size: int = 256
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    d_ff: Optional[int] = None  # default 4 * d_model
    max_seq_len: int = 512
    dropout: float = 0.1
    activation: str = "gelu"
    norm_eps: Optional[float] = None
    norm_position: Optional[str] = None  # "pre" (GPT) or "post" (BERT)
    embedding_norm: Optional[bool] = None  # LayerNorm after the embeddings (BERT)
    type_vocab_size: Optional[int] = None  # token-type embeddings (BERT); 0 = none
    bias: bool = True
    tie_embeddings: bool = True
    # Llama-family options (the defaults keep the GPT-2 / BERT architecture and every saved checkpoint):
    position_embedding: str = "learned"  # "rope": rotary embeddings on q and k (rotate-half form, as Llama)
    rope_theta: float = 10000.0
    norm_type: str = "layernorm"  # "rmsnorm": RMSNorm (weight only)
    gated_mlp: bool = False  # the MLP as act(x W_gate) * (x W_up) W_down: SwiGLU with activation "silu"
    num_kv_heads: Optional[int] = None  # grouped-query attention: key/value heads (default num_heads)
    qkv_bias: Optional[bool] = None  # biases on the q/k/v projection (default `bias`; Qwen2 has them alone)
    sliding_window: Optional[int] = None  # each query attends to the last `sliding_window` keys (Mistral)
    num_decoder_layers: Optional[int] = None  # encoder-decoder only; default num_layers
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # free-form, kept through save/load

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for key, value in _DEFAULTS[self.model_type].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len", "num_decoder_layers",
                     "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                f"e.g. num_heads={max(h for h in range(1, self.num_heads + 1) if self.d_model % h == 0)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        for name, plain in (("num_kv_heads", self.num_kv_heads == self.num_heads),
                            ("position_embedding", self.position_embedding == "learned"),
                            ("sliding_window", self.sliding_window is None)):
            if not plain and self.model_type != "decoder_only":
                raise ValueError(f"{name}={getattr(self, name)!r} is for decoder_only models (Llama family)")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if self.position_embedding == "rope" and (self.head_dim % 2 or not self.rope_theta > 0):
            raise ValueError(f"rotary embeddings need an even head dim and rope_theta > 0, got head_dim "
                             f"{self.head_dim}, rope_theta {self.rope_theta}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if not (self.norm_eps > 0):
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def estimated_parameters(self) -> int:
        """Parameters a model of this config holds (the exact count up to biases and norms, which the
        estimate over-counts a little): what check_size() weighs before anything is allocated."""
        d, ff = self.d_model, self.d_ff
        kv = 2 * d * self.num_kv_heads // self.num_heads  # k and v projections' outputs
        mlp = (3 if self.gated_mlp else 2) * d * ff
        block = 2 * d * d + d * kv + mlp + 9 * d + ff  # attention q/k/v/out, MLP, biases, norms
        positions = self.max_seq_len * d if self.position_embedding == "learned" else 0
        n = self.vocab_size * d + positions + self.type_vocab_size * d + 2 * d
        if self.model_type == "transformer":  # encoder and decoder: positions, blocks (cross-attention too), norms
            n += self.max_seq_len * d + 2 * d
            n += self.num_layers * block + self.num_decoder_layers * (block + 4 * d * d + 6 * d)
        else:
            n += self.num_layers * block
        if self.model_type == "encoder_only":  # the MLM head: a dense layer, its norm, the vocabulary bias
            n += d * d + 3 * d + self.vocab_size
        if not self.tie_embeddings:
            n += self.vocab_size * d
        return n

    def check_size(self, max_bytes: Optional[int] = None) -> None:
        """Raises ValueError before a model is built whose fp32 weights alone would not fit `max_bytes`
        (default: this machine's physical memory; MINILLM_MAX_MODEL_BYTES overrides): an absurd config.json
        otherwise builds layers until the process is killed for memory."""
        if max_bytes is None:
            env = os.environ.get("MINILLM_MAX_MODEL_BYTES", "").strip()
            max_bytes = int(float(env)) if env else _physical_memory()
        params = self.estimated_parameters()
        need = 4 * params
        if max_bytes and need > max_bytes:
            raise ValueError(f"this config describes a model of ~{params:,} parameters "
                             f"({need / 2**30:.1f} GiB of fp32 weights), more than {max_bytes / 2**30:.1f} GiB of "
                             f"memory here (d_model={self.d_model}, d_ff={self.d_ff}, num_layers={self.num_layers}, "
                             f"vocab_size={self.vocab_size}, max_seq_len={self.max_seq_len}); check the config "
                             f"(MINILLM_MAX_MODEL_BYTES raises the limit)")

    @classmethod
    def from_dict(cls, d: Union["ModelConfig", Dict[str, Any]]) -> "ModelConfig":
        """Builds a config from a dict such as the seed's; unknown keys are an error naming them."""
        if isinstance(d, ModelConfig):
            return d
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict or ModelConfig, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"minillm_version"})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, os.PathLike]) -> None:
        from minillm.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _physical_memory() -> int:
    """Bytes of physical memory, or 0 when the platform does not say (no limit then)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
