"""DocumentProcessor: every method, spans, length limits, merging, overlap, headings, token lengths."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.rag import DocumentProcessor as DP

DOC = """# Guide

Intro paragraph about files. It has Dr. Smith and 3.5 apples.

## Reading files

""" + " ".join(f"word{i}" for i in range(120)) + """

Tiny.

Section title
=============

Body of a reStructuredText section. Another sentence here!
"""


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400),
       method=st.sampled_from(["paragraph", "sentence", "chunk", "semantic", "regex"]),
       max_length=st.integers(5, 80), min_length=st.integers(0, 5))
def test_spans_are_exact_and_bounded(text, method, max_length, min_length):
    spans = DP.split_spans(text, method, min_length=min(min_length, max_length), max_length=max_length,
                           pattern=r"[;|]" if method == "regex" else None)
    for s, e in spans:
        chunk = text[s:e]
        assert chunk and chunk == chunk.strip() and len(chunk) <= max_length
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) or method == "chunk"


@pytest.mark.parametrize("method", ["paragraph", "sentence", "semantic", "chunk"])
def test_no_chunk_exceeds_max_and_words_stay_whole(method):
    chunks = DP.split_text(DOC, method, min_length=20, max_length=100)
    assert chunks and all(len(c) <= 100 for c in chunks)
    words = set(re.findall(r"\S+", DOC))
    for c in chunks:
        for w in re.findall(r"\S+", c):
            assert w in words or w.rstrip(".") in words or w in ("Guide", "Reading", "files"), w


def test_short_pieces_merge_with_a_neighbour():
    chunks = DP.split_text(DOC, "paragraph", min_length=30, max_length=1000)
    assert "Tiny." not in chunks and any("Tiny." in c for c in chunks)
    assert all(len(c) >= 30 for c in chunks)


def test_sentences_respect_abbreviations_and_decimals():
    chunks = DP.split_text("Intro paragraph about files. It has Dr. Smith and 3.5 apples. End!", "sentence",
                           max_length=200)
    assert chunks == ["Intro paragraph about files.", "It has Dr. Smith and 3.5 apples.", "End!"]


def test_chunk_overlap_is_present():
    text = " ".join(f"w{i}" for i in range(300))
    spans = DP.split_spans(text, "chunk", max_length=60, overlap=15)
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s2 < e1 and e1 - s2 >= 15 and e2 - s2 <= 60
    assert spans[-1][1] == len(text)


def test_semantic_chunks_keep_their_heading():
    chunks = DP.split_chunks(DOC, "semantic", min_length=0, max_length=120)
    reading = [c for c in chunks if c.heading == "Reading files"]
    assert len(reading) > 2 and all(c.text.startswith("Reading files") or c.text.startswith("## Reading")
                                    for c in reading)
    assert all(len(c.text) <= 120 for c in chunks)
    assert any(c.heading == "Section title" for c in chunks)


def test_regex_and_token_lengths():
    assert DP.split_text("a; b;; c", "regex", pattern=r";") == ["a", "b", "c"]
    from minillm.tokenizers import CharTokenizer

    tok = CharTokenizer.from_texts(DOC)
    chunks = DP.split_text(DOC, "paragraph", max_length=50, tokenizer=tok)
    assert all(len(tok.encode(c)) <= 50 for c in chunks)


def test_bad_arguments():
    for kwargs, word in [({"method": "words"}, "method"), ({"max_length": 0}, "max_length"),
                         ({"min_length": 50, "max_length": 10}, "min_length"),
                         ({"method": "chunk", "overlap": 10, "max_length": 10}, "overlap"),
                         ({"method": "regex"}, "pattern")]:
        with pytest.raises(ValueError, match=word):
            DP.split_text("some text", **kwargs)
    with pytest.raises(TypeError):
        DP.split_text(b"bytes")


# ---- structure: code, headings, heading paths ----
from pathlib import Path  # noqa: E402

from minillm.rag.splitter import code_regions, headings  # noqa: E402

KB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "python_docs_kb"
MARKDOWN = """# Guide

Intro text.

## Files

```python
# not a heading
def f():

    return 1
```

### Opening

Open a file with open().

~~~
## also not a heading
~~~

    # indented code is not a heading either

Setext title
------------

