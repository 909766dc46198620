"""SimpleDocumentStore: upsert, delete, incremental embedding, filters, persistence, crashes, threads."""
import json
import os
import pickle
import shutil
import sqlite3
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest

from minillm.rag import HashingEmbedder, SimpleDocumentStore

TEXTS = [f"document number {i} talks about {topic}" for i, topic in
         enumerate(["cats", "dogs", "python files", "sorting lists", "reading csv", "birds", "trees", "rivers"] * 5)]


class CountingEmbedder(HashingEmbedder):
    def __init__(self, dim=512):
        super().__init__(dim)
        self.seen = []

    def encode(self, texts, batch_size=256, show_progress=False):
        self.seen.extend(texts)
        return super().encode(texts, batch_size)


@pytest.fixture
def store():
    s = SimpleDocumentStore(embedding_dim=512, embedder=CountingEmbedder())
    s.add_documents(TEXTS, metadatas=[{"group": i % 4, "n": i} for i in range(len(TEXTS))],
                    ids=[f"d{i}" for i in range(len(TEXTS))])
    s.compute_embeddings(show_progress=False)
    return s


def test_search_by_text_and_vector(store):
    hits = store.search("python files", top_k=3)
    assert hits[0]["text"] == "document number 2 talks about python files"
    assert set(hits[0]) == {"id", "text", "score", "metadata"} and hits[0]["metadata"] == {"group": 2, "n": 2}
    vec = store.embedder.encode(["rivers"])[0]
    assert store.search(vec, top_k=1)[0]["text"].endswith("rivers")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_default_embedder_is_hashing_for_256(caplog, monkeypatch):
    from minillm.rag import embedders

    monkeypatch.setattr(embedders, "_logged", set())
    with caplog.at_level("INFO", logger="minillm.rag"):
        s = SimpleDocumentStore(embedding_dim=256)
        SimpleDocumentStore(embedding_dim=256)
    assert s.embedder.name == "hashing-256"
    lines = [r.getMessage() for r in caplog.records if "document store embedder" in r.getMessage()]
    assert len(lines) == 1 and "hashing-256" in lines[0] and "embedding_dim=384 picks all-MiniLM-L6-v2" in lines[0]
    with pytest.raises(ValueError, match="embedding_dim"):
        SimpleDocumentStore(embedding_dim=128, embedder=HashingEmbedder(512))


def test_upsert_delete_and_incremental_embedding(store):
    emb = store.embedder
    emb.seen.clear()
    store.add_documents(["document number 0 now talks about volcanoes"], metadatas=[{"group": 9}], ids=["d0"])
    store.add_documents([TEXTS[1]], metadatas=[{"group": 7}], ids=["d1"])  # same text: metadata only
    store.add_documents(["a brand new document"], ids=["new"])
    assert store.compute_embeddings(show_progress=False) == 2
    assert sorted(emb.seen) == ["a brand new document", "document number 0 now talks about volcanoes"]
    assert store.get("d1")["metadata"] == {"group": 7}
    # The metadata index follows updates and deletes.
    assert "d0" not in {h["id"] for h in store.search("cats", top_k=40, filter={"group": 0})}
    assert {h["id"] for h in store.search("cats", top_k=40, filter={"group": 9.0})} == {"d0"}
    assert {h["id"] for h in store.search("cats", top_k=40, filter={"group": [7, 9]})} == {"d0", "d1"}
    assert store.search("now talks about volcanoes", top_k=1)[0]["id"] == "d0"
    assert store.delete(["d0", "missing"]) == 1
    assert store.search("cats", top_k=5, filter={"group": 9}) == []
    assert all(h["id"] != "d0" for h in store.search("volcanoes", top_k=len(store)))
    assert len(store) == len(TEXTS) and {d["id"] for d in store.documents} == set(store._key_of)


