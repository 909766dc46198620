"""EncoderOnlyModel: a BERT (bidirectional attention over the padding mask) with an MLM head."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minillm import ops
from minillm.models.auto import register
from minillm.models.base import PreTrainedModel, lm_loss
from minillm.models.layers import Block, Embeddings, Packed, activation_fn, init_weights, make_norm, padding_mask


def pool(hidden: Tensor, attention_mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """Sentence vectors (B, C) from hidden states (B, N, C): the mean over tokens with mask 1, or the
    first ([CLS]) token."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"pooling mode must be 'mean' or 'cls', got {mode!r}")
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, N, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


class MLMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the (tied) vocabulary projection."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = activation_fn(config.activation)
        self.norm = ops.LayerNorm(config.d_model, eps=config.norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(h)))) + self.bias


@register("encoder_only")
class EncoderOnlyModel(PreTrainedModel):
    """BERT-like encoder.

    ``model(input_ids, attention_mask) -> hidden states (B, N, d_model)``;
    ``model(input_ids, attention_mask, labels=labels) -> (mlm logits, loss)``;
    ``model.predict_mlm(input_ids, attention_mask) -> logits (B, N, vocab)``.
    """

    def __init__(self, config):
        super().__init__(config)
        c = self.config
        self.embed = Embeddings(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm_f = make_norm(c) if c.norm_position == "pre" else None
        self.mlm_head = MLMHead(c)
        init_weights(self, c.num_layers)
        if c.tie_embeddings:
            self.mlm_head.decoder.weight = self.embed.tok.weight

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) hidden states; positions where attention_mask is 0 are returned as zeros.

        A batch with padding runs on its real tokens only (see layers.Packed): padding costs no
        matmul work, which is where variable-length batches gain most.
        """
        kpm = padding_mask(attention_mask, input_ids)
        x = self.embed(input_ids, token_type_ids=token_type_ids)
        packed = None
        if kpm is not None and not torch.compiler.is_compiling() and not bool(kpm.all()):
            packed = Packed.from_mask(kpm)
            x = packed.pack(x)  # (T, C)
        for block in self.blocks:
            x = block(x, key_padding_mask=kpm, packed=packed)
        if self.norm_f is not None:
            x = self.norm_f(x)
        return packed.unpack(x) if packed is not None else x

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids, labels: (B, N).

        Without labels: hidden states (B, N, d_model). With labels (token ids at masked positions,
        -100 elsewhere): (MLM logits (B, N, vocab), mean loss).
        """
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return hidden
        logits = self.mlm_head(hidden)
        return logits, lm_loss(logits, labels)

    def predict_mlm(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    token_type_ids: Optional[Tensor] = None) -> Tensor:
        """MLM logits (B, N, vocab)."""
        return self.mlm_head(self.encode(input_ids, attention_mask, token_type_ids))

    def compute_loss(self, batch: dict) -> Tensor:
        """Training entry point shared by all models: the MLM loss of a collated batch."""
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                    labels=batch["labels"])[1]

    def loss_logits_targets(self, batch: dict) -> Tuple[Tensor, Tensor, Tensor]:
        """(loss, MLM logits (B, N, V), labels (B, N)): -100 marks the positions not scored (the unmasked ones)."""
        logits, loss = self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                            labels=batch["labels"])
        return loss, logits, batch["labels"]

    def sentence_embeddings(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                            pooling: str = "mean", normalize: bool = True) -> Tensor:
        """(B, d_model) pooled sentence vectors, L2-normalised by default."""
        vec = pool(self.encode(input_ids, attention_mask), attention_mask, pooling)
        return F.normalize(vec, dim=-1) if normalize else vec
