"""Chroma-style filters (minillm.rag.where) against a Python oracle, through every store call that takes them."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.rag import HashingEmbedder, SimpleDocumentStore
from minillm.rag.where import compile_where

FIELDS = ["a", "b", "c"]
SCALARS = [-2, -1, 0, 1, 2, 1.0, 0.5, -1.5, True, False, "x", "y", "", "1"]
META_VALUES = SCALARS + [None, [1, 2], {"a": 1}]
WORDS = ["cat", "Cat", "dog", "50%", "a_b", "open(", "tree"]


# ---- the oracle: the semantics the module docstring states ----
def _kind(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "str" if isinstance(v, str) else "other"


def _eq(meta, field, value):
    return field in meta and _kind(meta[field]) == _kind(value) and meta[field] == value


def _op(meta, field, op, value):
    if op == "$eq":
        return _eq(meta, field, value)
    if op == "$ne":
        return not _eq(meta, field, value)
    if op == "$in":
        return any(_eq(meta, field, v) for v in value)
    if op == "$nin":
        return not any(_eq(meta, field, v) for v in value)
    have = meta.get(field)
    if _kind(have) != "number":
        return False
    return {"$gt": have > value, "$gte": have >= value, "$lt": have < value, "$lte": have <= value}[op]


def matches(meta, where):
    for key, cond in where.items():
        if key == "$and":
            ok = all(matches(meta, c) for c in cond)
        elif key == "$or":
            ok = any(matches(meta, c) for c in cond)
        elif isinstance(cond, dict):
            ok = all(_op(meta, key, op, v) for op, v in cond.items())
        else:
            ok = _eq(meta, key, cond)
        if not ok:
            return False
    return True


def doc_matches(text, wd):
    (op, value), = wd.items()
    if op == "$and":
        return all(doc_matches(text, c) for c in value)
    if op == "$or":
        return any(doc_matches(text, c) for c in value)
    return (value in text) == (op == "$contains")


# ---- strategies ----
numbers = st.sampled_from([v for v in SCALARS if _kind(v) == "number"])
scalars = st.sampled_from(SCALARS)
field_cond = st.one_of(
    scalars,
    st.dictionaries(st.sampled_from(["$eq", "$ne"]), scalars, min_size=1, max_size=2),
    st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), numbers, min_size=1, max_size=2),
    st.dictionaries(st.sampled_from(["$in", "$nin"]), st.lists(scalars, max_size=3), min_size=1, max_size=1))
leaf = st.dictionaries(st.sampled_from(FIELDS), field_cond, min_size=1, max_size=2)
wheres = st.recursive(leaf, lambda inner: st.one_of(
    st.builds(lambda cs: {"$and": cs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda cs: {"$or": cs}, st.lists(inner, min_size=1, max_size=3))), max_leaves=6)
doc_leaf = st.builds(lambda op, w: {op: w}, st.sampled_from(["$contains", "$not_contains"]),
                     st.sampled_from(WORDS + ["", "t", "%"]))
where_docs = st.recursive(doc_leaf, lambda inner: st.builds(
    lambda op, cs: {op: cs}, st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3)),
    max_leaves=4)
metas = st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(META_VALUES), max_size=3)
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


def _store(docs):
    store = SimpleDocumentStore(embedding_dim=64, embedder=HashingEmbedder(64))
    store.add_documents([t for t, _ in docs], metadatas=[m for _, m in docs], ids=[str(i) for i in range(len(docs))])
    return store


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(texts, metas), min_size=1, max_size=25), wheres, st.one_of(st.none(), where_docs))
def test_filters_match_the_oracle_in_get_search_and_delete(docs, where, where_document):
    store = _store(docs)
    want = [str(i) for i, (t, m) in enumerate(docs)
            if matches(m, where) and (where_document is None or doc_matches(t, where_document))]
    assert [d["id"] for d in store.get(where=where, where_document=where_document)] == want
    for mode in ("dense", "lexical", "hybrid"):
        hits = store.search("cat dog tree", top_k=len(docs), where=where, where_document=where_document, mode=mode)
        assert {h["id"] for h in hits} <= set(want)
        if mode == "dense":  # every allowed document has a vector: all of them come back
            assert sorted(h["id"] for h in hits) == sorted(want)
    assert store.delete(where=where, where_document=where_document) == len(want)
    assert sorted(d["id"] for d in store) == sorted(set(map(str, range(len(docs)))) - set(want))


def test_kinds_do_not_mix():
    store = _store([("t", {"a": True}), ("t", {"a": 1}), ("t", {"a": 1.0}), ("t", {"a": "1"}), ("t", {})])
    ids = lambda w: [d["id"] for d in store.get(where=w)]  # noqa: E731
    assert ids({"a": 1}) == ["1", "2"] and ids({"a": True}) == ["0"] and ids({"a": "1"}) == ["3"]
    assert ids({"a": {"$ne": 1}}) == ["0", "3", "4"]  # a missing field is "not equal"
    assert ids({"a": {"$gte": 1}}) == ["1", "2"]      # numbers only: True is not 1
    assert ids({"a": {"$in": []}}) == [] and ids({"a": {"$nin": []}}) == ["0", "1", "2", "3", "4"]


def test_values_are_parameters_never_sql():
    store = _store([("x", {"a'; DROP TABLE documents; --": "') OR 1=1 --"}), ("y", {"a": "b"})])
    where = {"a'; DROP TABLE documents; --": "') OR 1=1 --"}
    assert [d["id"] for d in store.get(where=where)] == ["0"]
    sql, params = compile_where(where)
    assert "DROP" not in sql and "OR 1=1" not in sql and params == ["a'; DROP TABLE documents; --", "') OR 1=1 --"]
    assert len(store) == 2 and [d["id"] for d in store.get(where_document={"$contains": "%"})] == []


@pytest.mark.parametrize("where, error", [
    ({"a": {"$regex": "x"}}, "unknown operator"),
    ({"$not": [{"a": 1}]}, "not a field"),
    ({"$and": []}, "non-empty list"),
    ({"$or": {"a": 1}}, "non-empty list"),
    ({"a": {"$gt": "x"}}, "compares numbers"),
    ({"a": {"$gt": True}}, "compares numbers"),
    ({"a": {"$in": "x"}}, "list of values"),
    ({"a": [1, 2]}, "str, int, float or bool"),
    ({"a": None}, "str, int, float or bool"),
    ({"a": math.nan}, "finite"),
    ({"a": 2 ** 70}, "64-bit"),
    ({"a": {}}, "empty operator"),
    ("a = 1", "must be a dict"),
])
def test_bad_filters_name_the_problem(where, error):
    store = _store([("x", {"a": 1})])
    with pytest.raises((ValueError, TypeError), match=error):
        store.get(where=where)
    with pytest.raises((ValueError, TypeError), match=error):
        store.search("x", where=where)


@pytest.mark.parametrize("wd, error", [({"$contains": 1}, "takes a string"), ({"$like": "x"}, "unknown operator"),
                                       ({"$contains": "a", "$not_contains": "b"}, "one-key dict")])
def test_bad_document_filters(wd, error):
    with pytest.raises((ValueError, TypeError), match=error):
        _store([("x", {})]).get(where_document=wd)


def test_metadata_filters_cannot_compare_are_refused():
    store = _store([("x", {})])
    for meta, error in (({"a": math.nan}, "finite"), ({"a": [math.inf]}, "finite"), ({"a": 2 ** 64}, "64-bit")):
        with pytest.raises(ValueError, match=error):
            store.add_documents(["y"], metadatas=[meta])
