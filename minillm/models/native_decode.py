"""One decoding step through every layer on the native kernels (`minillm._C.decode_layers`, csrc/decode.cpp).

A decoded token of a Llama-family model otherwise runs ~15 eager torch operations and module calls per layer around
the linear and attention kernels (~190 us a layer on a Zen 4, against ~300 us of int4 weights streamed): the native
step runs the same layers (RMSNorm, rotary q/k, the cache write, grouped-query attention, SwiGLU) between the same
kernels in one call. It applies only where it computes what the module path computes: the module path
(DecoderOnlyModel.hidden_states through its Blocks) is its reference, and everything else takes it. A bf16 model
(bf16 weights and KV cache) keeps its activations in fp32 between the kernels, where the modules round each op's
output to bf16: its logits are closer to the fp32 model's than the modules' are (tests/models/test_native_decode.py).
MINILLM_NATIVE_DECODE=0 turns it off.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor

from minillm.ops import _backend
from minillm.ops.attention import _threads
from minillm.ops.linear import Linear, _small_m_us
from minillm.ops.quant import QuantizedLinear

_ENABLED = os.environ.get("MINILLM_NATIVE_DECODE", "1").strip() not in ("0", "false", "off", "no")


def _config_fits(c) -> bool:
    return (c.position_embedding == "rope" and c.norm_type == "rmsnorm" and c.gated_mlp and c.activation == "silu"
            and c.norm_position == "pre" and not c.bias and not c.qkv_bias and not c.sliding_window
            and c.head_dim % 2 == 0)


_BITS = {torch.float32: 32, torch.bfloat16: 16}  # the stored bits of a float weight, as the binding takes them


def _weight(layer, keep: list) -> Optional[tuple]:
    """(bits, w, scale, offset, group) of a linear layer without bias, or None for a layer the step does not take;
    the tensors pointed to go into `keep`."""
    dense = _backend.dense_buf
    if isinstance(layer, QuantizedLinear):
        if layer.bias is not None:
            return None
        keep.extend((layer.codes, layer.scale, layer.offset))
        return (layer.bits, dense(layer.codes), dense(layer.scale), dense(layer.offset), layer.group_size)
    if isinstance(layer, Linear) and layer.bias is None:
        w = layer.weight
        if w.dtype not in _BITS or not w.is_contiguous() or not w.is_cpu:
            return None
        keep.append(w)
        return (_BITS[w.dtype], dense(w), (0, 0), (0, 0), 0)
    return None


def _layers(model, cache, keep: list) -> Optional[List[tuple]]:
    """The binding's layer tuples, or None; the tensors they point into (weights, fp32 copies of bf16 norm weights)
    go into `keep`, to stay alive while the tuples are used."""
    out, dense = [], _backend.dense_buf
    for i, block in enumerate(model.blocks):
        norms = tuple(n.float().contiguous() for n in (block.norm1.weight, block.norm2.weight))
        keep.extend(norms)
        ws = [_weight(m, keep) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj)]
        if any(w is None for w in ws):
            return None
        k, v = cache.k[i], cache.v[i]
        out.append((dense(norms[0]), ws[0], ws[1], dense(norms[1]), ws[2], ws[3], dense(k), dense(v)))
    return out


def _plan(model, cache):
    """(layer tuples, the tensors they point into) for `model` over `cache`'s buffers, built once per cache.

    Building them walks every module (~740 attribute lookups and ~490 tensor pointers a step for SmolLM2's 30 layers,
    about a millisecond: a tenth of an int4 step). A cache lives for one generate call, during which the model's
    modules are the same objects; its buffers never move. The plan holds the tensors it points into, so no pointer
    outlives its tensor; weights changed in place are read as they are at each step (but for a bf16 model's norm
    weights, copied to fp32 once)."""
    plan = cache.native_plan
    if plan is not None and plan[0] is model:
        return plan[1], plan[2]
    keep = [cache.k, cache.v]  # the buffers whose addresses the call reads
    layers = _layers(model, cache, keep)
    cache.native_plan = (model, layers, keep)
    return layers, keep


def native_step(model, x: Tensor, cache, key_padding_mask: Optional[Tensor], rope) -> Optional[Tensor]:
    """x (B, 1, C) after every layer, with the new keys and values written into `cache` (not advanced), or None when
    this step is not one the native kernels take (the caller then runs the modules)."""
    c = model.config
    B, N, C = x.shape
    if not (_ENABLED and N == 1 and cache is not None and 0 < cache.length < cache.capacity
            and x.dtype in _BITS and x.is_cpu and not torch.is_grad_enabled()
            and _backend.native_available() and not torch.compiler.is_compiling() and _config_fits(c)
            and cache.k[0].dtype == x.dtype and cache.k[0].is_contiguous() and not model.training):
        return None
    layers, keep = _plan(model, cache)
    if layers is None:
        return None
    T = cache.length + 1
    Dh, H, Hkv, F = c.head_dim, c.num_heads, c.num_kv_heads, c.d_ff
    # (B, Dh) fp32: (1, Dh) shared or one row per sequence (a bf16 model's tables as the modules use them)
    cos = rope.cos.reshape(-1, Dh).expand(B, Dh).float().contiguous()
    sin = rope.sin.reshape(-1, Dh).expand(B, Dh).float().contiguous()
    kpm = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, T):
            return None
        kpm = key_padding_mask.to(torch.uint8).contiguous()
    out = x.reshape(B, C).float().clone()  # updated in place by the kernel
    scratch = torch.empty(B * (C + (H + 2 * Hkv) * Dh + 2 * H * Dh + H + 3 * F + C))
    dense = _backend.dense_buf
    _backend.log_path_once("decode_layers", "cpu", True)
    _backend._C.decode_layers(
        x=dense(out), cos=dense(cos), sin=dense(sin), key_padding_mask=dense(kpm), scratch=dense(scratch),
        layers=layers, B=B, C=C, H=H, kv_heads=Hkv, head_dim=Dh, d_ff=F, cache_len=cache.length,
        capacity=cache.capacity, eps=float(c.norm_eps), scale=Dh ** -0.5,
        cache_dtype=_backend.DTYPE_CODE[x.dtype],
        linear_threads=_backend.threads_for(_small_m_us(B, 2 * F, C, layers[0][4][0] / 8)),
        attn_threads=_threads(B * H * T * Dh))
    del keep
    return out.to(x.dtype).view(B, 1, C)
