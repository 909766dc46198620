"""Transformer building blocks. Every attention goes through minillm.ops.attention.

Shapes: B batch, N tokens, C = d_model, H heads, Dh = C // H head dim, T cached tokens.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from minillm import ops
from minillm.models.config import ModelConfig


# Up to this many elements GELU runs on one thread. torch parallelises exact GELU even over the 1,536
# values of one decoding step; with OMP_WAIT_POLICY=PASSIVE waking the second thread costs ~50 us, ten
# times the work itself (measured: 54 us on 2 threads, 5.5 us on 1).
_SMALL_GELU = 16384


def _gelu(x: Tensor) -> Tensor:
    n = torch.get_num_threads()
    if n == 1 or x.numel() > _SMALL_GELU or torch.compiler.is_compiling():
        return F.gelu(x)
    torch.set_num_threads(1)  # OpenMP's thread count is per calling thread: other threads are unaffected
    try:
        return F.gelu(x)
    finally:
        torch.set_num_threads(n)


def activation_fn(name: str):
    if name == "gelu":
        return _gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    return F.relu


def dropout(module: nn.Dropout, x: Tensor) -> Tensor:
    """module(x), skipped when it is the identity (eval mode or p = 0): a decoded token passes ~2 dropouts per layer,
    ~4 us each as module calls."""
    return module(x) if module.training and module.p > 0 else x


def _norm_for_linear(norm: nn.Module, x: Tensor) -> Tensor:
    """norm(x) where a linear layer reads it first (a pre-norm branch). Under CPU bf16 autocast that layer casts
    its input to bf16 and its input's gradient comes back in bf16, so a LayerNorm of float32 x writes bf16 at once
    and reads that gradient as it is (ops.layer_norm's out_dtype): the same bits without the two casts (nanoGPT's
    baby GPT on 2 Zen 4 cores: 86 casts a step instead of 102, forward + backward 42.9 -> 39.5 ms;
    benchmarks/bench_train_parts.py)."""
    if (isinstance(norm, ops.LayerNorm) and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return norm(x, out_dtype=torch.bfloat16)
    return norm(x)


def make_norm(config: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    """The config's normalisation over the last dim: LayerNorm (GPT, BERT) or RMSNorm (Llama)."""
    dim = dim or config.d_model
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return ops.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype (as Llama's reference does),
    the result cast back before the weight multiplies it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as one op (seven eager ops cost ~30 us per norm, 61 norms a decoded token)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rope(NamedTuple):
    """cos and sin of the rotary embedding at the positions of one forward: (N, Dh) each, or (T, Dh) for packed
    tokens; rows broadcast over batch and heads."""

    cos: Tensor
    sin: Tensor


def rope_tables(config: ModelConfig, positions: Tensor, dtype: torch.dtype) -> Rope:
    """Rotary tables for `positions` (any shape P): cos, sin (P, Dh) in `dtype`, computed in fp32 (fp64 for fp64).
    Frequencies
    theta^(-2i / Dh), each used for dims i and i + Dh / 2 (the rotate-half layout of Llama's reference)."""
    Dh = config.head_dim
    work = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 as Llama's reference computes them
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, Dh, 2, device=positions.device, dtype=work) / Dh))
    angles = positions.to(work)[..., None] * inv_freq  # (P, Dh / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, Dh)
    return Rope(angles.cos().to(dtype), angles.sin().to(dtype))


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """x * cos + rotate_half(x) * sin for x (B, H, N, Dh) (or any (..., N, Dh) the tables broadcast to), where
    rotate_half(x) = (-x2, x1) for the halves x1, x2 of the last dim."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * rope.cos + rotated * rope.sin


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    Buffers are allocated once at full capacity, (B, H, capacity, Dh) per layer, and filled in place;
    attention reads strided views of the filled part, so a decode step copies nothing but the new token.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0
        self.native_plan = None  # the native decoding step's layer pointers over these buffers (native_decode._plan)

    def update(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Stores k, v (B, H, n, Dh) after the cached tokens; returns all keys and values (B, H, T + n, Dh)."""
        n = k.shape[2]
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {end} were asked for")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Marks n more tokens as cached, once every layer has stored them."""
        self.length += n


class Packed(NamedTuple):
    """Where the real tokens of a padded (B, N) batch sit, for running on them alone.

    Linear layers, norms and the MLP then see (T, C) with T = number of real tokens, so padding costs
    no matmul work; only attention scatters to the (B, H, N, Dh) layout the kernel reads.
    """

    b: Tensor  # (T,) batch index of each real token
    n: Tensor  # (T,) position of each real token
    mask: Tensor  # (B, N) bool, True = real token

    @classmethod
    def from_mask(cls, mask: Tensor) -> "Packed":
        b, n = mask.nonzero(as_tuple=True)
        return cls(b, n, mask)

    def pack(self, x: Tensor) -> Tensor:
        """(B, N, ...) -> (T, ...)"""
        return x[self.b, self.n]

    def unpack(self, x: Tensor, fill_padding: bool = True) -> Tensor:
        """(T, ...) -> (B, N, ...) with zeros at padding (or, with fill_padding=False, whatever the
        allocator held: for attention inputs, whose padded keys are never read and whose padded query
        rows are dropped again by `pack`)."""
        B, N = self.mask.shape
        shape = (B, N) + tuple(x.shape[1:])
        out = x.new_zeros(shape) if fill_padding else x.new_empty(shape)
        out[self.b, self.n] = x  # in place on a fresh tensor: no second copy
        return out


