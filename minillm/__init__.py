"""minillm: small language models on fused C++ (and CUDA) attention and exact top-k kernels."""
# torch first: it loads its bundled libgomp.so.1, which the native extension then shares.
import torch  # noqa: F401

from minillm import models, ops, rag, tokenizers, training
from minillm.index import FlatIndex

__version__ = "0.1.0"
__all__ = ["FlatIndex", "models", "ops", "rag", "tokenizers", "training", "__version__"]
