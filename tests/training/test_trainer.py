"""Trainer: results, early stopping, best weights, checkpoints, metrics."""
import json
import math

import pytest
import torch

from minillm.models import DecoderOnlyModel, EncoderOnlyModel, from_pretrained
from minillm.tokenizers import CharTokenizer
from minillm.training import Trainer, create_dataloaders

CFG = {"d_model": 32, "num_heads": 2, "num_layers": 2, "max_seq_len": 48, "dropout": 0.0}


def setup(texts, model_type="decoder_only", **loader_kw):
    tok = CharTokenizer.from_texts(texts)
    train, val = create_dataloaders(texts[:200], texts[200:], tok, batch_size=16, max_length=48, **loader_kw)
    cls = DecoderOnlyModel if model_type == "decoder_only" else EncoderOnlyModel
    torch.manual_seed(0)
    return cls({"model_type": model_type, "vocab_size": tok.vocab_size, **CFG}), tok, train, val


def test_training_improves_and_reports(texts, tmp_path):
    model, tok, train, val = setup(texts)
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path, progress=False)
    res = trainer.train(epochs=3)
    assert set(res) >= {"early_stopped", "epochs_completed", "best_val_loss", "best_epoch", "history"}
    assert res["epochs_completed"] == 3 and not res["early_stopped"]
    vals = [h["val_loss"] for h in res["history"]]
    assert vals[-1] < vals[0] and res["best_val_loss"] == min(vals)
    for name in ("best_model", "last"):
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert files == {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json",
                         ".minillm.json"}  # the marker: a folder minillm wrote, which a later save may replace
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(1, res["steps"] + 1))
    assert isinstance(from_pretrained(tmp_path / "best_model"), DecoderOnlyModel)


def test_early_stopping_counts_evaluations_and_restores_best(texts, tmp_path):
    model, tok, train, val = setup(texts)
    # min_delta so large that nothing after the first evaluation counts as an improvement.
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path, early_stopping_patience=2,
                      early_stopping_min_delta=100.0, progress=False)
    res = trainer.train(epochs=10)
    assert res["early_stopped"] and res["epochs_completed"] == 3 and res["best_epoch"] == 1
    best = from_pretrained(tmp_path / "best_model")
    for a, b in zip(best.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # restore_best_weights


def test_nan_is_never_an_improvement(texts, monkeypatch):
    model, tok, train, val = setup(texts)
    trainer = Trainer(model, train, val, checkpoint_dir=None, early_stopping_patience=2, progress=False)
    seq = iter([1.0, math.nan, math.nan, 0.5])
    monkeypatch.setattr(trainer, "evaluate_metrics", lambda loader=None: {"loss": next(seq)})
    res = trainer.train(epochs=4)
    assert res["early_stopped"] and res["best_val_loss"] == 1.0 and res["epochs_completed"] == 3


def test_without_validation_monitors_training_loss(texts):
    model, tok, train, _ = setup(texts)
    res = Trainer(model, train, None, learning_rate=3e-3, checkpoint_dir=None, eval_interval=5, max_steps=20,
                  progress=False).train(epochs=5)
    assert res["steps"] == 20 and len(res["history"]) == 4
    assert res["best_val_loss"] == min(h["train_loss"] for h in res["history"])


def test_grad_accumulation_and_bf16_and_mlm(texts):
    model, tok, train, val = setup(texts, "encoder_only")
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=None, grad_accum_steps=3, bf16=True,
                      progress=False)
    res = trainer.train(epochs=1)
    assert train.collate_fn.task == "mlm"
    assert res["steps"] == math.ceil(len(train) / 3) and math.isfinite(res["best_val_loss"])


def test_bad_arguments(texts):
    model, tok, train, val = setup(texts)
    with pytest.raises(ValueError, match="learning_rate"):
        Trainer(model, train, val, learning_rate=0)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        Trainer(model, train, val, early_stopping_patience=0)
    with pytest.raises(TypeError, match="DataLoader"):
        Trainer(model, [1, 2], val)
    with pytest.raises(ValueError, match="epochs"):
        Trainer(model, train, val, checkpoint_dir=None, progress=False).train(epochs=0)


def test_resume_survives_torn_metrics_lines(texts, tmp_path, caplog):
    # A crash mid-append (full disk, power loss) leaves a torn line: resume drops it, says so once, and the
    # file is whole again; before, json.loads failed on it and every resume failed.
    model, tok, train, val = setup(texts)
    Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path, progress=False, max_steps=10,
            eval_interval=5).train(epochs=1)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text() + '{"step": 11, "lo')
    model, tok, train, val = setup(texts)
    with caplog.at_level("WARNING", logger="minillm.training"):
        res = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path, progress=False, max_steps=15,
                      eval_interval=5).train(epochs=2, resume=True)
    assert res["steps"] == 15
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 2 line(s)" in warnings[0]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))


def test_appending_after_a_torn_line_starts_a_new_line(texts, tmp_path):
    model, tok, train, val = setup(texts)
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a previous run died mid-append
    Trainer(model, train, val, checkpoint_dir=tmp_path, metrics_file=metrics, progress=False, max_steps=2).train()
    lines = metrics.read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo' and all(json.loads(line)["step"] for line in lines[2:])


