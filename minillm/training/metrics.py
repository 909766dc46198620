"""Evaluation metrics for the Trainer's compute_metrics / metric_for_best_model.

Built in: "perplexity" (exp of the validation loss, as Hugging Face's run_clm/run_mlm report it) and "accuracy"
(the fraction of scored tokens whose argmax is the target: next-token accuracy for a decoder, masked-token
accuracy for an encoder, where only the masked positions are scored). A user metric is a function
``fn(logits, targets) -> float`` of one batch ((B, N, V) logits beside their (B, N) targets, -100 = not scored),
averaged over the evaluation batches; it is named by a mapping key or by the function's __name__.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

MetricFn = Callable[[Tensor, Tensor], float]
BUILT_IN = ("perplexity", "accuracy")
LOWER_IS_BETTER = ("loss", "perplexity")


def token_accuracy(logits: Tensor, targets: Tensor) -> Tuple[float, int]:
    """(correct, scored) over the positions whose target is not -100."""
    scored = targets != -100
    correct = (logits.argmax(-1) == targets) & scored
    return float(correct.sum()), int(scored.sum())


def resolve(compute_metrics) -> Dict[str, Optional[MetricFn]]:
    """{name: function, or None for a built-in} from a built-in name, a function, a sequence of those, or a
    mapping {name: function}."""
    if compute_metrics is None:
        return {}
    if isinstance(compute_metrics, str) or callable(compute_metrics):
        compute_metrics = [compute_metrics]
    if isinstance(compute_metrics, Mapping):
        items = list(compute_metrics.items())
    else:
        items = [(m, None) if isinstance(m, str) else (getattr(m, "__name__", None), m) for m in compute_metrics]
    out: Dict[str, Optional[MetricFn]] = {}
    for name, fn in items:
        if fn is None:
            if name not in BUILT_IN:
                raise ValueError(f"compute_metrics: unknown metric {name!r}; built in: {', '.join(BUILT_IN)} "
                                 f"(or pass a function fn(logits, targets) -> float)")
        elif not callable(fn):
            raise TypeError(f"compute_metrics: {name!r} must map to a function, got {type(fn).__name__}")
        elif not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"compute_metrics: a function needs a name (def it, or pass {{'name': fn}}), got {name!r}")
        elif name in BUILT_IN:
            raise ValueError(f"compute_metrics: {name!r} is a built-in metric's name; give your function another")
        if name in ("loss", "val_loss", "train_loss") or name in out:
            raise ValueError(f"compute_metrics: the name {name!r} is taken")
        out[name] = fn
    return out


def monitored_name(metric_for_best_model: str, names: Sequence[str]) -> str:
    """The metric named by metric_for_best_model ("loss", or one of `names`; Hugging Face's "eval_" prefix is
    accepted), checked."""
    name = metric_for_best_model
    if name.startswith("eval_"):
        name = name[len("eval_"):]
    if name == "val_loss":
        name = "loss"
    if name != "loss" and name not in names:
        raise ValueError(f"metric_for_best_model={metric_for_best_model!r} is not computed: use 'loss' or one of "
                         f"compute_metrics ({', '.join(names) or 'none given'})")
    return name


def greater_is_better_default(name: str) -> bool:
    return name not in LOWER_IS_BETTER and not name.endswith("loss")


class Accumulator:
    """Sums of each metric over this rank's evaluation batches, as a flat tensor that ranks all-reduce."""

    def __init__(self, metrics: Dict[str, Optional[MetricFn]]):
        self.metrics = metrics
        self.sums = {name: [0.0, 0.0] for name in metrics if name != "perplexity"}

    def add(self, logits: Tensor, targets: Tensor) -> None:
        logits = logits.detach().float()
        for name, fn in self.metrics.items():
            if name == "perplexity":
                continue
            if fn is None:  # accuracy: over tokens
                correct, scored = token_accuracy(logits, targets)
                self.sums[name][0] += correct
                self.sums[name][1] += scored
            else:  # a user's: the mean over batches
                value = fn(logits, targets)
                self.sums[name][0] += float(value.item() if torch.is_tensor(value) else value)
                self.sums[name][1] += 1

    def flat(self) -> list:
        return [x for name in sorted(self.sums) for x in self.sums[name]]

    def results(self, flat: Sequence[float], loss: float) -> Dict[str, float]:
        out = {}
        for i, name in enumerate(sorted(self.sums)):
            total, count = flat[2 * i], flat[2 * i + 1]
            out[name] = total / count if count else math.nan
        if "perplexity" in self.metrics:
            out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        return {name: out[name] for name in self.metrics}


def better(value: float, best: Optional[float], greater: bool, min_delta: float) -> bool:
    """value improves on best by more than min_delta in the good direction; NaN never improves."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if greater else value < best - min_delta


__all__ = ["BUILT_IN", "resolve", "monitored_name", "greater_is_better_default", "Accumulator", "better",
           "token_accuracy"]
