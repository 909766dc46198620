"""Llama-family architecture in DecoderOnlyModel: RoPE, RMSNorm, SwiGLU, grouped-query heads and sliding windows
against references, and Hugging Face Llama / Qwen2 / Mistral folders (tiny random configs saved by transformers)
loading to the same logits and greedy tokens."""
import json
import os

import pytest
import torch

from minillm.models import DecoderOnlyModel, ModelConfig, from_pretrained
from minillm.models.layers import MLP, RMSNorm, apply_rope, rope_tables

LLAMA = dict(model_type="decoder_only", vocab_size=96, d_model=64, num_heads=4, num_kv_heads=2, num_layers=2,
             d_ff=96, max_seq_len=64, dropout=0.0, activation="silu", gated_mlp=True, norm_type="rmsnorm",
             norm_eps=1e-6, position_embedding="rope", rope_theta=10000.0, bias=False, tie_embeddings=False)


def test_rope_matches_the_complex_rotation():
    """Rotate-half RoPE: dims i and i + Dh/2 are the real and imaginary parts of a complex number multiplied by
    exp(i * pos * theta^(-2i/Dh))."""
    config = ModelConfig(**LLAMA)
    Dh = config.head_dim
    x = torch.randn(2, 3, 7, Dh, dtype=torch.float64)
    pos = torch.arange(5, 12)
    got = apply_rope(x, rope_tables(config, pos, torch.float64))
    z = torch.complex(x[..., :Dh // 2], x[..., Dh // 2:])
    freqs = 10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    z = z * torch.polar(torch.ones(7, Dh // 2, dtype=torch.float64), pos[:, None].double() * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1))


def test_rmsnorm_and_swiglu_match_their_formulas():
    config = ModelConfig(**LLAMA)
    x = torch.randn(3, 5, 64)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    torch.testing.assert_close(norm(x), norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    mlp = MLP(config)
    w_gate, w_up = mlp.fc.weight.detach().chunk(2)
    want = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.proj.weight.detach().T
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)


def test_default_config_keeps_the_gpt2_architecture():
    config = ModelConfig()
    assert (config.position_embedding, config.norm_type, config.gated_mlp, config.num_kv_heads) == (
        "learned", "layernorm", False, config.num_heads)
    model = DecoderOnlyModel(config)
    assert model.embed.pos is not None and isinstance(model.norm_f, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="must divide num_heads"):
        ModelConfig(**{**LLAMA, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="for decoder_only models"):
        ModelConfig(model_type="encoder_only", position_embedding="rope")


def test_llama_model_trains_generates_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DecoderOnlyModel(ModelConfig(**LLAMA))
    ids = torch.randint(0, 96, (2, 20))
    _, loss = model(ids, labels=ids)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    greedy = model.generate(ids[:, :5], max_new_tokens=10, temperature=0)
    assert torch.equal(greedy, model.generate(ids[:, :5], max_new_tokens=10, temperature=0, use_cache=False))
    model.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


def test_sliding_window_attends_to_the_last_keys_only():
    torch.manual_seed(0)
    windowed = DecoderOnlyModel(ModelConfig(**LLAMA, sliding_window=4)).eval()
    full = DecoderOnlyModel(ModelConfig(**LLAMA)).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        a, b = windowed(ids)[0], full(ids)[0]
    torch.testing.assert_close(a[:, :4], b[:, :4])  # within the window both see the same keys
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    greedy = windowed.generate(ids[:, :3], max_new_tokens=12, temperature=0)
    assert torch.equal(greedy, windowed.generate(ids[:, :3], max_new_tokens=12, temperature=0, use_cache=False))


transformers = None


def _hf():
    global transformers
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers


FAMILY = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=1, sliding_window=6),
    "llama-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_hugging_face_folders_load_to_the_same_model(tmp_path, name, sharded):
    tf = _hf()
    kind = name.split("-")[0]
    config = tf.AutoConfig.for_model(kind, vocab_size=96, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6,
                                     **FAMILY[name])
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p))
    ref.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, DecoderOnlyModel) and ours.config.num_kv_heads == FAMILY[name]["num_key_value_heads"]
    ids = torch.randint(3, 96, (2, 16))
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids)[0]
    assert (a - b).abs().max() <= 1e-4
    ga = ref.generate(ids[:1, :5], max_new_tokens=20, do_sample=False, pad_token_id=0)
    gb = ours.generate(ids[:1, :5], max_new_tokens=20, temperature=0, eos_token_id=ours.config.eos_token_id)
    assert torch.equal(ga, gb)


