"""Where model classes and foreign weight formats are registered: the one table `from_pretrained` and
`build_model` look things up in.

    @register("decoder_only")            # a minillm model class, by config["model_type"]
    class DecoderOnlyModel(PreTrainedModel): ...

    @register_format("bert")             # a folder whose config.json says model_type "bert" (Hugging Face)
    def load_hf_bert(directory): ...

This module imports nothing from minillm.models, so the base class can consult it without importing its
subclasses; the classes and loaders register themselves when `minillm.models` imports their modules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Union

MODEL_CLASSES: Dict[str, type] = {}
FORMATS: Dict[str, Callable[[Union[str, Path]], object]] = {}


def register(model_type: str):
    """Class decorator: `model_type` (a minillm config's) builds this class."""
    def wrap(cls):
        MODEL_CLASSES[model_type] = cls
        cls.model_type = model_type
        return cls

    return wrap


def register_format(model_type: str):
    """Function decorator: loader(directory) -> model for folders whose config.json has this model_type."""
    def wrap(fn):
        FORMATS[model_type] = fn
        return fn

    return wrap


def model_class(model_type: str) -> type:
    try:
        return MODEL_CLASSES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; minillm builds {sorted(MODEL_CLASSES)}") from None
