"""minillm.ops: fused attention and exact top-k search.

CPU tensors run the C++ kernels in `minillm._C`; other devices (and ``MINILLM_FORCE_TORCH=1``) run
the plain-torch twins in :mod:`minillm.ops.reference`. :func:`backend_info` says which path is taken.
"""
from minillm.ops._backend import backend_info, force_torch, set_simd_level, simd_level, simd_levels
from minillm.ops.attention import attention, attention_qkvpacked, scaled_dot_product_attention
from minillm.ops.layer_norm import LayerNorm, layer_norm
from minillm.ops.linear import Linear, linear
from minillm.ops.topk import Int8Corpus, topk_search

__all__ = [
    "attention",
    "attention_qkvpacked",
    "scaled_dot_product_attention",
    "topk_search",
    "Int8Corpus",
    "linear",
    "Linear",
    "layer_norm",
    "LayerNorm",
    "backend_info",
    "force_torch",
    "simd_level",
    "simd_levels",
    "set_simd_level",
]
