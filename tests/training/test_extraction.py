"""load_model_and_tokenizer, continue_training and extract_model_for_inference for all model types."""
import pytest
import torch

from minillm.models import build_model
from minillm.tokenizers import CharTokenizer
from minillm.training import (Trainer, continue_training, create_dataloaders, extract_model_for_inference,
                              load_model_and_tokenizer)


@pytest.mark.parametrize("model_type", ["decoder_only", "encoder_only", "transformer"])
def test_round_trip_for_every_model_type(texts, tmp_path, model_type):
    tok = CharTokenizer.from_texts(texts)
    task = "seq2seq" if model_type == "transformer" else "auto"
    data = [(t, t[::-1]) for t in texts] if task == "seq2seq" else texts
    train, val = create_dataloaders(data[:200], data[200:], tok, batch_size=16, max_length=48, task=task)
    model = build_model({"model_type": model_type, "vocab_size": tok.vocab_size, "d_model": 32, "num_heads": 2,
                         "num_layers": 1, "max_seq_len": 48, "dropout": 0.0})
    Trainer(model, train, val, checkpoint_dir=tmp_path / "ck", progress=False, max_steps=6).train(epochs=1)

    loaded, loaded_tok = load_model_and_tokenizer(tmp_path / "ck" / "best_model")
    assert type(loaded) is type(model) and loaded_tok.encode("cat") == tok.encode("cat")
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)

    out = extract_model_for_inference(tmp_path / "ck" / "last", tmp_path / "inference", dtype=torch.bfloat16)
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    assert size(out) < size(tmp_path / "ck" / "last")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    small, _ = load_model_and_tokenizer(out)
    assert next(small.parameters()).dtype == torch.bfloat16

    res = continue_training(tmp_path / "ck" / "last", train, val, learning_rate=1e-4, epochs=1,
                            checkpoint_dir=tmp_path / "cont", early_stopping_patience=3, progress=False, max_steps=4)
    assert res["steps"] == 4 and (tmp_path / "cont" / "best_model" / "model.safetensors").exists()


def test_missing_tokenizer_and_folder(texts, tmp_path):
    model = build_model({"model_type": "decoder_only", "vocab_size": 30, "d_model": 16, "num_heads": 2,
                         "num_layers": 1, "max_seq_len": 16})
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_model_and_tokenizer(tmp_path / "m")
    CharTokenizer.from_texts("abc").save(tmp_path / "tok.json")
    m, t = load_model_and_tokenizer(tmp_path / "m", tokenizer_path=tmp_path / "tok.json")
    assert t.vocab_size == 8
    with pytest.raises(FileNotFoundError, match="not a minillm model"):
        load_model_and_tokenizer(tmp_path / "nowhere")