def test_filter_inside_search_returns_top_k(store):
    hits = store.search("cats", top_k=5, filter={"group": 3})
    assert len(hits) == 5 and all(h["metadata"]["group"] == 3 for h in hits)
    hits = store.search("cats", top_k=4, filter={"group": [1, 2]})
    assert len(hits) == 4 and {h["metadata"]["group"] for h in hits} <= {1, 2}
    assert len(store.search("cats", top_k=3, filter=lambda m: m["n"] < 2)) == 2
    assert store.search("cats", top_k=3, filter={"group": 99}) == []


def test_save_load_round_trip_and_checks(store, tmp_path):
    path = tmp_path / "document_store.pkl"  # the seed's path: a folder in minillm's format
    store.save(path)
    assert (path / "store.sqlite").is_file() and (path / "index" / "vectors.npy").is_file()
    loaded = SimpleDocumentStore.load(path, embedder=CountingEmbedder())
    assert isinstance(loaded.index._vectors, np.memmap)
    assert loaded.search("python files", 3) == store.search("python files", 3)
    assert loaded.get("d5") == store.get("d5")
    with pytest.raises(ValueError, match="hashing-512"):
        SimpleDocumentStore.load(path, embedder=HashingEmbedder(32))
    loaded.add_documents(["fresh after load"], ids=["fresh"])  # a memory-mapped store still takes writes
    loaded.compute_embeddings(show_progress=False)
    assert loaded.search("fresh after load", 1)[0]["id"] == "fresh"


def test_a_folder_mixed_from_two_saves_is_refused(store, tmp_path):
    # index/ copied over from a later save of the same store: the documents would answer with other vectors.
    a, b = tmp_path / "a", tmp_path / "b"
    store.save(a)
    store.add_documents(["one more document"], ids=["x"])
    store.compute_embeddings(show_progress=False)
    store.save(b)
    shutil.rmtree(a / "index")
    shutil.copytree(b / "index", a / "index")
    with pytest.raises(ValueError, match="different saves"):
        SimpleDocumentStore.load(a, embedder=CountingEmbedder())
    # Without the snapshot tokens (a save from before them), the halves' ids are still compared.
    db = sqlite3.connect(a / "store.sqlite")
    db.execute("DELETE FROM meta WHERE key = 'snapshot'")
    db.commit()
    db.close()
    meta = json.loads((a / "index" / "index.json").read_text())
    del meta["snapshot"]
    (a / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="1 vectors without an embedded document"):
        SimpleDocumentStore.load(a, embedder=CountingEmbedder())
    # ...and one save's halves load, with or without the token.
    assert len(SimpleDocumentStore.load(b, embedder=CountingEmbedder())) == len(TEXTS) + 1
    shutil.rmtree(a)
    shutil.copytree(b, a)
    meta = json.loads((a / "index" / "index.json").read_text())
    del meta["snapshot"]
    (a / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="snapshot"):  # one half with the token, one without: not one save
        SimpleDocumentStore.load(a, embedder=CountingEmbedder())


def test_real_pickle_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "document_store.pkl"
    path.write_bytes(pickle.dumps({"documents": ["x"]}))
    with pytest.raises(ValueError, match="never loads pickles"):
        SimpleDocumentStore.load(path)


SAVE_AND_DIE = textwrap.dedent('''
    import os, sys
    import minillm.utils as u
    from minillm.rag import SimpleDocumentStore, HashingEmbedder
    path = sys.argv[1]
    store = SimpleDocumentStore.load(path, embedder=HashingEmbedder(512))
    store.add_documents(["a document added by the second save"] * 3, ids=["x1", "x2", "x3"])
    store.compute_embeddings(show_progress=False)
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if os.path.basename(str(dst)).startswith(".document_store.old-"):
            os.kill(os.getpid(), 9)  # between the two renames of the swap
    u.os.replace = replace
    store.save(path)
''')


