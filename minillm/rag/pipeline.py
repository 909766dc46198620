"""RAGModel: retrieve passages, fit them into the model's context window, generate an answer."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from minillm.models import DecoderOnlyModel

log = logging.getLogger("minillm.rag")

DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {query}\nAnswer:"


class RAGModel:
    """Retrieval-augmented generation with a decoder-only model.

        rag = RAGModel(doc_store, model)            # tokenizer: given, or the one load_model_and_tokenizer attached
        answer = rag.generate("What is X?", top_k=3, max_length=100, temperature=0.7)
        answer, sources = rag.generate("What is X?", return_sources=True)
    """

    def __init__(self, doc_store, model: DecoderOnlyModel, tokenizer=None, prompt_template: str = DEFAULT_TEMPLATE):
        if not isinstance(model, DecoderOnlyModel):
            raise TypeError(f"RAGModel generates with a decoder-only model, got {type(model).__name__}")
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("RAGModel needs a tokenizer: pass tokenizer= or load the model with load_model_and_tokenizer")
        if "{context}" not in prompt_template or "{query}" not in prompt_template:
            raise ValueError("prompt_template must contain {context} and {query}")
        self.doc_store, self.model, self.tokenizer, self.prompt_template = doc_store, model, tokenizer, prompt_template

    def retrieve(self, query: str, top_k: int = 3, filter=None) -> List[Dict[str, Any]]:
        """The top_k passages for `query`: [{"id", "text", "score", "metadata"}]."""
        return self.doc_store.search(query, top_k=top_k, filter=filter)

    def build_prompt(self, query: str, passages: List[Dict[str, Any]], budget: int) -> Tuple[List[int], List[Dict]]:
        """Prompt token ids within `budget` tokens, dropping the lowest-ranked passages first; returns the ids
        and the passages kept."""
        kept = list(passages)
        while True:
            context = "\n\n".join(p["text"] for p in kept)
            ids = self.tokenizer.encode(self.prompt_template.format(context=context, query=query))
            if len(ids) <= budget or not kept:
                break
            kept.pop()
        if len(ids) > budget:  # even without passages the question is too long: keep its end
            ids = ids[-budget:]
        return ids, kept

    @torch.no_grad()
    def generate(self, query: str, top_k: int = 3, max_length: int = 100, temperature: float = 0.7,
                 top_p: Optional[float] = None, sample_top_k: Optional[int] = None, seed: Optional[int] = None,
                 filter=None, return_sources: bool = False) -> Union[str, Tuple[str, List[Dict[str, Any]]]]:
        """Retrieves top_k passages, builds a prompt that leaves room for max_length new tokens in the
        model's context window, decodes with the KV cache, and returns the generated text (and, with
        return_sources=True, the passages that made it into the prompt, with their scores)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        window = self.model.config.max_seq_len
        if max_length >= window:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt in a {window}-token context")
        passages = self.retrieve(query, top_k, filter=filter)
        ids, kept = self.build_prompt(query, passages, window - max_length)
        if len(kept) < len(passages):
            log.info("prompt fits %d of %d passages in the %d-token window", len(kept), len(passages), window)
        prompt = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        out = self.model.generate(prompt, max_new_tokens=max_length, temperature=temperature, top_k=sample_top_k,
                                  top_p=top_p, eos_token_id=self.tokenizer.eos_token_id, seed=seed)
        text = self.tokenizer.decode(out[0, len(ids):].tolist())
        return (text, kept) if return_sources else text
