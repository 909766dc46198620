"""FlatIndex: an exact vector index with FAISS's interface, searched by minillm.ops.topk_search.

    index = FlatIndex(384, metric="cosine")
    index.add_with_ids(vectors, ids)         # (n, d) float array, (n,) int64 ids
    D, I = index.search(queries, k=10)       # (Q, k) scores / squared distances and ids, like FAISS
    index.remove_ids([3, 5]); index.save("my.index"); index = FlatIndex.load("my.index", mmap=True)

Storage is float32, float16 (scanned natively, fp32 accumulation) or int8: per-row-scaled int8 codes are
scanned and the best 8k candidates rescored exactly against float32 rows kept beside them (FAISS's
IndexRefineFlat over a scalar quantizer; `Int8Corpus` in minillm.ops), a quarter of the bytes scanned.
Searches may run from many threads at once (the kernel releases the GIL); writes wait for them and are
serialised.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from minillm.ops import Int8Corpus, topk_search
from minillm.utils import atomic_dir, find_dir

FORMAT = "minillm-flat-index"
FORMAT_VERSION = 1
# search() refuses a k past ntotal whose (Q, k) results, all -1 padding beyond ntotal, would exceed this.
_MAX_PADDING_BYTES = 1 << 30
# What an index folder holds: a save replaces only a folder of these (or one with minillm's marker).
INDEX_NAMES = ("index.json", "vectors.npy", "ids.npy", "codes.npy", "scales.npy", "norm2.npy")
METRICS = ("ip", "cosine", "l2")
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.float32}  # dtype -> stored vector rows


class _RWLock:
    """Many readers or one writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x


