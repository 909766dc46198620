"""RAGModel: retrieve passages, fit them into the model's context window by tokens, generate a grounded answer.

With a chat model (a tokenizer with a chat template, e.g. SmolLM2-Instruct from `minillm.models.smollm2_path()`),
the passages go into the user turn as numbered sources under a system instruction; with a plain language model,
into `prompt_template`. Passages are kept in rank order while they fit; the first that does not fit whole is cut
at a token boundary (when at least MIN_PASSAGE_TOKENS of it fit), the rest are left out.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from minillm.models import DecoderOnlyModel

log = logging.getLogger("minillm.rag")

DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {query}\nAnswer:"
CHAT_SYSTEM = ("You answer questions using only the numbered sources given with the question. Answer briefly. "
               "If the sources do not contain the answer, say that you do not know.")
CHAT_USER = "Sources:\n{context}\n\nQuestion: {query}"
MIN_PASSAGE_TOKENS = 24  # a cut passage shorter than this is left out instead (too little to ground anything)


class RAGModel:
    """Retrieval-augmented generation with a decoder-only model.

        rag = RAGModel(doc_store, model)            # tokenizer: given, or the one load_model_and_tokenizer attached
        answer = rag.generate("What is X?", top_k=3, max_length=100, temperature=0.7)
        answer, sources = rag.generate("What is X?", return_sources=True)   # sources numbered as in the prompt
        for piece in rag.stream("What is X?"): print(piece, end="")         # rag.last_sources: what it used

    chat: use the tokenizer's chat template (default: whenever it has one); system_prompt: the chat instruction.
    search_mode: the store's search mode ("hybrid" by default: words and meaning).
    """

    def __init__(self, doc_store, model: DecoderOnlyModel, tokenizer=None, prompt_template: str = DEFAULT_TEMPLATE,
                 chat: Optional[bool] = None, system_prompt: str = CHAT_SYSTEM, search_mode: str = "hybrid"):
        if not isinstance(model, DecoderOnlyModel):
            raise TypeError(f"RAGModel generates with a decoder-only model, got {type(model).__name__}")
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("RAGModel needs a tokenizer: pass tokenizer= or load the model with load_model_and_tokenizer")
        if "{context}" not in prompt_template or "{query}" not in prompt_template:
            raise ValueError("prompt_template must contain {context} and {query}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat=True needs a tokenizer with a chat template (a chat model's, e.g. SmolLM2-Instruct)")
        self.doc_store, self.model, self.tokenizer, self.prompt_template = doc_store, model, tokenizer, prompt_template
        self.chat = has_template if chat is None else bool(chat)
        self.system_prompt, self.search_mode = system_prompt, search_mode
        self.last_sources: List[Dict[str, Any]] = []

    def retrieve(self, query: str, top_k: int = 3, filter=None, **search_kwargs) -> List[Dict[str, Any]]:
        """The top_k passages for `query`: [{"id", "text", "score", "metadata"}]."""
        search_kwargs.setdefault("mode", self.search_mode)
        return self.doc_store.search(query, top_k=top_k, filter=filter, **search_kwargs)

    def render(self, query: str, passages: List[Dict[str, Any]]) -> str:
        """The prompt text for these passages (numbered [1], [2], ... in order)."""
        context = "\n\n".join(f"[{i}] {p['text']}" for i, p in enumerate(passages, 1))
        if not self.chat:
            return self.prompt_template.format(context=context, query=query)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        user = CHAT_USER.format(context=context, query=query) if passages else query
        return self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": user}])

    def build_prompt(self, query: str, passages: List[Dict[str, Any]], budget: int) -> Tuple[List[int], List[Dict]]:
        """Prompt token ids within `budget` tokens and the passages in it, best first, each with its "number" in the
        prompt; the last one kept may be cut at a token boundary ("truncated": True)."""
        encode = self.tokenizer.encode
        ids = encode(self.render(query, []))
        if len(ids) > budget:  # even without passages the question is too long: keep its end
            log.warning("the question alone takes %d tokens of a %d-token budget: its start is cut", len(ids), budget)
            return ids[-budget:], []
        kept: List[Dict[str, Any]] = []
        for p in passages:
            trial = kept + [dict(p, number=len(kept) + 1)]
            trial_ids = encode(self.render(query, trial))
            if len(trial_ids) <= budget:
                kept, ids = trial, trial_ids
                continue
            # Cut this passage to what is left: its tokens, less the excess, then shrink until the whole fits
            # (tokens merge differently at the new edge, so the count is re-checked).
            toks = encode(p["text"])
            keep = len(toks) - (len(trial_ids) - budget)
            while keep >= MIN_PASSAGE_TOKENS:
                cut = dict(p, text=self.tokenizer.decode(toks[:keep]).rstrip() + " ...", number=len(kept) + 1,
                           truncated=True)
                cut_ids = encode(self.render(query, kept + [cut]))
                if len(cut_ids) <= budget:
                    kept, ids = kept + [cut], cut_ids
                    break
                keep -= max(1, len(cut_ids) - budget)
            break
        return ids, kept

    def _prepare(self, query: str, top_k: int, max_length: int, filter, search_kwargs) -> Tuple[List[int], List[Dict]]:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        window = self.model.config.max_seq_len
        if max_length >= window:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt in a {window}-token context")
        passages = self.retrieve(query, top_k, filter=filter, **search_kwargs) if top_k else []
        ids, kept = self.build_prompt(query, passages, window - max_length)
        if len(kept) < len(passages) or any(p.get("truncated") for p in kept):
            log.info("prompt fits %d of %d passages (%s) in the %d-token window", len(kept), len(passages),
                     "the last cut" if kept and kept[-1].get("truncated") else "whole", window)
        self.last_sources = kept
        return ids, kept

    @torch.no_grad()
    def generate(self, query: str, top_k: int = 3, max_length: int = 100, temperature: float = 0.7,
                 top_p: Optional[float] = None, sample_top_k: Optional[int] = None, seed: Optional[int] = None,
                 filter=None, return_sources: bool = False, repetition_penalty: float = 1.0,
                 **search_kwargs) -> Union[str, Tuple[str, List[Dict[str, Any]]]]:
        """Retrieves top_k passages (top_k=0: none, the model answers alone), builds a prompt that leaves room for
        max_length new tokens in the model's context window, decodes with the KV cache, and returns the generated
        text (and, with return_sources=True, the passages in the prompt, numbered, with their scores).
        search_kwargs reach the store's search (where=, where_document=, mode=)."""
        ids, kept = self._prepare(query, top_k, max_length, filter, search_kwargs)
        prompt = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        out = self.model.generate(prompt, max_new_tokens=max_length, temperature=temperature, top_k=sample_top_k,
                                  top_p=top_p, eos_token_id=self.tokenizer.eos_token_id, seed=seed,
                                  repetition_penalty=repetition_penalty)
        text = self.tokenizer.decode(out[0, len(ids):].tolist()).strip()
        return (text, kept) if return_sources else text

    def stream(self, query: str, top_k: int = 3, max_length: int = 100, temperature: float = 0.7,
               top_p: Optional[float] = None, sample_top_k: Optional[int] = None, seed: Optional[int] = None,
               filter=None, stop=(), repetition_penalty: float = 1.0, **search_kwargs) -> Iterator[str]:
        """generate() as an iterator of text pieces, each yielded as soon as it is sampled; the passages it uses
        are in `self.last_sources` once the first piece is asked for."""
        ids, _ = self._prepare(query, top_k, max_length, filter, search_kwargs)
        yield from self.model.stream(ids, self.tokenizer, max_new_tokens=max_length, temperature=temperature,
                                     top_k=sample_top_k, top_p=top_p, seed=seed, stop=stop,
                                     repetition_penalty=repetition_penalty)
