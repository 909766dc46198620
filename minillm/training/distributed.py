"""Where this process sits under torchrun (WORLD_SIZE / RANK / LOCAL_RANK), and the process group.

torchrun sets the three variables in every process it starts; without them this is one process of a world of one,
and nothing here touches torch.distributed. The group is created once, by whichever of create_dataloaders
(a token file built by one process per node) or the Trainer gets there first: gloo on CPU, nccl with CUDA.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's number on its node (0 on each node, so one process a node may write node-local files)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Joins the process group torchrun describes (once; nothing in a world of one)."""
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())  # nccl's collectives run on the current device
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def barrier() -> None:
    """Waits for every process (nothing in a world of one)."""
    if world_size() > 1:
        init()
        dist.barrier()