Body.
"""


def test_markdown_code_is_never_a_heading_or_cut():
    assert [(lvl, t) for _, lvl, t in headings(MARKDOWN)] == [
        (1, "Guide"), (2, "Files"), (3, "Opening"), (2, "Setext title")]
    chunks = DP.split_chunks(MARKDOWN, "semantic", max_length=60)
    by_text = {c.text: c.headings for c in chunks}
    fence = MARKDOWN[MARKDOWN.index("```python"):MARKDOWN.index("```\n\n###") + 3]
    assert any(fence in t for t in by_text)  # the fence whole, blank line inside included
    assert [c.headings for c in chunks if "open()" in c.text] == [["Guide", "Files", "Opening"]]
    assert [c.headings for c in chunks if "Body." in c.text] == [["Guide", "Setext title"]]


def _kb_files():
    if not KB.is_dir():
        pytest.skip(f"{KB} not found (shared data)")
    return sorted(KB.glob("*/*.txt"))


@pytest.mark.parametrize("max_length", [300, 1200])
def test_real_rst_docs_code_blocks_stay_whole(max_length):
    files = _kb_files()
    seen_comment_in_code = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        regions = code_regions(text)
        heads = headings(text, regions)
        for start, _, title in heads:  # no heading inside code, and "# comment" lines are not headings
            assert not any(a <= start < b for a, b in regions), (f.name, title)
        seen_comment_in_code += sum(text[a:b].count("\n   #") + text[a:b].startswith("#") for a, b in regions)
        for c in DP.split_chunks(text, "semantic", max_length=max_length):
            assert len(c.text) <= max_length and text[c.start:c.end] in c.text
            for a, b in regions:
                if b - a <= max_length - 80:  # a block that fits (with room for its heading) is never cut
                    assert not (a < c.start < b or a < c.end < b), (f.name, text[a:b][:60])
    assert seen_comment_in_code >= 3  # the docs do have "# comment" lines in code (interpreter.rst, classes.rst)


def test_real_rst_heading_paths():
    _kb_files()
    text = (KB / "tutorial" / "interpreter.rst.txt").read_text(encoding="utf-8")
    chunks = DP.split_chunks(text, "semantic", max_length=2000)
    coding = [c for c in chunks if "# -*- coding: encoding -*-" in c.text]
    assert [c.headings for c in coding] == [
        ["Using the Python Interpreter", "The Interpreter and Its Environment", "Source Code Encoding"]]
    top = [c.headings for c in chunks if c.heading == "Using the Python Interpreter"]
    assert top and all(h == ["Using the Python Interpreter"] for h in top)
    assert chunks[0].headings == [] and chunks[0].text.startswith(".. _tut-using:")  # the label above the title


# ---- recursive splitting, overlap for every method, split_documents ----
words_text = st.lists(st.tuples(st.text("abcxyz", min_size=1, max_size=3),
                                st.sampled_from([" ", " ", "\n", "\n\n", ". ", "  "])),
                      max_size=120).map(lambda ws: "".join(w + s for w, s in ws))


@settings(max_examples=150, deadline=None)
@given(text=words_text, max_length=st.integers(8, 80),
       separators=st.sampled_from([None, ["\n\n", "\n", " "], [". ", " "], ["zz"], []]))
def test_recursive_chunks_are_exact_bounded_and_cover_the_text(text, max_length, separators):
    spans = DP.split_spans(text, "recursive", max_length=max_length, separators=separators)
    for s, e in spans:
        assert text[s:e] and text[s:e] == text[s:e].strip() and len(text[s:e]) <= max_length
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing is lost


def test_recursive_prefers_the_coarsest_separator():
    text = "para one line a\npara one line b\n\npara two is here"
    assert DP.split_text(text, "recursive", max_length=32) == ["para one line a\npara one line b", "para two is here"]
    assert DP.split_text(text, "recursive", max_length=20) == ["para one line a", "para one line b",
                                                                "para two is here"]
    assert DP.split_text("a-b-c-d", "recursive", max_length=4, separators=["-"]) == ["a-b-", "c-d"]


@settings(max_examples=100, deadline=None)
@given(text=words_text, method=st.sampled_from(["paragraph", "sentence", "semantic", "recursive", "regex"]),
       max_length=st.integers(40, 90), overlap=st.integers(8, 12))
def test_overlap_for_every_method(text, method, max_length, overlap):
    chunks = DP.split_chunks(text, method, max_length=max_length, overlap=overlap,
                             pattern=r"\n" if method == "regex" else None)
    for c in chunks:
        assert len(c.text) <= max_length and text[c.start:c.end] in c.text
    for a, b in zip(chunks, chunks[1:]):
        assert b.start > a.start  # chunks move forward...
        # ...and share text, unless that would repeat the previous chunk whole (a one-word chunk)
        if any(a.start < m.start() < a.end for m in re.finditer(r"\S+", text)):
            assert b.start < a.end


def test_split_documents_keeps_metadata_and_spans():
    texts = [MARKDOWN, "First paragraph.\n\nSecond paragraph."]
    out = DP.split_documents(texts, [{"source": "a.md"}, {"source": "b.txt"}], method="semantic", max_length=80)
    assert {o["metadata"]["source"] for o in out} == {"a.md", "b.txt"}
    for o in out:
        m = o["metadata"]
        src = texts[0] if m["source"] == "a.md" else texts[1]
        assert src[m["start"]:m["end"]] in o["text"] and isinstance(m["headings"], list)
    assert [o["metadata"]["chunk"] for o in out if o["metadata"]["source"] == "b.txt"] == [0]
    with pytest.raises(ValueError, match="start"):
        DP.split_documents(["x"], [{"start": 1}])
    with pytest.raises(ValueError, match="1 metadatas for 2 texts"):
        DP.split_documents(["x", "y"], [{}])
    with pytest.raises(TypeError, match="one string"):
        DP.split_documents("x")
    with pytest.raises(ValueError, match="separators"):
        DP.split_text("x", "paragraph", separators=["\n"])
