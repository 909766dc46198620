"""Opening a tokenizer file: minillm's own JSON (``"type": "char"`` or ``"bpe"``) or a Hugging Face
tokenizer.json, each handed to the class registered for it.

Classes register themselves by their ``kind`` (``Tokenizer.__init_subclass__`` in tokenizers/base.py), so this
module imports no tokenizer class and the base class none of its subclasses. ``HF_KIND`` is the class for a
Hugging Face tokenizer.json (a file without minillm's "type").
"""
from __future__ import annotations

import json
import os
from typing import Dict, Union

KINDS: Dict[str, type] = {}
HF_KIND = "hf"

PathLike = Union[str, os.PathLike]


def load_tokenizer(path: PathLike):
    """Any tokenizer file: minillm's own JSON (char, bpe) or a Hugging Face tokenizer.json (a folder: its
    tokenizer.json)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a tokenizer JSON file ({exc})") from None
    own = isinstance(data, dict) and data.get("type") in KINDS and data.get("type") != HF_KIND
    if not own and not (isinstance(data, dict) and "model" in data):
        raise ValueError(f"{path} is neither a minillm tokenizer nor a Hugging Face tokenizer.json")
    try:
        if not own:
            return KINDS[HF_KIND].from_file(path)
        tok = KINDS[data["type"]]._from_json(data)
        tok.special_tokens = dict(data.get("special_tokens", {}))
        return tok
    except Exception as exc:  # the file's contents are wrong: the tokenizers library raises a bare Exception
        raise ValueError(f"{path} is a damaged tokenizer file ({type(exc).__name__}: {exc})") from exc
