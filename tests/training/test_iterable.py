"""The Trainer on a user's DataLoader over an IterableDataset: max_steps for a stream without a length, epochs for
one with a length, MLM masks kept off the model's random stream, and exact resume (the epoch is read again and
the batches already trained on are skipped)."""
import json

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from minillm.models import EncoderOnlyModel
from minillm.tokenizers import CharTokenizer
from minillm.training import Callback, Collator, Trainer


class Windows(IterableDataset):
    """Random windows of a token list, seeded by the epoch (set_epoch): `n` of them, or endless when n is None."""

    def __init__(self, ids, block, n=None):
        self.ids, self.block, self.n, self.epoch = ids, block, n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        i = 0
        while self.n is None or i < self.n:
            start = int(torch.randint(0, len(self.ids) - self.block, (1,), generator=g))
            yield self.ids[start:start + self.block]
            i += 1


class Sized(Windows):
    def __len__(self):
        return self.n


def setup(texts, n=None, sized=False):
    tok = CharTokenizer.from_texts(texts)
    ids = [i for t in texts for i in tok.encode(t, add_special_tokens=False)]
    ds = (Sized if sized else Windows)(ids, 30, n)
    train = DataLoader(ds, batch_size=8, collate_fn=Collator(tok, "mlm"))
    val = DataLoader(Windows(ids, 30, 16), batch_size=8, collate_fn=Collator(tok, "mlm"))
    torch.manual_seed(0)
    model = EncoderOnlyModel({"model_type": "encoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 32, "dropout": 0.1})
    return model, train, val


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_endless_stream_needs_max_steps_and_resumes_exactly(texts, tmp_path):
    model, train, val = setup(texts)
    with pytest.raises(ValueError, match="needs max_steps"):
        Trainer(model, train, val, checkpoint_dir=None, progress=False).train(epochs=1)

    class Crash(Callback):
        def on_step(self, trainer, step, loss):
            if step == 7:
                raise KeyboardInterrupt  # after the step-4 checkpoint, as a kill would

    def run(out, resume=False, callbacks=()):
        model, train, val = setup(texts)
        trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=out, max_steps=12,
                          eval_interval=4, progress=False, seed=3, callbacks=callbacks)
        return trainer.train(epochs=1, resume=resume)

    res = run(tmp_path / "full")
    assert res["steps"] == 12 and res["epochs_completed"] == 0  # an endless epoch never completes
    want = losses(tmp_path / "full" / "metrics.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[Crash()])
    run(tmp_path / "cut", resume=True)
    got = losses(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(5, 13)] == [want[s] for s in range(5, 13)]  # dropout and masks as uninterrupted


def test_sized_stream_runs_epochs_with_accumulation(texts, tmp_path):
    model, train, val = setup(texts, n=40, sized=True)  # 5 batches an epoch
    trainer = Trainer(model, train, val, checkpoint_dir=None, progress=False, grad_accum_steps=2)
    assert trainer._total_steps(3) == 9  # ceil(5 / 2) optimizer steps an epoch
    res = trainer.train(epochs=3)
    assert res["steps"] == 9 and res["epochs_completed"] == 3 and len(res["history"]) == 3


def test_stream_with_no_full_batch_group_ends_the_epoch(texts, tmp_path):
    model, train, val = setup(texts, n=0, sized=True)
    res = Trainer(model, train, val, checkpoint_dir=None, progress=False, max_steps=3).train(epochs=2)
    assert res["steps"] == 0 and res["epochs_completed"] == 2
