"""compute_metrics / metric_for_best_model / greater_is_better: the built-in metrics against a direct computation,
the best checkpoint and early stopping following the chosen metric and direction, and the refusals."""
import json
import math

import pytest
import torch

from minillm.training import Trainer, create_dataloaders
from minillm.training.metrics import resolve


def manual_scores(model, batches, decoder: bool):
    """Mean batch loss and token accuracy, computed here from the model's logits and the batches' labels."""
    model.eval()
    losses, correct, scored = [], 0, 0
    with torch.no_grad():
        for b in batches:
            if decoder:
                logits, loss = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
                logits, labels = logits[:, :-1], b["labels"][:, 1:]
            else:
                logits, loss = model(b["input_ids"], b["attention_mask"], labels=b["labels"])
                labels = b["labels"]
            keep = labels != -100
            correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
            scored += int(keep.sum())
            losses.append(float(loss))
    model.train()
    return sum(losses) / len(losses), correct / scored


def test_perplexity_and_next_token_accuracy_of_a_decoder(small_trainer, tmp_path):
    trainer = small_trainer(tmp_path, compute_metrics=["perplexity", "accuracy"], eval_interval=4, max_steps=8)
    res = trainer.train(epochs=1)
    batches = list(trainer.val_loader)
    loss, accuracy = manual_scores(trainer.model, batches, decoder=True)
    scores = trainer.evaluate_metrics(batches)
    assert scores["loss"] == pytest.approx(loss, rel=1e-6)
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-12) and 0 < accuracy < 1
    assert scores["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert trainer.evaluate(batches) == scores["loss"]
    # each evaluation's record carries the metrics, in history and in the metrics log
    assert [set(h) >= {"val_loss", "perplexity", "accuracy"} for h in res["history"]] == [True, True]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in logged if r.get("eval")] == [h["accuracy"] for h in res["history"]]
    assert res["metric_for_best_model"] == "loss" and res["best_metric"] == res["best_val_loss"]


