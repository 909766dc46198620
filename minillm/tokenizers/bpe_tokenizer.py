"""The seed's module name for the BPE tokenizer (`from minillm.tokenizers.bpe_tokenizer import BPETokenizer`)."""
from minillm.tokenizers.bpe import BPETokenizer

__all__ = ["BPETokenizer"]
