"""Trainer: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, evaluation, early stopping,
atomic checkpoints that resume exactly, and DistributedDataParallel under torchrun."""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from array import array
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from minillm.models.base import PreTrainedModel, unique_state_dict
from minillm.models.decoder import DecoderOnlyModel
from minillm.models.encoder import EncoderOnlyModel
from minillm.training import checkpoint as ckpt
from minillm.training import distributed
from minillm.training import metrics as metrics_lib
from minillm.training.callbacks import Callback, EarlyStopping
from minillm.training.collate import Collator
from minillm.training.optim import clip_grad_norm_and_step, make_adamw
from minillm.utils import atomic_write_text, progress_bar, remove_dir

log = logging.getLogger("minillm.training")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class _Loss(nn.Module):
    """forward(batch) -> loss, so that DistributedDataParallel sees (and synchronises) the call."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.compute_loss(batch)


def read_metrics(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl file: one JSON object with an integer "step" per line. Lines that are not
    (torn by a crash mid-append, say) are dropped with one warning naming how many."""
    records, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            records.append(r)
        else:
            bad += 1
    if bad:
        log.warning("%s: dropped %d line(s) that are not metrics records (torn by a crash?)", path, bad)
    return records


class _EpochBatches(torch.utils.data.Dataset):
    """One rank's batches of an epoch as a dataset of ready batches: item i is batch i collated. Served by a
    DataLoader with the user's num_workers, pin_memory, worker_init_fn, prefetch_factor, timeout and
    multiprocessing_context. Each batch's randomness (MLM masking) comes from a generator seeded by (run seed,
    epoch, batch), not from the process that happens to collate it: results do not depend on num_workers, and
    a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, dataset, batches: "_RankBatches", collate):
        self.dataset, self.batches, self.collate = dataset, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):  # the caller's (the model's dropout) stream is left as it was
            torch.manual_seed(self.batches.seed(i))
            return self.collate([self.dataset[j] for j in self.batches[i]])


def _batch_seed(run_seed: int, epoch: int, g: int) -> int:
    """The seed of the epoch's global batch g (its MLM masks; g = -1: an IterableDataset's whole stream)."""
    return ((run_seed * 1_000_003 + epoch) * 1_000_003 + g) % 2 ** 63


class _RankBatches:
    """One rank's batches of an epoch: dataset indices back to back in an int64 array and where each batch starts
    (8 bytes an index: Python lists of the 7.8 M windows of a 2 GB token file took 677 MB). Batch i is the epoch's
    global batch g = rank + i * world; its random masks are seeded by (run seed, epoch, g), whichever rank or
    worker collates it."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray, run_seed: int, epoch: int, rank: int, world: int):
        self.flat, self.starts = flat, starts
        self.run_seed, self.epoch, self.rank, self.world = run_seed, epoch, rank, world

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> List[int]:
        return self.flat[self.starts[i]:self.starts[i + 1]].tolist()

    def seed(self, i: int) -> int:
        return _batch_seed(self.run_seed, self.epoch, self.rank + i * self.world)