def test_crash_during_save_leaves_previous_store_loadable(store, tmp_path):
    path = tmp_path / "document_store"
    store.save(path)
    script = tmp_path / "die.py"
    script.write_text(SAVE_AND_DIE)
    proc = subprocess.run([sys.executable, str(script), str(path)], cwd=tempfile.gettempdir())
    assert proc.returncode == -signal.SIGKILL
    # Killed between the renames: the new store was complete before the swap began, so it is what loads, and
    # the next save installs it before removing the previous one.
    loaded = SimpleDocumentStore.load(path, embedder=HashingEmbedder(512))
    assert len(loaded) == len(TEXTS) + 3 and loaded.get("x1") is not None
    loaded.save(path)
    again = SimpleDocumentStore.load(path, embedder=HashingEmbedder(512))
    assert len(again) == len(TEXTS) + 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".document_store")) == [
        ".document_store.lock"]


def test_concurrent_searches_and_writes(store):
    queries = ["cats", "dogs", "rivers", "python files"]
    want = {q: [h["id"] for h in store.search(q, 3)] for q in queries}
    errors = []

    def reader(q):
        for _ in range(30):
            got = [h["id"] for h in store.search(q, 3)]
            if got != want[q]:
                errors.append((q, got))

    def writer():
        for i in range(20):
            store.add_documents([f"unrelated filler text {i} zzz"], ids=[f"w{i}"])
            store.compute_embeddings(show_progress=False)

    threads = [threading.Thread(target=reader, args=(q,)) for q in queries * 2] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store) == len(TEXTS) + 20


def test_non_string_ids_are_converted_the_same_everywhere():
    s = SimpleDocumentStore(embedding_dim=256, embedder=HashingEmbedder(256))
    assert s.add_documents(["one", "two"], ids=[1, 2]) == ["1", "2"]
    assert s.get(1)["text"] == "one" and s.get("1")["text"] == "one"
    assert s.delete([1]) == 1 and s.get(1) is None
    assert s.delete(2) == 1 and len(s) == 0


def test_metadata_that_json_would_change_is_refused(tmp_path):
    s = SimpleDocumentStore(embedding_dim=256, embedder=HashingEmbedder(256))
    for bad, match in (({1: "x"}, "keys must be strings"), ({"t": (1, 2)}, "tuple"),
                       ({"a": {"b": {2: 0}}}, r"metadata\['a'\]\['b'\] keys"), ({"s": {1, 2}}, "JSON value"),
                       ("source", "must be a dict")):
        with pytest.raises(TypeError, match=match):
            s.add_documents(["x"], metadatas=[bad])
    assert len(s) == 0
    meta = {"a": {"b": [1, {"c": None}], "f": 1.5}, "ok": True, "n": 3}
    s.add_documents(["x"], metadatas=[meta], ids=["x"])
    s.save(tmp_path / "s")
    loaded = SimpleDocumentStore.load(tmp_path / "s", embedder=HashingEmbedder(256))
    assert loaded.get("x")["metadata"] == meta
    assert [h["id"] for h in loaded.search("x", top_k=1, filter={"n": 3})] == ["x"]


def test_top_k_beyond_the_documents_costs_nothing(store):
    import tracemalloc

    tracemalloc.start()
    hits = store.search("cats", top_k=2 ** 31)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(hits) == len(TEXTS) and peak < 64 << 20, peak  # was 8 GB of padding before the clamp
    assert len(store.search("cats", top_k=2 ** 31, filter={"group": 1})) == sum(i % 4 == 1 for i in range(len(TEXTS)))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            store.search("cats", top_k=bad)


@pytest.mark.parametrize("name", ["docs#1", "what?", "100% sure", "a b"])
def test_paths_with_uri_characters_save_and_load(tmp_path, name):
    s = SimpleDocumentStore(embedding_dim=256, embedder=HashingEmbedder(256))
    s.add_documents(["a river in Africa"], ids=["r"])
    s.save(tmp_path / name)
    loaded = SimpleDocumentStore.load(tmp_path / name, embedder=HashingEmbedder(256))
    assert loaded.get("r")["text"] == "a river in Africa"


