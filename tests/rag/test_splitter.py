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
