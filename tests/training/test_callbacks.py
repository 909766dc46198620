"""Trainer callbacks: every hook with what it is given, a callback stopping the run, early stopping as one."""
import pytest

from minillm.training import Callback, EarlyStopping


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.state["step"]))

    def on_step(self, trainer, step, loss):
        self.events.append(("step", step, loss))
        return step == self.stop_at

    def on_evaluate(self, trainer, record):
        self.events.append(("evaluate", record["step"], record["val_loss"]))

    def on_save(self, trainer, path):
        self.events.append(("save", path.name))

    def on_train_end(self, trainer, results):
        self.events.append(("end", results["steps"]))


def test_every_hook_sees_the_run(small_trainer, tmp_path):
    rec = Recorder()
    res = small_trainer(tmp_path, eval_interval=5, max_steps=10, callbacks=[rec]).train(epochs=2)
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and rec.events[-1] == ("end", 10)
    assert [e[1] for e in rec.events if e[0] == "step"] == list(range(1, 11))
    assert [e[1] for e in rec.events if e[0] == "evaluate"] == [5, 10]
    assert [e[2] for e in rec.events if e[0] == "evaluate"] == [h["val_loss"] for h in res["history"]]
    saves = [e[1] for e in rec.events if e[0] == "save"]
    assert saves.count("last") == 2 and "best_model" in saves
    # the step's loss is the one logged
    logged = [e[2] for e in rec.events if e[0] == "step"]
    assert all(isinstance(x, float) for x in logged)


def test_a_callback_can_stop_the_run(small_trainer, tmp_path):
    rec = Recorder(stop_at=7)
    res = small_trainer(tmp_path, eval_interval=5, max_steps=40, callbacks=[rec]).train(epochs=5)
    assert res["steps"] == 7 and res["early_stopped"]
    assert [e[1] for e in rec.events if e[0] == "evaluate"] == [5, 7]  # the final evaluation still happens
    assert (tmp_path / "last").is_dir()


def test_early_stopping_is_a_callback(small_trainer, tmp_path):
    by_arg = small_trainer(tmp_path / "a", eval_interval=2, early_stopping_patience=2,
                         early_stopping_min_delta=10.0).train(epochs=5)
    by_cb = small_trainer(tmp_path / "b", eval_interval=2, early_stopping_min_delta=10.0,
                        callbacks=[EarlyStopping(2)]).train(epochs=5)
    assert by_arg["early_stopped"] and by_cb["early_stopped"]
    assert by_arg["steps"] == by_cb["steps"] == 6  # the first evaluation sets the best; two more without improving
    assert [h["val_loss"] for h in by_arg["history"]] == [h["val_loss"] for h in by_cb["history"]]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)
    with pytest.raises(TypeError, match="Callback"):
        small_trainer(tmp_path / "c", callbacks=[object()])
