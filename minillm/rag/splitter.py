"""DocumentProcessor: split text into retrieval chunks by paragraph, sentence, size, section (Markdown / reST
structure), pattern, or recursively by a list of separators.

Every method works on spans of the original text, so `split_spans` can return (start, end) offsets
with ``text[start:end] == chunk``. Lengths are characters, or tokens when a tokenizer (or any
length_function) is given; no chunk is longer than max_length (longer pieces are cut at word
boundaries, inside a word only when the word alone is too long); pieces shorter than min_length
merge with a neighbour; `overlap` makes each chunk begin at least that much before the previous one ends.

method="semantic" reads the document's structure: Markdown ATX (#) and setext headings, reStructuredText titles,
and code (Markdown fences, reST literal blocks after "::", code directives, doctest blocks). Code is never cut
inside (unless one block alone exceeds max_length; then at its line ends) and a `# comment` in it is never a
heading. Each chunk carries its heading path (["Guide", "Files", "Opening"]).
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from minillm.text import sentence_spans

METHODS = ("paragraph", "sentence", "chunk", "semantic", "regex", "recursive")
SEPARATORS = ["\n\n", "\n", ". ", " ", ""]  # the recursive method's default, coarsest first (as LangChain's)
Span = Tuple[int, int]

_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+\S.*$", re.M)
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})")
# reST directives whose content is code (any other directive's content is prose: note, warning, ...)
_CODE_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:code-block|code|sourcecode|doctest|testcode|testsetup|testoutput|"
                             r"literalinclude|highlight)::")
# reStructuredText: a title line under (and optionally over) a line of one repeated punctuation character.
_RST_CHARS = r"[=\-~^*+#\"'`:.]"
_RST_HEADING = re.compile(
    rf"^(?:(?P<o>{_RST_CHARS})(?P=o){{2,}}[ \t]*\n)?(?P<title>[^\s].*)\n(?P<u>{_RST_CHARS})(?P=u){{2,}}[ \t]*$", re.M)


@dataclass
class Chunk:
    text: str  # the chunk as returned by split_text (semantic sub-chunks carry their section heading)
    start: int  # text[start:end] is the chunk's own span of the document
    end: int
    heading: Optional[str] = None  # the innermost heading (method="semantic")
    headings: Optional[List[str]] = None  # the heading path, outermost first (method="semantic")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def code_regions(text: str) -> List[Span]:
    """Spans of code in Markdown or reST: fenced blocks (``` or ~~~, to the closing fence or the end), literal
    blocks (the indented lines after a paragraph ending in "::"), code directives with their indented content,
    and doctest blocks (">>>" lines to the next blank line)."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    regions, i, n = [], 0, len(lines)

    def indented_block(first: int, base: int) -> int:
        """Index past the block of blank or more-than-`base`-indented lines from `first` (trailing blanks out)."""
        j, last = first, first
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            if lines[j].strip():
                last = j + 1
            j += 1
        return last

    while i < n:
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            mark = fence.group(2)
            close = re.compile(rf"^ {{0,3}}{re.escape(mark[0])}{{{len(mark)},}}\s*$")
            j = i + 1
            while j < n and not close.match(lines[j]):
                j += 1
            end = min(j + 1, n)
            regions.append((starts[i], starts[end]))
            i = end
            continue
        directive = _CODE_DIRECTIVE.match(line)
        stripped = line.rstrip()
        if directive or (stripped.endswith("::") and not stripped.lstrip().startswith("..")):
            base = _indent(line)
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            if directive or (j > i + 1 and j < n and _indent(lines[j]) > base):  # "::" needs a blank line
                end = indented_block(i + 1, base)
                if end > i + 1:
                    regions.append((starts[i if directive else j], starts[end]))
                    i = end
                    continue
        if line.lstrip().startswith(">>>") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < n and lines[j].strip():
                j += 1
            regions.append((starts[i], starts[j]))
            i = j
            continue
        i += 1
    # from the first to the last non-space character, as chunks are trimmed
    return [(a + len(text[a:b]) - len(text[a:b].lstrip()), a + len(text[a:b].rstrip()))
            for a, b in regions if text[a:b].strip()]


def _region_at(pos: int, regions: List[Span]) -> Optional[Span]:
    """The region (sorted, disjoint) holding `pos`, or None."""
    k = bisect.bisect_right(regions, (pos, float("inf"))) - 1
    return regions[k] if k >= 0 and regions[k][0] <= pos < regions[k][1] else None


def _inside(pos: int, regions: List[Span]) -> bool:
    return _region_at(pos, regions) is not None


def headings(text: str, regions: Optional[List[Span]] = None) -> List[Tuple[int, int, str]]:
    """(start, level, title) of every heading outside code, in order. ATX levels are their # count; underlined
    (and overlined) titles take levels in the order their adornment style first appears, as reST defines, after
    any ATX level (Markdown's setext: = then -)."""
    regions = code_regions(text) if regions is None else regions
    found = {}
    for m in _MD_HEADING.finditer(text):
        if not _inside(m.start(1), regions):  # regions start at their first non-space character
            found[m.start()] = ("#", len(m.group(1)), m.group().strip().strip("#").strip())
    styles: List[Tuple[str, bool]] = []
    for m in _RST_HEADING.finditer(text):
        if m.start() in found or _inside(m.start(), regions) or _inside(m.start("title"), regions):
            continue
        style = (m.group("u"), m.group("o") is not None)
        if style not in styles:
            styles.append(style)
        found[m.start()] = ("rst", style, m.group("title").strip())
    markdown = any(kind == "#" for kind, _, _ in found.values())
    out = []
    for start in sorted(found):
        kind, level, title = found[start]
        if kind == "rst":  # Markdown's setext headings: "=" level 1, "-" level 2; reST: order of first use
            level = (1 if level[0] == "=" else 2) if markdown else styles.index(level) + 1
        out.append((start, level, title))
    return out


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
    def _base_spans(text: str, method: str, pattern: Optional[str], regions: List[Span]
                    ) -> List[Tuple[Span, Optional[str], Optional[List[str]]]]:
        """(span, section heading, heading path) pieces before any length rule."""
        if method == "paragraph":
            seps = [m.span() for m in re.finditer(r"\n[ \t]*\n\s*", text)]
            return [(sp, None, None) for sp in _pieces_between(text, 0, len(text), seps)]
        if method == "sentence":  # sentences never run across a paragraph break
            paragraphs = _pieces_between(text, 0, len(text), [m.span() for m in re.finditer(r"\n[ \t]*\n\s*", text)])
            return [((a + s, a + e), None, None) for a, b in paragraphs for s, e in sentence_spans(text[a:b])]
        if method == "regex":
            if not pattern:
                raise ValueError("method='regex' needs pattern=")
            seps = [m.span() for m in re.finditer(pattern, text) if m.end() > m.start()]
            return [(sp, None, None) for sp in _pieces_between(text, 0, len(text), seps)]
        if method in ("chunk", "recursive"):
            span = _trim(text, 0, len(text))
            return [(span, None, None)] if span else []
        # semantic: sections from one heading to the next; the heading line stays in its section.
        heads = headings(text, regions)
        starts = [0] + [h[0] for h in heads if h[0] > 0] + [len(text)]
        at = {h[0]: h for h in heads}
        out, path = [], []  # path: (level, title) of the headings above and at the current section
        for a, b in zip(starts, starts[1:]):
            if a in at:
                _, level, title = at[a]
                path = [p for p in path if p[0] < level] + [(level, title)]
            span = _trim(text, a, b)
            if span:
                out.append((span, at[a][2] if a in at else None, [t for _, t in path]))
        return out

    @staticmethod
    def _units(text: str, span: Span, max_length: int, length: Callable[[str], int],
               regions: List[Span]) -> List[Span]:
        """The span's words, with each code region in it as one unit (its lines when it alone is too long)."""
        s, e = span
        units: List[Span] = []
        for m in re.finditer(r"\S+", text[s:e]):
            a, b = s + m.start(), s + m.end()
            region = _region_at(a, regions)
            if region is None:
                units.append((a, b))
                continue
            ra, rb = max(region[0], s), min(region[1], e)
            if units and units[-1][1] > ra:
                continue  # a later word of a region already added
            region = _trim(text, ra, rb)
            if length(text[region[0]:region[1]]) <= max_length:
                units.append(region)
                continue
            pos = region[0]  # too long for one chunk: its lines are the units
            for line in text[region[0]:region[1]].splitlines(keepends=True):
                piece = _trim(text, pos, pos + len(line))
                if piece:
                    units.append(piece)
                pos += len(line)
        return units

    @classmethod
    def _cut(cls, text: str, span: Span, max_length: int, length: Callable[[str], int],
             overlap: int = 0, regions: Sequence[Span] = ()) -> List[Span]:
        """Splits a span into pieces of at most max_length at word boundaries (code regions whole); with overlap,
        each piece starts at a word boundary at least `overlap` (in length units) before the previous one's end."""
        s, e = span
        if length(text[s:e]) <= max_length and not overlap:
            return [span]
        words = cls._units(text, span, max_length, length, list(regions))
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

    @classmethod
    def _recursive(cls, text: str, span: Span, separators: List[str], max_length: int,
                   length: Callable[[str], int]) -> List[Span]:
        """LangChain's recursive splitting, on spans: cut at the first separator the text holds (each piece keeps
        the separator that ends it), pack neighbouring pieces up to max_length, and split a piece still too long
        with the next separators; past the last one (or at ""), at words, inside a word only when it alone is
        too long."""
        s, e = span
        if length(text[s:e]) <= max_length:
            return [span]
        for i, sep in enumerate(separators):
            if sep and sep in text[s:e]:
                break
        else:
            return cls._cut(text, span, max_length, length)
        rest = separators[i + 1:]
        out: List[Span] = []
        packable = False  # whether out[-1] may take the next piece (not when it came from a finer split)
        pos = s
        while pos < e:
            idx = text.find(sep, pos, e)
            end = e if idx < 0 else idx + len(sep)
            piece = _trim(text, pos, end)
            pos = end
            if not piece:
                continue
            a, b = piece
            if length(text[a:b]) > max_length:
                out.extend(cls._recursive(text, piece, rest, max_length, length))
                packable = False
            elif packable and length(text[out[-1][0]:b]) <= max_length:
                out[-1] = (out[-1][0], b)
            else:
                out.append(piece)
                packable = True
        return out

    @staticmethod
    def _extend_back(text: str, pieces: list, overlap: int, max_length: int, length: Callable[[str], int],
                     regions: List[Span], prefix: Callable[[Optional[str], bool], str]) -> list:
        """Overlap for the methods that cut at boundaries: each piece after the first starts earlier, at a word
        start (never inside code), while what it repeats is shorter than `overlap` and the chunk stays within
        max_length; never before the previous piece's start or its own section's."""
        starts = sorted({m.start() for m in re.finditer(r"\S+", text) if not _inside(m.start(), regions)}
                        | {a for a, _ in regions})
        out = pieces[:1]
        for sp, heading, cont, path, floor in pieces[1:]:
            s, e = sp
            lo = max(out[-1][0][0] + 1, floor)  # past the start of the chunk before (as extended): never all of it
            k = bisect.bisect_left(starts, s) - 1
            new = s
            while k >= 0 and starts[k] >= lo and length(text[new:s]) < overlap:
                if length(prefix(heading, cont) + text[starts[k]:e]) > max_length:
                    break
                new = starts[k]
                k -= 1
            out.append(((new, e), heading, cont, path, floor))
        return out

    @classmethod
    def split_chunks(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                     overlap: int = 0, pattern: Optional[str] = None,
                     length_function: Optional[Callable[[str], int]] = None, tokenizer=None,
                     separators: Optional[Sequence[str]] = None) -> List[Chunk]:
        """Chunks with their spans (and, for method='semantic', their section heading and heading path)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if not 0 <= min_length <= max_length:
            raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_length:
            raise ValueError(f"overlap must be an int in [0, max_length={max_length}), got {overlap!r}")
        if separators is not None:
            if method != "recursive":
                raise ValueError("separators= applies to method='recursive'")
            if isinstance(separators, str) or not all(isinstance(x, str) for x in separators):
                raise TypeError("separators must be a list of strings, coarsest first, e.g. ['\\n\\n', '\\n', ' ']")
        length = cls._length_fn(length_function, tokenizer)
        regions = code_regions(text) if method == "semantic" else []
        # Methods that cut at boundaries leave room for the overlap they add afterwards; "chunk" overlaps as it cuts
        budget_all = max_length if method == "chunk" or not overlap else max_length - overlap
        # (span, section heading, continues a section, heading path, the section's start)
        pieces: List[Tuple[Span, Optional[str], bool, Optional[List[str]], int]] = []
        for span, heading, path in cls._base_spans(text, method, pattern, regions):
            budget = budget_all
            if heading and length(text[span[0]:span[1]]) > budget:
                budget = max(1, budget - length(heading + "\n"))  # room for the heading on later pieces
            if method == "recursive":
                seps = list(SEPARATORS if separators is None else separators)
                cut = cls._recursive(text, span, seps, budget, length)
            else:
                cut = cls._cut(text, span, budget, length, overlap if method == "chunk" else 0, regions)
            for k, sp in enumerate(cut):
                pieces.append((sp, heading, k > 0, path, span[0] if method == "semantic" else 0))

        def prefix(heading: Optional[str], cont: bool) -> str:
            return f"{heading}\n" if heading and cont else ""

        if method != "chunk" and min_length:
            merged: List[Tuple[Span, Optional[str], bool, Optional[List[str]], int]] = []
            for sp, heading, cont, path, floor in pieces:
                if merged:
                    (ps, pe), ph, pc, pp, pf = merged[-1]
                    short = length(text[ps:pe]) < min_length or length(text[sp[0]:sp[1]]) < min_length
                    if short and length(prefix(ph, pc) + text[ps:sp[1]]) <= budget_all:
                        merged[-1] = ((ps, sp[1]), ph, pc, pp, pf)
                        continue
                merged.append((sp, heading, cont, path, floor))
            pieces = merged
        if overlap and method != "chunk":
            pieces = cls._extend_back(text, pieces, overlap, max_length, length, regions, prefix)
        return [Chunk(prefix(heading, cont) + text[s:e], s, e, heading, path)
                for (s, e), heading, cont, path, _ in pieces]

    @classmethod
    def split_spans(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                    **kwargs) -> List[Span]:
        """(start, end) offsets of the chunks: ``text[start:end]`` is each chunk's own text."""
        return [(c.start, c.end) for c in cls.split_chunks(text, method, min_length, max_length, **kwargs)]

    @classmethod
    def split_text(cls, text: str, method: str = "paragraph", min_length: int = 0, max_length: int = 1000,
                   overlap: int = 0, pattern: Optional[str] = None,
                   length_function: Optional[Callable[[str], int]] = None, tokenizer=None,
                   separators: Optional[Sequence[str]] = None) -> List[str]:
        """Chunks of `text` as strings (see the module docstring for the rules)."""
        return [c.text for c in cls.split_chunks(text, method, min_length, max_length, overlap, pattern,
                                                 length_function, tokenizer, separators)]

    @classmethod
    def split_documents(cls, texts: Sequence[str], metadatas: Optional[Sequence[Dict[str, Any]]] = None,
                        method: str = "paragraph", **kwargs) -> List[Dict[str, Any]]:
        """Splits each text and keeps its metadata: [{"text", "metadata"}] in order, where each chunk's metadata
        is its document's plus "start" and "end" (``texts[i][start:end]`` is the chunk's own span), "chunk" (its
        number within the document) and, for method="semantic", "headings" (the heading path). Ready for
        ``store.add_documents([c["text"] ...], metadatas=[c["metadata"] ...])``. kwargs: as split_chunks."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string (split_text takes one)")
        texts = list(texts)
        metadatas = [{} for _ in texts] if metadatas is None else list(metadatas)
        if len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        out = []
        for i, (text, meta) in enumerate(zip(texts, metadatas)):
            if not isinstance(meta, dict):
                raise TypeError(f"metadatas[{i}] must be a dict, got {type(meta).__name__}")
            ours = {"start", "end", "chunk"} | ({"headings"} if method == "semantic" else set())
            clash = ours & meta.keys()
            if clash:
                raise ValueError(f"metadatas[{i}] has {sorted(clash)}, which split_documents sets for each chunk; "
                                 f"rename them")
            for k, c in enumerate(cls.split_chunks(text, method, **kwargs)):
                extra = {"start": c.start, "end": c.end, "chunk": k}
                if method == "semantic":
                    extra["headings"] = list(c.headings or [])
                out.append({"text": c.text, "metadata": {**meta, **extra}})
        return out