class Attention(nn.Module):
    """Multi-head self-attention (fused q/k/v projection, with Hkv <= H key/value heads) or cross-attention
    (separate q and kv)."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        C = config.d_model
        self.heads, self.head_dim, self.cross = config.num_heads, config.head_dim, cross
        self.kv_heads = config.num_kv_heads
        # Mistral's window: query i sees keys i - W < j <= i, i.e. the kernel's window (W - 1, 0) with causal
        self.window = (config.sliding_window - 1, 0) if config.sliding_window else None
        if cross:
            self.q = ops.Linear(C, C, bias=config.qkv_bias)
            self.kv = ops.Linear(C, 2 * C, bias=config.qkv_bias)
        else:
            self.qkv = ops.Linear(C, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.qkv_bias)
        self.proj = ops.Linear(C, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def _split(self, x: Tensor, parts: int) -> List[Tensor]:
        B, N, _ = x.shape
        # (B, N, parts * C) -> (parts, B, H, N, Dh): strided views with unit stride along Dh, which the
        # kernel reads in place.
        return list(x.view(B, N, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4))

    def _split_qkv(self, x: Tensor) -> List[Tensor]:
        """(B, N, (H + 2 Hkv) Dh) -> q (B, H, N, Dh), k and v (B, Hkv, N, Dh): views, as _split's."""
        if self.kv_heads == self.heads:
            return self._split(x, 3)
        B, N, _ = x.shape
        heads = x.view(B, N, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, N, Dh)
        H, Hkv = self.heads, self.kv_heads
        return [heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]]

    def memory_kv(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the encoder output (B, M, C): (B, H, M, Dh) each."""
        k, v = self._split(self.kv(memory), 2)
        return k, v

    def forward(
        self,
        x: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        memory_kv: Optional[Tuple[Tensor, Tensor]] = None,
        packed: Optional[Packed] = None,
        rope: Optional[Rope] = None,
    ) -> Tensor:
        window = self.window if causal else None
        if packed is not None:  # x: (T, C) real tokens only
            qkv = self.qkv(x)  # (T, (H + 2 Hkv) Dh)
            if rope is not None:  # the packed tokens' own positions: tables (T, Dh)
                T = qkv.shape[0]
                heads = qkv.view(T, self.heads + 2 * self.kv_heads, self.head_dim)
                H, Hkv = self.heads, self.kv_heads
                r = Rope(rope.cos[:, None], rope.sin[:, None])  # (T, 1, Dh)
                qkv = torch.cat([apply_rope(heads[:, :H + Hkv], r), heads[:, H + Hkv:]], dim=1).flatten(1)
            # Padded positions are left unfilled: the kernel never reads padded keys nor padded queries
            # (query_padding_mask), forward or backward, and pack drops their output rows.
            q, k, v = self._split_qkv(packed.unpack(qkv, fill_padding=False))
            out = ops.attention(q, k, v, causal=causal, key_padding_mask=packed.mask,
                                query_padding_mask=packed.mask, window=window)  # (B, H, N, Dh)
            out = packed.pack(out.permute(0, 2, 1, 3)).flatten(1)  # (T, H, Dh) -> (T, C)
            return dropout(self.dropout, self.proj(out))
        B, N, C = x.shape
        if not self.cross and rope is None and cache is None:
            # q, k and v read in place from the projection, whose gradient the backward writes in one piece
            qkv = self.qkv(x).view(B, N, self.heads + 2 * self.kv_heads, self.head_dim)  # (B, N, H + 2 Hkv, Dh)
            out = ops.attention_qkvpacked(qkv, self.heads, kv_heads=self.kv_heads, causal=causal,
                                          key_padding_mask=key_padding_mask, window=window)  # (B, N, H, Dh)
            return dropout(self.dropout, self.proj(out.reshape(B, N, C)))
        if self.cross:
            (q,) = self._split(self.q(x), 1)
            k, v = memory_kv
        else:
            qkv = self.qkv(x)  # (B, N, (H + 2 Hkv) Dh)
            if rope is not None:  # q and k rotated in one pass; tables (N, Dh) broadcast over batch and heads
                H, Hkv = self.heads, self.kv_heads
                heads = qkv.view(B, N, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, N, Dh)
                qk = apply_rope(heads[:, :H + Hkv], rope)  # (B, H + Hkv, N, Dh), contiguous
                q, k, v = qk[:, :H], qk[:, H:], heads[:, H + Hkv:]
            else:
                q, k, v = self._split_qkv(qkv)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        out = ops.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, window=window)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(B, N, C)
        return dropout(self.dropout, self.proj(out))


class MLP(nn.Module):
    """act(x W1) W2, or gated (SwiGLU with "silu"): fc computes [gate, up] in one product, (..., 2 d_ff), and
    act(gate) * up goes into proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.gated_mlp
        self.fc = ops.Linear(config.d_model, (2 if self.gated else 1) * config.d_ff, bias=config.bias)
        self.proj = ops.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return dropout(self.dropout, self.proj(h))


class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each a residual branch with a LayerNorm placed
    before it (pre-norm, GPT) or after the residual sum (post-norm, BERT)."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre = config.norm_position == "pre"
        # Recompute this block's activations in the backward instead of keeping them (training only; see
        # PreTrainedModel.gradient_checkpointing_enable).
        self.gradient_checkpointing = False
        self.attn = Attention(config)
        self.norm1 = make_norm(config)
        self.cross_attn = Attention(config, cross=True) if cross else None
        self.norm_cross = make_norm(config) if cross else None
        self.mlp = MLP(config)
        self.norm2 = make_norm(config)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, branch) -> Tensor:
        return x + branch(_norm_for_linear(norm, x)) if self.pre else norm(x + branch(x))

    def forward(
        self,
        x: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        memory_kv: Optional[Tuple[Tensor, Tensor]] = None,
        memory_mask: Optional[Tensor] = None,
        packed: Optional[Packed] = None,
        rope: Optional[Rope] = None,
    ) -> Tensor:
        if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            # Non-reentrant checkpointing: keyword arguments pass through, dropout's RNG state is replayed, and
            # only x (and the inputs below) are kept for the backward.
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, use_reentrant=False, causal=causal, key_padding_mask=key_padding_mask, cache=None,
                layer=layer, memory_kv=memory_kv, memory_mask=memory_mask, packed=packed, rope=rope)
        return self._forward(x, causal=causal, key_padding_mask=key_padding_mask, cache=cache, layer=layer,
                             memory_kv=memory_kv, memory_mask=memory_mask, packed=packed, rope=rope)

    def _forward(self, x: Tensor, *, causal: bool, key_padding_mask: Optional[Tensor], cache: Optional[KVCache],
                 layer: int, memory_kv: Optional[Tuple[Tensor, Tensor]], memory_mask: Optional[Tensor],
                 packed: Optional[Packed], rope: Optional[Rope]) -> Tensor:
        if self.pre and self.cross_attn is None:  # decoder-only and pre-norm: no closures (a decoded token's path)
            x = x + self.attn(_norm_for_linear(self.norm1, x), causal=causal, key_padding_mask=key_padding_mask,
                              cache=cache, layer=layer, packed=packed, rope=rope)
            return x + self.mlp(_norm_for_linear(self.norm2, x))
        x = self._residual(x, self.norm1, lambda h: self.attn(h, causal=causal, key_padding_mask=key_padding_mask,
                                                               cache=cache, layer=layer, packed=packed, rope=rope))
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross,
                               lambda h: self.cross_attn(h, key_padding_mask=memory_mask, memory_kv=memory_kv))
        return self._residual(x, self.norm2, self.mlp)


