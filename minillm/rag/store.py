"""SimpleDocumentStore: documents + metadata in SQLite (with a BM25 index), vectors in a FlatIndex searched by
topk_search; dense, lexical or hybrid (reciprocal rank fusion) search with Chroma-style filters.

Saved as a folder (whatever the path is called, `document_store.pkl` included): store.sqlite
(documents, metadata, their FTS5 index, format version, dimension, dtype, metric, embedder name) and index/
(vectors as .npy, memory-mapped on load). Saving replaces the folder atomically. Nothing is ever pickled, and
a pickle file given to load() is refused with the reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from minillm.index import FlatIndex, _as_numpy, _RWLock
from minillm.rag import lexical
from minillm.rag.embedders import default_embedder, embedder_by_name
from minillm.rag.where import compile_where, compile_where_document
from minillm.utils import atomic_dir, find_dir, progress_bar

log = logging.getLogger("minillm.rag")
FORMAT = "minillm-document-store"
FORMAT_VERSION = 2  # 2: the lexical index (FTS5) in store.sqlite; version 1 stores load and get one
MODES = ("dense", "lexical", "hybrid")
HYBRID_DEPTH = 100  # candidates each ranking contributes to a hybrid search (at least top_k)
DB_NAME = "store.sqlite"
Filter = Union[Dict[str, Any], Callable[[Dict[str, Any]], bool], None]


def _array(x: Any, name: str) -> np.ndarray:
    """x as a numpy array: tensors through the index's own conversion (bf16 included), anything else np.asarray."""
    return _as_numpy(x, name) if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_metadata(meta: Any, where: str = "metadata") -> None:
    """Raises unless `meta` survives a JSON round trip unchanged (int keys would come back as strings, tuples
    as lists, and filters on them would stop matching after a reload)."""
    if isinstance(meta, dict):
        for key, value in meta.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} keys must be strings, got {key!r} ({type(key).__name__}); "
                                f"use str keys (JSON would turn it into {json.dumps(str(key))} on reload)")
            _check_metadata(value, f"{where}[{key!r}]")
        if where == "metadata":
            return
    elif where == "metadata":
        raise TypeError(f"metadata must be a dict with string keys, got {type(meta).__name__}")
    elif isinstance(meta, list):
        for i, value in enumerate(meta):
            _check_metadata(value, f"{where}[{i}]")
    elif isinstance(meta, tuple):
        raise TypeError(f"{where} is a tuple, which JSON stores as a list: pass a list")
    elif isinstance(meta, float) and not math.isfinite(meta):
        raise ValueError(f"{where} is {meta}: metadata numbers must be finite (JSON has no NaN or infinity, and "
                         f"filters could not compare it); store None or a string instead")
    elif isinstance(meta, int) and not isinstance(meta, bool) and not -2 ** 63 <= meta < 2 ** 63:
        raise ValueError(f"{where} is {meta}, beyond the 64-bit integers SQLite filters compare; store it as a "
                         f"string")
    elif not (meta is None or isinstance(meta, (str, bool, int, float))):
        raise TypeError(f"{where} must be a JSON value (str, int, float, bool, None, list, dict), "
                        f"got {type(meta).__name__}")


def _check_consistent(path: Path, meta: Dict[str, Any], store: "SimpleDocumentStore") -> None:
    """A loaded store's two halves (store.sqlite, index/) must come from one save: the same snapshot token
    (saves before the token have none) and one vector per embedded document, none for any other. A folder mixed
    from two saves would otherwise answer searches with documents that do not match their vectors."""
    mixed = f"{path}: {DB_NAME} and index/ come from different saves (a mixed or damaged folder); " \
            f"restore the folder from one save or rebuild the store"
    if "snapshot" in meta and meta["snapshot"] != store.index.snapshot:
        raise ValueError(f"{mixed} (snapshot {meta['snapshot']} against {store.index.snapshot})")
    embedded = store._docs.keys() - store._pending
    vectors = set(store.index.ids.tolist())
    if embedded != vectors:
        raise ValueError(f"{mixed}: {len(vectors - embedded)} vectors without an embedded document, "
                         f"{len(embedded - vectors)} embedded documents without a vector")
    if store._docs and store._next_key <= max(store._docs):
        raise ValueError(f"{mixed}: next_key {store._next_key} is not above every document key")


