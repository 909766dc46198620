"""SimpleDocumentStore: documents + metadata in SQLite, vectors in a FlatIndex searched by topk_search.

Saved as a folder (whatever the path is called, `document_store.pkl` included): store.sqlite
(documents, metadata, format version, dimension, dtype, metric, embedder name) and index/ (vectors
as .npy, memory-mapped on load). Saving replaces the folder atomically. Nothing is ever pickled, and
a pickle file given to load() is refused with the reason.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from minillm.index import FlatIndex, _RWLock
from minillm.rag.embedders import default_embedder, embedder_by_name
from minillm.utils import atomic_dir, find_dir, progress_bar

log = logging.getLogger("minillm.rag")
FORMAT = "minillm-document-store"
FORMAT_VERSION = 1
DB_NAME = "store.sqlite"
Filter = Union[Dict[str, Any], Callable[[Dict[str, Any]], bool], None]


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
    """Documents with metadata and embeddings, searchable by text or vector (cosine).

        store = SimpleDocumentStore(embedding_dim=256)      # hashing embedder; 384 -> MiniLM when installed
        ids = store.add_documents(chunks, metadatas=[{"source": "a.md"}, ...])
        store.compute_embeddings()
        hits = store.search("how do I open a file?", top_k=5, filter={"source": "a.md"})
        store.save("store_dir"); store = SimpleDocumentStore.load("store_dir")

    Searches may run from many threads at once; writes are serialised and wait for running searches.
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

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def documents(self) -> List[Dict[str, Any]]:
        with self._lock.read():  # a writer changing the dict mid-walk would raise in this thread
            return [{"id": d["id"], "text": d["text"], "metadata": dict(d["metadata"])} for d in self._docs.values()]

    def get(self, doc_id: str) -> Optional[Dict[str, Any]]:
        """The document with this id (ids are strings; any other id is looked up as str(id), as
        add_documents stores it), or None."""
        key = self._key_of.get(str(doc_id))
        if key is None:
            return None
        d = self._docs[key]
        return {"id": d["id"], "text": d["text"], "metadata": dict(d["metadata"])}

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
                      ids: Optional[Sequence[str]] = None) -> List[str]:
        """Adds or updates (by id) documents; returns their ids (generated when not given).
        A changed text is re-embedded by the next compute_embeddings(); metadata changes are immediate.
        Ids are strings: any other id is stored as str(id), and get/delete convert the same way. Metadata is a
        dict with string keys and JSON values (str, int, float, bool, None, lists and dicts of them), so it
        reads back from a saved store exactly as given."""
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
        with self._write, self._lock.write():
            stale = []
            for doc_id, text, meta in zip(ids, texts, metadatas):
                key = self._key_of.get(doc_id)
                if key is not None:
                    doc = self._docs[key]
                    if doc["text"] != text:
                        doc["text"] = text
                        self._pending.add(key)
                        stale.append(key)
                    self._index_meta(key, doc["metadata"], add=False)
                    doc["metadata"] = dict(meta)
                else:
                    key = self._next_key
                    self._next_key += 1
                    self._key_of[doc_id] = key
                    self._docs[key] = {"id": doc_id, "text": text, "metadata": dict(meta)}
                    self._pending.add(key)
                self._index_meta(key, meta, add=True)
            if stale:
                self.index.remove_ids(stale)
        return ids

    def delete(self, ids: Sequence[str]) -> int:
        """Deletes documents by id (converted with str(), as add_documents stores them); returns how many existed."""
        ids = [str(i) for i in ([ids] if isinstance(ids, (str, int)) else ids)]
        with self._write, self._lock.write():
            keys = [self._key_of.pop(i) for i in ids if i in self._key_of]
            for k in keys:
                self._index_meta(k, self._docs.pop(k)["metadata"], add=False)
                self._pending.discard(k)
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

    # ---- search ----
    def _allowed(self, filter: Filter) -> Optional[List[int]]:
        if filter is None:
            return None
        if callable(filter):
            return [k for k, d in self._docs.items() if filter(d["metadata"])]
        if not isinstance(filter, dict):
            raise TypeError("filter must be a dict of metadata values (a list means any of them) or a callable")

        allowed: Optional[set] = None
        for field, want in filter.items():
            bucket = self._by_meta.get(field, {})
            values = want if isinstance(want, (list, tuple, set)) else [want]
            keys = set().union(*(bucket.get(self._vkey(v), set()) for v in values))
            allowed = keys if allowed is None else allowed & keys
            if not allowed:
                return []
        return sorted(allowed) if allowed is not None else list(self._docs)

    def search(self, query: Union[str, np.ndarray, Sequence[float]], top_k: int = 5,
               filter: Filter = None) -> List[Dict[str, Any]]:
        """The top_k most similar documents: [{"id", "text", "score", "metadata"}], best first.

        query: text (embedded with the store's embedder) or a vector (embedding_dim,). filter: a dict
        of metadata values that must match (a list value means any of them) or a callable on the
        metadata; it is applied inside the search, so top_k results come back whenever that many match.
        """
        if self.pending():
            self.compute_embeddings(show_progress=False)
        if isinstance(query, str):
            vec = self.embedder.encode([query])[0]
        else:
            vec = np.asarray(query, dtype=np.float32).reshape(-1)
            if vec.shape != (self.embedding_dim,):
                raise ValueError(f"query vector must have shape ({self.embedding_dim},), got {vec.shape}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        with self._lock.read():
            allowed = self._allowed(filter)
            if (allowed is not None and not allowed) or not self.index.ntotal:
                return []
            # No more results than documents: memory follows the data, not top_k (2**31 allocated 8 GB).
            top_k = min(int(top_k), self.index.ntotal if allowed is None else len(allowed))
            scores, keys = self.index.search(vec, top_k, filter=allowed)
            return [{"id": self._docs[k]["id"], "text": self._docs[k]["text"], "score": float(s),
                     "metadata": dict(self._docs[k]["metadata"])}
                    for s, k in zip(scores.tolist(), keys.tolist()) if k >= 0]

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
                    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                    db.execute("CREATE TABLE documents (key INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, "
                               "text TEXT NOT NULL, metadata TEXT NOT NULL, embedded INTEGER NOT NULL)")
                    # The snapshot token goes into both halves; load refuses a folder whose halves differ.
                    snapshot = uuid.uuid4().hex
                    meta = {"format": FORMAT, "version": FORMAT_VERSION, "embedding_dim": self.embedding_dim,
                            "dtype": self.index.dtype, "metric": self.index.metric, "embedder": self.embedder.name,
                            "next_key": self._next_key, "snapshot": snapshot}
                    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
                    db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)",
                                   [(k, d["id"], d["text"], json.dumps(d["metadata"]), int(k not in self._pending))
                                    for k, d in self._docs.items()])
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
        db = sqlite3.connect(f"file:{urllib.parse.quote(str(found / DB_NAME))}?mode=ro", uri=True)
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            rows = db.execute("SELECT key, id, text, metadata, embedded FROM documents ORDER BY key").fetchall()
        finally:
            db.close()
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{p}: unsupported store format {meta.get('format')!r} version {meta.get('version')!r} "
                             f"(this minillm reads version {FORMAT_VERSION})")
        dim = meta["embedding_dim"]
        if embedder is None:
            embedder = embedder_by_name(meta["embedder"], dim)
            if embedder is None:
                raise ValueError(f"{p} was embedded with {meta['embedder']!r}; pass that embedder as embedder=")
        elif embedder.name != meta["embedder"]:
            raise ValueError(f"{p} was embedded with {meta['embedder']!r}, not {embedder.name!r}: its vectors and "
                             f"the queries' would not be comparable")
        store = cls(dim, embedder=embedder, dtype=meta["dtype"])
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