def test_searches_racing_writes_on_100k_documents():
    # Readers search (text queries, filters) while a writer upserts changed texts, adds and deletes documents
    # and re-embeds. Every hit must be a consistent snapshot: its score is the cosine between the query and
    # its own text's embedding (a vector left from a replaced text would not be), and it passes the filter.
    topics = ["cats", "dogs", "rivers", "python files", "sorting lists", "reading csv", "birds", "trees",
              "mountains", "trains", "coffee", "tea", "rain", "snow", "music", "chess"]
    n = 100_000
    store = SimpleDocumentStore(embedding_dim=256)
    store.add_documents([f"document {i} about {topics[i % 16]} and {topics[i * 7 % 16]}" for i in range(n)],
                        metadatas=[{"group": i % 10} for i in range(n)], ids=[f"d{i}" for i in range(n)])
    store.compute_embeddings(show_progress=False)
    embed = store.embedder
    errors, stop = [], threading.Event()

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / max(np.linalg.norm(v), 1e-300)

    def reader(seed):
        try:
            search_until_stopped(np.random.default_rng(seed))
        except Exception as exc:  # a thread's exception must fail the test, not only print
            errors.append(repr(exc))

    def search_until_stopped(rng):
        searches = 0
        while not stop.is_set() or searches < 5:
            q = f"{topics[rng.integers(16)]} {topics[rng.integers(16)]}"
            group = int(rng.integers(10)) if rng.random() < 0.5 else None
            hits = store.search(q, 5, filter={"group": group} if group is not None else None)
            qv = unit(embed.encode([q])[0])
            for h in hits:
                score = float(unit(embed.encode([h["text"]])[0]) @ qv)
                if abs(score - h["score"]) > 1e-4 or (group is not None and h["metadata"]["group"] != group):
                    errors.append((q, group, h))
            if len(hits) != 5 or len({h["id"] for h in hits}) != 5:
                errors.append((q, group, "hits", [h["id"] for h in hits]))
            searches += 1

    def writer():
        try:
            for r in range(30):
                base = 1000 * r
                store.add_documents([f"changed {base + j} about {topics[j % 16]} rain" for j in range(50)],
                                    metadatas=[{"group": j % 10} for j in range(50)],
                                    ids=[f"d{base + j}" for j in range(50)])  # upserts: new texts
                store.add_documents([f"new {r}-{j} about {topics[j % 16]}" for j in range(50)],
                                    metadatas=[{"group": j % 10} for j in range(50)],
                                    ids=[f"n{r}-{j}" for j in range(50)])
                store.delete([f"d{base + 500 + j}" for j in range(50)])
                store.compute_embeddings(show_progress=False)
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(store) == n + 30 * 50 - 30 * 50 and store.index.ntotal == len(store) and store.pending() == 0


# ---- lexical and hybrid search ----
def _fts_ok(store):
    # FTS5's own check that the index holds exactly the documents' current words (raises otherwise); committed,
    # since an open transaction on the mirror would hold save()'s backup waiting
    with store._db:
        store._db.execute("INSERT INTO lexical(lexical, rank) VALUES ('integrity-check', 1)")


def _lexical_scores(store, query):
    return {h["id"]: round(h["score"], 9) for h in store.search(query, top_k=len(store) or 1, mode="lexical")}


def test_lexical_search_ranks_by_bm25_with_stemming(store):
    hits = store.search("rivers", top_k=3, mode="lexical")
    assert hits and all(h["text"].endswith("rivers") for h in hits) and hits[0]["score"] > 0
    assert store.search("river", top_k=1, mode="lexical")[0]["text"].endswith("rivers")  # Porter: river(s) -> river
    # FTS5's query syntax in a user's question is just words: no error, no operator
    assert store.search('NOT cats AND "dogs* NEAR(', top_k=2, mode="lexical")
    assert store.search("!!! ???", top_k=2, mode="lexical") == []
    assert [h["id"] for h in store.search("python files", 5, mode="lexical", filter={"group": 2})][0] == "d2"
    with pytest.raises(ValueError, match="must be text"):
        store.search(store.embedder.encode(["cats"])[0], mode="lexical")
    with pytest.raises(ValueError, match="mode must be one of"):
        store.search("cats", mode="bm25")