class SimpleDocumentStore:
    """Documents with metadata and embeddings, searchable by meaning (cosine), by words (BM25) or both.

        store = SimpleDocumentStore(embedding_dim=256)      # hashing embedder; 384 -> MiniLM when installed
        ids = store.add_documents(chunks, metadatas=[{"source": "a.md"}, ...])
        store.compute_embeddings()
        hits = store.search("how do I open a file?", top_k=5, mode="hybrid", where={"source": "a.md"})
        store.save("store_dir"); store = SimpleDocumentStore.load("store_dir")

    Filters (every search mode applies them inside the search, so top_k results come back whenever that many
    match): `where` and `where_document` in Chroma's language (minillm.rag.where), `filter` as before (a dict of
    metadata values, a list meaning any of them, or a callable on the metadata). Searches may run from many threads
    at once; writes are serialised and wait for running searches.
    """

    def __init__(self, embedding_dim: int, embedder=None, dtype: str = "float32"):
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an int >= 1, got {embedding_dim!r}")
        self.embedding_dim = embedding_dim
        self.embedder = embedder if embedder is not None else default_embedder(embedding_dim)
        if self.embedder.dim != embedding_dim:
            raise ValueError(f"embedder {self.embedder.name} makes {self.embedder.dim}-d vectors but the store has "
                             f"embedding_dim={embedding_dim}")
        self.index = FlatIndex(embedding_dim, "cosine", dtype)
        self._docs: Dict[int, Dict[str, Any]] = {}  # key -> {"id", "text", "metadata"}
        self._key_of: Dict[str, int] = {}
        # Keys of documents without a current vector (new or changed text); every other document has one.
        # pending() reads its size without walking the documents, which searches racing writes cannot do.
        self._pending: set = set()
        # metadata field -> JSON of a value -> keys of the documents holding it: dict filters become set
        # operations instead of a scan over every document's metadata.
        self._by_meta: Dict[str, Dict[str, set]] = {}
        self._next_key = 0
        self._lock = _RWLock()
        self._write = threading.Lock()
        # The SQLite mirror of _docs (minillm.rag.lexical): where-filters and the BM25 index run there. One
        # connection, used under _db_lock (searches hold only the read lock, so several may reach it at once).
        self._db = lexical.open_memory()
        self._db_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """The documents ({"id", "text", "metadata"}) in insertion order, as they were when iteration began."""
        return iter(self.documents)

    @property
    def documents(self) -> List[Dict[str, Any]]:
        with self._lock.read():  # a writer changing the dict mid-walk would raise in this thread
            return [self._doc(k) for k in self._docs]

    def _doc(self, key: int) -> Dict[str, Any]:
        d = self._docs[key]
        return {"id": d["id"], "text": d["text"], "metadata": dict(d["metadata"])}

    def get(self, doc_id: Optional[str] = None, *, where: Filter = None, where_document: Optional[dict] = None,
            limit: Optional[int] = None) -> Union[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
        """get(doc_id): the document with this id, or None (ids are strings; any other id is looked up as
        str(id), as add_documents stores it). get(where=..., where_document=...): the list of matching documents,
        in insertion order, at most `limit`."""
        if doc_id is not None:
            if where is not None or where_document is not None:
                raise ValueError("get takes a doc_id or filters (where=, where_document=), not both")
            with self._lock.read():
                key = self._key_of.get(str(doc_id))
                return None if key is None else self._doc(key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        with self._lock.read():
            keys = self._allowed(None, where, where_document)
            keys = list(self._docs) if keys is None else keys
            return [self._doc(k) for k in keys[:limit]]

    # ---- metadata index ----
    @staticmethod
    def _vkey(value: Any) -> str:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1.0 and 1 match each other, as == says
        return json.dumps(value, sort_keys=True)

    def _index_meta(self, key: int, meta: Dict[str, Any], add: bool) -> None:
        for field, value in meta.items():
            bucket = self._by_meta.setdefault(field, {})
            vk = self._vkey(value)
            if add:
                bucket.setdefault(vk, set()).add(key)
            else:
                keys = bucket.get(vk)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del bucket[vk]

    # ---- writes ----
    def add_documents(self, texts: Sequence[str], metadatas: Optional[Sequence[Dict[str, Any]]] = None,
                      ids: Optional[Sequence[str]] = None, embeddings=None) -> List[str]:
        """Adds or updates (by id) documents; returns their ids (generated when not given).
        A changed text is re-embedded by the next compute_embeddings(); metadata changes are immediate.
        Ids are strings: any other id is stored as str(id), and get/delete convert the same way. Metadata is a
        dict with string keys and JSON values (str, int, float, bool, None, lists and dicts of them), so it
        reads back from a saved store exactly as given.

        embeddings: precomputed vectors (len(texts), embedding_dim), stored as the documents' vectors instead of
        embedding the texts; they must come from the store's embedder (or one whose vectors compare with its
        queries'), which the store cannot check."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        if len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        for m in metadatas:
            _check_metadata(m)  # stored as JSON: only what comes back from it unchanged
        ids = [str(i) for i in ids] if ids is not None else [uuid.uuid4().hex for _ in texts]
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        if len(set(ids)) != len(ids):
            raise ValueError("ids contain duplicates")
        vectors = self._check_embeddings(embeddings, len(texts)) if embeddings is not None else None
        with self._write, self._lock.write():
            stale, new_rows, changed_text, changed_meta, keys = [], [], [], [], []
            for doc_id, text, meta in zip(ids, texts, metadatas):
                key = self._key_of.get(doc_id)
                meta_json = json.dumps(meta)
                if key is not None:
                    doc = self._docs[key]
                    if doc["text"] != text:
                        changed_text.append((key, doc["text"], text))
                        doc["text"] = text
                        self._pending.add(key)
                        stale.append(key)
                    self._index_meta(key, doc["metadata"], add=False)
                    doc["metadata"] = dict(meta)
                    changed_meta.append((meta_json, key))
                else:
                    key = self._next_key
                    self._next_key += 1
                    self._key_of[doc_id] = key
                    self._docs[key] = {"id": doc_id, "text": text, "metadata": dict(meta)}
                    self._pending.add(key)
                    new_rows.append((key, doc_id, text, meta_json))
                self._index_meta(key, meta, add=True)
                keys.append(key)
            with self._db_lock, self._db:  # one transaction: the rows and their lexical index change together
                lexical.unindex_rows(self._db, [(k, old) for k, old, _ in changed_text])
                self._db.executemany("UPDATE documents SET text = ? WHERE key = ?", [(t, k) for k, _, t in changed_text])
                self._db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, 1)", new_rows)
                self._db.executemany("UPDATE documents SET metadata = ? WHERE key = ?", changed_meta)
                lexical.index_rows(self._db, [(k, t) for k, _, t in changed_text] + [(k, t) for k, _, t, _ in new_rows])
            if vectors is not None:  # every given document gets its vector now, replacing any it had
                self.index.remove_ids(keys)
                self.index.add_with_ids(vectors, np.asarray(keys, dtype=np.int64))
                self._pending.difference_update(keys)
            elif stale:
                self.index.remove_ids(stale)
        return ids

    def _check_embeddings(self, embeddings, n: int) -> np.ndarray:
        vectors = _array(embeddings, "embeddings")
        if vectors.shape != (n, self.embedding_dim):
            raise ValueError(f"embeddings must have shape ({n}, {self.embedding_dim}) (one {self.embedding_dim}-d "
                             f"vector per text), got {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.number) or np.issubdtype(vectors.dtype, np.complexfloating):
            raise TypeError(f"embeddings must be real numbers, got dtype {vectors.dtype}")
        vectors = vectors.astype(np.float32)
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings hold NaN or infinite values")
        return vectors

    def delete(self, ids: Optional[Sequence[str]] = None, *, where: Filter = None,
               where_document: Optional[dict] = None) -> int:
        """Deletes documents by id (converted with str(), as add_documents stores them) or by filters (where=,
        where_document=: every matching document); returns how many were deleted."""
        if ids is None and where is None and where_document is None:
            raise ValueError("delete needs ids or a filter (where=, where_document=); to empty the store, "
                             "delete(where={}) deletes everything")
        with self._write, self._lock.write():
            if ids is not None:
                ids = [str(i) for i in ([ids] if isinstance(ids, (str, int)) else ids)]
                keys = [self._key_of[i] for i in dict.fromkeys(ids) if i in self._key_of]
                if where is not None or where_document is not None:  # both: the listed ids that match
                    allowed = set(self._allowed(None, where, where_document) or [])
                    keys = [k for k in keys if k in allowed]
            else:
                keys = self._allowed(None, where, where_document)
                keys = list(self._docs) if keys is None else keys
            gone = []
            for k in keys:
                doc = self._docs.pop(k)
                del self._key_of[doc["id"]]
                self._index_meta(k, doc["metadata"], add=False)
                self._pending.discard(k)
                gone.append((k, doc["text"]))
            with self._db_lock, self._db:
                lexical.unindex_rows(self._db, gone)
                self._db.executemany("DELETE FROM documents WHERE key = ?", [(k,) for k in keys])
            self.index.remove_ids(keys)
        return len(keys)

    def compute_embeddings(self, batch_size: int = 32, show_progress: Optional[bool] = None) -> int:
        """Embeds the documents that are new or changed; returns how many were embedded. show_progress: a bar
        anywhere (True), never (False), or on a terminal only (None)."""
        with self._write:
            todo = sorted(self._pending)  # writers wait on self._write meanwhile: the set stays as it is
            if not todo:
                return 0
            texts = [self._docs[k]["text"] for k in todo]
            vectors = np.empty((len(todo), self.embedding_dim), dtype=np.float32)
            bar = progress_bar(enabled=show_progress, total=len(todo), desc="embedding", unit="doc")
            step = max(batch_size, 1) * 8  # the embedder batches inside; this only paces the progress bar
            for i in range(0, len(todo), step):
                vectors[i:i + step] = self.embedder.encode(texts[i:i + step], batch_size=batch_size)
                if bar is not None:
                    bar.update(min(step, len(todo) - i))
            if bar is not None:
                bar.close()
            with self._lock.write():
                self.index.add_with_ids(vectors, np.asarray(todo, dtype=np.int64))
                self._pending.difference_update(todo)
        log.info("embedded %d documents with %s", len(todo), self.embedder.name)
        return len(todo)

    # ---- filters ----
    def _allowed(self, filter: Filter, where: Filter = None, where_document: Optional[dict] = None
                 ) -> Optional[List[int]]:
        """The keys passing every filter given, ascending, or None when none is given (callers hold a lock)."""
        keys = self._filter_keys(filter)
        if where is None and where_document is None:
            return keys
        conds, params = [], []
        for compiled in ((compile_where(where),) if where is not None else ()) + \
                ((compile_where_document(where_document),) if where_document is not None else ()):
            conds.append(compiled[0])
            params += compiled[1]
        with self._db_lock:
            try:
                matched = [k for k, in self._db.execute(
                    f"SELECT key FROM documents d WHERE {' AND '.join(conds)} ORDER BY key", params)]
            except sqlite3.OperationalError as e:  # NaN / infinity kept by a store saved before they were refused
                raise ValueError(f"a document's metadata cannot be filtered ({e}): it holds NaN or infinity, which "
                                 f"JSON does not; re-add those documents with finite values") from None
        return matched if keys is None else sorted(set(matched).intersection(keys))

    def _filter_keys(self, filter: Filter) -> Optional[List[int]]:
        if filter is None:
            return None
        if callable(filter):
            return [k for k, d in self._docs.items() if filter(d["metadata"])]
        if not isinstance(filter, dict):
            raise TypeError("filter must be a dict of metadata values (a list means any of them) or a callable; "
                            "where= takes Chroma-style operators")
        allowed: Optional[set] = None
        for field, want in filter.items():
            bucket = self._by_meta.get(field, {})
            values = want if isinstance(want, (list, tuple, set)) else [want]
            keys = set().union(*(bucket.get(self._vkey(v), set()) for v in values))
            allowed = keys if allowed is None else allowed & keys
            if not allowed:
                return []
        return sorted(allowed) if allowed is not None else list(self._docs)

    # ---- search ----
    def search(self, query: Union[str, np.ndarray, Sequence[float]], top_k: int = 5, filter: Filter = None, *,
               where: Filter = None, where_document: Optional[dict] = None, mode: str = "dense",
               weights: Sequence[float] = (1.0, 1.0), rrf_k: int = 60) -> List[Dict[str, Any]]:
        """The top_k best documents: [{"id", "text", "score", "metadata"}], best first.

        query: text, or for mode="dense" a vector (embedding_dim,).
        mode: "dense" (cosine of the embeddings; score = cosine), "lexical" (BM25 over the words, Porter-stemmed,
        by SQLite FTS5; score = BM25) or "hybrid" (both rankings' first max(top_k, 100) fused by reciprocal rank,
        score = sum of weight / (rrf_k + rank); `weights` = (dense, lexical)).
        Filters: `where` / `where_document` (Chroma's operators, minillm.rag.where) and `filter` (a dict of
        metadata values, a list value meaning any of them, or a callable on the metadata), all applied inside the
        search."""
        return self._search([query], top_k, filter, where, where_document, mode, weights, rrf_k)[0]

    def search_batch(self, queries: Union[Sequence[str], np.ndarray], top_k: int = 5, filter: Filter = None, *,
                     where: Filter = None, where_document: Optional[dict] = None, mode: str = "dense",
                     weights: Sequence[float] = (1.0, 1.0), rrf_k: int = 60) -> List[List[Dict[str, Any]]]:
        """search() for many queries at once (texts, or an (n, embedding_dim) array for mode="dense"): one
        embedding call and one scan of the vectors for all of them; a list of result lists."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a list of queries; search() takes one")
        if isinstance(queries, (np.ndarray, torch.Tensor)):
            queries = _array(queries, "queries").astype(np.float32, copy=False)
            if queries.ndim != 2:
                raise ValueError(f"query vectors must be (n, {self.embedding_dim}), got shape {queries.shape}")
            queries = list(queries)
        return self._search(list(queries), top_k, filter, where, where_document, mode, weights, rrf_k)

    def _search(self, queries: list, top_k, filter, where, where_document, mode, weights, rrf_k) -> List[list]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        weights = tuple(weights)
        if len(weights) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights must be two finite numbers >= 0 (dense, lexical), got {weights!r}")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 0:
            raise ValueError(f"rrf_k must be an int >= 0, got {rrf_k!r}")
        texts = [q for q in queries if isinstance(q, str)]
        if mode != "dense" and len(texts) != len(queries):
            raise ValueError(f"mode={mode!r} matches words: queries must be text (vectors work with mode='dense')")
        if not queries:
            return []
        vecs = None
        if mode != "lexical":
            if self.pending():
                self.compute_embeddings(show_progress=False)
            vecs = self._query_vectors(queries, texts)
        top_k = int(top_k)
        with self._lock.read():
            allowed = self._allowed(filter, where, where_document)
            if allowed is not None and not allowed:
                return [[] for _ in queries]
            limit = len(self._docs) if allowed is None else len(allowed)
            depth = top_k if mode != "hybrid" else max(top_k, HYBRID_DEPTH)
            dense = self._dense(vecs, min(depth, limit), allowed) if mode != "lexical" else None
            lex = [self._bm25(q, min(depth, limit), allowed) for q in queries] if mode != "dense" else None
            out = []
            for i in range(len(queries)):
                if mode == "hybrid":
                    ranked = lexical.rrf(([k for k, _ in dense[i]], [k for k, _ in lex[i]]), weights, rrf_k)[:top_k]
                else:
                    ranked = (dense if mode == "dense" else lex)[i]
                out.append([dict(self._doc(k), score=float(s)) for k, s in ranked])
            return out

    def _query_vectors(self, queries: list, texts: List[str]) -> np.ndarray:
        """(n, dim) float32: the texts embedded in one call, vectors checked."""
        embedded = iter(self.embedder.encode(texts) if texts else ())
        out = np.empty((len(queries), self.embedding_dim), dtype=np.float32)
        for i, q in enumerate(queries):
            if isinstance(q, str):
                out[i] = next(embedded)
            else:
                vec = _array(q, "query").astype(np.float32, copy=False).reshape(-1)
                if vec.shape != (self.embedding_dim,):
                    raise ValueError(f"query vector must have shape ({self.embedding_dim},), got {vec.shape}")
                out[i] = vec
        return out

    def _dense(self, vecs: np.ndarray, k: int, allowed: Optional[List[int]]) -> List[List[tuple]]:
        # No more results than documents: memory follows the data, not top_k (2**31 allocated 8 GB).
        k = min(k, self.index.ntotal)
        if k < 1:
            return [[] for _ in vecs]
        scores, keys = self.index.search(vecs, k, filter=allowed)
        return [[(key, s) for s, key in zip(srow, krow) if key >= 0]
                for srow, krow in zip(scores.tolist(), keys.tolist())]

    def _bm25(self, text: str, k: int, allowed: Optional[List[int]]) -> List[tuple]:
        with self._db_lock:
            return lexical.bm25(self._db, text, k, allowed)

    def pending(self) -> int:
        """How many documents wait for compute_embeddings() (new or changed since)."""
        return len(self._pending)

    # ---- persistence ----
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes the store to the folder `path`, atomically replacing a store saved there before. A file, or a
        non-empty folder minillm did not save a store into, is refused (FileExistsError) and left as it is."""
        with self._write, self._lock.read():
            with atomic_dir(path, "store", (DB_NAME, "index")) as tmp:
                db = sqlite3.connect(tmp / DB_NAME)
                try:
                    with self._db_lock:  # documents and their lexical index, page by page
                        self._db.backup(db)
                    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                    # The snapshot token goes into both halves; load refuses a folder whose halves differ.
                    snapshot = uuid.uuid4().hex
                    meta = {"format": FORMAT, "version": FORMAT_VERSION, "embedding_dim": self.embedding_dim,
                            "dtype": self.index.dtype, "metric": self.index.metric, "embedder": self.embedder.name,
                            "next_key": self._next_key, "snapshot": snapshot}
                    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
                    db.execute("UPDATE documents SET embedded = 0 WHERE key IN (SELECT value FROM json_each(?))",
                               [json.dumps(sorted(self._pending))])
                    db.commit()
                finally:
                    db.close()
                (tmp / "index").mkdir()
                self.index._write(tmp / "index", snapshot=snapshot)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], embedder=None, mmap: bool = True) -> "SimpleDocumentStore":
        """Opens a saved store. The embedder recorded in it is re-created when it needs no weights or
        files (hashing, MiniLM); pass `embedder=` otherwise. A different embedder is an error."""
        p = Path(path)
        if p.is_file():
            head = p.read_bytes()[:2]
            if head[:1] == b"\x80":
                raise ValueError(f"{p} is a Python pickle; minillm never loads pickles (unpickling can run "
                                 f"arbitrary code). Re-create the store and save() it in minillm's format.")
            raise ValueError(f"{p} is a file, not a saved SimpleDocumentStore folder")
        found = find_dir(p, DB_NAME)
        if found is None:
            raise FileNotFoundError(f"no saved SimpleDocumentStore at {p}")
        # A URI, for read-only mode: the path is percent-encoded, or a '#' or '?' in it would end it there.
        src = sqlite3.connect(f"file:{urllib.parse.quote(str(found / DB_NAME))}?mode=ro", uri=True)
        db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            src.backup(db)  # the whole file into memory: it becomes the loaded store's SQLite mirror
        finally:
            src.close()
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        if meta.get("format") != FORMAT or meta.get("version") not in (1, FORMAT_VERSION):
            db.close()
            raise ValueError(f"{p}: unsupported store format {meta.get('format')!r} version {meta.get('version')!r} "
                             f"(this minillm reads versions 1 to {FORMAT_VERSION})")
        rows = db.execute("SELECT key, id, text, metadata, embedded FROM documents ORDER BY key").fetchall()
        has_fts = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lexical'").fetchone() is not None
        if not has_fts and meta["version"] >= 2:
            db.close()
            raise ValueError(f"{p}: {DB_NAME} has no lexical index although its version ({meta['version']}) writes "
                             f"one: a damaged store; rebuild it")
        with db:
            db.execute("DROP TABLE meta")
            db.execute("UPDATE documents SET embedded = 1")  # in memory pending lives in _pending
            if not has_fts:
                lexical.check_fts5(db)
                lexical.add_fts(db)  # a version-1 store: index its documents once
        dim = meta["embedding_dim"]
        if embedder is None:
            embedder = embedder_by_name(meta["embedder"], dim)
            if embedder is None:
                raise ValueError(f"{p} was embedded with {meta['embedder']!r}; pass that embedder as embedder=")
        elif embedder.name != meta["embedder"]:
            raise ValueError(f"{p} was embedded with {meta['embedder']!r}, not {embedder.name!r}: its vectors and "
                             f"the queries' would not be comparable")
        store = cls(dim, embedder=embedder, dtype=meta["dtype"])
        store._db.close()
        store._db = db
        store.index = FlatIndex.load(found / "index", mmap=mmap)
        if store.index.dim != dim or store.index.metric != meta["metric"]:
            raise ValueError(f"{p}: index dimension/metric do not match the store's")
        for key, doc_id, text, metadata, embedded in rows:
            store._docs[key] = {"id": doc_id, "text": text, "metadata": json.loads(metadata)}
            store._key_of[doc_id] = key
            if not embedded:
                store._pending.add(key)
            store._index_meta(key, store._docs[key]["metadata"], add=True)
        store._next_key = meta.get("next_key", (max(store._docs) + 1) if store._docs else 0)
        _check_consistent(p, meta, store)
        return store
