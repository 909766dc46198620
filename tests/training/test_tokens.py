"""Token files (minillm.training.tokens): what build writes, the windows a TokenDataset serves, the refusals of
a torn or foreign pair, DataLoader workers, streaming create_dataloaders with the Trainer, and bounded memory."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minillm.models import DecoderOnlyModel
from minillm.tokenizers import CharTokenizer
from minillm.training import Collator, TokenDataset, Trainer, create_dataloaders


def expected_tokens(tok, docs):
    out = []
    for d in docs:
        out += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    return out


def test_build_from_strings_writes_every_document_and_its_eos(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    ds = TokenDataset.build(texts, tok, tmp_path / "train.bin", block_size=32, batch_chars=500, progress=False)
    meta = json.loads((tmp_path / "train.bin.json").read_text())
    assert meta["format"] == "minillm-tokens" and meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    tokens = np.fromfile(tmp_path / "train.bin", dtype="<u2")
    assert tokens.tolist() == expected_tokens(tok, texts)
    assert ds.n_tokens == len(tokens) and len(ds) == len(tokens) // 32


def test_build_from_files_cuts_documents_at_blank_lines_and_long_ones_at_line_ends(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts + ["\n"])
    long_doc = "\n".join(texts[:40])  # one document of ~2,000 characters, read in pieces of ~300
    docs = texts[40:60] + [long_doc] + texts[60:80]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n\n".join(docs[:25]) + "\n", encoding="utf-8")
    b.write_text("\n\n".join(docs[25:]), encoding="utf-8")
    ds = TokenDataset.build([a, b], tok, tmp_path / "t.bin", block_size=16, batch_chars=300, progress=False)
    # each file line keeps its newline; documents end where a blank line (or the file) ends them
    want_docs = [d + "\n" for d in docs[:25]] + [d + "\n" for d in docs[25:-1]] + [docs[-1]]
    assert ds.tokens().tolist() == expected_tokens(tok, want_docs)


def test_parallel_build_writes_the_same_file_as_one_process(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    one = TokenDataset.build(texts * 3, tok, tmp_path / "one.bin", block_size=8, batch_chars=400, progress=False,
                             num_workers=0)
    three = TokenDataset.build(texts * 3, tok, tmp_path / "three.bin", block_size=8, batch_chars=400, progress=False,
                               num_workers=3)  # 3 worker processes, batches in flight out of order
    assert one.n_tokens == three.n_tokens > 0
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "three.bin").read_bytes()
    assert one.tokens().tolist() == expected_tokens(tok, texts * 3)


def test_windows_are_reproducible_random_and_in_range(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    path = tmp_path / "train.bin"
    ds = TokenDataset.build(texts, tok, path, block_size=24, progress=False, seed=3)
    again = TokenDataset(path, 24, seed=3)
    other = TokenDataset(path, 24, seed=4)
    offsets = [ds.offset(i) for i in range(len(ds))]
    assert offsets == [again.offset(i) for i in range(len(ds))]
    assert offsets != [other.offset(i) for i in range(len(ds))]
    assert all(0 <= o <= ds.n_tokens - 24 for o in offsets) and len(set(offsets)) > len(ds) // 2
    whole = ds.tokens()
    for i in (0, 7, len(ds) - 1):
        assert ds[i] == whole[offsets[i]:offsets[i] + 24].tolist()
    ds.set_epoch(1)  # each epoch its own windows; back to epoch 0, the same ones again
    assert [ds.offset(i) for i in range(len(ds))] != offsets
    ds.set_epoch(0)
    assert [ds.offset(i) for i in range(len(ds))] == offsets
    seq = TokenDataset(path, 24, random_windows=False)
    assert [seq.offset(i) for i in range(3)] == [0, 24, 48]
    assert sum((seq[i] for i in range(len(seq))), []) == whole[:len(seq) * 24].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_a_torn_mixed_or_foreign_pair_is_refused(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    path = tmp_path / "train.bin"
    TokenDataset.build(texts, tok, path, block_size=16, progress=False)
    meta = path.with_name("train.bin.json")
    good = meta.read_text()
    with open(path, "ab") as f:
        f.write(b"\x00")  # one byte more than the description says
    with pytest.raises(ValueError, match="mixed or torn"):
        TokenDataset(path, 16)
    TokenDataset.build(texts, tok, path, block_size=16, progress=False)  # rebuilt in place
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a minillm token file"):
        TokenDataset(path, 16)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="not a complete minillm token file"):
        TokenDataset(path, 16)
    meta.write_text(good)
    with pytest.raises(ValueError, match="vocabulary of"):
        TokenDataset(path, 16, tokenizer=CharTokenizer.from_texts(["abc"]))
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenDataset(path, 10**7)


def test_a_failed_build_leaves_no_file_behind(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)

    def docs():
        yield from texts[:50]
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        TokenDataset.build(docs(), tok, tmp_path / "t.bin", block_size=8, batch_chars=100, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dataloader_workers_give_the_same_batches(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    ds = TokenDataset.build(texts, tok, tmp_path / "train.bin", block_size=20, progress=False)
    collate = Collator(tok, "clm")

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                            collate_fn=collate, num_workers=workers)
        return [b["input_ids"] for b in loader]

    one, two = batches(0), batches(2)
    assert len(one) == len(two) and all(torch.equal(x, y) for x, y in zip(one, two))


def test_streaming_loaders_train_a_decoder(texts, tmp_path):
    tok = CharTokenizer.from_texts(texts)
    train, val = create_dataloaders(texts[:200], texts[200:], tok, batch_size=8, max_length=32, task="clm",
                                    streaming=True, token_dir=tmp_path / "tokens")
    assert isinstance(train.dataset, TokenDataset) and isinstance(val.dataset, TokenDataset)
    assert {p.name for p in (tmp_path / "tokens").iterdir()} == {"train.bin", "train.bin.json", "val.bin",
                                                                "val.bin.json"}
    batch = next(iter(train))
    assert batch["input_ids"].shape == (8, 32) and bool(batch["attention_mask"].all())
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 32, "dropout": 0.0})
    epochs = []
    real_set_epoch = train.dataset.set_epoch
    train.dataset.set_epoch = lambda e: (epochs.append(e), real_set_epoch(e))
    res = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path / "ck", progress=False).train(epochs=3)
    vals = [h["val_loss"] for h in res["history"]]
    assert vals[-1] < vals[0]
    assert epochs == [0, 1, 2]  # new windows every epoch
    with pytest.raises(ValueError, match="seq2seq"):
        create_dataloaders(["a\tb"], None, tok, task="seq2seq", streaming=True)


MEMORY_SCRIPT = textwrap.dedent('''
    import os, resource, sys
    import numpy as np
    from minillm.tokenizers import CharTokenizer
    from minillm.training import TokenDataset

    corpus, out, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    line = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun\\n"
    with open(corpus, "w") as f:
        for i in range(mb * 1_000_000 // len(line)):
            f.write(line if i % 50 else "\\n")  # documents of 50 lines
    tok = CharTokenizer.from_texts([line])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds = TokenDataset.build(corpus, tok, out, block_size=256, batch_chars=1 << 20, progress=False)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    total = sum(int(np.asarray(ds[i]).sum() >= 0) for i in range(0, len(ds), max(1, len(ds) // 1000)))
    print(ds.n_tokens, grew, total)
''')


def test_building_a_large_file_keeps_memory_bounded(tmp_path):
    """A 40 MB corpus is 40 M tokens (320 MB as int64, gigabytes as Python lists): the build's peak memory must
    stay far below that, since it reads and tokenizes about a megabyte at a time."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "corpus.txt"), str(tmp_path / "c.bin"), "40"],
                         capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert res.returncode == 0, res.stderr[-3000:]
    n_tokens, grew_kib, _ = map(int, res.stdout.split())
    assert n_tokens > 39_000_000
    assert grew_kib < 150 * 1024, f"peak memory grew {grew_kib / 1024:.0f} MiB while building"
