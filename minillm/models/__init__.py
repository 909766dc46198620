"""minillm.models: encoder-only (BERT, MLM), decoder-only (GPT or Llama family, KV-cache generation) and
encoder-decoder transformers; save_pretrained / from_pretrained in safetensors (and Hugging Face BERT and
Llama / Qwen2 / Mistral folders)."""
from minillm.models.base import PreTrainedModel, build_model, from_pretrained
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderOnlyModel
from minillm.models.encoder import EncoderOnlyModel, pool
from minillm.models.encoder_decoder import EncoderDecoderModel
from minillm.models.evaluation import next_token_nll
from minillm.models.gguf_llama import load_gguf, smollm2_path
from minillm.models.hf_gpt2 import load_hf_gpt2
from minillm.models.hf_llama import load_hf_llama
from minillm.models.layers import KVCache
from minillm.models.pretrained import SentenceEncoder, load_hf_bert, minilm_path

__all__ = [
    "ModelConfig", "PreTrainedModel", "build_model", "from_pretrained", "EncoderOnlyModel", "DecoderOnlyModel",
    "EncoderDecoderModel", "KVCache", "SentenceEncoder", "load_hf_bert", "load_hf_llama", "load_hf_gpt2", "load_gguf",
    "smollm2_path", "next_token_nll",
    "minilm_path", "pool",
]