class Embeddings(nn.Module):
    """Token + learned absolute position (+ token type) embeddings, optional LayerNorm, dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.d_model
        self.tok = nn.Embedding(config.vocab_size, C)
        # rotary embeddings act on q and k in the attention instead
        self.pos = nn.Embedding(config.max_seq_len, C) if config.position_embedding == "learned" else None
        self.token_type = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.norm = make_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.vocab_size, self.max_seq_len = config.vocab_size, config.max_seq_len

    def forward(self, input_ids: Tensor, start: int = 0, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """position_ids (B, N): each token's own position (left-padded batches); else start .. start + N - 1."""
        check_input_ids(input_ids, self.vocab_size, self.max_seq_len, start)
        N = input_ids.shape[1]
        x = self.tok(input_ids)
        if self.pos is not None:
            if position_ids is not None:
                x = x + self.pos(position_ids)
            else:
                x = x + self.pos(torch.arange(start, start + N, device=input_ids.device))[None]
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type(types)
        if self.norm is not None:
            x = self.norm(x)
        return dropout(self.dropout, x)


def check_input_ids(input_ids, vocab_size: int, max_seq_len: int, start: int = 0) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor (B, N), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (B, N), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
    if start + input_ids.shape[1] > max_seq_len:
        raise ValueError(f"sequence of {start + input_ids.shape[1]} tokens exceeds max_seq_len = {max_seq_len}; "
                         "truncate the input or raise max_seq_len")
    if input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got min {lo}, max {hi}")


def padding_mask(attention_mask: Optional[Tensor], input_ids: Tensor) -> Optional[Tensor]:
    """(B, N) bool key-padding mask (True = keep) from a 0/1 or bool attention mask; None when absent."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor (B, N), got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


def init_weights(module: nn.Module, num_layers: int) -> None:
    """GPT-2 / BERT initialisation: N(0, 0.02) weights, zero biases, and residual output projections
    scaled by 1 / sqrt(2 * num_layers) so the residual stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