def test_checkpoints_keep_every_gpus_rng_state(texts, tmp_path, monkeypatch):
    # A GPU machine stood in for: the checkpoint saves what torch.cuda.get_rng_state_all() returns and the load
    # hands it back to set_rng_state_all (only the CPU generator was saved before).
    from minillm.training import checkpoint as ckpt

    model, tok, train, val = setup(texts)
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(tmp_path / "c", model, tok, opt, None, {"step": 3})
    assert ckpt.load_checkpoint(tmp_path / "c", model, opt)["step"] == 3
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


def _mark_worker(worker_id):  # a user's worker_init_fn: module level, so spawned workers can load it
    import os
    import tempfile

    open(os.path.join(tempfile.gettempdir(), f"minillm-worker-{os.getppid()}-{worker_id}"), "w").close()


def test_the_user_dataloaders_workers_load_the_batches(texts, tmp_path):
    # num_workers and worker_init_fn of the user's DataLoader are used (they were ignored: every batch was
    # collated in the main process), and the losses do not depend on them: each batch's MLM masks come from
    # a generator seeded by (seed, epoch, batch), wherever it is collated.
    import glob
    import os
    import tempfile

    losses = {}
    for workers in (0, 2):
        model, tok, train, val = setup(texts, model_type="encoder_only", task="mlm")
        train = torch.utils.data.DataLoader(train.dataset, batch_size=16, shuffle=True, generator=train.generator,
                                            collate_fn=train.collate_fn, num_workers=workers,
                                            worker_init_fn=_mark_worker)
        for f in glob.glob(os.path.join(tempfile.gettempdir(), f"minillm-worker-{os.getpid()}-*")):
            os.remove(f)
        trainer = Trainer(model, train, None, learning_rate=3e-3, checkpoint_dir=None, max_steps=6,
                          metrics_file=tmp_path / f"m{workers}.jsonl", progress=False)
        trainer.train(epochs=2)
        records = [json.loads(line) for line in (tmp_path / f"m{workers}.jsonl").read_text().splitlines()]
        losses[workers] = [r["loss"] for r in records if "loss" in r]
        marks = glob.glob(os.path.join(tempfile.gettempdir(), f"minillm-worker-{os.getpid()}-*"))
        assert len(marks) == workers, marks  # the workers ran (and the main process none)
        for f in marks:
            os.remove(f)
    assert len(losses[0]) == 6 and losses[0] == losses[2]


def test_gradient_checkpointing_trains_with_the_same_losses(texts, tmp_path):
    runs = []
    for ck in (False, True):
        model, tok, train, val = setup(texts)
        trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=tmp_path / str(ck), progress=False,
                          max_steps=8, gradient_checkpointing=ck)
        assert all(b.gradient_checkpointing == ck for b in model.blocks)
        trainer.train(epochs=1)
        lines = (tmp_path / str(ck) / "metrics.jsonl").read_text().splitlines()
        runs.append([json.loads(line)["loss"] for line in lines if '"loss"' in line])
    assert len(runs[0]) == 8
    for a, b in zip(*runs):
        assert a == pytest.approx(b, rel=1e-5)


def test_torch_compile_option_trains_as_eager(small_trainer, tmp_path):
    eager = small_trainer(tmp_path / "eager", max_steps=3, eval_interval=3)
    compiled = small_trainer(tmp_path / "compiled", max_steps=3, eval_interval=3, torch_compile=True)
    assert compiled.runner is not compiled.model and hasattr(compiled.runner, "_orig_mod")
    a, b = eager.train(epochs=1), compiled.train(epochs=1)
    assert b["history"][0]["train_loss"] == pytest.approx(a["history"][0]["train_loss"], rel=1e-5)
    assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=1e-5)


def test_epoch_plan_from_the_permutation_equals_iterating_the_sampler():
    """The Trainer builds an epoch's batches for torch's standard samplers from the permutation (8 bytes an index,
    no Python ints); they must be the batches iterating the sampler gives, for every rank, with padding."""
    import itertools

    from torch.utils.data import DataLoader, Dataset

    class Items(Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return [i]

    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 10, "d_model": 8, "num_heads": 2,
                              "num_layers": 1, "max_seq_len": 8})
    for n, bs, drop, shuffle, world in itertools.product([1, 7, 64, 1001], [1, 3, 32], [False, True], [True, False],
                                                         [1, 3]):
        for rank in range(world):
            loader = DataLoader(Items(n), batch_size=bs, shuffle=shuffle, drop_last=drop,
                                generator=torch.Generator().manual_seed(0), collate_fn=lambda x: x)
            trainer = Trainer(model, loader, None, checkpoint_dir=None, progress=False)
            trainer.world, trainer.rank = world, rank
            fast = trainer._epoch_batches(3)
            assert trainer._standard_plan(loader.batch_sampler, 3) is not None
            trainer._standard_plan = lambda *args: None  # the general path: iterate the batch sampler
            slow = trainer._epoch_batches(3)
            assert [fast[i] for i in range(len(fast))] == [slow[i] for i in range(len(slow))], (n, bs, drop, world)
            assert [fast.seed(i) for i in range(len(fast))] == [slow.seed(i) for i in range(len(slow))]
