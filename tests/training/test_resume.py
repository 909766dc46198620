"""A run killed with SIGKILL and resumed gives the same per-step losses as an uninterrupted run, and a
kill in the middle of a checkpoint write leaves the previous checkpoint loadable."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from minillm.training.checkpoint import find_checkpoint

SCRIPT = textwrap.dedent('''
    import os, sys, time, random
    import torch
    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training import Trainer, create_dataloaders

    out, mode = sys.argv[1], sys.argv[2]
    words = "the cat sat on a mat while dogs ran in the park and birds sang".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(260)]
    tok = CharTokenizer.from_texts(texts)
    train, val = create_dataloaders(texts[:220], texts[220:], tok, batch_size=8, max_length=40, task="mlm", seed=5)
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 48, "dropout": 0.2})
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=out, eval_interval=5, max_steps=45,
                      progress=False, seed=7)
    if mode == "slow":  # leave the parent time to kill us mid-run
        step = trainer._optimizer_step
        trainer._optimizer_step = lambda loss: (time.sleep(0.15), step(loss))
    if mode == "die_in_checkpoint":  # SIGKILL between the two renames of the step-15 'last' checkpoint
        import minillm.utils as ck
        real, calls = os.replace, []
        def replace(src, dst):
            real(src, dst)
            if os.path.basename(str(dst)).startswith(".last.old-"):
                calls.append(dst)
                if len(calls) == 2:
                    os.kill(os.getpid(), 9)
        ck.os.replace = replace
    trainer.train(epochs=4, resume=(mode == "resume"))
''')


def run(script, out, mode, **kw):
    return subprocess.Popen([sys.executable, str(script), str(out), mode], cwd=tempfile.gettempdir(),
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, **kw)


def step_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT)
    return path


def test_sigkill_and_resume_reproduce_every_step(script, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(script, full, "normal").wait(timeout=300) == 0
    proc = run(script, killed, "slow")
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists and training has moved past it
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(step_losses(metrics)) >= 18:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(step_losses(killed / "metrics.jsonl")) < 45, "the run finished before it was killed"
    assert run(script, killed, "resume").wait(timeout=300) == 0
    want, got = step_losses(full / "metrics.jsonl"), step_losses(killed / "metrics.jsonl")
    assert len(want) == 45 and got == want


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(script, tmp_path):
    out = tmp_path / "run"
    assert run(script, out, "die_in_checkpoint").wait(timeout=300) == -signal.SIGKILL
    assert not (out / "last").exists()  # killed between the renames
    # The new checkpoint was complete (fsynced, marked) before the swap began: it is the one to load, and the
    # previous one stays beside it until a save installs the new one.
    found = find_checkpoint(out / "last")
    assert found is not None and found.name.startswith(".last.new-")
    state = json.loads((found / "trainer_state.json").read_text())
    assert state["step"] == 15
    assert [p.name.startswith(".last.old-") for p in out.glob(".last.old-*")] == [True]
    # Resuming picks it up and finishes.
    assert run(script, out, "resume").wait(timeout=300) == 0
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 45
