"""The command line: the seed's `--mode train` form, generate, extract, one-line errors, and train under torchrun."""
import os
import subprocess
import sys
import tempfile


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or tempfile.gettempdir(), env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                          timeout=300)


def test_train_generate_extract(text_file, tmp_path):
    ck = tmp_path / "ck"
    r = cli("--mode", "train", "--data_path", text_file, "--early_stopping_patience", "5", "--epochs", "2",
            "--tokenizer", "char", "--d_model", "32", "--num_layers", "1", "--num_heads", "2", "--max_seq_len", "64",
            "--checkpoint_dir", ck)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"epochs_completed": 2' in r.stdout and (ck / "best_model" / "model.safetensors").exists()
    r = cli("generate", "--model_path", ck / "best_model", "--prompt", "the cat", "--max_new_tokens", "20",
            "--seed", "0")
    assert r.returncode == 0 and "the cat" in r.stdout
    r = cli("extract", "--model_path", ck / "last", "--output_path", tmp_path / "inf", "--dtype", "bfloat16")
    assert r.returncode == 0 and (tmp_path / "inf" / "model.safetensors").exists()
    # continue with the default --max_length (256) on this 64-position model: clamped to 64, as train does;
    # a min_delta larger than any improvement stops it after the patience's evaluations
    r = cli("-v", "continue", "--model_path", ck / "best_model", "--data_path", text_file, "--epochs", "4",
            "--early_stopping_patience", "1", "--early_stopping_min_delta", "100", "--checkpoint_dir", tmp_path / "c2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "clamped to the model's max_seq_len 64" in r.stderr and '"epochs_completed": 2' in r.stdout


def test_errors_are_one_line(tmp_path):
    r = cli("train", "--data_path", tmp_path / "missing.txt")
    assert r.returncode == 2 and r.stderr.strip().startswith("minillm: error:") and len(r.stderr.splitlines()) == 1
    r = cli("generate", "--model_path", tmp_path, "--prompt", "x")
    assert r.returncode == 2 and "minillm: error:" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_every_flag():
    r = cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--data_path", "--early_stopping_patience", "--model_type", "--d_model", "--resume", "--max_steps"):
        assert flag in r.stdout


def test_damaged_model_files_give_one_line_errors(tmp_path):
    import json

    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer

    tok = CharTokenizer.from_texts(["the cat sat"])
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 16,
                              "num_heads": 2, "num_layers": 1, "max_seq_len": 16})
    damage = {
        "weights": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        "tokenizer key": lambda d: (d / "tokenizer.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "tokenizer.json").read_text()).items() if k != "chars"})),
        "config json": lambda d: (d / "config.json").write_text("{"),
        "tokenizer json": lambda d: (d / "tokenizer.json").write_text("[1, 2"),
        # the tokenizers library's own parse errors are a bare Exception
        "hf tokenizer": lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}'),
        "bpe inner tokenizer": lambda d: (d / "tokenizer.json").write_text(
            '{"type": "bpe", "special_tokens": {}, "tokenizer": {"model": 5}}'),
        "char tokenizer types": lambda d: (d / "tokenizer.json").write_text('{"type": "char", "chars": 5}'),
        "config types": lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "d_model": "wide"})),
        "config not an object": lambda d: (d / "config.json").write_text("[16, 2]"),
        "weights of other shapes": lambda d: (bigger.save_pretrained(d / "other"),
                                              (d / "other" / "model.safetensors").replace(d / "model.safetensors")),
    }
    bigger = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                               "num_heads": 2, "num_layers": 1, "max_seq_len": 16})
    for name, hurt in damage.items():
        d = tmp_path / name.replace(" ", "_")
        model.save_pretrained(d, tokenizer=tok)
        hurt(d)
        r = cli("generate", "--model_path", d, "--prompt", "the", "--max_new_tokens", "2")
        assert r.returncode == 2 and r.stderr.startswith("minillm: error:"), (name, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)


def test_train_under_torchrun_streams_rotates_and_monitors_a_metric(text_file, tmp_path):
    """`torchrun -m minillm train`: the same command on 2 processes, token files written once, one process
    printing, step checkpoints rotated, best_model/ following --metric_for_best_model."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ck = tmp_path / "ck"
    args = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "minillm", "train",
            "--data_path", text_file, "--tokenizer", "char", "--d_model", "32", "--num_layers", "1", "--num_heads", "2",
            "--max_seq_len", "32", "--max_length", "32", "--batch_size", "4", "--max_steps", "4", "--eval_interval",
            "2", "--save_total_limit", "1", "--compute_metrics", "accuracy", "perplexity", "--metric_for_best_model",
            "accuracy", "--streaming", "--token_dir", tmp_path / "tokens", "--checkpoint_dir", ck]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *map(str, args)], capture_output=True,
                       text=True, cwd=tempfile.gettempdir(), timeout=300,
                       env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["steps"] == 4 and printed[0]["metric_for_best_model"] == "accuracy"
    assert sorted(os.listdir(tmp_path / "tokens")) == ["train.bin", "train.bin.json", "val.bin", "val.bin.json"]
    names = set(os.listdir(ck))
    assert {"checkpoint-4", "best_model", "last"} <= names and "checkpoint-2" not in names
    evals = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["accuracy"] <= 1 for e in evals)
    best = max(evals, key=lambda e: e["accuracy"])
    assert printed[0]["best_step"] == best["step"] and printed[0]["best_metric"] == best["accuracy"]
