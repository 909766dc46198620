"""Batch collation for causal LM, masked LM and seq2seq."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


def pad(seqs: Sequence[Sequence[int]], value: int) -> Tuple[Tensor, Tensor]:
    """(B, N) ids right-padded with `value`, and the (B, N) 0/1 attention mask."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def mask_tokens(ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int], mask_id: int, vocab_size: int,
                probability: float = 0.15, generator=None) -> Tuple[Tensor, Tensor]:
    """BERT masking: select `probability` of the real, non-special tokens; of those 80% become
    mask_id, 10% a random token and 10% stay. Returns (masked ids, labels with -100 unselected)."""
    candidates = attention_mask.bool() & ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype))
    selected = (torch.rand(ids.shape, generator=generator) < probability) & candidates
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[selected & (roll < 0.8)] = mask_id
    random_pos = selected & (roll >= 0.8) & (roll < 0.9)
    out[random_pos] = torch.randint(vocab_size, (int(random_pos.sum()),), generator=generator)
    return out, labels


class Collator:
    """Turns a list of token lists (or seq2seq pairs) into a batch dict for `task`.

    The task may be "auto" until the Trainer sets it from the model (clm for decoders, mlm for
    encoders). Randomness (MLM masking) draws from torch's global generator, whose state the
    Trainer checkpoints, so a resumed run masks exactly as an uninterrupted one.
    """

    def __init__(self, tokenizer, task: str = "auto", mlm_probability: float = 0.15):
        self.tokenizer, self.task, self.mlm_probability = tokenizer, task, mlm_probability
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _framed(self, seqs: List[List[int]]) -> List[List[int]]:
        # An encoder sees [CLS] ... [SEP] (or BOS ... EOS) when the tokenizer has them.
        return [self.tokenizer._frame(list(s)) for s in seqs]

    def __call__(self, items) -> Dict[str, Tensor]:
        task = self.task
        if task == "auto":
            raise RuntimeError("the collator's task is 'auto': pass task= to create_dataloaders, or train "
                               "with minillm's Trainer, which sets it from the model")
        if task == "seq2seq":
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
            if bos is None or eos is None:
                raise ValueError("seq2seq needs a tokenizer with BOS and EOS tokens")
            src, src_mask = pad([s for s, _ in items], self.pad_id)
            tgt, tgt_mask = pad([[bos] + list(t) for _, t in items], self.pad_id)
            labels, _ = pad([list(t) + [eos] for _, t in items], -100)
            return {"src_ids": src, "src_mask": src_mask, "tgt_ids": tgt, "tgt_mask": tgt_mask, "labels": labels}
        if task == "mlm":
            mask_id = self.tokenizer.mask_token_id
            if mask_id is None:
                raise ValueError("masked LM needs a tokenizer with a mask token")
            ids, attn = pad(self._framed(items), self.pad_id)
            ids, labels = mask_tokens(ids, attn, self.tokenizer.all_special_ids, mask_id, self.tokenizer.vocab_size,
                                      self.mlm_probability)
            return {"input_ids": ids, "attention_mask": attn, "labels": labels}
        ids, attn = pad(items, self.pad_id)
        return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}