def test_mlm_accuracy_counts_the_masked_tokens_only(texts, tmp_path):
    from minillm.models import EncoderOnlyModel
    from minillm.tokenizers import CharTokenizer

    tok = CharTokenizer.from_texts(texts)
    train, val = create_dataloaders(texts[:200], texts[200:], tok, batch_size=16, max_length=48, task="mlm", seed=2)
    torch.manual_seed(0)
    model = EncoderOnlyModel({"model_type": "encoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 48, "dropout": 0.0})
    trainer = Trainer(model, train, val, checkpoint_dir=tmp_path, progress=False, learning_rate=3e-3,
                      compute_metrics="accuracy", metric_for_best_model="eval_accuracy", max_steps=6)
    res = trainer.train(epochs=1)
    assert trainer.greater and res["metric_for_best_model"] == "accuracy"
    batches = list(val)
    assert all(((b["labels"] != -100).sum() < (b["attention_mask"] == 1).sum()) for b in batches)  # masked few
    loss, accuracy = manual_scores(model, batches, decoder=False)
    scores = trainer.evaluate_metrics(batches)
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-12) and scores["loss"] == pytest.approx(loss, rel=1e-6)


def scripted(values):
    """A user metric whose value at an evaluation is values[step] (the step is set by a callback's on_step)."""
    box = {"step": 0}

    def score(logits, targets):
        return values[box["step"]]

    return score, box


def test_best_model_and_early_stopping_follow_the_metric_and_its_direction(small_trainer, tmp_path):
    from minillm.training import Callback

    values = {3: 0.2, 6: 0.5, 9: 0.4, 12: 0.45, 15: 0.9}

    class Step(Callback):  # tells the scripted metric which evaluation this is
        def on_step(self, trainer, step, loss):
            box["step"] = step

    def run(out, **kw):
        return small_trainer(out, compute_metrics={"score": score}, metric_for_best_model="score", eval_interval=3,
                             max_steps=15, callbacks=[Step()], **kw).train(epochs=5)

    score, box = scripted(values)
    res = run(tmp_path / "up")  # greater is better by default for a metric that is not a loss
    assert [h["score"] for h in res["history"]] == [0.2, 0.5, 0.4, 0.45, 0.9]
    assert res["best_step"] == 15 and res["best_metric"] == 0.9 and not res["early_stopped"]
    assert res["best_val_loss"] == res["history"][-1]["val_loss"]
    state = json.loads((tmp_path / "up" / "best_model" / "trainer_state.json").read_text())
    assert state["best_step"] == 15

    res = run(tmp_path / "patience", early_stopping_patience=2)  # 0.4 and 0.45 do not beat 0.5
    assert res["early_stopped"] and res["steps"] == 12 and res["best_step"] == 6

    res = run(tmp_path / "min_delta", early_stopping_patience=3, early_stopping_min_delta=0.45)
    assert res["early_stopped"] and res["steps"] == 12 and res["best_step"] == 3  # no gain above 0.45 until 0.9

    res = run(tmp_path / "down", greater_is_better=False)
    assert res["best_step"] == 3 and res["best_metric"] == 0.2


def test_resume_keeps_the_monitored_metric(small_trainer, tmp_path):
    small_trainer(tmp_path, compute_metrics="accuracy", metric_for_best_model="accuracy", eval_interval=4,
                  max_steps=4).train(epochs=1)
    with pytest.raises(ValueError, match="monitoring 'accuracy'"):
        small_trainer(tmp_path, max_steps=8).train(epochs=1, resume=True)
    res = small_trainer(tmp_path, compute_metrics="accuracy", metric_for_best_model="accuracy", eval_interval=4,
                        max_steps=8).train(epochs=1, resume=True)
    assert res["steps"] == 8 and res["metric_for_best_model"] == "accuracy"


def test_refusals(small_trainer, tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        small_trainer(tmp_path, compute_metrics=["bleu"])
    with pytest.raises(ValueError, match="needs a name"):
        small_trainer(tmp_path, compute_metrics=[lambda logits, targets: 0.0])
    with pytest.raises(ValueError, match="is not computed"):
        small_trainer(tmp_path, metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match="built-in metric's name"):
        resolve({"accuracy": lambda logits, targets: 0.0})
    with pytest.raises(TypeError, match="must map to a function"):
        resolve({"x": 3})
    with pytest.raises(ValueError, match="is taken"):
        resolve({"loss": lambda logits, targets: 0.0})
    from minillm.training import Trainer as T

    trainer = small_trainer(tmp_path)
    with pytest.raises(ValueError, match="needs a val_dataloader"):
        T(trainer.model, trainer.train_loader, None, compute_metrics="perplexity", checkpoint_dir=None)


def test_resume_from_another_runs_checkpoint_brings_its_best_model(small_trainer, tmp_path):
    """Best at step 8, nothing better after: a run resumed from another folder's checkpoint-8 ends with the step-8
    weights (restore_best_weights) and its own best_model/ copy of them."""
    from minillm.training import Callback
    from minillm.models.base import unique_state_dict
    from minillm.training.checkpoint import load_weights_dict, saved_step

    score, box = scripted({4: 0.5, 8: 0.9, 12: 0.1, 16: 0.2})

    class Step(Callback):
        def on_step(self, trainer, step, loss):
            box["step"] = step

    def make(out):
        return small_trainer(out, compute_metrics={"score": score}, metric_for_best_model="score", eval_interval=4,
                             max_steps=16, save_total_limit=4, callbacks=[Step()])

    full = make(tmp_path / "full")
    full.train(epochs=3)
    again = make(tmp_path / "again")
    res = again.train(epochs=3, resume_from=tmp_path / "full" / "checkpoint-8")
    assert res["best_step"] == 8 and saved_step(tmp_path / "again" / "best_model") == 8
    want = load_weights_dict(tmp_path / "full" / "best_model")
    for name, value in unique_state_dict(again.model).items():
        assert torch.equal(value, want[name]), name