def test_hybrid_is_reciprocal_rank_fusion_of_both_rankings(store):
    from minillm.rag.store import HYBRID_DEPTH

    for query, weights in (("python files about cats", (1.0, 1.0)), ("reading rivers", (0.3, 2.0))):
        dense = [h["id"] for h in store.search(query, HYBRID_DEPTH, mode="dense")]
        lex = [h["id"] for h in store.search(query, HYBRID_DEPTH, mode="lexical")]
        fused = {}
        for ranking, w in zip((dense, lex), weights):
            for rank, doc in enumerate(ranking, 1):
                fused[doc] = fused.get(doc, 0) + w / (60 + rank)
        hits = store.search(query, top_k=7, mode="hybrid", weights=weights)
        assert [round(h["score"], 12) for h in hits] == sorted((round(s, 12) for s in fused.values()), reverse=True)[:7]
        assert all(abs(fused[h["id"]] - h["score"]) < 1e-12 for h in hits)


def test_lexical_index_follows_upserts_deletes_and_saves(store, tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "rivers", "cats"]
    for step in range(60):
        doc_id = f"d{rng.integers(0, 50)}"
        if rng.random() < 0.3:
            store.delete([doc_id])
        else:
            text = " ".join(rng.choice(words, size=rng.integers(1, 6)))
            store.add_documents([text], metadatas=[{"step": step}], ids=[doc_id])
    _fts_ok(store)
    fresh = SimpleDocumentStore(embedding_dim=512, embedder=CountingEmbedder())
    fresh.add_documents([d["text"] for d in store], metadatas=[d["metadata"] for d in store],
                        ids=[d["id"] for d in store])
    for query in ("alpha gamma", "rivers", "cats beta delta"):
        assert _lexical_scores(store, query) == _lexical_scores(fresh, query)
    store.save(tmp_path / "s")
    loaded = SimpleDocumentStore.load(tmp_path / "s", embedder=CountingEmbedder())
    _fts_ok(loaded)
    assert _lexical_scores(loaded, "alpha gamma") == _lexical_scores(store, "alpha gamma")
    assert loaded.get(where={"step": {"$gte": 0}}) == store.get(where={"step": {"$gte": 0}})
    loaded.add_documents(["omega after load"], ids=["o"])  # the loaded mirror takes writes
    assert loaded.search("omega", 1, mode="lexical")[0]["id"] == "o"


