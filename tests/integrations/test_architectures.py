"""attn_implementation="minillm" on many transformers architectures, built from tiny random configs: the same
outputs as transformers' own attention (sdpa, or eager where the model has no sdpa) on padded batches, the same
greedy tokens, the same training gradients, with every attention call on minillm's kernel (GQA, sliding windows,
Gemma 2's softcapping, gpt-oss's sinks, T5's relative position bias and Falcon's ALiBi mask included). What the
kernel does not compute must reach transformers' functions untouched."""
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
# BLOOM computes attention itself (it never calls transformers' attention functions): only its mask comes from here.
NOT_CALLED = {"bloom"}


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
    """(kernel calls, fallback calls): lists that grow with each call."""
    calls, fallbacks = [], []
    real, real_fallback = mt._attention_band, mt._fallback
    monkeypatch.setattr(mt, "_attention_band", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mt, "_fallback", lambda *a, **k: fallbacks.append(1) or real_fallback(*a, **k))
    return calls, fallbacks


def _all_native(name, calls, fallbacks):
    if name in NOT_CALLED:
        assert not calls and not fallbacks
    else:
        assert calls and not fallbacks, f"{name}: {len(fallbacks)} of {len(calls) + len(fallbacks)} calls fell back"


def _grads(models, run):
    """Each model's parameter gradients after one training step (train mode) of `run(model)` -> loss."""
    grads = []
    for m in models:
        m.train()
        m.zero_grad()
        run(m).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return grads


def _assert_same_grads(name, grads):
    """Each parameter's gradient within 1e-4 of its largest entry; tensors whose gradient is zero in exact
    arithmetic (a key projection's bias: softmax ignores a constant per row) are held to 1e-4 of the model's
    largest gradient entry instead of to their own rounding noise."""
    assert grads[0].keys() == grads[1].keys()
    floor = 1e-3 * max(g.abs().max() for g in grads[0].values())
    for n, g in grads[0].items():
        err = (g - grads[1][n]).abs().max() / torch.maximum(g.abs().max(), floor)
        assert err <= 1e-4, f"{name}: {n} differs by {err:.2e} (relative)"


def _no_dropout(config):
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout",
                "dropout_rate", "activation_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob",
                "embedding_dropout", "mlp_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return config


def _padded_batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, n - 3:] = 0  # right padding
    mask[2, :3] = 0      # left padding
    return ids, mask


def _labels(ids, mask):
    """Causal-LM labels that only real positions' outputs predict: padding, and the first real token of a
    left-padded row (its prediction comes from a padding position, whose query sees no key: transformers' own
    backends disagree there, sdpa returning 0 and eager the mean of the padded values)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_transformers_attention(name, monkeypatch):
    ref, ours = _pair(transformers.AutoModelForCausalLM, _config(name, **DECODERS[name]))
    ids, mask = _padded_batch()
    calls, fallbacks = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    # Greedy decoding, left-padded prompts, token for token (past the sliding windows of 8).
    prompt = ids[[0, 2]]
    pmask = mask[[0, 2]]
    ga = ref.generate(prompt, attention_mask=pmask, max_new_tokens=6, do_sample=False)
    gb = ours.generate(prompt, attention_mask=pmask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)
    _all_native(name, calls, fallbacks)


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_training_gradients_match(name, monkeypatch):
    ref, ours = _pair(transformers.AutoModelForCausalLM, _no_dropout(_config(name, **DECODERS[name])))
    ids, mask = _padded_batch(1)
    labels = _labels(ids, mask)
    calls, fallbacks = _count_kernel_calls(monkeypatch)
    _assert_same_grads(name, _grads((ref, ours), lambda m: m(ids, attention_mask=mask, labels=labels).loss))
    _all_native(name, calls, fallbacks)


ENCODERS = {"bert": dict(), "roberta": dict(), "modernbert": dict(global_attn_every_n_layers=1)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_matches_transformers_attention(name, monkeypatch):
    ref, ours = _pair(transformers.AutoModel, _no_dropout(_config(name, **ENCODERS[name])))
    ids, mask = _padded_batch(2)
    calls, fallbacks = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).last_hidden_state, ours(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    _all_native(name, calls, fallbacks)
    # A training step: the loss over real positions' states.
    w = torch.randn(ref.config.hidden_size)  # a loss that depends on every state (a sum of squares after
    # LayerNorm would be nearly constant)
    _assert_same_grads(name, _grads((ref, ours), lambda m: (m(ids, attention_mask=mask).last_hidden_state[keep] @ w)
                                    .square().mean()))


SEQ2SEQ = {
    "t5": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, relative_attention_num_buckets=8,
               decoder_start_token_id=0),
    "bart": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_start_token_id=2),
}


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_encoder_decoder_matches_transformers_attention(name, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(name, vocab_size=128, pad_token_id=0, eos_token_id=1,
                                                   **SEQ2SEQ[name])
    ref, ours = _pair(transformers.AutoModelForSeq2SeqLM, _no_dropout(config))
    ids, mask = _padded_batch(3)
    dec = torch.randint(3, 128, (3, 7))
    calls, fallbacks = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (a - b).abs().max() <= 1e-4
    ga = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    gb = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)
    # Training: T5's relative position bias (its embedding) gets its gradient through the kernel's dbias.
    _assert_same_grads(name, _grads((ref, ours), lambda m: m(input_ids=ids, attention_mask=mask,
                                                             decoder_input_ids=dec, labels=dec).loss))
    _all_native(name, calls, fallbacks)


def test_whisper_text_decoder_matches(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.WhisperConfig(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2,
                                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                            decoder_ffn_dim=128, max_target_positions=64, pad_token_id=0,
                                            decoder_start_token_id=1, eos_token_id=2)
    ref, ours = _pair(transformers.WhisperForCausalLM, _no_dropout(config))
    ids, mask = _padded_batch(4)
    calls, fallbacks = _count_kernel_calls(monkeypatch)
    enc = torch.randn(3, 10, 64)  # encoder states the decoder cross-attends to
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, encoder_outputs=(enc,)).logits
        b = ours(ids, attention_mask=mask, encoder_outputs=(enc,)).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4
    labels = _labels(ids, mask)
    _assert_same_grads("whisper", _grads((ref, ours), lambda m: m(ids, attention_mask=mask, encoder_outputs=(enc,),
                                                                   labels=labels).loss))
    _all_native("whisper", calls, fallbacks)


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
