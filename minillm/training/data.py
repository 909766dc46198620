"""Text files to train/validation/test lists, and lists to DataLoaders of token chunks."""
from __future__ import annotations

import logging
import os
import random
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from minillm.text import split_sentences
from minillm.training.collate import Collator

log = logging.getLogger("minillm.training")

SPLIT_METHODS = ("paragraph", "line", "sentence", "chunk")
TASKS = ("auto", "clm", "mlm", "seq2seq")


def split_text(text: str, method: str = "paragraph", chunk_size: int = 1000) -> List[str]:
    """Pieces of `text`: paragraphs (blank-line separated), lines, sentences or fixed-size chunks."""
    if method == "paragraph":
        pieces = re.split(r"\n\s*\n", text)
    elif method == "line":
        pieces = text.splitlines()
    elif method == "sentence":
        pieces = split_sentences(text)
    elif method == "chunk":
        pieces = [text[i:i + chunk_size] for i in range(0, len(text), chunk_size)]
    else:
        raise ValueError(f"split_method must be one of {SPLIT_METHODS}, got {method!r}")
    return [p.strip() for p in pieces if p.strip()]


def load_and_split_data(
    file_path: Union[str, os.PathLike],
    split_method: str = "paragraph",
    val_split: float = 0.1,
    test_split: float = 0.0,
    seed: int = 42,
    chunk_size: int = 1000,
    shuffle: bool = True,
    encoding: str = "utf-8",
) -> Tuple[List[str], List[str], List[str]]:
    """Reads a text file, splits it into pieces and those into (train, val, test) lists.

    The pieces are shuffled with `seed` (the same seed always gives the same split); with
    shuffle=False the split is by position (the last pieces are test, those before them val).
    """
    if split_method not in SPLIT_METHODS:
        raise ValueError(f"split_method must be one of {SPLIT_METHODS}, got {split_method!r}")
    if not (0 <= val_split < 1 and 0 <= test_split < 1 and val_split + test_split < 1):
        raise ValueError(f"val_split and test_split must be in [0, 1) with a sum below 1, got {val_split}, {test_split}")
    path = os.fspath(file_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}")
    try:
        with open(path, encoding=encoding) as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid {encoding} text ({exc.reason} at byte {exc.start}); "
                         f"pass encoding= or convert the file") from None
    pieces = split_text(text, split_method, chunk_size)
    if not pieces:
        raise ValueError(f"{path} holds no text")
    if shuffle:
        random.Random(seed).shuffle(pieces)
    n = len(pieces)
    n_test = int(round(n * test_split))
    n_val = int(round(n * val_split))
    if val_split > 0 and n_val == 0 and n > 1:
        n_val = 1
    if n - n_val - n_test < 1:
        raise ValueError(f"{path} splits into {n} pieces by {split_method!r}: too few for these splits")
    train = pieces[: n - n_val - n_test]
    val = pieces[n - n_val - n_test: n - n_test]
    test = pieces[n - n_test:]
    log.info("%s: %d %ss -> %d train, %d val, %d test", path, n, split_method, len(train), len(val), len(test))
    return train, val, test


class TokenChunks(Dataset):
    """Each text tokenized and cut into chunks (nothing is dropped) of at most max_length - 2 tokens,
    leaving room for the two special tokens an encoder's batch frames them with."""

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int):
        self.chunks: List[List[int]] = []
        max_length = max(1, max_length - 2)
        for ids in tokenizer.encode_batch(list(texts), padding=False, truncation=False)["input_ids"]:
            self.chunks.extend(ids[i:i + max_length] for i in range(0, len(ids), max_length) if ids[i:i + max_length])

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> List[int]:
        return self.chunks[i]