def test_a_version_1_store_loads_with_a_lexical_index(store, tmp_path):
    path = tmp_path / "v1"
    store.save(path)
    db = sqlite3.connect(path / "store.sqlite")  # what version 1 wrote: no FTS table
    db.execute("DROP TABLE lexical")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    db.commit()
    db.close()
    loaded = SimpleDocumentStore.load(path, embedder=CountingEmbedder())
    _fts_ok(loaded)
    assert _lexical_scores(loaded, "python files") == _lexical_scores(store, "python files")
    db = sqlite3.connect(path / "store.sqlite")  # a version-2 file without its index is damaged, not old
    db.execute("UPDATE meta SET value = '2' WHERE key = 'version'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="no lexical index"):
        SimpleDocumentStore.load(path, embedder=CountingEmbedder())


def test_crash_during_save_keeps_the_lexical_index(store, tmp_path):
    path = tmp_path / "document_store"
    store.save(path)
    script = tmp_path / "die.py"
    script.write_text(SAVE_AND_DIE)
    assert subprocess.run([sys.executable, str(script), str(path)], cwd=tempfile.gettempdir()).returncode < 0
    loaded = SimpleDocumentStore.load(path, embedder=HashingEmbedder(512))
    _fts_ok(loaded)
    assert {h["id"] for h in loaded.search("second save", 3, mode="lexical")} == {"x1", "x2", "x3"}


def test_precomputed_embeddings_search_batch_and_iteration(store):
    vecs = store.embedder.encode(["volcano one", "volcano two"])
    store.add_documents(["first", "second"], ids=["v1", "v2"], embeddings=vecs)
    assert store.pending() == 0 and store.search(vecs[1], 1)[0]["id"] == "v2"
    store.add_documents(["first"], ids=["v1"], embeddings=vecs[1:] * 3)  # replaces the vector, text unchanged
    assert {h["id"] for h in store.search(vecs[1], 2)} == {"v1", "v2"}
    with pytest.raises(ValueError, match=r"shape \(1, 512\)"):
        store.add_documents(["x"], embeddings=vecs)
    with pytest.raises(ValueError, match="NaN"):
        store.add_documents(["x"], embeddings=vecs[:1] * np.nan)
    queries = ["cats", "python files", "reading csv rivers"]
    for mode in ("dense", "lexical", "hybrid"):
        assert store.search_batch(queries, 4, mode=mode, where={"group": {"$ne": 1}}) == [
            store.search(q, 4, mode=mode, where={"group": {"$ne": 1}}) for q in queries]
    assert store.search_batch(store.embedder.encode(queries), 3) == [store.search(q, 3) for q in queries]
    import torch  # tensors too, bf16 included (numpy has no bf16: converted through float32)

    assert store.search_batch(torch.from_numpy(store.embedder.encode(queries)), 3) == store.search_batch(queries, 3)
    store.add_documents(["bf16 row"], ids=["b16"], embeddings=torch.from_numpy(vecs[:1]).bfloat16())
    assert store.pending() == 0 and store.search(torch.from_numpy(vecs[0]), 3)[0]["id"] == "b16"
    assert [d["id"] for d in store][:3] == ["d0", "d1", "d2"] and len(list(store)) == len(store)
    assert store.get(where={"n": {"$lt": 2}}, limit=1) == [store.get("d0")]
    assert store.delete(["d0", "d1"], where={"n": 1}) == 1 and store.get("d0") is not None


def test_lexical_and_hybrid_searches_racing_writes(store):
    # The SQLite mirror is one connection: searches from many threads and a writer must not interleave on it.
    errors = []

    def reader(q):
        try:
            for _ in range(40):
                for mode in ("lexical", "hybrid"):
                    hits = store.search(q, 3, mode=mode, where={"group": {"$in": [0, 1, 2, 3]}})
                    if mode == "lexical" and not all(q.split()[0] in h["text"] for h in hits):
                        errors.append((q, hits))
        except Exception as exc:  # a thread's exception must fail the test
            errors.append(repr(exc))

    def writer():
        for i in range(30):
            store.add_documents([f"racing filler {i} about cats"], metadatas=[{"group": i % 4}], ids=[f"r{i}"])
            store.delete(where={"group": 3, "n": {"$gte": 0}} if i == 15 else {"no": "match"})

    threads = [threading.Thread(target=reader, args=(q,)) for q in ("rivers", "python files", "cats")] + \
        [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _fts_ok(store)


def test_a_python_without_fts5_gets_a_clear_error(monkeypatch):
    # SQLite without FTS5 fails the probe's CREATE VIRTUAL TABLE; an unknown tokenizer fails it the same way.
    from minillm.rag import lexical

    monkeypatch.setattr(lexical, "TOKENIZE", "no_such_tokenizer")
    with pytest.raises(RuntimeError, match="lacks FTS5.*python.org"):
        SimpleDocumentStore(embedding_dim=64, embedder=HashingEmbedder(64))
