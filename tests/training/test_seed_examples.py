"""The seed document's training, early-stopping, extraction and fine-tuning examples, with only the
`minillm.` prefix added to their imports (epochs and file paths shortened to fit a test)."""
import os

import pytest


@pytest.fixture
def workdir(tmp_path, text_file, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text(text_file.read_text())
    (tmp_path / "data" / "new_data.txt").write_text(text_file.read_text()[::-1])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_seed_examples_run(workdir):
    # --- "Training an Encoder-Only Model" ---
    from minillm.models.encoder_model import EncoderOnlyModel
    from minillm.tokenizers.bpe_tokenizer import BPETokenizer
    from minillm.training.data_utils import create_dataloaders, load_and_split_data
    from minillm.training.enhanced_trainer import Trainer

    train_texts, val_texts, _ = load_and_split_data(
        file_path="./data/train.txt", split_method="paragraph", val_split=0.1, test_split=0.0)
    tokenizer = BPETokenizer(vocab_size=10000)
    tokenizer.train(train_texts)
    tokenizer.save("./data/tokenizer.json")
    train_dataloader, val_dataloader = create_dataloaders(
        train_texts=train_texts, val_texts=val_texts, tokenizer=tokenizer, batch_size=16, max_length=512)
    config = {"model_type": "encoder_only", "vocab_size": tokenizer.vocab_size, "d_model": 256, "num_heads": 4,
              "num_layers": 4, "d_ff": 1024, "max_seq_len": 512, "dropout": 0.1}
    model = EncoderOnlyModel(config)
    trainer = Trainer(model=model, train_dataloader=train_dataloader, val_dataloader=val_dataloader,
                      learning_rate=1e-3, checkpoint_dir="./checkpoints/encoder_model", early_stopping_patience=5)
    results = trainer.train(epochs=2)
    if results["early_stopped"]:
        print(f"Training stopped early after {results['epochs_completed']} epochs")
    assert results["epochs_completed"] == 2

    # --- "Early Stopping Functionality" (decoder, cpu) with the seed's Trainer arguments ---
    from minillm.models import DecoderOnlyModel

    gpt = DecoderOnlyModel({**config, "model_type": "decoder_only", "d_model": 64, "num_layers": 2, "d_ff": 128})
    train_dataloader, val_dataloader = create_dataloaders(train_texts, val_texts, tokenizer, batch_size=16,
                                                          max_length=128)
    trainer = Trainer(model=gpt, train_dataloader=train_dataloader, val_dataloader=val_dataloader,
                      learning_rate=1e-3, checkpoint_dir="./checkpoints", device="cpu",
                      early_stopping_patience=5, early_stopping_min_delta=0.01)
    results = trainer.train(epochs=2)
    assert "early_stopped" in results

    # --- "Model Extraction and Retraining" ---
    from minillm.training.model_extraction import (continue_training, extract_model_for_inference,
                                                   load_model_and_tokenizer)

    model, tokenizer = load_model_and_tokenizer(model_path="./checkpoints/best_model",
                                                tokenizer_path="./data/tokenizer.json", device="cpu")
    results = continue_training(model_path="./checkpoints/best_model", train_dataloader=train_dataloader,
                                val_dataloader=val_dataloader, learning_rate=1e-4, epochs=1,
                                checkpoint_dir="./checkpoints/continued", early_stopping_patience=3)
    extracted_path = extract_model_for_inference(model_path="./checkpoints/best_model",
                                                 output_path="./models/inference_model", device="cpu")
    assert os.path.isdir(extracted_path)

    # --- "Fine-tuning a Pre-trained Model" ---
    train_texts, val_texts, _ = load_and_split_data(file_path="./data/new_data.txt", split_method="paragraph",
                                                    val_split=0.1, test_split=0.0)
    tokenizer = BPETokenizer.load("./data/tokenizer.json")
    train_dataloader, val_dataloader = create_dataloaders(train_texts=train_texts, val_texts=val_texts,
                                                          tokenizer=tokenizer, batch_size=16, max_length=128)
    results = continue_training(model_path="./checkpoints/best_model", train_dataloader=train_dataloader,
                                val_dataloader=val_dataloader, learning_rate=5e-5, epochs=1,
                                checkpoint_dir="./checkpoints/fine_tuned", early_stopping_patience=3)
    assert results["epochs_completed"] == 1
