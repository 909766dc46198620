"""minillm.models: encoder-only (BERT, MLM), decoder-only (GPT, KV-cache generation) and
encoder-decoder transformers; save_pretrained / from_pretrained in safetensors."""
from minillm.models.base import PreTrainedModel, build_model, from_pretrained
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderOnlyModel
from minillm.models.encoder import EncoderOnlyModel, pool
from minillm.models.encoder_decoder import EncoderDecoderModel
from minillm.models.layers import KVCache
from minillm.models.pretrained import SentenceEncoder, load_hf_bert, minilm_path

__all__ = [
    "ModelConfig", "PreTrainedModel", "build_model", "from_pretrained", "EncoderOnlyModel", "DecoderOnlyModel",
    "EncoderDecoderModel", "KVCache", "SentenceEncoder", "load_hf_bert", "minilm_path", "pool",
]
