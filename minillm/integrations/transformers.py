"""minillm attention as a Hugging Face transformers attention backend.

    import minillm.integrations.transformers as mt
    mt.register()                                  # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="minillm")
    # or model.set_attn_implementation("minillm"); sentence-transformers:
    # SentenceTransformer(path, model_kwargs={"attn_implementation": "minillm"})
    mt.replace_linear(model)                       # optional: linear layers on minillm's GEMM too

Two functions are registered under the name "minillm" (transformers >= 4.48): the attention function
(AttentionInterface) and a mask function (AttentionMaskInterface). Registering only the first would
make transformers pass attention_mask=None and silently ignore padding. The mask function hands the
attention a (B, Nk) boolean padding mask when the layer's mask is plain causal or bidirectional
attention plus padding, which the kernel takes directly (padded keys cost nothing); other mask
patterns (sliding windows, packed sequences, ...) come as torch's dense masks and run through
torch's scaled_dot_product_attention, as does attention dropout in training. Each fallback is
logged once.

Attention is a small part of an encoder's time at sentence lengths; :func:`replace_linear` moves the
rest, the model's linear layers (nn.Linear and GPT-2's Conv1D), onto minillm's GEMM in place.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from minillm import ops

log = logging.getLogger("minillm.integrations")
NAME = "minillm"
_warned: set = set()


def _once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.info("minillm attention backend: %s; using torch's scaled_dot_product_attention there", reason)


def minillm_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """A (B, kv_length) bool padding mask (True = keep), None without padding, or, for any mask
    pattern beyond causal/bidirectional + padding, torch's dense boolean mask."""
    import transformers.masking_utils as mu

    plain = mask_function is None or mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function)
    if not plain:
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, **{k: v for k, v in kwargs.items()
                                                           if k in ("local_size", "use_vmap", "device")})
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    if mask.shape[1] != kv_length:  # a static cache longer than the mask: let torch handle the slicing
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False)
    return mask


def minillm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, Nq, D), key/value (B, Hkv, Nk, D) ->
    ((B, Nq, H, D), None)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1  # one decoding query sees the whole cache either way
    dropout = dropout if module.training else 0.0
    kpm = attention_mask if (attention_mask is None or (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool)) else None
    if dropout > 0 or (attention_mask is not None and kpm is None) or kwargs.get("output_attentions"):
        _once("attention dropout in training" if dropout > 0 else "a dense attention mask")
        mask = attention_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=causal and mask is None)
    else:
        out = ops.attention(query, key, value, causal=causal, key_padding_mask=kpm, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers the "minillm" attention and mask functions with transformers; returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("minillm's transformers backend needs transformers >= 4.48 (pip install transformers)") from exc
    AttentionInterface.register(NAME, minillm_attention)
    AttentionMaskInterface.register(NAME, minillm_mask)
    return NAME


class _NativeConv1D(torch.nn.Module):
    """Forward of transformers' Conv1D (weight (in, out): y = x W + b) on minillm.ops.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight.t(), self.bias)


def replace_linear(model: torch.nn.Module) -> int:
    """Runs every nn.Linear and transformers Conv1D of `model` on minillm.ops.linear (the native GEMM on
    CPU float32/float64, F.linear elsewhere), in place: each layer keeps its parameters, hooks and
    state_dict; only its forward changes. Returns the number of layers changed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        Conv1D = None
    # Subclasses with the same attributes, so swapping a module's class is enough.
    swaps = {torch.nn.Linear: ops.Linear}
    if Conv1D is not None:
        swaps[Conv1D] = type("Conv1D", (_NativeConv1D, Conv1D), {"__module__": __name__})
    changed = 0
    for module in model.modules():
        native = swaps.get(type(module))
        if native is not None:
            module.__class__ = native
            changed += 1
    return changed
