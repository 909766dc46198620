"""Token sampling and the decoding loop shared by the decoder-only and encoder-decoder models."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from minillm.models.layers import KVCache


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty: float = 1.0) -> None:
    if not (repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def penalize_repetition(logits: Tensor, idx: Tensor, penalty: float) -> Tensor:
    """The CTRL paper's repetition penalty, as transformers applies it: the logit of every token already in idx
    (B, T) is divided by `penalty` when positive and multiplied by it when negative. logits: (B, V)."""
    seen = torch.gather(logits, 1, idx)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, idx, seen)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (B,) from logits (B, V): greedy when temperature == 0, else softmax sampling
    after temperature scaling, top-k and nucleus (top-p) filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode(*args, **kwargs) -> Tensor:
    """Appends up to max_new_tokens sampled tokens to idx (B, T) and returns (B, T + n): decode_steps run to the
    end (see there for the arguments)."""
    idx = args[1] if len(args) > 1 else kwargs["idx"]
    for idx in decode_steps(*args, **kwargs):
        pass
    return idx


def decode_steps(
    step: Callable[[Tensor, Optional[KVCache]], Tensor],
    idx: Tensor,
    capacity: int,
    new_cache: Optional[Callable[[], KVCache]],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    eos_token_id: Optional[int],
    seed: Optional[int],
    repetition_penalty: float = 1.0,
) -> Iterator[Tensor]:
    """Yields idx (B, T + i) after each of up to max_new_tokens sampled tokens is appended to idx (B, T).

    step(ids, cache) returns the logits (B, V) after the last of `ids`. With a cache, the first call
    feeds the prompt and later calls one token each. Once the context reaches `capacity` tokens (the
    positional limit), every step re-reads the last `capacity` tokens without a cache, exactly as the
    uncached path does from the start, so cached and uncached greedy decoding agree token for token.
    Sequences that emit eos_token_id keep emitting it; the loop stops when all have.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = new_cache() if new_cache is not None else None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is not None and cache.length == 0:
            logits = step(idx[:, -capacity:], cache)
        elif cache is not None and cache.length < capacity:
            logits = step(idx[:, -1:], cache)
        else:
            cache = None
            logits = step(idx[:, -capacity:], None)
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, idx, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        yield idx
        if eos_token_id is not None and bool(finished.all()):
            break


def stream_text(steps: Iterator[Tensor], tokenizer, prompt_length: int, stop=()) -> Iterator[str]:
    """The text of one sequence's new tokens, piece by piece as `steps` (decode_steps for a batch of one) appends
    them: each piece is what the decoded text grew by, held back while it ends inside a character (byte-level
    tokens can split one) or could be the start of a stop string, so that the pieces join to the decoded text, cut
    before the first stop string (where generation then ends)."""
    shown = ""
    text = ""
    for idx in steps:
        text = tokenizer.decode(idx[0, prompt_length:].tolist())
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        if text.endswith("\ufffd"):  # a character still incomplete
            continue
        # hold back a tail that a stop string could still complete
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        ready = text[:len(text) - hold]
        if len(ready) > len(shown) and ready.startswith(shown):
            yield ready[len(shown):]
            shown = ready
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]
