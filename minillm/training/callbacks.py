"""Trainer callbacks: hooks at the start and end of training, after every optimizer step, after every evaluation
and after every checkpoint save. A hook that returns True asks the Trainer to stop (after that step or
evaluation: the final evaluation and checkpoint still happen). Early stopping is one of them.

Under torchrun every rank runs the hooks; a stop request from any rank stops them all (the flags are
all-reduced), so ranks never disagree about the step count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional


class Callback:
    """Override the hooks you need; each gets the Trainer (its .state, .model, .optimizer, ...)."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step(self, trainer, step: int, loss: float) -> Optional[bool]:
        """After optimizer step `step` (1-based) with its training loss (mean over ranks)."""
        return None

    def on_evaluate(self, trainer, record: Dict[str, Any]) -> Optional[bool]:
        """After an evaluation: record has step, epoch, train_loss, val_loss, each of compute_metrics, lr, time;
        trainer.state has the best metric so far ("best", "best_step") and the evaluations since it improved
        ("bad_evals")."""
        return None

    def on_save(self, trainer, path: Path) -> None:
        """After a checkpoint folder (last/, best_model/, checkpoint-STEP/) was written (rank 0 only)."""

    def on_train_end(self, trainer, results: Dict[str, Any]) -> None:
        pass


class EarlyStopping(Callback):
    """Stops after `patience` evaluations in a row without improvement of the monitored metric (an improvement
    is a change in the metric's good direction, greater_is_better, by more than the Trainer's
    early_stopping_min_delta; NaN never improves). The count lives in
    trainer.state, so a resumed run stops exactly where an uninterrupted one would."""

    def __init__(self, patience: int):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.patience = patience

    def on_evaluate(self, trainer, record: Dict[str, Any]) -> Optional[bool]:
        return trainer.state["bad_evals"] >= self.patience


__all__ = ["Callback", "EarlyStopping"]