def test_unsupported_llama_variants_are_refused(tmp_path):
    tf = _hf()
    config = tf.AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, num_attention_heads=4,
                                     num_hidden_layers=1, intermediate_size=96, hidden_act="gelu")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ValueError, match="hidden_act"):
        from_pretrained(tmp_path)
    d = config.to_dict()
    d.update(hidden_act="silu", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    d.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        from_pretrained(tmp_path)
    d.pop("rope_scaling")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_left_padded_batch_generates_as_its_prompts_one_by_one(arch, use_cache):
    torch.manual_seed(0)
    config = ModelConfig(**LLAMA) if arch == "llama" else ModelConfig(vocab_size=96, d_model=64, num_heads=4,
                                                                       num_layers=2, max_seq_len=64, dropout=0.0)
    model = DecoderOnlyModel(config).eval()
    prompts = [torch.randint(3, 96, (n,)) for n in (9, 4, 6)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    out = model.generate(ids, max_new_tokens=12, temperature=0, attention_mask=mask, use_cache=use_cache)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12, temperature=0)
        assert torch.equal(out[i, T - len(p):], alone[0]), i
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask.flip(1))


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_hugging_face_gpt2_folders_load_to_the_same_model(tmp_path, act):
    tf = _hf()
    config = tf.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function=act)
    torch.manual_seed(0)
    ref = tf.GPT2LMHeadModel(config).eval()
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids)[0]
    assert (a - b).abs().max() <= 1e-4
    ga = ref.generate(ids[:1, :5], max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ga, ours.generate(ids[:1, :5], max_new_tokens=20, temperature=0))


def _dequantized_twin(model):
    """A float copy of a quantized model whose linear layers hold the dequantized weights (the torch twin)."""
    import copy

    from minillm.ops.linear import Linear
    from minillm.ops.quant import QuantizedLinear

    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                lin = Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    twin.quantization = None
    return twin


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 32), ("int4", None), ("int4", 64)])
def test_quantized_model_is_its_dequantized_twin(tmp_path, mode, group):
    import copy

    from minillm.ops.quant import QuantizedLinear

    torch.manual_seed(0)
    model = DecoderOnlyModel(ModelConfig(**LLAMA)).eval()
    q = copy.deepcopy(model).quantize(mode, group)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * 2 + 1  # qkv, proj, fc, proj per block + the head
    assert layers["lm_head"].mode == "int8"  # the output head keeps 8 bits by default
    # group_size None: int4 in groups of 32, int8 (and so the head) a scale per channel; a given size: both grouped
    want_group = group or (32 if mode == "int4" else 0)
    assert layers["lm_head"].group_size == (group or 0)
    # d_ff = 96: the MLP's output projection has 96 inputs, a multiple of 32 but not of 64 (int8 per channel then)
    proj = layers["blocks.0.mlp.proj"]
    assert (proj.mode, proj.group_size) == ((mode, want_group) if want_group != 64 else ("int8", 0))
    assert (layers["blocks.0.attn.qkv"].mode, layers["blocks.0.attn.qkv"].group_size) == (mode, want_group)
    assert q.quantization == {"mode": mode, "group_size": want_group or None, "head": "int8"}
    twin = _dequantized_twin(q)
    ids = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(q(ids)[0], twin(ids)[0], atol=1e-4, rtol=1e-4)
    assert (q(ids)[0] - model(ids)[0]).abs().max() < (0.05 if mode == "int8" else 0.5)  # close to the float model
    greedy = q.generate(ids[:, :5], max_new_tokens=12, temperature=0)
    assert torch.equal(greedy, q.generate(ids[:, :5], max_new_tokens=12, temperature=0, use_cache=False))
    # left-padded prompts decode as they would one by one
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    batch = q.generate(ids[:, :6], max_new_tokens=6, temperature=0, attention_mask=mask)
    alone = q.generate(ids[1:, 2:6], max_new_tokens=6, temperature=0)
    assert torch.equal(batch[1, 2:], alone[0])
    with pytest.raises(ValueError, match="quantized"):
        q.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", quantize=mode, group_size=group)
    torch.testing.assert_close(loaded(ids)[0], q(ids)[0])
    half = copy.deepcopy(q).to(torch.bfloat16)  # the scales stay fp32; activations bf16
    assert half.lm_head.scale.dtype == torch.float32
    assert (half(ids)[0].float() - q(ids)[0]).abs().max() < 0.1


def test_quantize_refuses_unknown_modes_and_a_4bit_head_is_an_option():
    model = DecoderOnlyModel(ModelConfig(**LLAMA))
    with pytest.raises(ValueError, match="mode must be one of"):
        model.quantize("int2")
    with pytest.raises(ValueError, match="head must be one of"):
        model.quantize("int4", head="fp8")
    model.quantize("int4", head="int4")
    assert model.lm_head.mode == "int4"
    with pytest.raises(ValueError, match="no linear layers"):
        model.quantize("int8")


def test_next_token_nll_is_the_models_loss_window_by_window():
    from minillm.models import next_token_nll

    torch.manual_seed(0)
    model = DecoderOnlyModel(ModelConfig(**LLAMA)).eval()
    ids = torch.randint(0, 96, (50,))
    nll, pred = next_token_nll(model, ids, window=16)  # 3 whole windows, the last 2 tokens dropped
    assert nll.shape == pred.shape == (45,)
    for w in range(3):
        chunk = ids[16 * w:16 * (w + 1)][None]
        logits, loss = model(chunk, labels=chunk)
        torch.testing.assert_close(nll[15 * w:15 * (w + 1)].mean(), loss)
        assert torch.equal(pred[15 * w:15 * (w + 1)], logits[0, :-1].argmax(-1))
    with pytest.raises(ValueError, match="window"):
        next_token_nll(model, ids[:10], window=16)
