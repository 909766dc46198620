"""Hugging Face GPT-2 folders in DecoderOnlyModel: config.json and model.safetensors (transformers' Conv1D weights,
stored (in, out), transposed into nn.Linear's (out, in)). No code from the folder runs; nothing is downloaded.

    model = minillm.models.from_pretrained("path/to/gpt2-folder")   # config.json says "model_type": "gpt2"
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from safetensors import safe_open

from minillm.models.auto import register_format
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderOnlyModel

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def gpt2_config(hf: dict, max_seq_len: Optional[int] = None) -> ModelConfig:
    """ModelConfig of a Hugging Face GPT2Config (as its config.json or to_dict() holds it)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not "
                         "supported")
    d = hf["n_embd"]
    vocab = hf["vocab_size"]

    def token(key):
        value = hf.get(key)
        return value if isinstance(value, int) and 0 <= value < vocab else None

    return ModelConfig(
        model_type="decoder_only", vocab_size=vocab, d_model=d, num_heads=hf["n_head"], num_layers=hf["n_layer"],
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=max_seq_len or hf["n_positions"], dropout=0.0,
        activation=_ACTIVATIONS[act], norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, tie_embeddings=True,
        pad_token_id=token("pad_token_id"), bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
        extra={"source": "huggingface-gpt2"},
    )


def gpt2_weights(get: Callable[[str], torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Our state dict from GPT-2's tensors, `get(name)` returning the tensor of transformer.<name> (wte.weight,
    h.0.attn.c_attn.weight, ...). The tied lm_head is left out."""
    out = {"embed.tok.weight": get("wte.weight"), "embed.pos.weight": get("wpe.weight"),
           "norm_f.weight": get("ln_f.weight"), "norm_f.bias": get("ln_f.bias")}
    for i in range(num_layers):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            w = get(f"h.{i}.{theirs}.weight")
            out[f"blocks.{i}.{ours}.weight"] = w.T if w.dim() == 2 else w  # Conv1D stores (in, out)
            out[f"blocks.{i}.{ours}.bias"] = get(f"h.{i}.{theirs}.bias")
    return out


def load_hf_gpt2(directory: Union[str, Path]) -> DecoderOnlyModel:
    """DecoderOnlyModel with the weights of a Hugging Face GPT-2 folder; a missing or mis-shaped tensor is an error
    naming it."""
    directory = Path(directory)
    config = gpt2_config(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {directory} (pickled pytorch_model.bin is not loaded)")
    model = DecoderOnlyModel(config)
    ours = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""

        def get(name):
            if prefix + name not in names:
                raise ValueError(f"{weights} has no tensor {prefix + name}")
            return f.get_tensor(prefix + name)

        state = gpt2_weights(get, config.num_layers)
    with torch.no_grad():
        for name, t in state.items():
            if t.shape != ours[name].shape:
                raise ValueError(f"{weights}: {name} is {tuple(t.shape)}, the config says {tuple(ours[name].shape)}")
            ours[name].copy_(t)
    return model.eval()


register_format("gpt2")(load_hf_gpt2)
