"""fp16 autocast with a GradScaler (on CPU here; the same code serves CUDA): training runs, an overflowing step is
skipped with the scale halved and the schedule held, and the scale is checkpointed so a resume is exact."""
import json

import pytest
import torch

from minillm.training import Callback


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_fp16_trains_and_resumes_exactly_with_its_loss_scale(small_trainer, tmp_path):
    class Crash(Callback):
        def on_step(self, trainer, step, loss):
            if step == 7:
                raise KeyboardInterrupt

    def make(out, **kw):  # a first scale so large that early steps overflow: the scale matters to the losses
        trainer = small_trainer(out, fp16=True, eval_interval=4, max_steps=10, **kw)
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_interval=3)
        return trainer

    full = make(tmp_path / "full")
    assert full.scaler.is_enabled() and full._autocast().fast_dtype == torch.float16
    res = full.train(epochs=2)
    want = losses(tmp_path / "full" / "metrics.jsonl")
    assert res["steps"] == 10 and all(map(torch.isfinite, map(torch.tensor, want.values())))
    assert want[10] < want[1]
    saved = torch.load(tmp_path / "full" / "last" / "optimizer.pt", weights_only=True)
    assert saved["scaler"]["scale"] == full.scaler.get_scale() < 2.0 ** 40  # it overflowed

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", callbacks=[Crash()]).train(epochs=2)
    resumed = make(tmp_path / "cut")
    resumed.train(epochs=2, resume=True)
    got = losses(tmp_path / "cut" / "metrics.jsonl")
    assert [got[s] for s in range(5, 11)] == [want[s] for s in range(5, 11)]
    assert resumed.scaler.get_scale() == full.scaler.get_scale()


def test_an_overflowing_fp16_step_is_skipped(small_trainer, tmp_path):
    trainer = small_trainer(tmp_path, fp16=True, max_steps=4, eval_interval=4, grad_clip=None)
    param = next(trainer.model.parameters())
    calls = {"n": 0}

    def poison(grad):  # the third backward's gradient overflows
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

    param.register_hook(poison)
    seen = []

    class Watch(Callback):
        def on_step(self, trainer, step, loss):
            seen.append((step, param.detach().clone(), trainer.scaler.get_scale(), trainer.scheduler.last_epoch))

    trainer.callbacks.append(Watch())
    trainer.train(epochs=1)
    (_, w2, s2, e2), (_, w3, s3, e3), (_, w4, s4, e4) = seen[1:]
    assert torch.equal(w3, w2) and s3 == s2 / 2 and e3 == e2  # skipped: weights, schedule held; scale halved
    assert not torch.equal(w4, w3) and s4 == s3 and e4 == e3 + 1


def test_bf16_and_fp16_together_are_refused(small_trainer, tmp_path):
    with pytest.raises(ValueError, match="bf16 and fp16"):
        small_trainer(tmp_path, fp16=True, bf16=True)
