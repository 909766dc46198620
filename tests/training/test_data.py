"""load_and_split_data, create_dataloaders and MLM collation."""
import pytest
import torch

from minillm.tokenizers import BPETokenizer, CharTokenizer
from minillm.training import create_dataloaders, load_and_split_data, mask_tokens, split_text


def test_split_is_deterministic_and_complete(text_file):
    a = load_and_split_data(text_file, "paragraph", val_split=0.1, test_split=0.1, seed=3)
    b = load_and_split_data(text_file, "paragraph", val_split=0.1, test_split=0.1, seed=3)
    c = load_and_split_data(text_file, "paragraph", val_split=0.1, test_split=0.1, seed=4)
    assert a == b and a != c
    train, val, test = a
    assert (len(train), len(val), len(test)) == (96, 12, 12)
    assert sorted(train + val + test) == sorted(split_text(text_file.read_text(), "paragraph"))


def test_split_methods():
    text = "Dr. Smith arrived at 3.5 p.m. today. He left!\nSecond line?\n\nNew paragraph here."
    assert split_text(text, "paragraph") == ["Dr. Smith arrived at 3.5 p.m. today. He left!\nSecond line?",
                                             "New paragraph here."]
    assert split_text(text, "line")[1] == "Second line?"
    assert split_text(text, "sentence")[0] == "Dr. Smith arrived at 3.5 p.m. today."
    assert split_text("abcdefghij", "chunk", chunk_size=4) == ["abcd", "efgh", "ij"]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_and_split_data(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="no text"):
        load_and_split_data(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa text")
    with pytest.raises(ValueError, match="not valid utf-8"):
        load_and_split_data(tmp_path / "bin.txt")
    with pytest.raises(ValueError, match="split_method"):
        load_and_split_data(tmp_path / "bin.txt", split_method="words")


def test_clm_and_mlm_batches(texts):
    tok = BPETokenizer(vocab_size=300).train(texts)
    train, val = create_dataloaders(texts[:200], texts[200:], tok, batch_size=8, max_length=16, task="clm")
    batch = next(iter(train))
    assert batch["input_ids"].shape[1] <= 14 and batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # Nothing is dropped: every token of every text appears in some chunk.
    total = sum(len(tok.encode(t)) for t in texts[:200])
    assert sum(len(c) for c in train.dataset.chunks) == total
    mtrain, _ = create_dataloaders(texts[:200], None, tok, batch_size=8, max_length=16, task="mlm")
    mb = next(iter(mtrain))
    assert mb["input_ids"][:, 0].eq(tok.bos_token_id).all() and (mb["labels"] != -100).any()


def test_mlm_masking_ratios():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 250), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # specials at both ends
    attn = torch.ones_like(ids)
    attn[:, 200:] = 0  # padding
    ids[:, 200:] = 0
    out, labels = mask_tokens(ids, attn, special_ids=[0, 1, 2, 3], mask_id=3, vocab_size=1000, generator=g)
    selected = labels != -100
    eligible = attn.bool() & (ids > 3)
    assert not (selected & ~eligible).any(), "special or padding tokens were selected"
    n = int(eligible.sum())
    assert abs(selected.sum().item() / n - 0.15) < 0.005
    sel = selected.sum().item()
    masked = (out[selected] == 3).sum().item() / sel
    kept = (out[selected] == ids[selected]).sum().item() / sel
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / 1000) < 0.01
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(out[~selected], ids[~selected])


def test_char_tokenizer_loader_and_seq2seq(texts):
    tok = CharTokenizer.from_texts(texts)
    pairs = [(t, t[::-1]) for t in texts[:20]]
    train, _ = create_dataloaders(pairs, None, tok, batch_size=4, max_length=64, task="seq2seq")
    b = next(iter(train))
    assert (b["tgt_ids"][:, 0] == tok.bos_token_id).all()
    first = b["labels"][0][b["labels"][0] != -100]
    assert first[-1] == tok.eos_token_id and torch.equal(first[:-1], b["tgt_ids"][0, 1:len(first)])
    with pytest.raises(ValueError, match="pairs"):
        create_dataloaders(["no tab here"], None, tok, task="seq2seq")
