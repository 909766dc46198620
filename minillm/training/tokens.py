"""Token files: a corpus tokenized once into a flat memory-mapped array (nanoGPT's train.bin), and a Dataset of
block_size windows read from it without loading the corpus.

Layout: ``NAME.bin`` holds the token ids back to back, little-endian uint16 (vocabularies up to 65,536) or uint32,
each document followed by the tokenizer's EOS id when it has one; ``NAME.bin.json`` says what the file is
(format tag, dtype, token count, vocabulary size, EOS id). Both are written under temporary names and renamed into
place, the JSON last, so a crash never leaves a file that loads; a load checks the JSON against the file and the
tokenizer it is given.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from minillm.utils import atomic_write, atomic_write_text, progress_bar

log = logging.getLogger("minillm.training")

FORMAT = "minillm-tokens"
VERSION = 1
PathLike = Union[str, os.PathLike]


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _pieces(sources, batch_chars: int) -> Iterator[List[Tuple[str, bool]]]:
    """Batches of (text, ends a document) of about batch_chars characters. A path (or a list of paths) is read
    line by line and cut at blank lines into documents, a document longer than batch_chars into pieces at line
    ends, so a file of any size streams; an iterable of strings gives one document per string."""
    if isinstance(sources, (str, os.PathLike)) and _is_path(sources):
        sources = [sources]
    batch: List[Tuple[str, bool]] = []
    size = 0
    for src in sources:
        if _is_path(src):
            doc: List[str] = []
            doc_chars = 0
            with open(src, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        doc.append(line)
                        doc_chars += len(line)
                        if doc_chars < batch_chars:
                            continue
                        batch.append(("".join(doc), False))  # a long document: this piece, more to come
                    elif doc:
                        batch.append(("".join(doc), True))
                    else:
                        continue
                    size += doc_chars
                    doc, doc_chars = [], 0
                    if size >= batch_chars:
                        yield batch
                        batch, size = [], 0
            if doc:
                batch.append(("".join(doc), True))
                size += doc_chars
            elif batch and not batch[-1][1]:
                batch[-1] = (batch[-1][0], True)
        elif isinstance(src, str):
            batch.append((src, True))
            size += len(src)
        else:
            raise TypeError(f"sources must be text file paths or strings, got {type(src).__name__}")
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer, pieces: List[Tuple[str, bool]], eos: Optional[int], dtype: np.dtype) -> np.ndarray:
    """One batch of pieces as token ids of `dtype`, EOS after each piece that ends a document."""
    ids = tokenizer.encode_batch([t for t, _ in pieces], padding=False, truncation=False, return_tensors=None)
    parts = []
    for seq, (_, ends) in zip(ids["input_ids"], pieces):
        parts.append(np.asarray(seq, dtype=np.int64))
        if ends and eos is not None:
            parts.append(np.asarray([eos], dtype=np.int64))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    vocab = tokenizer.vocab_size
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise ValueError(f"the tokenizer produced ids outside [0, {vocab})")
    return arr.astype(dtype)


_WORKER_TOKENIZER = None


def _worker_init(tokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process a worker already; no nested thread pools
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(pieces, eos, dtype) -> np.ndarray:
    return _encode(_WORKER_TOKENIZER, pieces, eos, dtype)


def _encoded_batches(sources, tokenizer, batch_chars: int, eos, dtype, workers: int) -> Iterator[np.ndarray]:
    """Each batch of _pieces encoded, in order: in this process, or on `workers` processes with at most 2 batches
    a worker in flight (the text is read only as fast as it is tokenized, so memory stays bounded). The pool starts
    at the third batch: a small corpus never pays for starting processes."""
    batches = _pieces(sources, batch_chars)
    for pieces in itertools.islice(batches, 2 if workers > 1 else None):
        yield _encode(tokenizer, pieces, eos, dtype)
    if workers <= 1:
        return
    pending: deque = deque()
    with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(tokenizer,)) as pool:
        for pieces in batches:
            pending.append(pool.submit(_worker_encode, pieces, eos, dtype))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _is_path(src) -> bool:
    # A str names a file when it is one (a document string of one line that happens to be a file name is read
    # as that file, as `open` would): pass Path objects to be explicit.
    return isinstance(src, os.PathLike) or (isinstance(src, str) and "\n" not in src and os.path.isfile(src))


class TokenDataset(Dataset):
    """block_size windows of a token file, for causal (or masked) LM training without holding the corpus in RAM.

    Items are lists of block_size token ids. With ``random_windows=True`` (training) item i starts at an offset
    drawn from a generator seeded by (seed, epoch, i): any window can come up, the same (epoch, i) always gives
    the same window (so the Trainer's seeded order and its exact resume hold), each epoch draws new windows
    (the Trainer calls ``set_epoch`` as DistributedSampler's users do), and len() = n_tokens // block_size items
    make an epoch, one corpus's worth of tokens, as nanoGPT's iterations do. With ``random_windows=False`` (validation)
    the items are the consecutive non-overlapping windows. Rank sharding under torchrun is the Trainer's (each
    rank takes every world_size-th batch), and the file is opened read-only by every rank and DataLoader worker
    (re-opened lazily in each process; windows are read with pread, ``tokens()`` maps the whole file).
    """

    def __init__(self, path: PathLike, block_size: int, *, seed: int = 0, random_windows: bool = True,
                 tokenizer=None):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.path = Path(path)
        self.meta = self.read_meta(self.path, tokenizer)
        self.n_tokens = int(self.meta["n_tokens"])
        if self.n_tokens < block_size:
            raise ValueError(f"{self.path} holds {self.n_tokens} tokens, fewer than block_size={block_size}: "
                             f"use a smaller block_size or more text")
        self.block_size, self.seed, self.random_windows = block_size, seed, random_windows
        self.epoch = 0
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._tokens: Optional[np.memmap] = None
        self._pid = -1
        self._fd: Optional[int] = None
        self._fd_pid = -1

    @staticmethod
    def read_meta(path: PathLike, tokenizer=None) -> dict:
        """The JSON beside a token file, checked against the file (and the tokenizer, when given)."""
        path = Path(path)
        meta_path = _meta_path(path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{meta_path} is missing: {path} is not a complete minillm token file "
                                    f"(build one with TokenDataset.build)") from None
        except ValueError as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a minillm token file description (format {FORMAT!r} expected)")
        if meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: version {meta.get('version')!r}, this minillm reads {VERSION}")
        if meta.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"{meta_path}: dtype must be uint16 or uint32, got {meta.get('dtype')!r}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing (its description {meta_path} exists)") from None
        if size != int(meta.get("n_tokens", -1)) * itemsize:
            raise ValueError(f"{path} has {size} bytes, its description says {meta.get('n_tokens')} {meta['dtype']} "
                             f"tokens ({int(meta.get('n_tokens', 0)) * itemsize} bytes): the pair is mixed or torn")
        if tokenizer is not None and int(meta.get("vocab_size", -1)) != tokenizer.vocab_size:
            raise ValueError(f"{path} was tokenized with a vocabulary of {meta.get('vocab_size')}, this tokenizer has "
                             f"{tokenizer.vocab_size}: rebuild the token file with it")
        return meta

    @classmethod
    def build(cls, sources, tokenizer, path: PathLike, *, block_size: int = 1024, batch_chars: int = 1 << 20,
              append_eos: bool = True, progress: Optional[bool] = None, seed: int = 0,
              random_windows: bool = True, num_workers: Optional[int] = None) -> "TokenDataset":
        """Tokenizes `sources` (a text file, a list of files, or an iterable of strings) into the token file
        `path` and returns its dataset. Text is read and tokenized in batches of about `batch_chars` characters
        (one encode_batch call per batch) and appended to the file, so neither the text
        nor the tokens are ever held whole. Each document (a string, or a blank-line-separated block of a file)
        ends with EOS when `append_eos` and the tokenizer has one; a document longer than batch_chars is
        tokenized in pieces cut at line ends. Batches are tokenized in parallel on `num_workers` processes (default:
        the CPUs this process may use, up to 8; 0 or 1: in this process) and written in order, so the file is the
        same for any count. A progress bar shows on a terminal."""
        path = Path(path)
        vocab = tokenizer.vocab_size
        dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")
        eos = tokenizer.eos_token_id if append_eos else None
        n_tokens = 0
        bar = progress_bar(enabled=progress, desc=f"tokenizing into {path.name}", unit="tok", unit_scale=True)

        if num_workers is None:
            num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

        def write(tmp: str) -> None:  # appends each batch's ids; atomic_write fsyncs and renames it into place
            nonlocal n_tokens
            with open(tmp, "wb") as out:
                for arr in _encoded_batches(sources, tokenizer, batch_chars, eos, dtype, num_workers):
                    arr.tofile(out)
                    n_tokens += int(arr.size)
                    if bar is not None:
                        bar.update(int(arr.size))

        try:
            atomic_write(path, write)
        finally:
            if bar is not None:
                bar.close()
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "n_tokens": n_tokens,
                "vocab_size": vocab, "eos_token_id": eos}
        atomic_write_text(_meta_path(path), json.dumps(meta, indent=1) + "\n")
        log.info("%s: %d tokens (%s, %.1f MB)", path, n_tokens, dtype.name, n_tokens * dtype.itemsize / 1e6)
        return cls(path, block_size, seed=seed, random_windows=random_windows, tokenizer=tokenizer)

    def tokens(self) -> np.memmap:
        """The whole file as a read-only memmap (opened once per process: DataLoader workers get their own)."""
        if self._tokens is None or self._pid != os.getpid():
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
            self._pid = os.getpid()
        return self._tokens

    def _file(self) -> int:
        """A read-only descriptor of the file, one per process."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self):  # workers and spawned processes re-open the file
        state = dict(self.__dict__)
        state["_tokens"], state["_pid"], state["_fd"], state["_fd_pid"] = None, -1, None, -1
        return state

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and getattr(self, "_fd_pid", -1) == os.getpid():
            os.close(fd)

    def __len__(self) -> int:
        return self.n_tokens // self.block_size

    def set_epoch(self, epoch: int) -> None:
        """Draw the random windows of this epoch (the Trainer calls it before each epoch)."""
        self.epoch = int(epoch)

    def offset(self, i: int) -> int:
        """Where item i starts."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a TokenDataset of {len(self)}")
        if not self.random_windows:
            return i * self.block_size
        # SeedSequence mixes (seed, epoch, i) into independent streams: neighbouring i give unrelated offsets.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, i])))
        return int(rng.integers(0, self.n_tokens - self.block_size + 1))

    def __getitem__(self, i: int) -> List[int]:
        # One pread per window rather than a memmap slice: random windows through a mapping pull the kernel's
        # readahead into this process's resident memory (a 4 GB file read at 64k random windows: +3.7 GB RSS),
        # where a read leaves the pages in the shared page cache.
        start, size = self.offset(i), self.dtype.itemsize
        data = os.pread(self._file(), self.block_size * size, start * size)
        if len(data) != self.block_size * size:
            raise OSError(f"{self.path}: short read at token {start} (the file changed since it was opened?)")
        return np.frombuffer(data, dtype=self.dtype).astype(np.int64).tolist()


__all__ = ["TokenDataset"]
