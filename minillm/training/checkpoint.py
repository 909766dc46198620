"""Training checkpoints: a folder per checkpoint, replaced atomically.

A checkpoint folder holds model.safetensors, config.json and tokenizer.json (as save_pretrained
writes them), optimizer.pt (optimizer, scheduler, and the CPU's and every GPU's torch RNG state: tensors
and plain values, loaded with torch.load(weights_only=True)) and trainer_state.json (loop position, early-stopping
counters, history, Python and numpy RNG states). No pickle of arbitrary objects is ever loaded.

A new checkpoint is written beside the old one, then swapped in with renames: a crash at any moment
leaves the previous checkpoint (or the new one) loadable; find_checkpoint() knows where to look.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from minillm.models.base import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, PreTrainedModel
from minillm.utils import atomic_dir, atomic_write_text, find_dir

log = logging.getLogger("minillm.training")

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
# What a checkpoint folder holds: a save replaces only a folder of these (or one with minillm's marker).
CHECKPOINT_NAMES = (WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME, OPTIMIZER_NAME, STATE_NAME)


def save_checkpoint(path: Path, model: PreTrainedModel, tokenizer, optimizer, scheduler,
                    state: Dict[str, Any], scaler=None) -> Path:
    with atomic_dir(path, "checkpoint", CHECKPOINT_NAMES) as new:
        model.save_pretrained(new, tokenizer=tokenizer)
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    # fp16's loss scale and its growth count (an empty dict when the scaler is off)
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(),
                    # every GPU's generator too (dropout on CUDA draws from it), so a resumed run repeats; a
                    # process that never used CUDA still has them at their initial state, as a new one will
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None},
                   new / OPTIMIZER_NAME)
        np_state = np.random.get_state()
        full_state = {**state, "python_rng": _jsonable(random.getstate()),
                      "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        atomic_write_text(new / STATE_NAME, json.dumps(full_state) + "\n")
    return Path(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copies the checkpoint folder src to dst (replacing dst atomically, as a save does)."""
    with atomic_dir(dst, "checkpoint", CHECKPOINT_NAMES) as new:
        for name in CHECKPOINT_NAMES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, new / name)
    return Path(dst)


def saved_step(path: Path) -> Optional[int]:
    """The optimizer step a checkpoint folder was saved at (None when it holds no readable state)."""
    try:
        return json.loads((Path(path) / STATE_NAME).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def find_checkpoint(path: Path) -> Optional[Path]:
    """The complete checkpoint at `path`, or the previous one a crash mid-swap left beside it."""
    found = find_dir(path, STATE_NAME)
    return found if found is not None and (found / WEIGHTS_NAME).is_file() else None


def load_weights_dict(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(Path(path) / WEIGHTS_NAME))


def load_checkpoint(path: Path, model: PreTrainedModel, optimizer=None, scheduler=None,
                    scaler=None) -> Dict[str, Any]:
    """Restores model weights, optimizer, scheduler, the fp16 loss scaler and RNG states; returns the trainer
    state."""
    path = Path(path)
    model.load_weights(path / WEIGHTS_NAME)
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    opt_file = path / OPTIMIZER_NAME
    if opt_file.is_file():
        saved = torch.load(opt_file, map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        cuda_rng = saved.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available():
            if len(cuda_rng) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_rng)
            else:
                log.warning("%s holds the RNG states of %d GPUs, this process sees %d: their generators are not "
                            "restored, so a resumed run's dropout differs from an uninterrupted one's",
                            path, len(cuda_rng), torch.cuda.device_count())
    if "python_rng" in state:
        random.setstate(_tuples(state.pop("python_rng")))
    if "numpy_rng" in state:
        kind, keys, *rest = state.pop("numpy_rng")
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return state