class Trainer:
    """Trains a minillm model.

    The seed's arguments come first (model, loaders, learning_rate, checkpoint_dir, device,
    early_stopping_patience, early_stopping_min_delta); the rest are keyword-only.

    * The monitored metric (`metric_for_best_model`) is the validation loss by default, or the mean training
      loss since the last evaluation when there is no validation loader; or one of `compute_metrics`: built-in
      "perplexity" (exp of the validation loss) and "accuracy" (argmax = target over scored tokens: next-token
      for a decoder, masked tokens for an encoder), or your fn(logits, targets) -> float (the mean over
      batches), each in the metrics log and history. `greater_is_better` defaults to False for losses and
      perplexity, True otherwise (as Hugging Face's). Evaluations happen every `eval_interval` optimizer steps,
      or at the end of each epoch when it is None. Patience counts evaluations; an improvement is a change in
      the good direction by more than `min_delta`; NaN never improves.
    * `checkpoint_dir/last/` (every evaluation and the end), `checkpoint_dir/best_model/` (each
      improvement) and, with `save_total_limit=N`, `checkpoint_dir/checkpoint-STEP/` at every evaluation (the
      newest N kept) hold model.safetensors, config.json, tokenizer.json, the optimizer, scheduler and
      RNG states and the loop position; each is replaced atomically. ``train(epochs, resume=True)``
      continues from `last/` exactly: the same per-step losses as an uninterrupted run.
    * bf16=True / "auto" runs the forward under bf16 autocast; fp16=True under fp16 autocast with a GradScaler
      (overflowing steps skipped, the scale checkpointed); torch_compile=True compiles the training forward (off by
      default: slower on CPU as measured). The optimizer is AdamW, fused where torch has the kernel (make_adamw).
    * Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel (gloo on CPU, nccl on
      CUDA), each rank takes every world_size-th batch, and rank 0 alone logs and writes checkpoints. Every
      rank runs the same number of steps per epoch: when the batch count does not divide by the world size,
      the epoch's list is padded with its own first batches (as DistributedSampler pads with samples), so a
      few batches count twice in that epoch rather than one rank entering a collective the others skip.
    * The train DataLoader gives the batches (its batch_sampler's order, seeded per epoch), the collate
      function, and how they are loaded: num_workers, pin_memory, worker_init_fn, prefetch_factor, timeout and
      multiprocessing_context are honoured. Workers start anew each epoch (persistent_workers does not apply).
      A batch's random masking depends on (seed, epoch, batch) alone, so results are the same for any
      num_workers and resumes stay exact.
    * A train DataLoader over an IterableDataset is iterated as built (its collate, workers, pin_memory); one
      pass is an epoch (set_epoch(epoch) is called when the dataset has it), and a stream without __len__ needs
      max_steps. Under torchrun every rank reads the same stream and takes every world_size-th batch (a last
      incomplete group is dropped). Its randomness draws from a generator seeded by (seed, epoch), apart from the
      model's, and a resume reads the epoch again and skips what was trained on: exact when the stream gives the
      same batches each time an epoch is read.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        train_dataloader: DataLoader,
        val_dataloader: Optional[DataLoader] = None,
        learning_rate: float = 1e-3,
        checkpoint_dir: Union[str, os.PathLike, None] = "./checkpoints",
        device: Union[str, torch.device, None] = None,
        early_stopping_patience: Optional[int] = None,
        early_stopping_min_delta: float = 0.0,
        *,
        tokenizer=None,
        weight_decay: float = 0.1,
        betas=(0.9, 0.95),
        warmup_steps: Optional[int] = None,
        min_lr: Optional[float] = None,
        lr_schedule: str = "cosine",
        grad_clip: Optional[float] = 1.0,
        grad_accum_steps: int = 1,
        bf16: Union[bool, str] = False,
        fp16: bool = False,
        torch_compile: bool = False,
        eval_interval: Optional[int] = None,
        eval_batches: Optional[int] = None,
        max_steps: Optional[int] = None,
        seed: int = 0,
        restore_best_weights: bool = True,
        metrics_file: Union[str, os.PathLike, None] = None,
        plot_path: Union[str, os.PathLike, None, bool] = None,
        progress: Optional[bool] = None,
        save_total_limit: Optional[int] = None,
        gradient_checkpointing: bool = False,
        callbacks: Sequence[Callback] = (),
        compute_metrics=None,
        metric_for_best_model: str = "loss",
        greater_is_better: Optional[bool] = None,
    ):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a minillm model, got {type(model).__name__}")
        if not isinstance(train_dataloader, DataLoader):
            raise TypeError("train_dataloader must be a torch DataLoader (see create_dataloaders)")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if early_stopping_patience is not None and early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 or None, got {early_stopping_patience}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if save_total_limit is not None and (isinstance(save_total_limit, bool) or not isinstance(save_total_limit, int)
                                             or save_total_limit < 1):
            raise ValueError(f"save_total_limit must be an int >= 1 or None, got {save_total_limit!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.metrics = metrics_lib.resolve(compute_metrics)
        if self.metrics and val_dataloader is None:
            raise ValueError("compute_metrics needs a val_dataloader: the metrics are computed on validation batches")
        self.monitor = metrics_lib.monitored_name(metric_for_best_model, list(self.metrics))
        self.greater = (metrics_lib.greater_is_better_default(self.monitor) if greater_is_better is None
                        else bool(greater_is_better))
        self.world, self.rank = distributed.world_size(), distributed.rank()
        distributed.init()
        if device is None:
            device = default_device()
            if device.type == "cuda" and self.world > 1:
                device = torch.device("cuda", distributed.local_rank())
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if gradient_checkpointing:  # each block recomputes its activations in the backward
            self.model.gradient_checkpointing_enable()
        self.train_loader, self.val_loader = train_dataloader, val_dataloader
        self.tokenizer = tokenizer or getattr(train_dataloader.collate_fn, "tokenizer", None)
        self._set_task(train_dataloader)
        if val_dataloader is not None:
            self._set_task(val_dataloader)
        self.lr, self.min_lr = learning_rate, (learning_rate / 10 if min_lr is None else min_lr)
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.grad_clip, self.accum, self.max_steps = grad_clip, grad_accum_steps, max_steps
        self.eval_interval, self.eval_batches = eval_interval, eval_batches
        self.min_delta = early_stopping_min_delta
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be minillm.training.Callback instances, got {type(cb).__name__}")
        # early_stopping_patience is the EarlyStopping callback, first in line
        self.callbacks: List[Callback] = ([EarlyStopping(early_stopping_patience)] if early_stopping_patience
                                          else []) + list(callbacks)
        self.restore_best_weights, self.seed, self.progress = restore_best_weights, seed, progress
        self.save_total_limit = save_total_limit
        self.bf16 = cpu_has_bf16() if bf16 == "auto" and self.device.type == "cpu" else bool(bf16)
        self.fp16 = bool(fp16)
        if self.fp16 and self.bf16:
            raise ValueError("bf16 and fp16 are both set: choose one autocast dtype")
        # fp16's narrow range: losses are scaled up before the backward and gradients unscaled before the step,
        # and a step whose gradients overflowed is skipped with the scale halved (GradScaler)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.metrics_file = Path(metrics_file) if metrics_file else (
            self.checkpoint_dir / "metrics.jsonl" if self.checkpoint_dir else None)
        self._metrics_line_start = False  # set once the metrics file is known to end with a newline
        self.plot_path = (self.checkpoint_dir / "loss_curve.png" if plot_path is None and self.checkpoint_dir
                          else (plot_path or None))
        torch.manual_seed(seed)
        self.runner: nn.Module = _Loss(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # On CPU, find_unused_parameters also keeps DDP from rebuilding its gradient buckets after the first
            # step: a rebuilt layout changes where each gradient falls in gloo's ring all-reduce and so its
            # summation order, and a resumed run (whose first step is on the initial layout) would drift from
            # the uninterrupted one by rounding. With it, resuming under torchrun repeats the run bit for bit.
            self.runner = nn.parallel.DistributedDataParallel(self.runner, device_ids=ids,
                                                              find_unused_parameters=self.device.type == "cpu")
        if torch_compile:  # the training forward and loss compiled; under DDP around it (its optimizer splits graphs per bucket)
            self.runner = torch.compile(self.runner)
        self.optimizer = make_adamw(self.model, learning_rate, weight_decay, betas)
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self.state: Dict[str, Any] = {
            "step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "best_epoch": None,
            "bad_evals": 0, "early_stopped": False, "history": [], "train_loss_sum": 0.0, "train_loss_n": 0,
            "monitor": self.monitor, "greater_is_better": self.greater, "world_size": self.world,
        }
        self._best_weights: Optional[Dict[str, torch.Tensor]] = None

    # ---- set-up helpers ----

    def _set_task(self, loader: DataLoader) -> None:
        collate = loader.collate_fn
        if isinstance(collate, Collator) and collate.task == "auto":
            if isinstance(self.model, EncoderOnlyModel):
                collate.task = "mlm"
            elif isinstance(self.model, DecoderOnlyModel):
                collate.task = "clm"
            else:
                raise ValueError("an encoder-decoder model needs create_dataloaders(..., task='seq2seq')")
            log.info("data task: %s (from %s)", collate.task, type(self.model).__name__)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _total_steps(self, epochs: int) -> int:
        if self._streamed:
            try:
                batches = len(self.train_loader) // self.world  # incomplete groups are dropped
            except TypeError:  # a stream without a length: max_steps is the schedule's length
                if self.max_steps is None:
                    raise ValueError("a train DataLoader over an IterableDataset without __len__ needs max_steps= "
                                     "(the learning-rate schedule's length)") from None
                return self.max_steps
        else:
            batches = math.ceil(len(self.train_loader.batch_sampler) / self.world)
        per_epoch = math.ceil(batches / self.accum)
        total = per_epoch * epochs
        return min(total, self.max_steps) if self.max_steps else total

    def _make_scheduler(self, total: int) -> None:
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, total // 20)
        floor = self.min_lr / self.lr

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _epoch_batches(self, epoch: int) -> _RankBatches:
        """This rank's batches of dataset indices for `epoch`, in the batch sampler's order seeded per epoch."""
        sampler = self.train_loader.batch_sampler
        gen = getattr(getattr(sampler, "sampler", None), "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed + epoch)  # the same order in a resumed run
        self._set_epoch(epoch)
        plan = self._standard_plan(sampler, epoch)
        if plan is not None:
            return plan
        flat, starts = array("q"), array("q", [0])
        head: List[List[int]] = []  # the epoch's first world_size batches, which padding repeats
        n = 0
        for g, batch in enumerate(sampler):
            if g < self.world:
                head.append([int(j) for j in batch])
            if g % self.world == self.rank:
                flat.extend(int(j) for j in batch)
                starts.append(len(flat))
            n = g + 1
        if self.world > 1 and n % self.world:
            # Pad with the epoch's first batches so every rank runs ceil(n / world) steps: a rank with one
            # batch fewer would enter evaluate()'s all-reduce while the others wait in DDP's gradient one.
            for g in range(n, math.ceil(n / self.world) * self.world):
                if g % self.world == self.rank:
                    flat.extend(head[g % n])
                    starts.append(len(flat))
        return _RankBatches(np.frombuffer(flat, dtype=np.int64), np.frombuffer(starts, dtype=np.int64), self.seed,
                            epoch, self.rank, self.world)

    def _set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.train_loader.dataset, "set_epoch", None)
        if callable(set_epoch):  # datasets that draw per epoch (TokenDataset's random windows, a user's stream)
            set_epoch(epoch)

    def _standard_plan(self, sampler, epoch: int) -> Optional[_RankBatches]:
        """_epoch_batches for torch's own BatchSampler over a RandomSampler (without replacement, one pass, with a
        generator: the DataLoaders create_dataloaders makes) or a SequentialSampler, built from the permutation
        itself: the same batches as iterating the sampler, whose RandomSampler turns the permutation into a list
        of Python ints (7.8 M windows: 280 MB more)."""
        from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

        if type(sampler) is not BatchSampler:
            return None
        inner = sampler.sampler
        n = len(self.train_loader.dataset)
        if type(inner) is RandomSampler and not inner.replacement and inner.num_samples == n and inner.generator is not None:
            order = torch.randperm(n, generator=inner.generator).numpy()  # RandomSampler's first draw
        elif type(inner) is SequentialSampler and len(inner) == n:
            order = np.arange(n, dtype=np.int64)
        else:
            return None
        bs = sampler.batch_size
        nb = n // bs if sampler.drop_last else -(-n // bs)  # global batches
        bounds = np.minimum(np.arange(nb + 1, dtype=np.int64) * bs, n)  # batch g is order[bounds[g]:bounds[g + 1]]
        if self.world == 1:
            flat, starts = order[:bounds[-1]], bounds
        else:  # this rank's global batches rank, rank + world, ...; padding wraps around to the epoch's first
            padded = -(-nb // self.world) * self.world if nb else 0
            mine = np.arange(self.rank, padded, self.world) % max(nb, 1)
            lengths = bounds[mine + 1] - bounds[mine]
            starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            within = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], lengths)
            flat = order[np.repeat(bounds[mine], lengths) + within]
        return _RankBatches(np.ascontiguousarray(flat, dtype=np.int64), starts, self.seed, epoch, self.rank,
                            self.world)

    @property
    def _streamed(self) -> bool:
        return isinstance(self.train_loader.dataset, IterableDataset)

    def _epoch_stream(self, epoch: int, skip: int) -> Iterator[Tuple[int, Dict[str, Any], bool]]:
        """(i, batch, last in epoch) for this rank's batches i = skip, skip + 1, ... of `epoch`."""
        if self._streamed:
            yield from self._iterable_batches(epoch, skip)
            return
        batches = self._epoch_batches(epoch)
        for i, batch in enumerate(self._batch_loader(batches, skip), start=skip):
            yield i, batch, i == len(batches) - 1

    def _iterable_batches(self, epoch: int, skip: int) -> Iterator[Tuple[int, Dict[str, Any], bool]]:
        """An IterableDataset's DataLoader, iterated as the user built it (its collate, workers, pin_memory).
        Every rank reads the same stream and takes every world_size-th batch; the batches are taken in groups of
        world_size and a last, incomplete group is dropped, so ranks stay in step. The stream's randomness (MLM
        masks, the workers' seeds) draws from a generator seeded by (seed, epoch), kept apart from the model's
        dropout stream, so a resume (which reads the epoch again from its start and skips `skip` groups) sees
        the same batches. The stream must give the same batches in the same order on every rank and each time
        an epoch is read (seeded by set_epoch, if it has one)."""
        self._set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_batch_seed(self.seed, epoch, -1))
            it = iter(self.train_loader)
            data_rng = torch.get_rng_state()

        def group():
            nonlocal data_rng
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(data_rng)
                got = list(itertools.islice(it, self.world))
                data_rng = torch.get_rng_state()
            return got if len(got) == self.world else None

        current, i = group(), 0
        while current is not None:
            following = group()  # one group ahead: the last batch of an epoch flushes gradient accumulation
            if i >= skip:
                yield i, current[self.rank], following is None
            current, i = following, i + 1

    def _batch_loader(self, batches: _RankBatches, start: int):
        """Batches [start, len) of this rank's epoch, collated as the user's DataLoader would load them."""
        user = self.train_loader
        workers = user.num_workers
        extra = {"prefetch_factor": user.prefetch_factor} if workers > 0 else {}
        # Its own generator: a DataLoader iterator draws its workers' base seed from the global generator
        # otherwise, and a resumed run (a new iterator mid-epoch) would shift the dropout stream.
        gen = torch.Generator().manual_seed(batches.seed(0))
        return DataLoader(_EpochBatches(user.dataset, batches, user.collate_fn), batch_size=None,
                          sampler=range(start, len(batches)), generator=gen, num_workers=workers,
                          pin_memory=user.pin_memory, worker_init_fn=user.worker_init_fn, timeout=user.timeout,
                          multiprocessing_context=user.multiprocessing_context if workers > 0 else None, **extra)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16 if self.fp16 else torch.bfloat16,
                              enabled=self.bf16 or self.fp16)

    # ---- evaluation and bookkeeping ----

    def evaluate(self, loader: Optional[DataLoader] = None) -> float:
        """Mean loss over the validation loader (the first eval_batches batches), on every rank."""
        return self.evaluate_metrics(loader)["loss"]

    @torch.no_grad()
    def evaluate_metrics(self, loader: Optional[DataLoader] = None) -> Dict[str, float]:
        """{"loss": mean batch loss, and each of compute_metrics} over the validation loader (the first
        eval_batches batches), the same on every rank (batches split over ranks, sums all-reduced)."""
        loader = loader or self.val_loader
        self.model.eval()
        total, count = 0.0, 0
        acc = metrics_lib.Accumulator(self.metrics)
        for i, batch in enumerate(loader):
            if self.eval_batches is not None and i >= self.eval_batches:
                break
            if i % self.world != self.rank:
                continue
            batch = self._to_device(batch)
            with self._autocast():
                if acc.sums:  # metrics that read the logits
                    loss, logits, targets = self.model.loss_logits_targets(batch)
                    acc.add(logits, targets)
                else:
                    loss = self.model.compute_loss(batch)
            total += float(loss)
            count += 1
        flat = [total, count] + acc.flat()
        if self.world > 1:
            t = torch.tensor(flat, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            flat = t.tolist()
        self.model.train()
        loss = flat[0] / flat[1] if flat[1] else math.nan
        return {"loss": loss, **acc.results(flat[2:], loss)}

    def _metric(self, record: Dict[str, Any]) -> None:
        if self.is_main and self.metrics_file is not None:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_file, "a+b") as f:
                if not self._metrics_line_start:
                    # A crash mid-append leaves a torn last line without its newline: start on a new line
                    # rather than glue this record to it (readers drop the torn one).
                    f.seek(0, os.SEEK_END)
                    if f.tell():
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                    self._metrics_line_start = True
                f.write((json.dumps(record) + "\n").encode("utf-8"))

    def _evaluate_and_checkpoint(self) -> None:
        st = self.state
        train_loss = st["train_loss_sum"] / st["train_loss_n"] if st["train_loss_n"] else math.nan
        st["train_loss_sum"], st["train_loss_n"] = 0.0, 0
        scores = self.evaluate_metrics() if self.val_loader is not None else {}
        val_loss = scores.pop("loss", None)
        metric = scores[self.monitor] if self.monitor != "loss" else (val_loss if val_loss is not None else train_loss)
        record = {"step": st["step"], "epoch": st["epoch"], "train_loss": train_loss, "val_loss": val_loss,
                  **scores, "lr": self.optimizer.param_groups[0]["lr"], "time": time.time()}
        st["history"].append(record)
        self._metric({"eval": True, **record})
        improved = metrics_lib.better(metric, st["best"], self.greater, self.min_delta)
        if improved:
            st["best"], st["best_step"], st["best_epoch"], st["bad_evals"] = metric, st["step"], st["epoch"], 0
            # by unique names, as best_model/ holds them (a tied embedding once)
            self._best_weights = {k: v.to("cpu", copy=True) for k, v in unique_state_dict(self.model).items()}
            self._save("best_model")
        else:
            st["bad_evals"] += 1
        if self._ask(lambda cb: cb.on_evaluate(self, record)):  # before `last` is saved: a resume stays stopped
            st["early_stopped"] = True
        log.info("step %d epoch %d: train %.4f val %s%s%s", st["step"], st["epoch"], train_loss,
                 "n/a" if val_loss is None else f"{val_loss:.4f}", "".join(f" {k} {v:.4f}" for k, v in scores.items()),
                 " (best)" if improved else "")
        self._save("last")
        if self.save_total_limit is not None:
            self._save(f"checkpoint-{st['step']}")
            self._rotate_checkpoints()

    def _rotate_checkpoints(self) -> None:
        """Keeps the newest save_total_limit step checkpoints (checkpoint-STEP/); best_model/ and last/ are not
        counted. Only folders minillm saved as checkpoints are removed: a user's folder of the same name stays."""
        if self.checkpoint_dir is None or not self.is_main:
            return
        steps = sorted(int(p.name[len("checkpoint-"):]) for p in self.checkpoint_dir.glob("checkpoint-*")
                       if p.is_dir() and p.name[len("checkpoint-"):].isdigit())
        for step in steps[:-self.save_total_limit]:
            if not remove_dir(self.checkpoint_dir / f"checkpoint-{step}", "checkpoint"):
                log.warning("left %s in place: not a checkpoint minillm saved", self.checkpoint_dir / f"checkpoint-{step}")

    def _ask(self, hook) -> bool:
        """Runs hook(callback) for every callback: True when any asks to stop, on any rank."""
        stop = any([hook(cb) is True for cb in self.callbacks])
        if self.world > 1:
            t = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop = bool(t[0] > 0)
        return stop

    def _save(self, name: str) -> None:
        if self.checkpoint_dir is not None and self.is_main:
            path = ckpt.save_checkpoint(self.checkpoint_dir / name, self.model, self.tokenizer, self.optimizer,
                                        self.scheduler, self.state, scaler=self.scaler)
            for cb in self.callbacks:
                cb.on_save(self, path)
        if self.world > 1:
            dist.barrier()

    def _resume(self, resume_from: Union[str, os.PathLike, None] = None) -> bool:
        if resume_from is not None:
            path = ckpt.find_checkpoint(Path(resume_from))
            if path is None:
                raise FileNotFoundError(f"resume_from={resume_from}: no complete minillm checkpoint there (a "
                                        f"checkpoint folder holds {ckpt.STATE_NAME} and {ckpt.WEIGHTS_NAME})")
        else:
            path = ckpt.find_checkpoint(self.checkpoint_dir / "last") if self.checkpoint_dir else None
        if path is None:
            log.info("no checkpoint to resume from in %s; starting fresh", self.checkpoint_dir)
            return False
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, scaler=self.scaler)
        was = (state.get("monitor", "loss"), state.get("greater_is_better", False))
        if state.get("best") is not None and was != (self.monitor, self.greater):
            raise ValueError(f"{path} was trained monitoring {was[0]!r} (greater_is_better={was[1]}); this Trainer "
                             f"monitors {self.monitor!r} (greater_is_better={self.greater}): resume with the same "
                             f"metric_for_best_model, or start a new run")
        if state.get("world_size", self.world) != self.world:
            log.warning("%s was saved by a run of %d processes, this one has %d: the epoch's batches are split "
                        "differently, so the run continues but does not repeat an uninterrupted one", path,
                        state["world_size"], self.world)
        state["world_size"] = self.world
        state.setdefault("monitor", self.monitor)
        state.setdefault("greater_is_better", self.greater)
        self.state = state
        if self.state.get("best") is not None:
            self._resume_best(path)
        if self.is_main and self.metrics_file is not None and self.metrics_file.exists():
            # Steps logged after the checkpoint will run again: drop them so the log stays one run. Lines a
            # crash tore (full disk, power loss) are dropped too, and said once; the file is rewritten atomically.
            keep = [r for r in read_metrics(self.metrics_file) if r["step"] <= self.state["step"]]
            atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in keep))
            self._metrics_line_start = True
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state["step"], self.state["epoch"],
                 self.state["batch_in_epoch"])
        return True

    def _resume_best(self, path: Path) -> None:
        """Finds the best weights of the run being resumed: the best_model/ (saved at the state's best_step) in
        checkpoint_dir or beside the checkpoint resumed from (another run's folder). One found elsewhere is copied
        into checkpoint_dir/best_model/, so this run's folder holds its best model even if nothing improves."""
        here = self.checkpoint_dir / "best_model" if self.checkpoint_dir is not None else None
        for candidate in dict.fromkeys(p for p in (here, Path(path).parent / "best_model") if p is not None):
            best = ckpt.find_checkpoint(candidate)
            if best is not None and ckpt.saved_step(best) == self.state.get("best_step"):
                self._best_weights = ckpt.load_weights_dict(best)
                if here is not None and candidate != here and self.is_main:
                    ckpt.copy_checkpoint(best, here)
                break
        else:
            log.warning("resuming from %s: no best_model/ saved at step %s found (in %s or beside the checkpoint); "
                        "the best weights restored at the end will be this run's best", path,
                        self.state.get("best_step"), self.checkpoint_dir)
        if self.world > 1:
            dist.barrier()

    # ---- the loop ----

    def train(self, epochs: int = 1, resume: bool = False,
              resume_from: Union[str, os.PathLike, None] = None) -> Dict[str, Any]:
        """Trains for `epochs` epochs (or until max_steps, or early stopping).

        resume=True continues from checkpoint_dir/last/; resume_from=PATH from any checkpoint folder (last/,
        best_model/, a step checkpoint-N/, another run's), exactly: the steps after it repeat an uninterrupted
        run's losses.

        Returns {"early_stopped", "epochs_completed", "best_val_loss", "best_epoch", "best_step",
        "steps", "history"}; best_val_loss is the best monitored metric (training loss without a
        validation loader).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        total = self._total_steps(epochs)
        self._make_scheduler(total)
        if resume_from is not None:
            self._resume(resume_from)
        elif resume:
            self._resume()
        st = self.state
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.model.train()
        bar = None
        if self.is_main:  # on a terminal unless progress=True / False says otherwise (utils.progress_bar)
            bar = progress_bar(enabled=self.progress, total=total, initial=st["step"], desc="training", unit="step",
                               dynamic_ncols=True)
        done = st["early_stopped"] or (self.max_steps is not None and st["step"] >= self.max_steps)
        while not done and st["epoch"] < epochs:
            # Resuming mid-epoch skips the batches already trained on; the RNG state restored from the
            # checkpoint is the one that followed them.
            micro, acc_loss, any_batch = 0, 0.0, False
            for bi, batch, last_in_epoch in self._epoch_stream(st["epoch"], st["batch_in_epoch"]):
                any_batch = True
                batch = self._to_device(batch)
                with self._autocast():
                    loss = self.runner(batch)
                self.scaler.scale(loss / self.accum).backward()
                acc_loss += float(loss.detach()) / self.accum
                micro += 1
                if micro == self.accum or last_in_epoch:
                    self._optimizer_step(acc_loss * self.accum / micro)
                    micro, acc_loss = 0, 0.0
                    st["batch_in_epoch"] = bi + 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{st['train_loss_sum'] / max(1, st['train_loss_n']):.4f}")
                    if last_in_epoch:
                        st["epoch"] += 1
                        st["batch_in_epoch"] = 0
                    at_limit = self.max_steps is not None and st["step"] >= self.max_steps
                    if (self.eval_interval and st["step"] % self.eval_interval == 0) or (
                            self.eval_interval is None and last_in_epoch) or at_limit:
                        self._evaluate_and_checkpoint()
                    if st["early_stopped"] or at_limit:
                        done = True
                        break
            if not any_batch:  # nothing (left) in this epoch: a resume at its end, or an empty stream
                st["epoch"], st["batch_in_epoch"] = st["epoch"] + 1, 0
        if bar is not None:
            bar.close()
        if st["train_loss_n"]:
            self._evaluate_and_checkpoint()
        if self.restore_best_weights and self._best_weights is not None:
            with torch.no_grad():
                for name, t in unique_state_dict(self.model).items():
                    t.copy_(self._best_weights[name])
        self._plot()
        if st["early_stopped"]:
            log.info("stopped early (a callback asked; %d evaluations without improvement)", st["bad_evals"])
        results = {
            "early_stopped": st["early_stopped"],
            "epochs_completed": st["epoch"],
            "best_val_loss": self._best_val_loss(),
            "best_metric": st["best"],
            "metric_for_best_model": self.monitor,
            "best_epoch": st["best_epoch"],
            "best_step": st["best_step"],
            "steps": st["step"],
            "history": list(st["history"]),
        }
        for cb in self.callbacks:
            cb.on_train_end(self, results)
        return results

    def _best_val_loss(self) -> Optional[float]:
        """The monitored loss at its best; with another metric monitored, the validation loss of the best
        evaluation."""
        st = self.state
        if self.monitor == "loss":
            return st["best"]
        return next((h["val_loss"] for h in st["history"] if h["step"] == st["best_step"]), None)

    def _optimizer_step(self, loss_value: float) -> None:
        st = self.state
        scale = None
        if self.grad_clip and not self.fp16:  # the clip coefficient applied in the fused optimizer's pass
            clip_grad_norm_and_step(self.optimizer, self.model.parameters(), self.grad_clip)
        else:
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
            scale = self.scaler.get_scale() if self.fp16 else None
            self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
            self.scaler.update()
        if scale is None or self.scaler.get_scale() >= scale:  # the schedule advances with the weights
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            t = torch.tensor([loss_value], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss_value = float(t[0]) / self.world
        st["step"] += 1
        st["train_loss_sum"] += loss_value
        st["train_loss_n"] += 1
        self._metric({"step": st["step"], "loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"]})
        if any(type(cb).on_step is not Callback.on_step for cb in self.callbacks):  # no collective otherwise
            if self._ask(lambda cb: cb.on_step(self, st["step"], loss_value)):
                st["early_stopped"] = True

    def _plot(self) -> None:
        if not (self.is_main and self.plot_path and self.state["history"]):
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps, train = [], []
        if self.metrics_file is not None and self.metrics_file.exists():
            for r in read_metrics(self.metrics_file):
                if "loss" in r:
                    steps.append(r["step"])
                    train.append(r["loss"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, train, lw=0.8, label="train (per step)")
        evals = [h for h in self.state["history"] if h["val_loss"] is not None]
        if evals:
            ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(self.plot_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.plot_path, dpi=110)
        plt.close(fig)
