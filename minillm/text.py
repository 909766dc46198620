"""Sentence boundaries shared by the training data splitter and the RAG splitter."""
from __future__ import annotations

import re
from typing import List, Tuple

# Words that end with a period without ending a sentence (compared lower-case, final period removed).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig figs no nos vol inc ltd co corp dept est approx "
    "a.m p.m u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_END = re.compile(r"[.!?]+[\"')\]]*\s+")


def sentence_spans(text: str) -> List[Tuple[int, int]]:
    """(start, end) offsets of the sentences of `text`, whitespace between them excluded.

    A sentence ends at . ! or ? followed by whitespace, except after an abbreviation (Dr., e.g.,
    p.m.), a single letter (initials), or when the next word starts lower-case. A decimal point is
    never followed by whitespace, so 3.5 stays whole.
    """
    spans, start = [], 0
    for m in _END.finditer(text):
        end_punct = m.start() + len(m.group().rstrip())
        if m.group()[0] == ".":
            word = text[:m.start()].rsplit(None, 1)[-1].lower() if text[:m.start()].split() else ""
            nxt = text[m.end():m.end() + 1]
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or (nxt and nxt.islower()):
                continue
        spans.append((start, end_punct))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return [(s + (len(text[s:e]) - len(text[s:e].lstrip())), e) for s, e in spans if text[s:e].strip()]


def split_sentences(text: str) -> List[str]:
    return [text[s:e] for s, e in sentence_spans(text)]
