"""DecoderOnlyModel: a GPT (pre-norm, causal attention, tied embeddings) with KV-cache generation."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from minillm import ops
from minillm.models.auto import register
from minillm.models.base import PreTrainedModel, lm_loss
from minillm.models.generation import check_sampling, decode, decode_steps, stream_text
from minillm.models.layers import (Block, Embeddings, KVCache, Rope, check_input_ids, init_weights, make_norm,
                                   padding_mask, rope_tables)
from minillm.models.native_decode import native_step


@register("decoder_only")
class DecoderOnlyModel(PreTrainedModel):
    """GPT-like language model.

    ``model(input_ids, labels=None) -> (logits (B, N, vocab), loss or None)``.
    """

    def __init__(self, config):
        super().__init__(config)
        c = self.config
        self.embed = Embeddings(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm_f = make_norm(c) if c.norm_position == "pre" else None
        self.lm_head = ops.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.num_layers)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      cache: Optional[KVCache] = None, *, key_padding_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) final hidden states. With a cache, input_ids continue the cached tokens.

        attention_mask (B, N): padding of input_ids (no cache). Generation from left-padded prompts passes instead
        key_padding_mask (B, T + N) over the cached and new keys and position_ids (B, N), each token's position
        counted over its own sequence's real tokens."""
        start = cache.length if cache is not None else 0
        x = self.embed(input_ids, start, position_ids=position_ids)
        kpm = key_padding_mask if key_padding_mask is not None else padding_mask(attention_mask, input_ids)
        if attention_mask is not None and cache is not None:
            raise ValueError("attention_mask with a KV cache: pass key_padding_mask over all keys (generate does)")
        rope = None
        if self.config.position_embedding == "rope":
            if position_ids is not None:  # (B, N, Dh) tables, broadcast over heads as (B, 1, N, Dh)
                tables = rope_tables(self.config, position_ids, x.dtype)
                rope = Rope(tables.cos[:, None], tables.sin[:, None])
            else:  # (N, Dh) tables for positions start .. start + N - 1
                rope = rope_tables(self.config, torch.arange(start, start + input_ids.shape[1], device=x.device),
                                   x.dtype)
        fused = native_step(self, x, cache, kpm, rope) if rope is not None else None  # a decoding step, natively
        if fused is not None:
            x = fused
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, causal=True, key_padding_mask=kpm, cache=cache, layer=i, rope=rope)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm_f(x) if self.norm_f is not None else x

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """input_ids, attention_mask (1 = token, 0 = padding): (B, N).

        labels: (B, N) copies of input_ids (-100 = ignore), shifted inside: position t predicts
        labels[t + 1] (Hugging Face convention). targets: (B, N) next-token ids already aligned with
        the inputs, as in nanoGPT. Returns (logits (B, N, vocab), mean loss or None).
        """
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        elif targets is not None:
            loss = lm_loss(logits, targets)
        return logits, loss

    def compute_loss(self, batch: dict) -> Tensor:
        """Training entry point shared by all models: the loss of a collated batch."""
        return self(batch["input_ids"], labels=batch.get("labels"), attention_mask=batch.get("attention_mask"))[1]

    def loss_logits_targets(self, batch: dict) -> Tuple[Tensor, Tensor, Tensor]:
        """(loss, logits (B, N-1, V), targets (B, N-1)) of a collated batch: position t's logits next to the token
        it predicts, labels[t + 1] (-100 = not scored). Evaluation metrics (the Trainer's compute_metrics) use it."""
        logits, loss = self(batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"))
        return loss, logits[:, :-1], batch["labels"][:, 1:]

    def _last_logits(self, ids: Tensor, cache: Optional[KVCache]) -> Tensor:
        return self.lm_head(self.hidden_states(ids, cache=cache)[:, -1])  # (B, V)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 50, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 seed: Optional[int] = None, use_cache: bool = True,
                 attention_mask: Optional[Tensor] = None, repetition_penalty: float = 1.0) -> Tensor:
        """Continues each prompt of input_ids (B, T) by up to max_new_tokens tokens: (B, T + n).

        temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible with
        `seed`. Decoding uses a KV cache (each step attends one new query to the cache); greedy output
        is the same with use_cache=False. Prompts of different lengths come left-padded with their
        attention_mask (B, T) (1 = token): padded keys are never attended to, and each sequence's positions
        count its own tokens, so a batch decodes as its prompts would one by one. repetition_penalty > 1 lowers
        the logits of tokens already in the sequence (prompt included), as transformers' does.
        """
        args = self._decode_args(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, use_cache,
                                 attention_mask, repetition_penalty)
        was_training = self.training
        self.eval()
        try:
            return decode(*args)
        finally:
            self.train(was_training)

    def _decode_args(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, use_cache,
                     attention_mask=None, repetition_penalty=1.0):
        check_input_ids(input_ids, self.config.vocab_size, 1 << 62)
        check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one prompt token per sequence")
        c = self.config
        capacity = min(c.max_seq_len, input_ids.shape[1] + max_new_tokens)  # no cache memory beyond the need
        new_cache = (lambda: KVCache(c.num_layers, input_ids.shape[0], c.num_kv_heads, capacity, c.head_dim,
                                     self.embed.tok.weight.dtype, input_ids.device)) if use_cache else None
        step = self._last_logits
        mask = padding_mask(attention_mask, input_ids)
        if mask is not None and not bool(mask.all()):
            step = self._padded_step(mask, max_new_tokens)
        return (step, input_ids, c.max_seq_len, new_cache, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                seed, repetition_penalty)

    def _padded_step(self, mask: Tensor, max_new_tokens: int):
        """decode_steps' step for left-padded prompts: the key padding of the keys in play and each query's
        position among its sequence's tokens, from the prompt mask followed by the generated tokens."""
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("generate takes left-padded prompts (padding before each prompt's tokens, "
                             "padding_side='left'); this attention_mask pads elsewhere")
        B, T = mask.shape
        full = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, T + n): every token the loop sees
        calls, base = [0], [0]

        def step(ids: Tensor, cache: Optional[KVCache]) -> Tensor:
            total, n = T + calls[0], ids.shape[1]  # decode_steps appends one token per call
            calls[0] += 1
            if cache is not None:
                if cache.length == 0:
                    base[0] = total - n  # the first token the cache holds
                keys = full[:, base[0]:base[0] + cache.length + n]
            else:  # a window of the last n tokens, recomputed
                keys = full[:, total - n:total]
            positions = (keys.long().cumsum(1) - 1).clamp_min(0)[:, -n:]  # (B, n)
            h = self.hidden_states(ids, cache=cache, key_padding_mask=keys, position_ids=positions)
            return self.lm_head(h[:, -1])

        return step

    @torch.no_grad()
    def stream(self, prompt: str, tokenizer, max_new_tokens: int = 50, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
               seed: Optional[int] = None, stop=(), repetition_penalty: float = 1.0):
        """The continuation of `prompt` (text, or its token ids) as an iterator of text pieces, each yielded as soon
        as its tokens are sampled (generate's sampling; eos_token_id defaults to the tokenizer's). The pieces join to
        the decoded continuation, which ends before the first of the `stop` strings if one appears."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        args = self._decode_args(ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, True, None,
                                 repetition_penalty)
        was_training = self.training
        self.eval()
        try:
            yield from stream_text(decode_steps(*args), tokenizer, ids.shape[1], stop)
        finally:
            self.train(was_training)
