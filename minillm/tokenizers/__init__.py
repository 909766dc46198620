"""Tokenizers with one interface: CharTokenizer, BPETokenizer (byte-level BPE) and pretrained
Hugging Face tokenizer.json files (PretrainedTokenizer); load_tokenizer opens any of their files."""
from minillm.tokenizers.base import Tokenizer
from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.char import CharTokenizer
from minillm.tokenizers.loading import load_tokenizer
from minillm.tokenizers.pretrained import PretrainedTokenizer

__all__ = ["Tokenizer", "CharTokenizer", "BPETokenizer", "PretrainedTokenizer", "load_tokenizer"]
