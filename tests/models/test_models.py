"""The three architectures: shapes, masks, losses, generation with and without the KV cache, save/load."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minillm import models
from minillm.models import (DecoderOnlyModel, EncoderDecoderModel, EncoderOnlyModel, ModelConfig, build_model,
                            from_pretrained)
from minillm.tokenizers import CharTokenizer

SMALL = dict(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=40, dropout=0.0)


def make(model_type, **kw):
    return build_model({**SMALL, "model_type": model_type, **kw}).eval()


# ---- config ----


def test_seed_config_dict_builds_every_model_type():
    seed = {"model_type": "encoder_only", "vocab_size": 10000, "d_model": 256, "num_heads": 4, "num_layers": 4,
            "d_ff": 1024, "max_seq_len": 512, "dropout": 0.1}
    assert isinstance(EncoderOnlyModel(seed), EncoderOnlyModel)
    assert isinstance(build_model({**SMALL, "model_type": "decoder_only"}), DecoderOnlyModel)
    assert isinstance(build_model({**SMALL, "model_type": "transformer"}), EncoderDecoderModel)


@pytest.mark.parametrize("bad,words", [
    ({"d_model": 30, "num_heads": 4}, ["divisible", "num_heads"]),
    ({"model_type": "gpt"}, ["model_type"]),
    ({"num_layers": 0}, ["num_layers"]),
    ({"dropout": 1.5}, ["dropout"]),
    ({"activation": "swish"}, ["activation"]),
    ({"n_embd": 32}, ["unknown config keys", "n_embd"]),
    ({"pad_token_id": 50}, ["pad_token_id"]),
])
def test_bad_configs_name_the_problem(bad, words):
    with pytest.raises(ValueError) as info:
        build_model({**SMALL, "model_type": "decoder_only", **bad})
    for w in words:
        assert w in str(info.value)


def test_model_class_checks_its_type():
    with pytest.raises(ValueError, match="model_type='encoder_only'"):
        EncoderOnlyModel({**SMALL, "model_type": "decoder_only"})


# ---- encoder ----


def test_encoder_shapes_and_padding_invariance():
    model = make("encoder_only")
    ids = torch.randint(5, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    hidden = model(ids, mask)
    assert hidden.shape == (3, 12, 32)
    assert model.predict_mlm(ids, mask).shape == (3, 12, 50)
    # Padded positions change nothing at real positions, and the padded sequence equals itself unpadded.
    ids2 = ids.clone()
    ids2[1, 7:] = 3
    torch.testing.assert_close(model(ids2, mask)[1, :7], hidden[1, :7])
    torch.testing.assert_close(model(ids[1:2, :7])[0], hidden[1, :7], atol=1e-5, rtol=1e-4)


def test_encoder_mlm_loss_ignores_minus_100():
    model = make("encoder_only")
    ids = torch.randint(5, 50, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5] = 7, 9
    logits, loss = model(ids, labels=labels)
    want = F.cross_entropy(torch.stack([logits[0, 3], logits[1, 5]]), torch.tensor([7, 9]))
    torch.testing.assert_close(loss, want)
    assert model.compute_loss({"input_ids": ids, "labels": labels}) == loss


def test_sentence_embeddings_and_pooling():
    model = make("encoder_only")
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    emb = model.sentence_embeddings(ids, mask)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    hidden = model(ids, mask)
    torch.testing.assert_close(models.pool(hidden, mask)[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(models.pool(hidden, mask, "cls"), hidden[:, 0])


# ---- decoder ----


def test_decoder_forward_loss_and_causality():
    model = make("decoder_only")
    ids = torch.randint(0, 50, (2, 15))
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (2, 15, 50)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)))
    _, loss_t = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(loss_t, F.cross_entropy(model(ids[:, :-1])[0].reshape(-1, 50), ids[:, 1:].reshape(-1)))
    assert model(ids)[1] is None
    future = ids.clone()
    future[:, 10:] = 1
    torch.testing.assert_close(model(future)[0][:, :10], logits[:, :10])


@pytest.mark.parametrize("prompt_len,new", [(1, 20), (5, 30), (30, 25), (45, 5)])
def test_greedy_generation_same_with_and_without_cache(prompt_len, new):
    # (30, 25) and (45, 5) run past max_seq_len = 40, where both paths slide the window.
    model = make("decoder_only")
    prompt = torch.randint(0, 50, (3, prompt_len))
    cached = model.generate(prompt, max_new_tokens=new, temperature=0)
    uncached = model.generate(prompt, max_new_tokens=new, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt_len], prompt)


def test_decode_steps_attend_one_query_to_the_cache(monkeypatch):
    model = make("decoder_only")
    seen = []
    real = models.layers.ops.attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(models.layers.ops, "attention", spy)
    model.generate(torch.randint(0, 50, (2, 4)), max_new_tokens=3, temperature=0)
    per_layer = seen[:: SMALL["num_layers"]]
    assert per_layer == [(4, 4), (1, 5), (1, 6)]


def test_sampling_is_reproducible_and_filters():
    model = make("decoder_only")
    prompt = torch.randint(0, 50, (2, 3))
    a = model.generate(prompt, 15, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    b = model.generate(prompt, 15, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 15, temperature=0)
    assert torch.equal(model.generate(prompt, 15, temperature=0.8, top_k=1, seed=5), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=0.8, top_p=1e-6, seed=5), greedy)


def test_eos_stops_and_pads():
    model = make("decoder_only")
    prompt = torch.randint(0, 50, (1, 3))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    first = (out[0, 3:] == eos).nonzero()[0, 0].item() + 3
    assert out.shape[1] == first + 1 and torch.equal(out[0, :first], greedy[0, :first])


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = make("decoder_only").train()
    ids = torch.randint(0, 50, (4, 20))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("model_type", ["decoder_only", "encoder_only"])
def test_bf16_autocast_step_is_the_same_with_the_fused_norm_cast(model_type, monkeypatch):
    # Pre-norm blocks under CPU bf16 autocast have their LayerNorm write bf16 for the next linear layer
    # (layers._norm_for_linear); loss and every gradient must be those of the norm followed by autocast's cast.
    import importlib

    from minillm.models import layers

    ln = importlib.import_module("minillm.ops.layer_norm")

    torch.manual_seed(0)
    model = make(model_type, dropout=0.1).train()
    ids = torch.randint(0, 50, (3, 17))

    def step():
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    seen = []
    forward_cpu = ln._forward_cpu
    monkeypatch.setattr(ln, "_forward_cpu", lambda *a: seen.append(a[-1]) or forward_cpu(*a))
    fused = step()
    monkeypatch.setattr(layers, "_norm_for_linear", lambda norm, x: norm(x))
    plain = step()
    pre_norm = model_type == "decoder_only"
    assert (torch.bfloat16 in seen) == pre_norm  # the fusion ran where it applies, and only there
    assert torch.equal(fused[0], plain[0])
    assert fused[1].keys() == plain[1].keys()
    for name in fused[1]:
        assert torch.equal(fused[1][name], plain[1][name]), name


def test_padded_training_batch_matches_unpadded():
    model = make("decoder_only")
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    logits, _ = model(ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(logits[1, :6], model(ids[1:2, :6])[0][0], atol=1e-5, rtol=1e-4)


# ---- encoder-decoder ----


def test_encoder_decoder_forward_generation_and_cache():
    model = make("transformer", bos_token_id=1, eos_token_id=2)
    src = torch.randint(3, 50, (2, 11))
    src_mask = torch.ones_like(src)
    src_mask[0, 8:] = 0
    tgt = torch.randint(3, 50, (2, 7))
    logits, loss = model(src, tgt, src_mask=src_mask, labels=tgt)
    assert logits.shape == (2, 7, 50) and loss.ndim == 0
    cached = model.generate(src, 50, src_mask=src_mask, temperature=0)
    uncached = model.generate(src, 50, src_mask=src_mask, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached) and (cached[:, 0] == 1).all()
    # Source padding is invisible to the decoder.
    src2 = src.clone()
    src2[0, 8:] = 4
    torch.testing.assert_close(model(src2, tgt, src_mask=src_mask)[0][0], logits[0])
    with pytest.raises(ValueError, match="BOS"):
        make("transformer").generate(src, 3)


# ---- save / load ----


@pytest.mark.parametrize("model_type", ["encoder_only", "decoder_only", "transformer"])
def test_save_load_round_trip(tmp_path, model_type):
    model = make(model_type, bos_token_id=1)
    tok = CharTokenizer.from_texts("abc")
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    src = torch.randint(0, 50, (2, 8))
    if model_type == "transformer":
        torch.testing.assert_close(loaded(src, src)[0], model(src, src)[0])
    else:
        out_a, out_b = loaded(src), model(src)
        torch.testing.assert_close(out_a[0] if isinstance(out_a, tuple) else out_a,
                                   out_b[0] if isinstance(out_b, tuple) else out_b)
    # Tied weights stay tied after loading.
    if model_type == "decoder_only":
        assert loaded.lm_head.weight.data_ptr() == loaded.embed.tok.weight.data_ptr()
    assert type(model).from_pretrained(tmp_path).config == model.config


def test_loading_names_missing_and_mismatched_tensors(tmp_path):
    model = make("decoder_only")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["blocks.1.mlp.fc.weight"]
    tensors["blocks.0.attn.proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as info:
        from_pretrained(tmp_path)
    assert "blocks.1.mlp.fc.weight" in str(info.value) and "blocks.0.attn.proj.weight" in str(info.value)
    make("decoder_only").save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="model_type='encoder_only'"):
        EncoderOnlyModel.from_pretrained(tmp_path / "d")


def test_loading_rejects_unknown_config_keys(tmp_path):
    make("decoder_only").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_head"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="n_head"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nowhere")


# ---- bad input ----


@pytest.mark.parametrize("model_type", ["encoder_only", "decoder_only"])
def test_bad_token_ids_and_lengths(model_type):
    model = make(model_type)
    with pytest.raises(ValueError, match="vocab_size=50"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="vocab_size=50"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len = 40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_bad_generation_arguments():
    model = make("decoder_only")
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, word in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p"),
                         ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=word):
            model.generate(prompt, **{"max_new_tokens": 3, **kwargs})


def test_config_save_load(tmp_path):
    cfg = ModelConfig(model_type="transformer", vocab_size=20, d_model=16, num_heads=2, num_layers=1)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_absurd_configs_are_refused_before_allocating():
    import resource

    from minillm.models import DecoderOnlyModel, EncoderDecoderModel
    from minillm.models.config import ModelConfig

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"GiB of fp32 weights\), more than"):
        DecoderOnlyModel({"model_type": "decoder_only", "d_model": 65536, "num_heads": 1, "num_layers": 64})
    with pytest.raises(ValueError, match="check the config"):
        EncoderDecoderModel({"model_type": "transformer", "vocab_size": 10 ** 9, "d_model": 4096, "num_heads": 8})
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: nothing was built
    for cfg in ({"model_type": "decoder_only", "d_model": 64, "num_heads": 2, "num_layers": 3, "vocab_size": 50},
                {"model_type": "transformer", "d_model": 32, "num_heads": 2, "num_layers": 2, "num_decoder_layers": 3},
                {"model_type": "encoder_only", "d_model": 48, "num_heads": 3, "tie_embeddings": False}):
        config = ModelConfig.from_dict(cfg)
        model_cls = {"decoder_only": DecoderOnlyModel, "transformer": EncoderDecoderModel}.get(cfg["model_type"])
        if model_cls is None:
            from minillm.models import EncoderOnlyModel as model_cls
        n = model_cls(cfg).num_parameters()
        assert n <= config.estimated_parameters() <= 1.5 * n, (cfg, n, config.estimated_parameters())
    with pytest.raises(ValueError, match=r"more than 0\.0 GiB"):
        ModelConfig.from_dict({"d_model": 64, "num_heads": 2}).check_size(max_bytes=1000)


def test_weights_that_do_not_fit_are_refused_before_the_model_is_allocated(tmp_path):
    # A config grown to ~800M parameters (3.2 GB) beside the small model's weights: the names and shapes are
    # compared on the meta device, so the process never allocates the large model (it did before refusing).
    import os
    import subprocess
    import sys
    import tempfile

    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak memory from /proc (Linux)")
    small = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 50, "d_model": 16, "num_heads": 2,
                              "num_layers": 1, "max_seq_len": 16})
    small.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(d_model=2048, num_heads=16, num_layers=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # The peak as VmHWM (this process's own), not ru_maxrss, which a child inherits from its parent (pytest).
    code = ("from minillm.models import PreTrainedModel\n"
            "try:\n"
            f"    PreTrainedModel.from_pretrained({str(tmp_path)!r})\n"
            "except ValueError as e:\n"
            "    print('refused', 'shape mismatches' in str(e) or 'missing tensors' in str(e))\n"
            "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    refused, peak_mb = res.stdout.split("\n")[0], int(res.stdout.split()[-1])
    assert refused == "refused True" and peak_mb < 600, res.stdout  # torch itself: ~300 MB
