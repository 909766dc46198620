"""torchrun --nproc_per_node=2 on CPU (gloo): ranks stay identical, rank 0 alone writes checkpoints."""
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

SCRIPT = textwrap.dedent('''
    import hashlib, os, random, sys
    import torch
    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training import Trainer, create_dataloaders

    out = sys.argv[1]
    words = "the cat sat on a mat while dogs ran in the park".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(200)]
    tok = CharTokenizer.from_texts(texts)
    train, val = create_dataloaders(texts[:180], texts[180:], tok, batch_size=8, max_length=40)
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 48, "dropout": 0.1})
    whole = len(sys.argv) > 2  # whole epochs, evaluated at each epoch's end; else 10 steps, every 4th evaluated
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=os.path.join(out, "ckpt"),
                      eval_interval=None if whole else 4, max_steps=None if whole else 10, progress=False)
    res = trainer.train(epochs=2)
    assert len(res["history"]) == (2 if whole else 3), res["history"]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    with open(os.path.join(out, f"rank{os.environ['RANK']}.txt"), "w") as f:
        f.write(f"{digest} {res['steps']} {trainer.world} {len(train.batch_sampler)}\\n")
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, *args):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path), *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0 == r1, (r0, r1)
    assert (tmp_path / "ckpt" / "last" / "model.safetensors").is_file()
    return r0


def test_torchrun_two_ranks_stay_identical(tmp_path):
    assert torchrun(tmp_path)[1:3] == ["10", "2"]


def test_torchrun_whole_epochs_whose_batches_do_not_divide(tmp_path):
    # An odd number of batches: rank 0's share is one more than rank 1's. The epoch list is padded by one, so
    # both ranks run (n + 1) / 2 steps per epoch and meet at the end-of-epoch evaluation (before, rank 0 ran
    # one more step, whose gradient all-reduce met rank 1's evaluation all-reduce: a hang, or garbage).
    _, steps, world, batches = torchrun(tmp_path, "whole")
    assert int(batches) % 2 == 1 and world == "2"
    assert int(steps) == 2 * (int(batches) + 1) // 2
