"""Save / load for every minillm model: config.json + model.safetensors (+ tokenizer.json). No pickle."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.models import auto
from minillm.models.config import ModelConfig
from minillm.utils import atomic_write, atomic_write_text

log = logging.getLogger("minillm.models")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"



def unique_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict without the second name of tied parameters (safetensors stores each tensor once)."""
    seen, out = set(), {}
    # Tied parameters are one Parameter object under two names: identity finds them on any device, the meta
    # device too (where every data pointer is 0).
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def _fit_problems(expected: Dict[str, torch.Tensor], f, strict: bool) -> List[str]:
    """What keeps an open safetensors file `f` from loading into tensors named and shaped as `expected`."""
    names = set(f.keys())
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    mismatched = [
        f"{n}: file {tuple(f.get_slice(n).get_shape())} vs model {tuple(expected[n].shape)}"
        for n in sorted(names & set(expected))
        if tuple(f.get_slice(n).get_shape()) != tuple(expected[n].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected and strict:
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    return problems


class PreTrainedModel(nn.Module):
    """Base of the minillm models: config handling, save_pretrained / from_pretrained, loss helper."""

    model_type = ""

    def __init__(self, config: Union[ModelConfig, Dict[str, Any]]):
        super().__init__()
        config = ModelConfig.from_dict(config)
        if self.model_type and config.model_type != self.model_type:
            raise ValueError(f"{type(self).__name__} needs model_type={self.model_type!r}, got {config.model_type!r}")
        config.check_size()  # before any layer is allocated
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(t.numel() for t in unique_state_dict(self).values() if t.is_floating_point())

    def quantize(self, mode: str = "int8", group_size: Optional[int] = None,
                 head: Optional[str] = None) -> "PreTrainedModel":
        """Stores the weights of every linear layer as int8 codes ("int8") or 4-bit codes ("int4"); in place, returns
        the model. Decoding then reads 1 or ~0.6 bytes per weight instead of 4 (minillm.ops.quant).

        group_size None: int4 in groups of 32 input channels, each with a scale and an offset; int8 with a scale per
        output channel. group_size 32 or 64: both in such groups (int8: 1.25 bytes a weight at 32). A model from a
        4-bit GGUF file keeps its weights nearly exactly in int8 groups of 32 (SmolLM2: 19 of 20 greedy chat replies
        identical to fp32's, 9 per channel; docs/performance.md).

        The output head (`lm_head`) takes `head`'s mode, by default int8 under both: as llama.cpp keeps its output
        weight at 6-8 bits, since its errors reach every logit (SmolLM2 on Tiny Shakespeare, perplexity: +5.0% with a
        4-bit head, see docs/performance.md). Embeddings and norms stay as they are; a layer whose input width the
        groups do not divide keeps int8 with a scale per channel. Quantized weights are constants: fine-tune before
        quantizing."""
        from minillm.ops.linear import Linear
        from minillm.ops.quant import MODES, QuantizedLinear, group_size_for

        head = head or "int8"
        for name, value in (("mode", mode), ("head", head)):
            if value not in MODES:
                raise ValueError(f"{name} must be one of {MODES}, got {value!r}")
            group_size_for(value, group_size)  # a bad group_size is named before any layer changes
        head_layer = getattr(self, "lm_head", None)
        replaced = {}  # id(Linear) -> its QuantizedLinear: a layer shared by two names is quantized once
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    if id(child) not in replaced:
                        layer_mode = head if child is head_layer else mode
                        group = group_size_for(layer_mode, group_size)
                        if group and child.in_features % group:
                            log.info("quantize: %s has %d input features, not a multiple of group_size %d: int8 "
                                     "with a scale per channel", name, child.in_features, group)
                            layer_mode, group = "int8", 0
                        replaced[id(child)] = QuantizedLinear.from_linear(child, layer_mode, group or None)
                    setattr(parent, name, replaced[id(child)])
        if not replaced:
            raise ValueError(f"{type(self).__name__} has no linear layers to quantize (already quantized?)")
        self.quantization = {"mode": mode, "group_size": group_size_for(mode, group_size) or None, "head": head}
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory in training: every transformer block recomputes its activations in the
        backward instead of keeping them (torch.utils.checkpoint, non-reentrant; dropout replays its random
        state, so losses and gradients are those of the plain model). Inference and KV-cache decoding are
        unaffected."""
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, on: bool) -> None:
        found = False
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing") and m is not self:
                m.gradient_checkpointing = on
                found = True
        if not found:
            raise NotImplementedError(f"{type(self).__name__} has no blocks that support gradient checkpointing")

    def save_pretrained(self, directory: Union[str, os.PathLike], tokenizer=None,
                        dtype: Optional[torch.dtype] = None) -> Path:
        """Writes config.json, model.safetensors and (when given) tokenizer.json into `directory`.

        Each file is written atomically. `dtype` casts floating-point weights (e.g. torch.bfloat16).
        """
        if getattr(self, "quantization", None):
            raise ValueError("this model was quantized (model.quantize); save the float model and quantize it after "
                             "loading: from_pretrained(path, quantize=\"int8\")")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in unique_state_dict(self).items():
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t.contiguous()
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(directory / TOKENIZER_NAME)
        return directory

    def load_weights(self, path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Loads model.safetensors into this model; missing, unexpected or mis-shaped tensors are
        an error that names them."""
        expected = unique_state_dict(self)
        with safe_open(os.fspath(path), framework="pt") as f:
            names = set(f.keys())
            problems = _fit_problems(expected, f, strict)
            if problems:
                raise ValueError(f"{path} does not fit {type(self).__name__}: " + "; ".join(problems))
            # Weights saved in another floating dtype (e.g. bf16 by extract) load in that dtype.
            float_dtypes = {f.get_slice(n).get_dtype() for n in names & set(expected) if expected[n].is_floating_point()}
            file_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                          "F64": torch.float64}.get(next(iter(float_dtypes)), None) if len(float_dtypes) == 1 else None
            if file_dtype is not None and file_dtype != next(self.parameters()).dtype:
                self.to(file_dtype)
                expected = unique_state_dict(self)
            with torch.no_grad():
                for name, t in expected.items():
                    t.copy_(f.get_tensor(name))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
                        group_size: Optional[int] = None, head: Optional[str] = None) -> "PreTrainedModel":
        """Loads a model saved by save_pretrained (any model type when called on PreTrainedModel), a Hugging Face
        BERT, GPT-2 or Llama / Qwen2 / Mistral folder, or a llama-architecture .gguf file. quantize="int8" | "int4"
        then stores its linear layers' weights as codes (:meth:`quantize`, with group_size and head)."""
        model = cls._load(directory, device, dtype)
        return model.quantize(quantize, group_size, head) if quantize else model

    @classmethod
    def _load(cls, directory, device, dtype) -> "PreTrainedModel":
        directory = Path(directory)
        if directory.suffix == ".gguf" and directory.is_file():  # a llama.cpp file (minillm.models.gguf_llama)
            model = auto.FORMATS["gguf"](directory)
            if cls is not PreTrainedModel and not isinstance(model, cls):
                raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
            return model.to(device=device, dtype=dtype) if (device or dtype) else model
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path} holds a JSON {type(raw).__name__}, not a config object")
        foreign = auto.FORMATS.get(raw.get("model_type"))  # e.g. a Hugging Face BERT folder
        if foreign is not None:
            model = foreign(directory)
        else:
            config = ModelConfig.from_dict(raw)
            model_cls = auto.model_class(config.model_type) if cls is PreTrainedModel else cls
            weights = directory / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
            # Names and shapes first, on the meta device (no memory): a file that does not fit is refused
            # before the model's parameters are allocated.
            with torch.device("meta"):
                probe = model_cls(config)
            with safe_open(os.fspath(weights), framework="pt") as f:
                problems = _fit_problems(unique_state_dict(probe), f, strict=True)
            if problems:
                raise ValueError(f"{weights} does not fit {model_cls.__name__}: " + "; ".join(problems))
            model = model_cls(config)
            model.load_weights(weights)
        if cls is not PreTrainedModel and not isinstance(model, cls):
            raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        model.eval()
        return model.to(device=device, dtype=dtype) if (device or dtype) else model


def build_model(config: Union[ModelConfig, Dict[str, Any]]) -> PreTrainedModel:
    """The model class named by config["model_type"]: encoder_only, decoder_only or transformer."""
    config = ModelConfig.from_dict(config)
    return auto.model_class(config.model_type)(config)


def from_pretrained(directory: Union[str, os.PathLike], **kwargs) -> PreTrainedModel:
    """Loads any minillm model, a Hugging Face folder or a .gguf file from `directory` (PreTrainedModel.from_pretrained's
    keywords: device, dtype, quantize, group_size)."""
    return PreTrainedModel.from_pretrained(directory, **kwargs)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100. logits: (B, N, V), labels: (B, N)."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be {tuple(logits.shape[:-1])}")
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100)
