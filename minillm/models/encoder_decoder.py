"""EncoderDecoderModel ("transformer"): encoder + causal decoder with cross-attention."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from minillm import ops
from minillm.models.auto import register
from minillm.models.base import PreTrainedModel, lm_loss
from minillm.models.generation import check_sampling, decode
from minillm.models.layers import (Block, Embeddings, KVCache, check_input_ids, init_weights, make_norm,
                                   padding_mask)


@register("transformer")
class EncoderDecoderModel(PreTrainedModel):
    """Sequence-to-sequence transformer; encoder and decoder share one token embedding.

    ``model(src_ids, tgt_ids, src_mask=None, tgt_mask=None, labels=None) -> (logits (B, Nt, vocab), loss)``.
    """

    def __init__(self, config):
        super().__init__(config)
        c = self.config
        self.enc_embed = Embeddings(c)
        self.dec_embed = Embeddings(c)
        self.dec_embed.tok = self.enc_embed.tok
        self.encoder = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.decoder = nn.ModuleList(Block(c, cross=True) for _ in range(c.num_decoder_layers))
        pre = c.norm_position == "pre"
        self.enc_norm = make_norm(c) if pre else None
        self.dec_norm = make_norm(c) if pre else None
        self.lm_head = ops.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.num_layers + c.num_decoder_layers)
        if c.tie_embeddings:
            self.lm_head.weight = self.enc_embed.tok.weight

    def encode(self, src_ids: Tensor, src_mask: Optional[Tensor] = None) -> Tensor:
        """Encoder output (B, Ns, C)."""
        kpm = padding_mask(src_mask, src_ids)
        x = self.enc_embed(src_ids)
        for block in self.encoder:
            x = block(x, key_padding_mask=kpm)
        return self.enc_norm(x) if self.enc_norm is not None else x

    def memory_kv(self, memory: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values of the encoder output, computed once."""
        return [block.cross_attn.memory_kv(memory) for block in self.decoder]

    def decode_hidden(self, tgt_ids: Tensor, memory_kv: List[Tuple[Tensor, Tensor]], src_kpm: Optional[Tensor],
                      tgt_mask: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> Tensor:
        start = cache.length if cache is not None else 0
        x = self.dec_embed(tgt_ids, start)
        kpm = padding_mask(tgt_mask, tgt_ids)
        for i, block in enumerate(self.decoder):
            x = block(x, causal=True, key_padding_mask=kpm, cache=cache, layer=i, memory_kv=memory_kv[i],
                      memory_mask=src_kpm)
        if cache is not None:
            cache.advance(tgt_ids.shape[1])
        return self.dec_norm(x) if self.dec_norm is not None else x

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """src_ids/src_mask: (B, Ns); tgt_ids/tgt_mask: (B, Nt) decoder inputs starting with BOS;
        labels: (B, Nt), the token each decoder position predicts (-100 = ignore), i.e. tgt_ids
        shifted left by one. Returns (logits (B, Nt, vocab), mean loss or None)."""
        memory = self.encode(src_ids, src_mask)
        hidden = self.decode_hidden(tgt_ids, self.memory_kv(memory), padding_mask(src_mask, src_ids), tgt_mask)
        logits = self.lm_head(hidden)
        return logits, (lm_loss(logits, labels) if labels is not None else None)

    def compute_loss(self, batch: dict) -> Tensor:
        """Training entry point shared by all models: the loss of a collated seq2seq batch."""
        return self(batch["src_ids"], batch["tgt_ids"], batch.get("src_mask"), batch.get("tgt_mask"),
                    labels=batch["labels"])[1]

    def loss_logits_targets(self, batch: dict) -> Tuple[Tensor, Tensor, Tensor]:
        """(loss, logits (B, Nt, V), labels (B, Nt)): each decoder position's logits beside the token it predicts."""
        logits, loss = self(batch["src_ids"], batch["tgt_ids"], batch.get("src_mask"), batch.get("tgt_mask"),
                            labels=batch["labels"])
        return loss, logits, batch["labels"]

    @torch.no_grad()
    def generate(self, src_ids: Tensor, max_new_tokens: int = 50, src_mask: Optional[Tensor] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, seed: Optional[int] = None, bos_token_id: Optional[int] = None,
                 use_cache: bool = True) -> Tensor:
        """Decodes from BOS: (B, 1 + n) target ids. The encoder runs once; its cross-attention keys and
        values are cached per layer, and self-attention uses a KV cache (greedy output equals
        use_cache=False)."""
        check_input_ids(src_ids, self.config.vocab_size, self.config.max_seq_len)
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        bos = bos_token_id if bos_token_id is not None else self.config.bos_token_id
        if bos is None:
            raise ValueError("generation starts from a BOS token: pass bos_token_id or set config.bos_token_id")
        was_training = self.training
        self.eval()
        try:
            c = self.config
            memory_kv = self.memory_kv(self.encode(src_ids, src_mask))
            src_kpm = padding_mask(src_mask, src_ids)

            def step(ids: Tensor, cache: Optional[KVCache]) -> Tensor:
                return self.lm_head(self.decode_hidden(ids, memory_kv, src_kpm, cache=cache)[:, -1])

            capacity = min(c.max_seq_len, 1 + max_new_tokens)
            new_cache = (lambda: KVCache(c.num_decoder_layers, src_ids.shape[0], c.num_heads, capacity, c.head_dim,
                                         self.dec_embed.tok.weight.dtype, src_ids.device)) if use_cache else None
            start = torch.full((src_ids.shape[0], 1), bos, dtype=torch.long, device=src_ids.device)
            return decode(step, start, c.max_seq_len, new_cache, max_new_tokens, temperature, top_k, top_p,
                          eos_token_id, seed)
        finally:
            self.train(was_training)
