"""minillm attention as a Hugging Face transformers attention backend.

    import minillm.integrations.transformers as mt
    mt.register()                                  # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="minillm")
    # or model.set_attn_implementation("minillm"); sentence-transformers:
    # SentenceTransformer(path, model_kwargs={"attn_implementation": "minillm"})
    mt.replace_linear(model)                       # optional: linear layers on minillm's GEMM too

Two functions are registered under the name "minillm" (transformers >= 4.48): the attention function
(AttentionInterface) and a mask function (AttentionMaskInterface). The mask function returns exactly what
transformers' `sdpa` backend gets (`sdpa_mask`), so model code that edits the mask (Falcon adds ALiBi to it) keeps
working; when the pattern is causal or bidirectional attention plus key padding it also tags the mask with the
(B, Nk) padding, which the kernel takes directly (padded keys cost nothing).

The attention runs minillm's kernel only for what the kernel computes exactly: such a tagged mask (or none),
no attention dropout, and no argument beyond those. Everything else -- a mask of any other pattern or made by the
model, T5's `position_bias`, Gemma 2's `softcap`, gpt-oss's attention sinks (`s_aux`), `output_attentions`, dropout
in training, or any keyword this module does not know -- goes to transformers' own `sdpa` function with every
argument untouched, or to the model's own `eager` function where `sdpa` cannot compute it (softcap, sinks,
attention weights). Each reason is logged once.

Attention is a small part of an encoder's time at sentence lengths; :func:`replace_linear` moves the
rest, the model's linear layers (nn.Linear and GPT-2's Conv1D), onto minillm's GEMM in place.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Optional, Tuple

import torch

from minillm import ops

log = logging.getLogger("minillm.integrations")
NAME = "minillm"
_warned: set = set()


def _once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.info("minillm attention backend: %s; running transformers' own attention there", reason)


def minillm_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' `sdpa_mask` (a (B, 1, Nq, Nk) bool mask, or None where `is_causal` suffices), tagged with
    `_minillm_padding = ((B, Nk) bool keep mask, causal)` when the pattern is plain causal or bidirectional
    attention plus key padding, aligned as the kernel's bottom-right causal mask is."""
    import transformers.masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if not _uses_attention_functions(kwargs.get("config")):
        # A model that computes attention itself (BLOOM) adds the mask it gets to its scores: it needs the float
        # mask its eager implementation would get, not a boolean one.
        return mu.eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    mask = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    causal = mask_function is mu.causal_mask_function
    plain = causal or mask_function is mu.bidirectional_mask_function
    if (mask is not None and plain and attention_mask is not None and attention_mask.dim() == 2
            and attention_mask.shape == (batch_size, kv_length) and kv_offset == 0
            and (not causal or q_offset + q_length == kv_length)):
        mask._minillm_padding = (attention_mask.to(torch.bool), causal)
    return mask


_interface_users: dict = {}


def _uses_attention_functions(config) -> bool:
    """Whether the model of `config` calls transformers' attention functions (ALL_ATTENTION_FUNCTIONS), as nearly
    every model does; BLOOM computes attention itself."""
    if config is None:
        return True
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    if name not in _interface_users:
        try:
            module = importlib.import_module(name)
            _interface_users[name] = hasattr(module, "ALL_ATTENTION_FUNCTIONS")
        except ImportError:
            _interface_users[name] = True
    return _interface_users[name]


# Keywords that do not change what attention computes whatever they hold (sdpa ignores them too): the models'
# bookkeeping. Any other keyword holding something other than None / False sends the call to transformers' own
# functions, so a keyword this module does not know is never dropped.
_ANY_VALUE = {"position_ids", "cache_position", "use_cache", "past_key_values"}
# What sdpa cannot compute and the model's own eager function can.
_EAGER_ONLY = ("softcap", "s_aux", "sinks", "output_attentions")


def _why_not_native(module, query, key, attention_mask, dropout: float, kwargs: dict) -> str:
    for name, value in kwargs.items():
        if name in _ANY_VALUE or value is None or value is False:
            continue
        if name == "sliding_window" and attention_mask is None:  # the window covers every key (no mask was needed)
            continue
        return f"{name}={type(value).__name__} (not in the kernel yet)"
    if dropout > 0:
        return "attention dropout in training"
    if attention_mask is not None and getattr(attention_mask, "_minillm_padding", None) is None:
        return "an attention mask beyond key padding (a model-made or dense pattern)"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads not a multiple of the key/value heads"
    return ""


def _eager_mask(attention_mask, query: torch.Tensor, key: torch.Tensor, causal: bool):
    """The additive float mask the models' eager functions take, from what minillm_mask made (bool or None)."""
    min_value = torch.finfo(query.dtype).min
    if attention_mask is None:
        Nq, Nk = query.shape[2], key.shape[2]
        if not causal or Nq == 1:
            return None
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device).tril(Nk - Nq)  # bottom-right
        attention_mask = visible[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(attention_mask, zero, min_value)
    return attention_mask


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """transformers' own attention for this call: `sdpa`, or the model's `eager` where sdpa cannot compute it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extra = {} if is_causal is None else {"is_causal": is_causal}
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None and any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _EAGER_ONLY):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return eager(module, query, key, value, _eager_mask(attention_mask, query, key, bool(causal)),
                     dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **extra, **kwargs)


def minillm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, Nq, D), key/value (B, Hkv, Nk, D) ->
    ((B, Nq, H, D), None)."""
    dropout = dropout if module.training else 0.0
    why = _why_not_native(module, query, key, attention_mask, dropout, kwargs)
    if why:
        _once(why)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    kpm = None  # grouped-query attention (fewer key/value heads) goes to the kernel as it is: no repeated K/V
    if attention_mask is not None:
        kpm, causal = attention_mask._minillm_padding
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1  # one decoding query sees the whole cache either way
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
