"""The Trainer's optimizer step: AdamW (fused where torch has the kernel) and gradient clipping folded into it."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW as the Trainer runs it: weight decay on matrices only (not on biases and norms), and torch's fused
    kernel (one pass a parameter instead of about a dozen ops) where it has one for the parameters' device. Measured
    on the 27 parameters (0.8M values) of nanoGPT's baby GPT, Zen 4, 2 cores: a step 1.5 ms fused vs 6.5 ms as
    torch runs it on CPU by default (a loop of per-parameter ops)."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def _folds_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, whose kernel divides each gradient by `optimizer.grad_scale` as it reads
    it (the hook GradScaler uses to unscale in the same pass), when nothing else has set that attribute."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "grad_scale", None) is None and getattr(optimizer, "found_inf", None) is None)


def clip_grad_norm_and_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                            max_norm: float) -> torch.Tensor:
    """clip_grad_norm_(parameters, max_norm) then optimizer.step(), with the scaling by the clip coefficient done
    inside a fused Adam/AdamW's own pass over the gradients: the same coefficient (max_norm / (norm + 1e-6),
    at most 1) as torch.nn.utils.clip_grad_norm_, given to the kernel as its gradient divisor, instead of a
    separate multiply of every gradient (nanoGPT's baby GPT on 2 Zen 4 cores: clip + step 4.29 -> 3.57 ms,
    benchmarks/bench_train_parts.py). Other optimizers clip and step as usual. Returns the total norm before
    clipping. The weights differ from the separate clip by rounding only (the kernel divides by 1/coef rather than
    multiplying by coef)."""
    params = [p for p in parameters if p.grad is not None]
    if not _folds_grad_scale(optimizer) or not params:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        return total
    grads = [p.grad for p in params]
    if len({(g.device, g.dtype) for g in grads}) == 1:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    else:  # as clip_grad_norm_: the norm of each group's norms, in the first gradient's device
        dev = grads[0].device
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(dev) for g in grads]))
    coef = torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)
    optimizer.grad_scale = 1.0 / coef  # gradients divided by 1 / coef: multiplied by the clip coefficient
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return total
