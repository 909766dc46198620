"""Scoring a causal language model on a token stream: next-token negative log-likelihoods (perplexity = exp of their
mean) and the model's argmax predictions, window by window."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


@torch.no_grad()
def next_token_nll(model, ids: Tensor, window: int = 512) -> Tuple[Tensor, Tensor]:
    """(nll, argmax) over consecutive, non-overlapping windows of `window` tokens of ids (T,) (a partial last window
    is dropped): each window predicts its tokens 1 .. window - 1 from those before them within the window, so every
    window contributes window - 1 values. nll: (n,) fp32 per predicted token; argmax: (n,) the model's top token."""
    if ids.dim() != 1 or ids.numel() < window or window < 2:
        raise ValueError(f"ids must be 1-D with at least window >= 2 tokens, got shape {tuple(ids.shape)} and "
                         f"window {window}")
    nll, preds = [], []
    for s in range(0, ids.numel() - window + 1, window):
        w = ids[s:s + window][None]  # (1, window)
        logits = model(w)[0][0, :-1].float()  # (window - 1, V): position t predicts token t + 1
        nll.append(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="none"))
        preds.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(preds)
