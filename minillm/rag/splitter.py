"""DocumentProcessor: split text into retrieval chunks by paragraph, sentence, size, section or pattern.

Every method works on spans of the original text, so `split_spans` can return (start, end) offsets
with ``text[start:end] == chunk``. Lengths are characters, or tokens when a tokenizer (or any
length_function) is given; no chunk is longer than max_length (longer pieces are cut at word
boundaries, inside a word only when the word alone is too long); pieces shorter than min_length
merge with a neighbour.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from minillm.text import sentence_spans

METHODS = ("paragraph", "sentence", "chunk", "semantic", "regex")
Span = Tuple[int, int]

_MD_HEADING = re.compile(r"^ {0,3}#{1,6}\s+\S.*$", re.M)
# reStructuredText: a title line under (and optionally over) a line of one repeated punctuation character.
_RST_CHARS = r"[=\-~^*+#\"'`:.]"
_RST_HEADING = re.compile(
    rf"^(?:(?P<o>{_RST_CHARS})(?P=o){{2,}}[ \t]*\n)?(?P<title>[^\s].*)\n(?P<u>{_RST_CHARS})(?P=u){{2,}}[ \t]*$", re.M)


@dataclass
class Chunk:
    text: str  # the chunk as returned by split_text (semantic sub-chunks carry their section heading)
    start: int  # text[start:end] is the chunk's own span of the document
    end: int
    heading: Optional[str] = None


def _trim(text: str, s: int, e: int) -> Optional[Span]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return (s, e) if e > s else None


def _pieces_between(text: str, s: int, e: int, separators: List[Span]) -> List[Span]:
    out, pos = [], s
    for a, b in separators:
        if a >= pos:
            span = _trim(text, pos, a)
            if span:
                out.append(span)
            pos = b
    span = _trim(text, pos, e)
    if span:
        out.append(span)
    return out


class DocumentProcessor:
    """Text splitting for retrieval (the seed's API): ``DocumentProcessor.split_text(text, method=...)``."""

    @staticmethod
    def _length_fn(length_function, tokenizer) -> Callable[[str], int]:
        if length_function is not None and tokenizer is not None:
            raise ValueError("pass length_function or tokenizer, not both")
        if tokenizer is not None:
            return lambda s: len(tokenizer.encode(s))
        return length_function or len

    @staticmethod
    def _base_spans(text: str, method: str, pattern: Optional[str]) -> List[Tuple[Span, Optional[str]]]:
        """(span, heading) pieces before any length rule."""
        if method == "paragraph":
            seps = [m.span() for m in re.finditer(r"\n[ \t]*\n\s*", text)]
            return [(sp, None) for sp in _pieces_between(text, 0, len(text), seps)]
        if method == "sentence":  # sentences never run across a paragraph break
            paragraphs = _pieces_between(text, 0, len(text), [m.span() for m in re.finditer(r"\n[ \t]*\n\s*", text)])
            return [((a + s, a + e), None) for a, b in paragraphs for s, e in sentence_spans(text[a:b])]
        if method == "regex":
            if not pattern:
                raise ValueError("method='regex' needs pattern=")
            seps = [m.span() for m in re.finditer(pattern, text) if m.end() > m.start()]
            return [(sp, None) for sp in _pieces_between(text, 0, len(text), seps)]
        if method == "chunk":
            span = _trim(text, 0, len(text))
            return [(span, None)] if span else []
        # semantic: sections from one heading to the next; the heading line stays in its section.
        heads = sorted({(m.start(), m.group().strip()) for m in _MD_HEADING.finditer(text)}
                       | {(m.start(), m.group("title").strip()) for m in _RST_HEADING.finditer(text)})
        starts = [0] + [h[0] for h in heads if h[0] > 0] + [len(text)]
        titles = {h[0]: h[1].lstrip("#").strip() for h in heads}
        out = []
        for a, b in zip(starts, starts[1:]):
            span = _trim(text, a, b)
            if span:
                out.append((span, titles.get(a)))
        return out

    @staticmethod
    def _cut(text: str, span: Span, max_length: int, length: Callable[[str], int],
             overlap: int = 0) -> List[Span]:
        """Splits a span into pieces of at most max_length at word boundaries; with overlap, each piece
        starts at a word boundary at least `overlap` (in length units) before the previous one's end."""
        s, e = span
        if length(text[s:e]) <= max_length and not overlap:
            return [span]
        words = [(s + m.start(), s + m.end()) for m in re.finditer(r"\S+", text[s:e])]
        out, i = [], 0
        while i < len(words):
            start = words[i][0]
            j = i
            while j + 1 < len(words) and length(text[start:words[j + 1][1]]) <= max_length:
                j += 1
            end = words[j][1]
            if length(text[start:end]) > max_length:  # one word alone is too long: cut inside it
                end = start + 1
                while end < words[j][1] and length(text[start:end + 1]) <= max_length:
                    end += 1
                out.append((start, end))
                words[i] = (end, words[i][1])
                continue
            out.append((start, end))
            if j + 1 >= len(words):
                break
            nxt = j + 1
            if overlap:
                # Step back to the latest word start that leaves at least `overlap` shared.
                k = j
                while k > i and length(text[words[k][0]:end]) < overlap:
                    k -= 1
                nxt = max(k, i + 1)
            i = nxt
        return out

    @staticmethod
    def _merge_short(text: str, spans: List[Span], min_length: int, max_length: int,
                     length: Callable[[str], int]) -> List[Span]:
        out: List[Span] = []
        for sp in spans:
            if out and (length(text[out[-1][0]:out[-1][1]]) < min_length or length(text[sp[0]:sp[1]]) < min_length) \
                    and length(text[out[-1][0]:sp[1]]) <= max_length:
                out[-1] = (out[-1][0], sp[1])
            else:
                out.append(sp)
        return out

    @classmethod
    def split_chunks(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                     overlap: int = 0, pattern: Optional[str] = None,
                     length_function: Optional[Callable[[str], int]] = None, tokenizer=None) -> List[Chunk]:
        """Chunks with their spans (and, for method='semantic', their section heading)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if not 0 <= min_length <= max_length:
            raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")
        if not 0 <= overlap < max_length:
            raise ValueError(f"overlap must be in [0, max_length={max_length}), got {overlap}")
        if overlap and method != "chunk":
            raise ValueError("overlap applies to method='chunk'")
        length = cls._length_fn(length_function, tokenizer)
        pieces: List[Tuple[Span, Optional[str], bool]] = []  # (span, section heading, continues a section)
        for span, heading in cls._base_spans(text, method, pattern):
            budget = max_length
            if heading and length(text[span[0]:span[1]]) > max_length:
                budget = max(1, max_length - length(heading + "\n"))  # room for the heading on later pieces
            for k, sp in enumerate(cls._cut(text, span, budget, length, overlap)):
                pieces.append((sp, heading, k > 0))
        if method != "chunk" and min_length:
            merged: List[Tuple[Span, Optional[str], bool]] = []
            for sp, heading, cont in pieces:
                if merged:
                    (ps, pe), ph, pc = merged[-1]
                    short = length(text[ps:pe]) < min_length or length(text[sp[0]:sp[1]]) < min_length
                    if short and length(text[ps:sp[1]]) + (length(ph + "\n") if pc and ph else 0) <= max_length:
                        merged[-1] = ((ps, sp[1]), ph, pc)
                        continue
                merged.append((sp, heading, cont))
            pieces = merged
        chunks = []
        for (s, e), heading, cont in pieces:
            body = text[s:e]
            chunks.append(Chunk(f"{heading}\n{body}" if heading and cont else body, s, e, heading))
        return chunks

    @classmethod
    def split_spans(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                    **kwargs) -> List[Span]:
        """(start, end) offsets of the chunks: ``text[start:end]`` is each chunk's own text."""
        return [(c.start, c.end) for c in cls.split_chunks(text, method, min_length, max_length, **kwargs)]

    @classmethod
    def split_text(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                   overlap: int = 0, pattern: Optional[str] = None,
                   length_function: Optional[Callable[[str], int]] = None, tokenizer=None) -> List[str]:
        """Chunks of `text` as strings (see the module docstring for the rules)."""
        return [c.text for c in cls.split_chunks(text, method, min_length, max_length, overlap, pattern,
                                                 length_function, tokenizer)]
