"""Trainer checkpoint options: step checkpoints with save_total_limit, and resume_from=PATH."""
import json

import pytest

from minillm.utils import remove_dir


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_save_total_limit_keeps_the_newest_step_checkpoints_and_never_a_users_folder(small_trainer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    theirs = out / "checkpoint-2"  # a folder minillm did not write, named like a step checkpoint
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    res = small_trainer(out, eval_interval=4, save_total_limit=2, max_steps=20).train(epochs=3)
    assert res["steps"] == 20
    steps = sorted(p.name for p in out.glob("checkpoint-*"))
    assert steps == ["checkpoint-16", "checkpoint-2", "checkpoint-20"]
    assert (theirs / "notes.txt").read_text() == "mine"
    assert (out / "best_model").is_dir() and (out / "last").is_dir()
    assert not list(out.glob(".checkpoint-*.del-*"))
    state = json.loads((out / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["step"] == 16
    assert remove_dir(theirs, "checkpoint") is False and theirs.is_dir()
    with pytest.raises(ValueError, match="save_total_limit"):
        small_trainer(tmp_path / "x", save_total_limit=0)


def test_resume_from_any_step_checkpoint_repeats_the_uninterrupted_run(small_trainer, tmp_path):
    full = tmp_path / "full"
    small_trainer(full, eval_interval=4, save_total_limit=10, max_steps=20).train(epochs=3)
    want = losses(full / "metrics.jsonl")
    assert sorted(want) == list(range(1, 21))
    again = tmp_path / "again"
    res = small_trainer(again, eval_interval=4, max_steps=20).train(epochs=3, resume_from=full / "checkpoint-8")
    got = losses(again / "metrics.jsonl")
    assert sorted(got) == list(range(9, 21))  # the steps after checkpoint-8, none before
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert res["steps"] == 20
    with pytest.raises(FileNotFoundError, match="no complete minillm checkpoint"):
        small_trainer(tmp_path / "y").train(epochs=1, resume_from=tmp_path / "nothing-here")


def test_resume_with_another_world_size_says_so(small_trainer, tmp_path, caplog):
    small_trainer(tmp_path, eval_interval=4, max_steps=4).train(epochs=1)
    state_file = tmp_path / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 4}))  # as if saved by a 4-process torchrun
    with caplog.at_level("WARNING", logger="minillm.training"):
        res = small_trainer(tmp_path, eval_interval=4, max_steps=8).train(epochs=1, resume=True)
    assert res["steps"] == 8 and "saved by a run of 4 processes, this one has 1" in caplog.text
