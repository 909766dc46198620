"""Load a trained model with its tokenizer, continue training it, or extract it for inference."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from minillm.models.base import CONFIG_NAME, TOKENIZER_NAME, PreTrainedModel, from_pretrained
from minillm.tokenizers import load_tokenizer
from minillm.training import checkpoint as ckpt

log = logging.getLogger("minillm.training")
PathLike = Union[str, os.PathLike]


def _model_dir(model_path: PathLike) -> Path:
    path = ckpt.find_checkpoint(Path(model_path)) or Path(model_path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{model_path} is not a minillm model folder (no {CONFIG_NAME})")
    return path


def load_model_and_tokenizer(model_path: PathLike, tokenizer_path: Optional[PathLike] = None,
                             device: Union[str, torch.device, None] = None) -> Tuple[PreTrainedModel, object]:
    """(model in eval mode, tokenizer) from a checkpoint or saved-model folder.

    The tokenizer is `tokenizer_path` when given, else the tokenizer.json beside the weights (an
    error when there is none), or a .gguf file's own. Works for all three model types, Hugging Face BERT and
    Llama-family folders, and llama-architecture .gguf files.
    """
    if Path(model_path).suffix == ".gguf" and Path(model_path).is_file():  # llama.cpp's file: both in one, read once
        from minillm.models.gguf_llama import gguf_reader, gguf_tokenizer, load_gguf

        reader = gguf_reader(model_path)
        model = load_gguf(model_path, reader=reader).to(device=device)
        tokenizer = (load_tokenizer(tokenizer_path) if tokenizer_path is not None
                     else gguf_tokenizer(model_path, reader=reader))
        model.tokenizer = tokenizer
        return model, tokenizer
    path = _model_dir(model_path)
    model = from_pretrained(path, device=device)
    tok_file = Path(tokenizer_path) if tokenizer_path is not None else path / TOKENIZER_NAME
    if not tok_file.exists():
        raise FileNotFoundError(f"no tokenizer at {tok_file}; pass tokenizer_path=")
    tokenizer = load_tokenizer(tok_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    model.tokenizer = tokenizer  # so that RAGModel(store, model) finds it, as in the seed's example
    return model, tokenizer


def continue_training(model_path: PathLike, train_dataloader, val_dataloader=None, learning_rate: float = 1e-4,
                      epochs: int = 1, checkpoint_dir: PathLike = "./checkpoints/continued",
                      early_stopping_patience: Optional[int] = None, device=None, **trainer_kwargs) -> dict:
    """Fine-tunes the model in `model_path` and returns Trainer.train's results.

    When the folder is a training checkpoint with an optimizer state (and the parameter layout
    matches), AdamW continues from that state; the learning-rate schedule starts afresh.
    """
    from minillm.training.trainer import Trainer

    path = _model_dir(model_path)
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path / TOKENIZER_NAME) if (path / TOKENIZER_NAME).exists() else None
    trainer = Trainer(model, train_dataloader, val_dataloader, learning_rate=learning_rate,
                      checkpoint_dir=checkpoint_dir, device=device, early_stopping_patience=early_stopping_patience,
                      tokenizer=tokenizer, **trainer_kwargs)
    opt_file = path / ckpt.OPTIMIZER_NAME
    if opt_file.is_file():
        saved = torch.load(opt_file, map_location="cpu", weights_only=True)["optimizer"]
        try:
            trainer.optimizer.load_state_dict(saved)
            for group in trainer.optimizer.param_groups:  # the new run's learning rate, not the old one's
                group["lr"] = group["initial_lr"] = learning_rate
            log.info("continuing with the optimizer state of %s", path)
        except ValueError as exc:
            log.warning("optimizer state in %s does not fit (%s); starting AdamW afresh", path, exc)
    return trainer.train(epochs)


def extract_model_for_inference(model_path: PathLike, output_path: PathLike, device: Union[str, torch.device] = "cpu",
                                dtype: Optional[torch.dtype] = None) -> Path:
    """Writes weights (optionally cast, e.g. torch.bfloat16), config and tokenizer to `output_path`;
    optimizer and trainer state are left behind. Returns the output folder."""
    path = _model_dir(model_path)
    model = from_pretrained(path, device=device)
    tokenizer = load_tokenizer(path / TOKENIZER_NAME) if (path / TOKENIZER_NAME).exists() else None
    out = model.save_pretrained(output_path, tokenizer=tokenizer, dtype=dtype)
    size = lambda p: sum(f.stat().st_size for f in Path(p).iterdir() if f.is_file())  # noqa: E731
    log.info("extracted %s (%.1f MB) -> %s (%.1f MB)", path, size(path) / 1e6, out, size(out) / 1e6)
    return Path(out)
