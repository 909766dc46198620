"""RAGModel and the seed's RAG examples (with only the `minillm.` prefix added to the imports)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.models import DecoderOnlyModel
from minillm.rag import RAGModel, SimpleDocumentStore
from minillm.tokenizers import CharTokenizer

KB = ["Paris is the capital of France. It lies on the Seine.",
      "Berlin is the capital of Germany.",
      "Machine learning is the study of algorithms that improve with data.",
      "The Nile is a long river in Africa."]


@pytest.fixture
def parts():
    tok = CharTokenizer.from_texts(" ".join(KB) + "?:\nQCA")
    torch.manual_seed(0)
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 1, "max_seq_len": 160, "dropout": 0.0})
    store = SimpleDocumentStore(embedding_dim=256)
    store.add_documents(KB)
    store.compute_embeddings(show_progress=False)
    return store, model, tok


def test_retrieve_and_generate_with_sources(parts):
    store, model, tok = parts
    rag = RAGModel(store, model, tok)
    assert rag.retrieve("capital of France", top_k=1)[0]["text"].startswith("Paris")
    answer, sources = rag.generate("What is the capital of France?", top_k=2, max_length=20, temperature=0.0,
                                   return_sources=True)
    assert isinstance(answer, str) and sources and sources[0]["text"].startswith("Paris")
    assert all("score" in s for s in sources)


def test_prompt_drops_lowest_ranked_passages_to_fit(parts):
    store, model, tok = parts
    rag = RAGModel(store, model, tok)
    passages = store.search("capital", top_k=4)
    ids, kept = rag.build_prompt("capital?", passages, budget=120)
    assert len(ids) <= 120 and 0 < len(kept) < 4
    assert [p["id"] for p in kept] == [p["id"] for p in passages[:len(kept)]]  # best first, numbered in order
    assert [p["number"] for p in kept] == list(range(1, len(kept) + 1))
    for p, orig in zip(kept, passages):
        if p.get("truncated"):  # the last one may be cut at a token boundary
            assert p is kept[-1] and orig["text"].startswith(p["text"].removesuffix(" ..."))
        else:
            assert p["text"] == orig["text"]
    assert rag.render("capital?", kept).count("[1] ") == 1  # (this character tokenizer has no "[" to decode)
    # Generation leaves room for its own tokens inside the 160-token window.
    _, used = rag.generate("capital?", top_k=4, max_length=60, temperature=0.0, return_sources=True)
    assert len(used) < 4
    with pytest.raises(ValueError, match="no room"):
        rag.generate("capital?", max_length=160)


def test_rag_needs_a_decoder_and_a_tokenizer(parts):
    store, model, tok = parts
    with pytest.raises(ValueError, match="tokenizer"):
        RAGModel(store, model)
    with pytest.raises(TypeError, match="decoder-only"):
        RAGModel(store, torch.nn.Linear(2, 2), tok)


def test_seed_rag_examples(tmp_path, monkeypatch):
    """Both RAG examples of the seed document, verbatim apart from the imports' prefix and paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "knowledge_base.txt").write_text(
        "# Machine learning\n\nMachine learning is a field of study in artificial intelligence concerned with "
        "statistical algorithms that learn from data.\n\n# Geography\n\nParis is the capital of France. " * 3)
    tok = CharTokenizer.from_texts(open("data/knowledge_base.txt").read() + "?QCA:")
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tok.vocab_size, "d_model": 32,
                              "num_heads": 2, "num_layers": 1, "max_seq_len": 512, "dropout": 0.0})
    model.save_pretrained("./checkpoints/best_model", tokenizer=tok)

    from minillm.models.rag_utils import DocumentProcessor, RAGModel, SimpleDocumentStore

    doc_store = SimpleDocumentStore(embedding_dim=256)
    text = "Your long document text here..." * 20
    chunks = DocumentProcessor.split_text(text, method="semantic", min_length=50, max_length=500)
    doc_store.add_documents(chunks)
    doc_store.compute_embeddings()
    doc_store.save("./data/document_store.pkl")
    from minillm.training.model_extraction import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("./checkpoints/best_model")
    rag_model = RAGModel(doc_store, model)
    response = rag_model.generate(query="What is the capital of France?", top_k=3, max_length=100, temperature=0.7)
    assert isinstance(response, str)

    doc_store = SimpleDocumentStore(embedding_dim=256)
    with open("./data/knowledge_base.txt", "r") as f:
        text = f.read()
    chunks = DocumentProcessor.split_text(text, method="semantic", min_length=50, max_length=500)
    doc_store.add_documents(chunks)
    doc_store.compute_embeddings()
    rag_model = RAGModel(doc_store, model)
    response = rag_model.generate(query="What is machine learning?", top_k=3, max_length=200, temperature=0.7)
    print(response)
    assert isinstance(response, str)
    assert SimpleDocumentStore.load("./data/document_store.pkl").embedder.name == "hashing-256"


