"""Small deterministic corpora for the training tests."""
import random

import pytest

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
