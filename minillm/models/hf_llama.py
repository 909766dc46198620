"""Hugging Face Llama-family folders (Llama, Qwen2, Mistral) in DecoderOnlyModel: config.json and safetensors
weights (one file, or shards listed in model.safetensors.index.json). No code from the folder runs and nothing is
downloaded; pickled weights (pytorch_model.bin) are refused.

    model = minillm.models.from_pretrained("path/to/llama-folder")   # dispatched on config.json's model_type
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Union

import torch
from safetensors import safe_open

from minillm.models.auto import register_format
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderOnlyModel

FAMILY = ("llama", "qwen2", "mistral")


def _rope_theta(hf: dict) -> float:
    # transformers >= 5 writes rope_parameters {"rope_type", "rope_theta"}; older configs rope_theta (+ rope_scaling)
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ValueError(f"rope scaling {kind!r} is not supported (only plain rotary embeddings)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _token_id(value, vocab_size: int):
    if isinstance(value, list):  # some configs list several end-of-sequence ids: the first is the model's own
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


def llama_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face Llama / Qwen2 / Mistral config.json."""
    kind = hf.get("model_type")
    if kind not in FAMILY:
        raise ValueError(f"model_type {kind!r} is not one of the Llama family {FAMILY}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (Llama-family MLPs are SwiGLU, silu)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {d // heads} "
                         f"is not supported")
    if hf.get("mlp_bias") or (kind == "llama" and hf.get("attention_bias")):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    window = None
    if kind == "mistral" or hf.get("use_sliding_window"):
        window = hf.get("sliding_window")
    vocab = hf["vocab_size"]
    return ModelConfig(
        model_type="decoder_only", vocab_size=vocab, d_model=d, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, num_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), dropout=0.0,
        activation="silu", gated_mlp=True, norm_type="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_position="pre", position_embedding="rope", rope_theta=_rope_theta(hf), bias=False,
        qkv_bias=kind == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window, pad_token_id=_token_id(hf.get("pad_token_id"), vocab),
        bos_token_id=_token_id(hf.get("bos_token_id"), vocab), eos_token_id=_token_id(hf.get("eos_token_id"), vocab),
        extra={"source": f"huggingface-{kind}"},
    )


def llama_name_map(config: ModelConfig) -> Dict[str, List[str]]:
    """Our parameter name -> the checkpoint tensors it is made of (concatenated along dim 0: q/k/v into the fused
    projection, gate/up into the gated MLP's first layer)."""
    m = {"embed.tok.weight": ["model.embed_tokens.weight"], "norm_f.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        m[ours + "attn.qkv.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        if config.qkv_bias:
            m[ours + "attn.qkv.bias"] = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
        m[ours + "attn.proj.weight"] = [hf + "self_attn.o_proj.weight"]
        m[ours + "mlp.fc.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        m[ours + "mlp.proj.weight"] = [hf + "mlp.down_proj.weight"]
        m[ours + "norm1.weight"] = [hf + "input_layernorm.weight"]
        m[ours + "norm2.weight"] = [hf + "post_attention_layernorm.weight"]
    return m


def _weight_files(directory: Path) -> Dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}; pickled "
                                f"pytorch_model.bin files are not loaded")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_hf_llama(directory: Union[str, Path]) -> DecoderOnlyModel:
    """DecoderOnlyModel with the weights of a Hugging Face Llama / Qwen2 / Mistral folder, in float32 (cast with
    ``.to(dtype)``). A missing, mis-shaped or unplaced tensor is an error naming it."""
    directory = Path(directory)
    config = llama_config(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    config.check_size()
    files = _weight_files(directory)
    model = DecoderOnlyModel(config)
    ours = model.state_dict()
    handles = {}
    missing, mismatched, used = [], [], set()
    try:
        with torch.no_grad():
            for name, srcs in llama_name_map(config).items():
                if not all(s in files for s in srcs):
                    missing.extend(s for s in srcs if s not in files)
                    continue
                parts = []
                for s in srcs:
                    path = files[s]
                    if path not in handles:
                        handles[path] = safe_open(str(path), framework="pt")
                    parts.append(handles[path].get_tensor(s))
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                if t.shape != ours[name].shape:
                    mismatched.append(f"{srcs}: {tuple(t.shape)} vs {tuple(ours[name].shape)}")
                    continue
                ours[name].copy_(t)
                used.update(srcs)
    finally:
        handles.clear()
    if missing or mismatched:
        raise ValueError(f"{directory} does not fit the model its config.json describes: missing {missing[:10]}, "
                         f"shape mismatches {mismatched[:10]}")
    # Rotary tables are computed, never loaded; a tied checkpoint may still store lm_head.weight.
    unused = sorted(n for n in set(files) - used
                    if not n.endswith("rotary_emb.inv_freq") and not (config.tie_embeddings and n == "lm_head.weight"))
    if unused:
        raise ValueError(f"{directory} holds tensors this model has no place for: {unused[:10]}")
    return model.eval()


for _kind in FAMILY:
    register_format(_kind)(load_hf_llama)
