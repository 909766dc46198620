"""minillm attention as a Hugging Face transformers attention backend.

    import minillm.integrations.transformers as mt
    mt.register()                                  # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="minillm")
    # or model.set_attn_implementation("minillm"); sentence-transformers:
    # SentenceTransformer(path, model_kwargs={"attn_implementation": "minillm"})
    mt.replace_linear(model)                       # optional: linear layers on minillm's GEMM too

Two functions are registered under the name "minillm" (transformers >= 4.48): the attention function
(AttentionInterface) and a mask function (AttentionMaskInterface). The mask function returns exactly what
transformers' `sdpa` backend gets (`sdpa_mask`), so model code that edits the mask keeps working; when the mask is a
band of keys per query (causal, bidirectional, sliding windows, with the cache's offsets) times key padding it also
tags it with that band, checked against the mask, which the kernel takes as a window and a (B, Nk) padding mask:
blocks outside the window and padded keys cost nothing.

The attention runs minillm's kernel for what it computes exactly: a tagged mask (or none), an additive float mask
(Falcon's ALiBi mask) as a bias, T5's `position_bias` as a bias (with its gradient), Gemma 2's `softcap`, gpt-oss's
attention sinks (`s_aux`), grouped-query heads without copies. Everything else -- a boolean mask of another pattern,
`output_attentions`, dropout in training, or any keyword this module does not know -- goes to transformers' own
`sdpa` function with every argument untouched, or to the model's own `eager` function where `sdpa` cannot compute it
(attention weights). Each reason is logged once.

Attention is a small part of an encoder's time at sentence lengths; :func:`replace_linear` moves the
rest, the model's linear layers (nn.Linear and GPT-2's Conv1D), onto minillm's GEMM in place.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import NamedTuple, Optional, Tuple

import torch

from minillm import ops
from minillm.ops.attention import _attention_band

log = logging.getLogger("minillm.integrations")
NAME = "minillm"
_warned: set = set()


def _once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.info("minillm attention backend: %s; running transformers' own attention there", reason)


def minillm_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """What the kernel takes, where the pattern is a band of keys per query (causal, bidirectional, sliding windows,
    with the cache's offsets: key j visible to query i when i + lo <= j <= i + hi) times key padding: the (B, Nk)
    bool key-padding mask tagged `_minillm_band`, no (B, 1, Nq, Nk) mask at all. The band is read off the pattern
    function row block by row block (index-based functions, as sdpa_mask's own fast path evaluates them) and must
    hold exactly for every row and batch entry. Any other pattern, or a model that asks for the mask itself
    (`allow_is_causal_skip=False`: Falcon adds ALiBi onto it), gets transformers' `sdpa_mask`, tagged with its band
    when it is one. None where sdpa would get None and the kernel's causal flag means the same."""
    import transformers.masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=mask_function, attention_mask=attention_mask)
    if not _uses_attention_functions(kwargs.get("config")):
        # A model that computes attention itself (BLOOM) adds the mask it gets to its scores: it needs the float
        # mask its eager implementation would get, not a boolean one.
        return mu.eager_mask(**args, **kwargs)
    padded = attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size
    # A causal mask with allow_is_causal_skip=False is one the model asked to have materialised (Falcon edits it);
    # bidirectional masks always come with allow_is_causal_skip=False (and allow_is_bidirectional_skip given).
    materialise = not kwargs.get("allow_is_causal_skip", True) and "allow_is_bidirectional_skip" not in kwargs
    if kwargs.get("use_vmap", False) or materialise or (attention_mask is not None and not padded):
        mask = mu.sdpa_mask(**args, **kwargs)
        if mask is not None and mask.dtype == torch.bool and not kwargs.get("use_vmap", False):
            band = _band_of(mask, mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset)
            if band is not None:
                mask._minillm_band = band
        return mask
    kpm = _key_padding(attention_mask, kv_length, kv_offset)
    if kpm is not None and bool(kpm.all()):
        kpm = None
    local = kwargs.get("local_size")
    if kpm is None and (q_length == 1 or kv_length == q_length) and (local is None or kv_length < local):
        # sdpa_mask's own shortcut (None: `is_causal` suffices), where top-left and bottom-right alignment agree
        if mask_function is mu.causal_mask_function:
            return None
        if mask_function is mu.bidirectional_mask_function and kwargs.get("allow_is_bidirectional_skip", False):
            return None
    dev = kwargs.get("device", None) or (attention_mask.device if attention_mask is not None else "cpu")
    lo_hi = _probe_band(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, dev)
    if lo_hi is None:
        return mu.sdpa_mask(**args, **kwargs)
    keep = kpm if kpm is not None else torch.ones(batch_size, kv_length, dtype=torch.bool, device=dev)
    keep = keep.clone()  # a tensor of its own to carry the tag
    keep._minillm_band = _Band(lo_hi[0], lo_hi[1], kpm, q_length, kv_length)
    return keep


def _probe_band(mask_function, B: int, Nq: int, Nk: int, q_offset: int, kv_offset: int, device,
                rows_per_step: int = 256) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """(lo, hi) when mask_function's pattern (without padding) is the band i + lo <= j <= i + hi over the (Nq, Nk)
    grid of local indices for every batch entry (None: unbounded on that side), else None. Evaluated rows_per_step
    rows at a time, so its memory stays O(B * rows_per_step * Nk)."""
    from transformers.masking_utils import _non_vmap_expansion_sdpa

    batch, head = torch.arange(B, device=device), torch.arange(1, device=device)
    kv = torch.arange(Nk, device=device) + kv_offset
    j = torch.arange(Nk, device=device)[None, :]
    lo = hi = None                # the band's offsets, from rows that show them (first key > 0, last < Nk - 1)
    lo_max = hi_min = None        # bounds from rows that reach the grid's edges: lo <= lo_max, hi >= hi_min
    empty_rows = []               # rows that see no key: the band must miss the grid there
    for r0 in range(0, Nq, rows_per_step):
        r1 = min(Nq, r0 + rows_per_step)
        try:
            pat = mask_function(*_non_vmap_expansion_sdpa(batch, head, torch.arange(r0, r1, device=device) + q_offset,
                                                          kv))
            pat = torch.as_tensor(pat, device=device).expand(B, 1, r1 - r0, Nk)
        except Exception:  # not index-based: only the dense mask describes it
            return None
        vis = pat[0, 0]  # (rows, Nk)
        if pat.dtype != torch.bool or (B > 1 and not bool((pat == vis).all())):
            return None  # batch-dependent (packed sequences, chunks after left padding)
        i = torch.arange(r0, r1, device=device)
        count = vis.sum(1)
        first = torch.where(vis, j, Nk).amin(1)
        last = torch.where(vis, j, -1).amax(1)
        seen = count > 0
        if not bool((count[seen] == (last - first + 1)[seen]).all()):
            return None  # a hole in some row
        empty_rows.append(i[~seen])
        for edge, sel, d in ((0, seen & (first > 0), first - i), (1, seen & (last < Nk - 1), last - i)):
            if bool(sel.any()):
                vals = d[sel]
                v = int(vals[0])
                if not bool((vals == v).all()) or (edge == 0 and lo not in (None, v)) or (edge == 1 and hi not in (None, v)):
                    return None
                if edge == 0:
                    lo = v
                else:
                    hi = v
        at_left, at_right = seen & (first == 0), seen & (last == Nk - 1)
        if bool(at_left.any()):
            m = int((-i[at_left]).min())  # i + lo <= 0 for these rows
            lo_max = m if lo_max is None else min(lo_max, m)
        if bool(at_right.any()):
            m = int((Nk - 1 - i[at_right]).max())  # i + hi >= Nk - 1
            hi_min = m if hi_min is None else max(hi_min, m)
    if (lo is not None and lo_max is not None and lo > lo_max) or (hi is not None and hi_min is not None and hi < hi_min):
        return None
    empty = torch.cat(empty_rows) if empty_rows else torch.empty(0, dtype=torch.long)
    if empty.numel():  # the band must see nothing in these rows, and something in the others (checked above)
        miss = torch.zeros_like(empty, dtype=torch.bool)
        if hi is not None:
            miss |= empty + hi < 0
        if lo is not None:
            miss |= empty + lo > Nk - 1
        if lo is not None and hi is not None and lo > hi:
            miss |= True
        if not bool(miss.all()):
            return None
    return lo, hi


def _dense_mask(band: "_Band", device) -> torch.Tensor:
    """The (B, 1, Nq, Nk) bool mask a tagged compact mask stands for (sdpa_mask's), for transformers' own functions."""
    i = torch.arange(band.Nq, device=device)[:, None]
    j = torch.arange(band.Nk, device=device)[None, :]
    vis = torch.ones(band.Nq, band.Nk, dtype=torch.bool, device=device)
    if band.hi is not None:
        vis &= j <= i + band.hi
    if band.lo is not None:
        vis &= j >= i + band.lo
    if band.kpm is None:
        return vis[None, None]
    return vis[None, None] & band.kpm[:, None, None, :]


class _Band(NamedTuple):
    """What the kernel computes for a tagged mask: keys j with i + lo <= j <= i + hi (None: unbounded) for query i
    of an (Nq, Nk) call, and the (B, Nk) key padding (None: none)."""
    lo: Optional[int]
    hi: Optional[int]
    kpm: Optional[torch.Tensor]
    Nq: int
    Nk: int


def _band_of(mask, mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset) -> Optional[_Band]:
    """The band a dense sdpa_mask `mask` is, or None: the pattern's band (_probe_band) with the key padding, checked
    against the mask itself."""
    B = mask.shape[0]
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
        return None
    lo_hi = _probe_band(mask_function, B, q_length, kv_length, q_offset, kv_offset, mask.device)
    if lo_hi is None:
        return None
    band = _Band(lo_hi[0], lo_hi[1], _key_padding(attention_mask, kv_length, kv_offset), q_length, kv_length)
    return band if torch.equal(mask, _dense_mask(band, mask.device).expand_as(mask)) else None


def _key_padding(attention_mask: Optional[torch.Tensor], kv_length: int, kv_offset: int) -> Optional[torch.Tensor]:
    """The (B, Nk) keep mask of keys kv_offset .. kv_offset + Nk - 1 from a 2-D attention mask (zero-padded past its
    end, as sdpa_mask pads it), or None without one."""
    if attention_mask is None:
        return None
    padding = torch.nn.functional.pad(attention_mask, (0, max(0, kv_length + kv_offset - attention_mask.shape[-1])))
    return padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)


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
# bookkeeping. `sliding_window` is carried by the mask in both of transformers' own functions (a tagged mask
# carries it to the kernel). Any other keyword holding something other than None / False that _native_kwargs does
# not take sends the call to transformers' own functions, so a keyword this module does not know is never dropped.
_ANY_VALUE = {"position_ids", "cache_position", "use_cache", "past_key_values", "sliding_window"}
# What sdpa cannot compute and the model's own eager function can.
_EAGER_ONLY = ("softcap", "s_aux", "sinks", "output_attentions")


