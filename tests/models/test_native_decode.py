"""minillm.models.native_decode (csrc/decode.cpp): a decoding step through every layer in one native call against its
reference, the module path (MINILLM_NATIVE_DECODE off), for fp32, int8 (per channel and grouped) and int4 weights, grouped-query heads,
left-padded batches and any cache position; and the steps it must leave to the modules."""
import copy

import pytest
import torch

import minillm.models.native_decode as nd
from minillm.models import DecoderOnlyModel, ModelConfig
from minillm.models.layers import KVCache
from minillm.ops import _backend

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="native extension not available")

LLAMA = dict(model_type="decoder_only", vocab_size=96, d_model=64, num_heads=4, num_kv_heads=2, num_layers=3,
             d_ff=96, max_seq_len=64, dropout=0.0, activation="silu", gated_mlp=True, norm_type="rmsnorm",
             norm_eps=1e-6, position_embedding="rope", rope_theta=10000.0, bias=False, tie_embeddings=False)


class _Count:
    """Counts decode_layers calls (the native step taken) while delegating every binding."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name != "decode_layers":
            return fn

        def counted(**kw):
            self.calls += 1
            return fn(**kw)
        return counted


@pytest.fixture
def counter(monkeypatch):
    spy = _Count(_backend._C)
    monkeypatch.setattr(_backend, "_C", spy)
    return spy


def _model(mode=None, group=32, **over):
    torch.manual_seed(0)
    m = DecoderOnlyModel(ModelConfig(**{**LLAMA, **over})).eval()
    return m.quantize(mode, group) if mode else m


def _steps(model, ids, n, enabled, monkeypatch, mask=None, feed=None):
    """Logits of n cached decode steps after the prompt ids (B, T) (greedy tokens fed back, or the columns of feed
    (B, n)), and the cache."""
    monkeypatch.setattr(nd, "_ENABLED", enabled)
    step = model._padded_step(mask.bool(), n) if mask is not None else model._last_logits
    c = model.config
    cache = KVCache(c.num_layers, ids.shape[0], c.num_kv_heads, ids.shape[1] + n, c.head_dim,
                    model.embed.tok.weight.dtype, ids.device)
    out = []
    with torch.no_grad():
        logits = step(ids, cache)
        for i in range(n):
            out.append(logits)
            logits = step(logits.argmax(-1, keepdim=True) if feed is None else feed[:, i:i + 1], cache)
    return torch.stack(out), cache


@pytest.mark.parametrize("mode,group", [(None, None), ("int8", None), ("int8", 32), ("int4", 32)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_native_step_is_the_module_path(monkeypatch, counter, mode, group, kv_heads):
    model = _model(mode, group, num_kv_heads=kv_heads)
    ids = torch.randint(0, 96, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :6] = 0
    for m in (None, mask):
        want, cache_w = _steps(model, ids, 10, False, monkeypatch, m)
        calls = counter.calls
        got, cache_g = _steps(model, ids, 10, True, monkeypatch, m)
        assert counter.calls - calls == 10  # every step after the prompt went native
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for a, b in zip(cache_g.k + cache_g.v, cache_w.k + cache_w.v):
            torch.testing.assert_close(a[:, :, :cache_g.length], b[:, :, :cache_w.length], atol=2e-5, rtol=1e-5)


def test_generation_is_unchanged_and_stops_at_the_cache_end(monkeypatch, counter):
    model = _model("int4")
    ids = torch.randint(0, 96, (2, 8))
    # past max_seq_len = 64 the loop drops the cache and recomputes windows: the modules' path
    monkeypatch.setattr(nd, "_ENABLED", False)
    want = model.generate(ids, max_new_tokens=70, temperature=0)
    monkeypatch.setattr(nd, "_ENABLED", True)
    got = model.generate(ids, max_new_tokens=70, temperature=0)
    assert torch.equal(got, want) and counter.calls > 0


def test_the_layer_plan_is_built_once_per_cache_and_reads_weights_as_they_are(monkeypatch, counter):
    model = _model("int4")
    built, real = [], nd._layers
    monkeypatch.setattr(nd, "_layers", lambda *a: built.append(1) or real(*a))
    ids = torch.randint(0, 96, (1, 6))
    model.generate(ids, max_new_tokens=8, temperature=0)
    assert len(built) == 1 and counter.calls == 7  # 7 native steps after the prompt, one plan
    feed = torch.randint(0, 96, (1, 6))

    def run(enabled, change):
        m = copy.deepcopy(model)
        monkeypatch.setattr(nd, "_ENABLED", enabled)
        c = m.config
        cache = KVCache(c.num_layers, 1, c.num_kv_heads, 12, c.head_dim, torch.float32, ids.device)
        out = []
        with torch.no_grad():
            m._last_logits(ids, cache)
            for i in range(6):
                if i == 3 and change:  # in place, between two steps of the same cache
                    m.blocks[0].mlp.proj.scale.mul_(2)
                out.append(m._last_logits(feed[:, i:i + 1], cache))
        return torch.stack(out)

    got, want = run(True, True), run(False, True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, run(True, False))  # the change mattered


@pytest.mark.parametrize("change", ["gpt2", "bias", "window", "fp16", "grad", "training", "layernorm"])
def test_steps_it_does_not_compute_take_the_modules(monkeypatch, counter, change):
    if change == "gpt2":
        model = DecoderOnlyModel(ModelConfig(vocab_size=96, d_model=64, num_heads=4, num_layers=2, max_seq_len=64))
    else:
        over = {"bias": {"qkv_bias": True}, "window": {"sliding_window": 4},
                "layernorm": {"norm_type": "layernorm"}}.get(change, {})
        model = _model(**over)
    model.eval()
    if change == "fp16":
        model.to(torch.float16)
    ids = torch.randint(0, 96, (1, 6))
    if change in ("grad", "training"):
        if change == "training":
            model.train()
        c = model.config
        cache = KVCache(c.num_layers, 1, c.num_kv_heads, 20, c.head_dim, torch.float32, ids.device)
        model.hidden_states(ids, cache=cache)
        model.hidden_states(ids[:, :1], cache=cache)
    else:
        model.generate(ids, max_new_tokens=4, temperature=0)
    assert counter.calls == 0


def test_the_binding_checks_every_buffer():
    model = _model("int4")
    c = model.config
    cache = KVCache(c.num_layers, 2, c.num_kv_heads, 16, c.head_dim, torch.float32, torch.device("cpu"))
    cache.length = 5
    keep = []
    layers = nd._layers(model, cache, keep)
    B, C, Dh, H, Hkv, F = 2, c.d_model, c.head_dim, c.num_heads, c.num_kv_heads, c.d_ff
    x, cos, sin = torch.zeros(B, C), torch.ones(B, Dh), torch.zeros(B, Dh)
    scratch = torch.zeros(B * (C + (H + 2 * Hkv) * Dh + 2 * H * Dh + H + 3 * F + C))
    d = _backend.dense_buf
    kw = dict(x=d(x), cos=d(cos), sin=d(sin), scratch=d(scratch), layers=layers, B=B, C=C, H=H, kv_heads=Hkv,
              head_dim=Dh, d_ff=F, cache_len=5, capacity=16, eps=1e-6, scale=0.125)
    _backend._C.decode_layers(**kw)  # exact sizes: runs
    short = torch.zeros(B * Dh - 1)
    kpm = torch.ones(B, 5, dtype=torch.uint8)  # one key short of cache_len + 1
    bad_layer = list(layers[0])
    bad_layer[6] = d(torch.zeros(10))  # a k cache far too small
    q4 = bad_layer[1]
    for change, words in [(dict(cos=d(short)), "cos reaches"), (dict(scratch=d(scratch[:-1])), "scratch reaches"),
                          (dict(key_padding_mask=d(kpm)), "key_padding_mask reaches"),
                          (dict(layers=[tuple(bad_layer)]), "k_cache reaches"),
                          (dict(cache_len=16), "cache_len < capacity"), (dict(kv_heads=3), "H % kv_heads"),
                          (dict(layers=[(layers[0][0], (4, q4[1], q4[2], (0, 0), 32)) + layers[0][2:]]),
                           "offset is a null pointer"),
                          (dict(d_ff=F + 32), "reaches"), (dict(cache_dtype=2), "cache_dtype must be")]:
        with pytest.raises(ValueError, match="minillm._C") as info:
            _backend._C.decode_layers(**{**kw, **change})
        assert words in str(info.value), (change, info.value)
    with pytest.raises(TypeError, match="layer tuples"):
        _backend._C.decode_layers(**{**kw, "layers": tuple(layers)})


def test_bf16_model_steps_natively_and_closer_to_fp32(monkeypatch, counter):
    """A bf16 model (bf16 weights and cache): the native step keeps activations in fp32 between the kernels, so its
    logits sit closer to the fp32 model's (same bf16-rounded weights) than the module path's, which rounds every
    op's output to bf16; the keys and values it caches are the fp32 step's, rounded once."""
    ref = _model(None, num_kv_heads=2)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())  # the fp32 twin holds exactly the bf16 weights
    half = copy.deepcopy(ref).to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    feed = torch.randint(0, 96, (2, 8))  # the same tokens through all three
    exact, _ = _steps(ref, ids, 8, True, monkeypatch, mask, feed)
    modules, _ = _steps(half, ids, 8, False, monkeypatch, mask, feed)
    calls = counter.calls
    native, cache = _steps(half, ids, 8, True, monkeypatch, mask, feed)
    assert counter.calls - calls == 8 and cache.k[0].dtype == torch.bfloat16
    # step 0's logits come from the prompt pass (the modules in both); the native steps are 1 .. 7
    err_native = (native[1:].float() - exact[1:]).abs().amax(dim=(1, 2))
    err_modules = (modules[1:].float() - exact[1:]).abs().amax(dim=(1, 2))
    assert (err_native <= err_modules).all(), (err_native, err_modules)
    assert err_native.max() < 0.05
