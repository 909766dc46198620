"""attn_implementation="minillm" on many transformers architectures, built from tiny random configs: the same
outputs as transformers' own attention (sdpa, or eager where the model has no sdpa) on padded batches, the same
greedy tokens, the same training gradients. Whatever the kernel does not compute exactly must reach
transformers' functions untouched (T5's position bias, Gemma 2's softcapping, gpt-oss's sinks, Falcon's ALiBi)."""
import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import minillm.integrations.transformers as mt  # noqa: E402

mt.register()

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODERS = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "mistral": dict(num_key_value_heads=2, sliding_window=8),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    # Soft-capping at 0.5 and sinks of size ~2 change every output: a backend that ignored them would fail.
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=0.5),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, sliding_window=8),
    "phi3": dict(num_key_value_heads=2),
    "gpt_neox": dict(),
    "gpt2": dict(),
    "gptj": dict(rotary_dim=8),
    "falcon-alibi": dict(alibi=True, new_decoder_architecture=False, multi_query=False),
    "falcon-rotary": dict(),
    "bloom": dict(),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt_oss": dict(num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8),
}
# Plain causal attention with padding: the kernel must run there (not only the fallback).
NATIVE = {"llama", "qwen2", "gpt2", "gpt_neox", "opt", "falcon-rotary", "bert", "roberta"}


def _config(name, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(name.split("-")[0], **SMALL, **extra)


def _pair(cls, config):
    """(reference model on transformers' attention, the same weights on minillm's), eval mode."""
    make = getattr(cls, "from_config", None) or cls._from_config  # Auto classes, or a model class itself
    torch.manual_seed(0)
    # Each model gets its own copy of the config: from_config records the implementation in the config object, and
    # a shared one would switch the reference to minillm too.
    try:
        ref = make(copy.deepcopy(config), attn_implementation="sdpa")
    except (ValueError, ImportError):  # no sdpa support: eager is transformers' own implementation
        ref = make(copy.deepcopy(config), attn_implementation="eager")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "sinks" in n:  # gpt-oss's attention sinks start at zero; make them matter
                p.copy_(2 * torch.randn_like(p))
    ours = make(copy.deepcopy(config), attn_implementation="minillm")
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation in ("sdpa", "eager") and ours.config._attn_implementation == "minillm"
    for m in (ref, ours):
        m.eval()
        if getattr(m, "generation_config", None) is not None:
            m.generation_config.pad_token_id = 0
    return ref, ours


def _count_kernel_calls(monkeypatch):
    calls = []
    real = mt.ops.attention
    monkeypatch.setattr(mt.ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _padded_batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, n - 3:] = 0  # right padding
    mask[2, :3] = 0      # left padding
    return ids, mask


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_transformers_attention(name, monkeypatch):
    ref, ours = _pair(transformers.AutoModelForCausalLM, _config(name, **DECODERS[name]))
    ids, mask = _padded_batch()
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    if name in NATIVE:
        assert calls, f"{name}: plain causal attention with padding should run minillm's kernel"
    # Greedy decoding, left-padded prompts, token for token.
    prompt = ids[[0, 2]]
    pmask = mask[[0, 2]]
    ga = ref.generate(prompt, attention_mask=pmask, max_new_tokens=6, do_sample=False)
    gb = ours.generate(prompt, attention_mask=pmask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "falcon-alibi", "gpt_oss", "qwen3"])
def test_decoder_training_gradients_match(name):
    config = _config(name, **DECODERS[name])
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    ref, ours = _pair(transformers.AutoModelForCausalLM, config)
    ids, mask = _padded_batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for m in (ref, ours):
        m.train()
        m.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        err = (g - grads[1][n]).abs().max() / g.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, f"{name}: {n} differs by {err:.2e} (relative)"


ENCODERS = {"bert": dict(), "roberta": dict(), "modernbert": dict(global_attn_every_n_layers=1)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_matches_transformers_attention(name, monkeypatch):
    ref, ours = _pair(transformers.AutoModel, _config(name, **ENCODERS[name]))
    ids, mask = _padded_batch(2)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).last_hidden_state, ours(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    if name in NATIVE:
        assert calls


SEQ2SEQ = {
    "t5": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, relative_attention_num_buckets=8,
               decoder_start_token_id=0),
    "bart": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_start_token_id=2),
}


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_encoder_decoder_matches_transformers_attention(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(name, vocab_size=128, pad_token_id=0, eos_token_id=1,
                                                   **SEQ2SEQ[name])
    ref, ours = _pair(transformers.AutoModelForSeq2SeqLM, config)
    ids, mask = _padded_batch(3)
    dec = torch.randint(3, 128, (3, 7))
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (a - b).abs().max() <= 1e-4
    ga = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    gb = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


def test_whisper_text_decoder_matches():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.WhisperConfig(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2,
                                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                            decoder_ffn_dim=128, max_target_positions=64, pad_token_id=0,
                                            decoder_start_token_id=1, eos_token_id=2)
    ref, ours = _pair(transformers.WhisperForCausalLM, config)
    ids, mask = _padded_batch(4)
    enc = torch.randn(3, 10, 64)  # encoder states the decoder cross-attends to
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, encoder_outputs=(enc,)).logits
        b = ours(ids, attention_mask=mask, encoder_outputs=(enc,)).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4


def test_unknown_keywords_are_never_dropped(monkeypatch):
    # A keyword the backend does not know, holding a value, must reach transformers' sdpa function untouched.
    seen = {}

    def fake_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs)
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    import transformers.integrations.sdpa_attention as sa

    monkeypatch.setattr(sa, "sdpa_attention_forward", fake_sdpa)
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 8)
    out, _ = mt.minillm_attention(module, q, q, q, None, scaling=0.5, some_new_bias=torch.ones(1))
    assert "some_new_bias" in seen and seen["scaling"] == 0.5 and out.shape == (1, 3, 2, 8)