def test_cli_rag_index_and_query(tmp_path):
    import os
    import subprocess
    import sys
    import tempfile

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Rivers\n\nThe Nile is a long river in Africa flowing north.\n")
    (docs / "b.rst").write_text("Cities\n======\n\nParis is the capital of France and a large city.\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "minillm", "rag", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, cwd=tempfile.gettempdir(), env=env, timeout=300)
    r = run("index", "--docs", docs, "--store", tmp_path / "store", "--embedding_dim", "256", "--min_length", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("query", "--store", tmp_path / "store", "Which river is in Africa?", "--top-k", "1")
    assert r.returncode == 0 and "Nile" in r.stdout and "a.md" in r.stdout
    # Indexing again adds to the store: unchanged chunks keep their vectors, a changed file's chunks are updated
    # and its vanished ones removed; --rebuild starts afresh. Every method, with --pattern and --overlap.
    (docs / "a.md").write_text("# Rivers\n\nThe Amazon is the largest river in South America by volume.\n")
    (docs / "c.txt").write_text("Volcanoes erupt molten rock called lava.\n")
    r = run("index", "--docs", docs, "--store", tmp_path / "store", "--min_length", "10")
    assert r.returncode == 0 and "updated" in r.stdout and "3 chunks (+1, 2 embedded, 1 removed)" in r.stdout, \
        r.stdout + r.stderr[-2000:]
    r = run("query", "--store", tmp_path / "store", "Which river is in Africa?", "--top-k", "3", "--search_mode", "lexical")
    assert r.returncode == 0 and "Nile" not in r.stdout and "Amazon" in r.stdout
    r = run("index", "--docs", docs / "c.txt", "--store", tmp_path / "store", "--rebuild", "--method", "recursive",
            "--overlap", "5", "--min_length", "0", "--max_length", "20")
    assert r.returncode == 0 and "indexed" in r.stdout and "Amazon" not in run(
        "query", "--store", tmp_path / "store", "Amazon river").stdout
    r = run("index", "--docs", docs, "--store", tmp_path / "s2", "--method", "regex", "--pattern", "[.]",
            "--min_length", "0", "--embedding_dim", "256")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("query", "--store", tmp_path / "nowhere", "x")
    assert r.returncode == 2 and "minillm: error:" in r.stderr
    # --store naming a folder of the user's: refused in one line, nothing removed (it was deleted before).
    r = run("index", "--docs", docs, "--store", docs, "--embedding_dim", "256", "--min_length", "10")
    assert r.returncode == 2 and "minillm: error: refusing to replace" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in docs.iterdir()) == ["a.md", "b.rst", "c.txt"]
    # A damaged store.sqlite: one line and exit 2, not a traceback.
    (tmp_path / "store" / "store.sqlite").write_bytes(b"this is not a database" * 100)
    r = run("query", "--store", tmp_path / "store", "x")
    assert r.returncode == 2 and "minillm: error:" in r.stderr and "Traceback" not in r.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 200), top_k=st.integers(0, 4), question=st.text("abc ?", max_size=80))
def test_prompt_never_exceeds_its_budget(parts, budget, top_k, question):
    store, model, tok = parts
    rag = RAGModel(store, model, tok)
    ids, kept = rag.build_prompt(question, store.search("capital", top_k=top_k) if top_k else [], budget)
    assert len(ids) <= budget and len(kept) <= top_k
    assert all(len(tok.encode(p["text"])) >= 1 for p in kept)


def test_stream_gives_generate_s_text(parts):
    store, model, tok = parts
    rag = RAGModel(store, model, tok)
    want, sources = rag.generate("capital of France?", top_k=2, max_length=15, temperature=0.0, return_sources=True)
    pieces = list(rag.stream("capital of France?", top_k=2, max_length=15, temperature=0.0))
    assert "".join(pieces).strip() == want and rag.last_sources == sources
    closed = rag.generate("capital of France?", top_k=0, max_length=5, temperature=0.0, return_sources=True)
    assert closed[1] == []


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from minillm.models import smollm2_path
    from minillm.training import load_model_and_tokenizer

    try:
        path = smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model_and_tokenizer(path)


def test_chat_model_answers_from_numbered_sources(parts, smollm2):
    store, _, _ = parts
    model, tok = smollm2
    rag = RAGModel(store, model, tok)
    assert rag.chat
    ids, kept = rag.build_prompt("What is the capital of France?", store.search("capital of France", top_k=2), 4096)
    text = rag.render("What is the capital of France?", kept)
    assert ids == tok.encode(text) and len(kept) == 2
    assert "<|im_start|>system" in text and "[1] Paris is the capital" in text and "[2] " in text
    answer, sources = rag.generate("What is the capital of France?", top_k=2, max_length=24, temperature=0.0,
                                   return_sources=True)
    assert "Paris" in answer and sources[0]["number"] == 1
    # a window too small for both passages: the second is cut by tokens, and the prompt still fits
    ids, kept = rag.build_prompt("What is the capital of France?", store.search("capital of France", top_k=4), 90)
    assert len(ids) <= 90 and kept and len(kept) < 4


def test_cli_rag_generate_uses_smollm2_by_default(tmp_path, smollm2):
    import os
    import subprocess
    import sys
    import tempfile

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "facts.md").write_text("# Facts\n\nThe capital of France is Paris.\n\nThe Nile flows through Egypt.\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "minillm", "rag", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, cwd=tempfile.gettempdir(), env=env, timeout=600)
    assert run("index", "--docs", docs, "--store", tmp_path / "s", "--min_length", "0").returncode == 0
    r = run("query", "--store", tmp_path / "s", "What is the capital of France?", "--generate", "--temperature", "0",
            "--max_length", "20", "--top-k", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.split("answer:", 1)[1]
    assert "Paris" in answer and "[1] " in answer and "facts.md" in answer
