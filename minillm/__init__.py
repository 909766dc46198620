"""minillm: small language models on fused C++ (and CUDA) attention and exact top-k kernels.

Subpackages load on first use (``minillm.ops``, ``minillm.models``, ``minillm.tokenizers``, ``minillm.rag``,
``minillm.training``, ``minillm.integrations``), so ``import minillm.ops`` loads no models and
``minillm --help`` does not wait for torch. ``minillm._C`` is imported only by ``minillm.ops._backend``, after
torch (whose bundled libgomp the extension shares).
"""
from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

_SUBPACKAGES = ("models", "ops", "rag", "tokenizers", "training", "integrations", "index", "text", "utils", "cli")
_ATTRIBUTES = {"FlatIndex": "minillm.index"}

__all__ = ["FlatIndex", "models", "ops", "rag", "tokenizers", "training", "__version__"]


def __getattr__(name: str) -> Any:
    # PEP 562: runs only for names not yet in the module's namespace; importing a subpackage binds it here.
    if name in _SUBPACKAGES:
        return importlib.import_module(f"minillm.{name}")
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES) | set(_ATTRIBUTES))
