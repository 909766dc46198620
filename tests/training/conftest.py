"""Small deterministic corpora for the training tests."""
import random

import pytest
import torch

WORDS = ("the cat sat on a mat while dogs ran in the park and birds sang over old trees near quiet water "
         "every morning people walk slowly past red houses").split()


def make_texts(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "." for _ in range(n)]


@pytest.fixture
def texts():
    return make_texts(240)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(make_texts(120)), encoding="utf-8")
    return path


@pytest.fixture
def small_trainer(texts):
    """small_trainer(out, **trainer_kwargs): a 2-layer character GPT on `texts` (200 train / 40 val, batches of 16,
    seeded), its Trainer writing to `out`."""
    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training import Trainer, create_dataloaders

    def make(out, **kw):
        tok = CharTokenizer.from_texts(texts)
        train, val = create_dataloaders(texts[:200], texts[200:], tok, batch_size=16, max_length=48, seed=2)
        torch.manual_seed(0)
        model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                                  "num_heads": 2, "num_layers": 2, "max_seq_len": 48, "dropout": 0.0})
        kw = {"learning_rate": 3e-3, "progress": False, "seed": 1, **kw}
        return Trainer(model, train, val, checkpoint_dir=out, **kw)

    return make