def _broadcasts(t: torch.Tensor, shape) -> bool:
    return t.dim() <= 4 and all(n in (1, want) for n, want in zip(t.shape[::-1], shape[::-1]))


def _native_kwargs(module, query, key, attention_mask, dropout: float, is_causal, kwargs: dict):
    """(keywords for minillm.ops.attention._attention_band, (lo, hi)) when the kernel computes this call exactly,
    else (None, why)."""
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    kw = {}
    bias = None
    for name, value in kwargs.items():
        if name in _ANY_VALUE or value is None or value is False:
            continue
        if name == "softcap" and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            kw["softcap"] = float(value)
        elif name in ("s_aux", "sinks") and isinstance(value, torch.Tensor) and tuple(value.shape) == (H,):
            kw["sinks"] = value  # gpt-oss: one logit per head in the softmax's denominator
        elif (name == "position_bias" and isinstance(value, torch.Tensor) and value.is_floating_point()
              and _broadcasts(value, (B, H, Nq, Nk))):
            bias = value  # T5's relative position bias (plus its causal part in the decoder)
        else:
            return None, f"{name}={type(value).__name__} (not in the kernel)"
    if dropout > 0:
        return None, "attention dropout in training"
    if query.shape[1] % key.shape[1] != 0:
        return None, "query heads not a multiple of the key/value heads"
    lo = hi = None  # the band of keys query i sees: i + lo <= j <= i + hi
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and Nq > 1:  # sdpa's is_causal: top-left, j <= i (one decoding query sees the whole cache)
            hi = 0
    elif getattr(attention_mask, "_minillm_band", None) is not None:
        band = attention_mask._minillm_band
        if (band.Nq, band.Nk) != (Nq, Nk):
            return None, "a mask made for other sequence lengths"
        if band.lo is not None and band.hi is not None and band.lo > band.hi:
            return None, "a mask that hides every key"
        lo, hi = band.lo, band.hi
        if band.kpm is not None:
            kw["key_padding_mask"] = band.kpm
    elif attention_mask.is_floating_point() and _broadcasts(attention_mask, (B, H, Nq, Nk)):
        # An additive float mask (Falcon's ALiBi, a model-made pattern): the kernel adds it as a bias, blockwise.
        bias = attention_mask if bias is None else bias + attention_mask
    elif attention_mask.dim() != 4:
        raise ValueError(f"minillm attention got a {attention_mask.dim()}-D attention mask without the band its mask "
                         f"function tagged it with: model code rebuilt it; use attn_implementation='sdpa' for this model")
    else:
        return None, "a mask that is not a band of keys (a model-made or dense pattern)"
    if bias is not None:
        kw["bias"] = bias
    return kw, (lo, hi)


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

    band = getattr(attention_mask, "_minillm_band", None)
    if band is not None and attention_mask.dim() != 4:  # a compact mask: the dense one transformers' functions take
        attention_mask = _dense_mask(band, query.device)
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
    kw, band = _native_kwargs(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if kw is None:
        _once(band)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    # grouped-query attention (fewer key/value heads) goes to the kernel as it is: no repeated K/V
    out = _attention_band(query, key, value, band[0], band[1], scale=scaling, **kw)
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
