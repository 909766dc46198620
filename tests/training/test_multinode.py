"""torchrun --nnodes 2 --nproc-per-node 2 on localhost (two launchers meeting over 127.0.0.1, gloo): a streamed
token-file run where one process per node writes that node's token files, ranks end with identical weights,
rank 0 alone writes checkpoints, and a resume from a step checkpoint repeats the uninterrupted run's losses."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training import Trainer, create_dataloaders

    data, token_dir, ckpt, resume_from = sys.argv[1:5]
    text = open(data, encoding="utf-8").read()
    docs = text.split("\\n\\n")
    tok = CharTokenizer.from_texts(docs)
    train, val = create_dataloaders(docs[:-20], docs[-20:], tok, batch_size=4, max_length=32, streaming=True,
                                    token_dir=token_dir, seed=3)
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 2, "max_seq_len": 32, "dropout": 0.1})
    trainer = Trainer(model, train, val, learning_rate=3e-3, checkpoint_dir=ckpt, eval_interval=4, max_steps=8,
                      save_total_limit=2, compute_metrics="accuracy", progress=False, seed=5)
    res = trainer.train(epochs=1, resume_from=resume_from or None)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    with open(os.path.join(ckpt + "-ranks", f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"digest": digest, "steps": res["steps"], "world": trainer.world,
                   "local_rank": int(os.environ["LOCAL_RANK"]), "accuracy": [h["accuracy"] for h in res["history"]],
                   "windows": len(train.dataset), "batches": len(train.batch_sampler), "best_step": res["best_step"]}, f)
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path, ckpt, resume_from=""):
    """Runs SCRIPT on 2 "nodes" x 2 processes: two torchrun launchers, node 0 hosting the rendezvous."""
    script = tmp_path / "multinode_script.py"
    script.write_text(SCRIPT)
    (tmp_path / (ckpt + "-ranks")).mkdir()
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):  # each node's own token folder: a node-local disk
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", str(script),
               str(tmp_path / "corpus.txt"), str(tmp_path / f"node{node}-tokens"), str(tmp_path / ckpt), resume_from]
        procs.append(subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    ranks = [json.loads((tmp_path / (ckpt + "-ranks") / f"rank{r}.json").read_text()) for r in range(4)]
    losses = [json.loads(line) for line in (tmp_path / ckpt / "metrics.jsonl").read_text().splitlines()]
    return ranks, {r["step"]: r["loss"] for r in losses if "loss" in r}


@pytest.fixture
def corpus(tmp_path, texts):
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts), encoding="utf-8")


def test_two_nodes_of_two_processes_train_identically_and_resume(tmp_path, corpus):
    ranks, losses = two_nodes(tmp_path, "ckpt")
    assert [r["world"] for r in ranks] == [4] * 4 and [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    assert len({r["digest"] for r in ranks}) == 1  # DDP kept all four replicas identical
    assert {r["steps"] for r in ranks} == {8} and len({json.dumps(r["accuracy"]) for r in ranks}) == 1
    assert ranks[0]["batches"] >= 32  # 8 steps x 4 ranks, without padding the epoch
    # one writer a node: each node's folder holds its token files, no temporary leftovers
    for node in (0, 1):
        names = sorted(os.listdir(tmp_path / f"node{node}-tokens"))
        assert names == ["train.bin", "train.bin.json", "val.bin", "val.bin.json"], names
    # rank 0 alone wrote checkpoints: the step checkpoints, best_model and last, once each
    assert {"best_model", "checkpoint-4", "checkpoint-8", "last"} <= set(os.listdir(tmp_path / "ckpt"))
    assert sorted(losses) == list(range(1, 9))

    # resume from the step-4 checkpoint (into another folder): steps 5-8 repeat, bit for bit, on every rank
    again, resumed = two_nodes(tmp_path, "ckpt2", resume_from=str(tmp_path / "ckpt" / "checkpoint-4"))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in (5, 6, 7, 8)] == [losses[s] for s in (5, 6, 7, 8)]
    assert {r["digest"] for r in again} == {ranks[0]["digest"]}
    assert again[0]["accuracy"][-1] == ranks[0]["accuracy"][-1] and again[0]["best_step"] == ranks[0]["best_step"]