class Pairs(Dataset):
    """(source ids, target ids) for seq2seq, from (source, target) pairs or "source<TAB>target" lines."""

    def __init__(self, texts: Sequence[Union[str, Tuple[str, str]]], tokenizer, max_length: int):
        pairs = []
        for t in texts:
            if isinstance(t, str):
                if "\t" not in t:
                    raise ValueError(f"seq2seq texts are (source, target) pairs or 'source<TAB>target' lines; got {t[:60]!r}")
                t = tuple(t.split("\t", 1))
            pairs.append(t)
        src = tokenizer.encode_batch([p[0] for p in pairs], padding=False, truncation=True, max_length=max_length)
        tgt = tokenizer.encode_batch([p[1] for p in pairs], padding=False, truncation=True, max_length=max_length - 1)
        self.items = list(zip(src["input_ids"], tgt["input_ids"]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def create_dataloaders(
    train_texts: Sequence,
    val_texts: Optional[Sequence],
    tokenizer,
    batch_size: int = 16,
    max_length: int = 512,
    task: str = "auto",
    mlm_probability: float = 0.15,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    streaming: bool = False,
    token_dir: Union[str, os.PathLike, None] = None,
) -> Tuple[DataLoader, Optional[DataLoader]]:
    """(train_loader, val_loader) of padded batches for a task.

    clm: {"input_ids", "attention_mask", "labels"} for a decoder (labels shifted inside the model);
    mlm: the same with 15% of non-special tokens selected (80% <mask>, 10% random, 10% kept) and
    labels -100 elsewhere; seq2seq: {"src_ids", "src_mask", "tgt_ids", "tgt_mask", "labels"}.
    "auto" lets the Trainer pick clm or mlm from the model it trains. Training batches are shuffled
    with a generator seeded by `seed`, so a run (and a resumed run) sees the same order.

    streaming=True tokenizes the texts (strings, or paths of text files of any size) once into token files
    under `token_dir` (train.bin, val.bin; default: a new temporary directory) and serves windows of them
    (minillm.training.tokens.TokenDataset): random windows drawn from (seed, epoch, item) for training, the
    consecutive windows for validation; nothing is held in memory but the batches. Windows are max_length
    tokens for clm and max_length - 2 for mlm and auto (room for an encoder's two special tokens, as without
    streaming). Not for seq2seq. Under torchrun (WORLD_SIZE > 1) token_dir is required: one process a node
    (LOCAL_RANK 0) writes the files, the others wait for it and read them; nodes sharing token_dir write the
    same bytes under unique temporary names, so the last rename leaves a whole file either way.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    if not train_texts:
        raise ValueError("train_texts is empty")

    if streaming and task == "seq2seq":
        raise ValueError("streaming=True serves token windows for clm or mlm; seq2seq needs (source, target) pairs")
    if streaming:
        from minillm.training import distributed
        from minillm.training.tokens import TokenDataset

        if token_dir is None:
            if distributed.world_size() > 1:
                raise ValueError("streaming=True under torchrun needs token_dir=: a folder every process of a node "
                                 "sees (one process a node writes the token files there, the others read them)")
            import tempfile

            token_dir = tempfile.mkdtemp(prefix="minillm-tokens-")
        window = max_length if task == "clm" else max_length - 2

    def make(texts, is_train):
        if texts is None or len(texts) == 0:
            return None
        if streaming:
            path = os.path.join(token_dir, "train.bin" if is_train else "val.bin")
            # Under torchrun, local rank 0 of each node tokenizes and the others wait, then open its file. A build
            # that fails still reaches the barrier (finally), so the others fail on the missing file, not hang.
            builder = distributed.local_rank() == 0
            try:
                if builder:
                    ds = TokenDataset.build(texts, tokenizer, path, block_size=window, seed=seed,
                                            random_windows=is_train)
            finally:
                distributed.barrier()
            if not builder:
                ds = TokenDataset(path, window, seed=seed, random_windows=is_train, tokenizer=tokenizer)
        elif task == "seq2seq":
            ds = Pairs(texts, tokenizer, max_length)
        else:
            ds = TokenChunks(texts, tokenizer, max_length)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and is_train, generator=gen,
                          collate_fn=Collator(tokenizer, task, mlm_probability), num_workers=num_workers)

    return make(train_texts, True), make(val_texts, False)