class FlatIndex:
    """Exact search over stored vectors; ids are int64, given (add_with_ids) or sequential (add)."""

    def __init__(self, dim: int, metric: str = "ip", dtype: str = "float32"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.dim, self.metric, self.dtype = int(dim), metric, dtype
        self._arrays = self._empty_arrays(0)  # name -> (capacity, ...) array, rows [0, n) live
        self._n = 0
        self._pos: dict = {}  # id -> row
        self._next_id = 0
        self._lock = _RWLock()
        self.snapshot: Optional[str] = None  # the store save a loaded index came from (None: a plain index)

    def _empty_arrays(self, cap: int) -> dict:
        arrays = {"vectors": np.empty((cap, self.dim), dtype=DTYPES[self.dtype]), "ids": np.empty((cap,), np.int64)}
        if self.dtype == "int8":  # the scanned codes, beside the float rows that rescore candidates
            arrays.update(codes=np.zeros((cap, Int8Corpus.code_width(self.dim)), np.int8), scales=np.empty((cap,), np.float32),
                          norm2=np.empty((cap,), np.float32))
        return arrays

    @property
    def _vectors(self) -> np.ndarray:
        return self._arrays["vectors"]

    @property
    def _ids(self) -> np.ndarray:
        return self._arrays["ids"]

    # ---- properties ----
    @property
    def ntotal(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        """The ids of the stored vectors, in storage order (a copy)."""
        return self._ids[: self._n].copy()

    def reconstruct(self, id_: int) -> np.ndarray:
        """The stored vector of `id_` (normalised for cosine), as float32."""
        if id_ not in self._pos:
            raise KeyError(f"id {id_} is not in the index")
        return self._vectors[self._pos[id_]].astype(np.float32)

    # ---- writes ----
    def _prepare(self, x) -> np.ndarray:
        x = _as_numpy(x, "x")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"vectors must be floating point, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or inf")
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1)
        return x.astype(DTYPES[self.dtype], copy=False)

    def _grow(self, extra: int) -> None:
        need = self._n + extra
        if need > self._vectors.shape[0] or not self._vectors.flags.writeable:
            arrays = self._empty_arrays(max(need, 2 * self._vectors.shape[0], 1024))
            for name, a in arrays.items():
                a[: self._n] = self._arrays[name][: self._n]
            self._arrays = arrays

    def add(self, x) -> np.ndarray:
        """Adds vectors (n, d) with sequential ids; returns the ids."""
        x = self._prepare(x)
        with self._lock.write():
            # next_id is above every id ever stored, so these are free.
            ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            self._add_locked(x, ids)
        return ids

    def add_with_ids(self, x, ids) -> None:
        """Adds vectors (n, d) under the given int64 ids (n,); an id already present is an error."""
        x = self._prepare(x)
        ids = np.asarray(_as_numpy(ids, "ids") if not isinstance(ids, (list, tuple)) else ids)
        if ids.ndim != 1 or len(ids) != len(x) or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be {len(x)} integers, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids contain duplicates")
        with self._lock.write():
            present = [int(i) for i in ids if int(i) in self._pos]
            if present:
                raise ValueError(f"ids already in the index: {present[:10]}; remove_ids() them first")
            self._add_locked(x, ids)

    def _add_locked(self, x: np.ndarray, ids: np.ndarray) -> None:
        self._grow(len(x))
        rows = slice(self._n, self._n + len(x))
        self._vectors[rows] = x
        self._ids[rows] = ids
        if self.dtype == "int8":
            codes, scales, norm2 = Int8Corpus.quantize(x)
            self._arrays["codes"][rows], self._arrays["scales"][rows] = codes.numpy(), scales.numpy()
            self._arrays["norm2"][rows] = norm2.numpy()
        for j, i in enumerate(ids.tolist()):
            self._pos[i] = self._n + j
        self._n += len(x)
        if len(ids):
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove_ids(self, ids) -> int:
        """Removes the given ids (missing ones are ignored); O(1) each: the last row moves into the
        hole. Other ids stay valid. Returns how many were removed."""
        ids = np.atleast_1d(np.asarray(_as_numpy(ids, "ids") if not isinstance(ids, (list, tuple, int)) else ids))
        if ids.size and ids.dtype.kind not in "iu":  # 1.5 would truncate to 1 and remove another vector
            raise TypeError(f"ids must be integers, got dtype {ids.dtype} ({ids.ravel()[:3].tolist()}...)")
        removed = 0
        with self._lock.write():
            self._grow(0)  # a memory-mapped index becomes a private copy before it changes
            for i in ids.astype(np.int64).tolist():
                row = self._pos.pop(i, None)
                if row is None:
                    continue
                last = self._n - 1
                if row != last:
                    for a in self._arrays.values():
                        a[row] = a[last]
                    self._pos[int(self._ids[row])] = row
                self._n -= 1
                removed += 1
        return removed

    def reset(self) -> None:
        """Removes everything."""
        with self._lock.write():
            self._arrays = self._empty_arrays(0)
            self._n, self._pos, self._next_id = 0, {}, 0

    # ---- search ----
    def search(self, x, k: int, filter=None) -> Tuple[Union[np.ndarray, torch.Tensor], Union[np.ndarray, torch.Tensor]]:
        """(D, I): the k best stored vectors per query, best first.

        x: (Q, d) or (d,) queries (numpy in, numpy out; torch tensors give torch tensors). D holds inner
        products / cosines (larger first) or squared L2 distances (smaller first); where fewer than k
        vectors exist (or pass the filter), I is -1 and D is -inf (ip, cosine) or +inf (l2).
        filter: ids allowed (any int sequence/array) or a bool mask aligned with `index.ids`; applied
        inside the search, so k results come back whenever k vectors pass.
        """
        as_torch = isinstance(x, torch.Tensor)
        q = _as_numpy(x, "x")
        single = q.ndim == 1
        q = q[None, :] if single else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if k > max(self._n, 1) and len(q) * k * 12 > _MAX_PADDING_BYTES:
            # Columns past ntotal are only -1 padding (FAISS's shape): refuse to allocate gigabytes of it.
            raise ValueError(f"k = {k} is more than the {self._n} stored vectors, and its (Q, k) results would take "
                             f"{len(q) * k * 12 / 2**30:.1f} GiB; pass k <= ntotal")
        fill = np.inf if self.metric == "l2" else -np.inf
        D = np.full((len(q), k), fill, dtype=np.float32)
        I = np.full((len(q), k), -1, dtype=np.int64)
        with self._lock.read():
            live = {name: a[: self._n] for name, a in self._arrays.items()}
            if filter is not None:
                keep = self._filter_rows(filter)
                live = {name: a[keep] for name, a in live.items()}
            rows, ids = live["vectors"], live["ids"]
            n = len(rows)
            if n and len(q):
                kk = min(k, n)
                metric = "ip" if self.metric == "cosine" else self.metric  # stored rows are normalised
                qs = q
                if self.metric == "cosine":
                    norms = np.linalg.norm(q, axis=1, keepdims=True)
                    qs = q / np.where(norms > 0, norms, 1)
                corpus = np.ascontiguousarray(rows)
                if self.dtype == "int8":
                    corpus = Int8Corpus.from_parts(corpus, live["codes"], live["scales"], live["norm2"])
                scores, idx = topk_search(qs, corpus, kk, metric)
                D[:, :kk], I[:, :kk] = scores, ids[idx]
        if single:
            D, I = D[0], I[0]
        return (torch.from_numpy(D), torch.from_numpy(I)) if as_torch else (D, I)

    def _filter_rows(self, filter) -> np.ndarray:
        f = _as_numpy(filter, "filter") if not isinstance(filter, (list, tuple, set, frozenset)) else np.asarray(
            sorted(filter) if isinstance(filter, (set, frozenset)) else filter)
        if f.dtype == bool:
            if f.shape != (self._n,):
                raise ValueError(f"a boolean filter must have shape (ntotal,) = ({self._n},), got {f.shape}")
            return np.flatnonzero(f)
        if f.size and f.dtype.kind not in "iu":
            raise TypeError(f"filter must be ids (integers) or a boolean mask, got dtype {f.dtype}")
        rows = [self._pos[i] for i in f.astype(np.int64).ravel().tolist() if i in self._pos]
        return np.unique(np.asarray(rows, dtype=np.int64))

    # ---- persistence ----
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes a folder: index.json (format, version, dim, metric, dtype, count), vectors.npy, ids.npy
        (int8: also codes.npy, scales.npy, norm2.npy) and minillm's marker; atomically replacing an index saved
        at `path` before. A file, or a non-empty folder that is not a saved index, is refused (FileExistsError)."""
        with self._lock.read():
            with atomic_dir(path, "index", INDEX_NAMES) as tmp:
                self._write(tmp)

    def _write(self, folder: Path, snapshot: Optional[str] = None) -> None:
        """The index's files into `folder` (a fresh one: atomic_dir's, or inside a store's). `snapshot`: the
        token of the store save this index belongs to, which the store's load compares with its own."""
        for name, a in self._arrays.items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(a[: self._n]))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "metric": self.metric,
                "dtype": self.dtype, "ntotal": self._n, "next_id": self._next_id}
        if snapshot is not None:
            meta["snapshot"] = snapshot
        (folder / "index.json").write_text(json.dumps(meta) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], mmap: bool = True) -> "FlatIndex":
        """Opens a saved index; with mmap the vectors stay on disk, paged in as searches touch them."""
        found = find_dir(path, "index.json")
        if found is None:
            raise FileNotFoundError(f"no saved FlatIndex at {path}")
        meta = json.loads((found / "index.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a minillm FlatIndex (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has index format version {meta.get('version')}; this minillm reads "
                             f"version {FORMAT_VERSION}")
        index = cls(meta["dim"], meta["metric"], meta["dtype"])
        arrays = {}
        for name, empty in index._arrays.items():
            a = np.load(found / f"{name}.npy", mmap_mode="r" if mmap and name != "ids" else None, allow_pickle=False)
            if a.shape[1:] != empty.shape[1:] or a.dtype != empty.dtype or len(a) != meta["ntotal"]:
                raise ValueError(f"{path}: {name}.npy ({a.shape} {a.dtype}) does not match index.json "
                                 f"({meta['ntotal']} rows of {empty.shape[1:]} {empty.dtype})")
            arrays[name] = a
        index._arrays, index._n = arrays, meta["ntotal"]
        index._pos = {int(i): r for r, i in enumerate(arrays["ids"].tolist())}
        if len(index._pos) != index._n:
            raise ValueError(f"{path}: ids.npy holds duplicate ids; the index is damaged")
        index._next_id = int(meta.get("next_id", index._n))
        if index._n and index._next_id <= int(arrays["ids"].max()):
            raise ValueError(f"{path}: index.json's next_id {index._next_id} is not above every stored id; the "
                             f"index is damaged or mixed from different saves")
        index.snapshot = meta.get("snapshot")
        return index

    def __repr__(self) -> str:
        return f"FlatIndex(dim={self.dim}, metric={self.metric!r}, dtype={self.dtype!r}, ntotal={self._n})"
