"""Metadata and text filters for the document store, in Chroma's `where` / `where_document` language, compiled to
SQL over the store's SQLite tables with every value, field name included, passed as a parameter (never formatted
into the statement).

    where={"source": "a.md"}                                  # equal ($eq)
    where={"year": {"$gte": 2020, "$lt": 2024}}               # both conditions
    where={"$or": [{"lang": {"$in": ["en", "de"]}}, {"draft": False}]}
    where_document={"$contains": "open("}                     # substring of the text (case-sensitive)

Semantics (the tests' oracle, tests/rag/test_where.py, implements them in Python):
- A field condition looks at top-level metadata keys only. Values compare within their kind: strings with strings,
  numbers (int or float) with numbers, booleans with booleans; True never equals 1.
- `$eq`, `$in` need the field present with an equal value; `$ne`, `$nin` are their negations, so they also hold
  for documents without the field (as in MongoDB).
- `$gt $gte $lt $lte` take a number and hold for numeric fields only.
- A dict of several fields, or of several operators for one field, means all of them; `$and` / `$or` take a
  non-empty list of where-dicts.
- `where_document` takes `$contains` / `$not_contains` (a string) and `$and` / `$or` of those.
"""
from __future__ import annotations

import math
from typing import Any, List, Tuple

COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPS = ("$eq", "$ne", "$in", "$nin") + tuple(COMPARE)
_INT_RANGE = 2 ** 63  # SQLite integers are 64-bit
_NUMBER = "type IN ('integer', 'real')"


def _scalar(value: Any, where: str) -> None:
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -_INT_RANGE <= value < _INT_RANGE:
            raise ValueError(f"{where}: {value} is beyond SQLite's 64-bit integers")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number")
        return
    raise TypeError(f"{where}: filter values must be str, int, float or bool, got {type(value).__name__} "
                    f"({value!r})")


def _equal(field: str, value: Any, where: str) -> Tuple[str, List[Any]]:
    """SQL that holds when metadata[field] is present and equals `value` within its kind."""
    _scalar(value, where)
    # json_each(metadata): one row per top-level key with its JSON type and SQL value (true/false have value 1/0)
    if isinstance(value, bool):
        return "EXISTS (SELECT 1 FROM json_each(d.metadata) WHERE key = ? AND type = ?)", \
            [field, "true" if value else "false"]
    kind = "type = 'text'" if isinstance(value, str) else _NUMBER
    return f"EXISTS (SELECT 1 FROM json_each(d.metadata) WHERE key = ? AND {kind} AND value = ?)", [field, value]


def _field(field: str, cond: Any, where: str) -> Tuple[str, List[Any]]:
    if not isinstance(cond, dict):
        return _equal(field, cond, where)
    if not cond:
        raise ValueError(f"{where}: an empty operator dict; give one of {', '.join(OPS)}")
    parts, params = [], []
    for op, value in cond.items():
        at = f"{where}[{op!r}]"
        if op == "$eq":
            sql, p = _equal(field, value, at)
        elif op == "$ne":
            sql, p = _equal(field, value, at)
            sql = f"NOT {sql}"
        elif op in ("$in", "$nin"):
            if not isinstance(value, list):
                raise TypeError(f"{at} takes a list of values, got {type(value).__name__}")
            alts = [_equal(field, v, f"{at}[{i}]") for i, v in enumerate(value)]
            sql = "(" + " OR ".join(s for s, _ in alts) + ")" if alts else "0"
            p = [x for _, ps in alts for x in ps]
            if op == "$nin":
                sql = f"NOT {sql}"
        elif op in COMPARE:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{at} compares numbers, got {type(value).__name__} ({value!r})")
            _scalar(value, at)
            sql = f"EXISTS (SELECT 1 FROM json_each(d.metadata) WHERE key = ? AND {_NUMBER} AND value {COMPARE[op]} ?)"
            p = [field, value]
        else:
            raise ValueError(f"{at}: unknown operator {op!r}; use one of {', '.join(OPS)}")
        parts.append(sql)
        params += p
    return "(" + " AND ".join(parts) + ")", params


def _logical(op: str, clauses: Any, where: str, compile_one) -> Tuple[str, List[Any]]:
    if not isinstance(clauses, list) or not clauses:
        raise ValueError(f"{where}[{op!r}] takes a non-empty list of filters")
    compiled = [compile_one(c, f"{where}[{op!r}][{i}]") for i, c in enumerate(clauses)]
    joiner = " AND " if op == "$and" else " OR "
    return "(" + joiner.join(s for s, _ in compiled) + ")", [x for _, ps in compiled for x in ps]


def compile_where(where: Any, at: str = "where") -> Tuple[str, List[Any]]:
    """(SQL condition on the row alias `d` of the documents table, its parameters) for a `where` dict."""
    if not isinstance(where, dict):
        raise TypeError(f"{at} must be a dict such as {{'source': 'a.md'}} or {{'year': {{'$gte': 2020}}}}, "
                        f"got {type(where).__name__}")
    if not where:
        return "1", []
    parts, params = [], []
    for key, cond in where.items():
        if key in ("$and", "$or"):
            sql, p = _logical(key, cond, at, compile_where)
        elif not isinstance(key, str):
            raise TypeError(f"{at}: field names are strings, got {key!r}")
        elif key.startswith("$"):
            raise ValueError(f"{at}: {key!r} is not a field and not $and/$or (operators go inside a field: "
                             f"{{'field': {{{key!r}: ...}}}})")
        else:
            sql, p = _field(key, cond, f"{at}[{key!r}]")
        parts.append(sql)
        params += p
    return "(" + " AND ".join(parts) + ")", params


def compile_where_document(where_document: Any, at: str = "where_document") -> Tuple[str, List[Any]]:
    """(SQL condition on `d.text`, parameters) for {"$contains": s}, {"$not_contains": s}, $and / $or of them."""
    if not isinstance(where_document, dict) or len(where_document) != 1:
        raise ValueError(f"{at} must be a one-key dict: {{'$contains': 'text'}}, {{'$not_contains': 'text'}}, "
                         f"or {{'$and' | '$or': [...]}}")
    (op, value), = where_document.items()
    if op in ("$and", "$or"):
        return _logical(op, value, at, compile_where_document)
    if op not in ("$contains", "$not_contains"):
        raise ValueError(f"{at}: unknown operator {op!r}; use $contains, $not_contains, $and or $or")
    if not isinstance(value, str):
        raise TypeError(f"{at}[{op!r}] takes a string, got {type(value).__name__}")
    # instr: a plain substring test (LIKE would treat % and _ as wildcards and ignore case for ASCII only)
    return ("instr(d.text, ?) > 0" if op == "$contains" else "instr(d.text, ?) = 0"), [value]
