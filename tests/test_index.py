"""FlatIndex behaves like FAISS's flat indexes; removal, filters, persistence, bad input."""
import threading

import numpy as np
import pytest
import torch

from minillm import FlatIndex

rng = np.random.default_rng(0)
X = rng.standard_normal((3000, 48)).astype(np.float32)
Q = rng.standard_normal((20, 48)).astype(np.float32)


@pytest.mark.parametrize("metric,faiss_cls", [("ip", "IndexFlatIP"), ("l2", "IndexFlatL2")])
def test_matches_faiss(metric, faiss_cls):
    faiss = pytest.importorskip("faiss")
    ref = getattr(faiss, faiss_cls)(48)
    ref.add(X)
    D_ref, I_ref = ref.search(Q, 10)
    index = FlatIndex(48, metric)
    index.add(X)
    D, I = index.search(Q, 10)
    np.testing.assert_allclose(D, D_ref, atol=1e-4, rtol=1e-4)
    # Identical ids up to ties: where ids differ, the scores must tie.
    differ = I != I_ref
    assert differ.mean() < 0.01
    np.testing.assert_allclose(D[differ], D_ref[differ], atol=1e-4)


def test_cosine_and_fp16_storage():
    index = FlatIndex(48, "cosine", dtype="float16")
    index.add(X * 7.0)  # scale does not matter for cosine
    D, I = index.search(Q, 5)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    exact = np.sort(Qn @ Xn.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(D, exact, atol=2e-3)
    assert index._vectors.dtype == np.float16


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_int8_storage_rescoring_gives_exact_results(metric):
    centres = rng.standard_normal((30, 48)).astype(np.float32)
    data = centres[rng.integers(0, 30, 3000)] + 0.3 * rng.standard_normal((3000, 48)).astype(np.float32)
    exact, quant = FlatIndex(48, metric), FlatIndex(48, metric, dtype="int8")
    for ix in (exact, quant):
        ix.add_with_ids(data, np.arange(3000) + 7)
        ix.remove_ids([7, 8, 2000])
    D, I = quant.search(Q, 10)
    D_ref, I_ref = exact.search(Q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref)]) >= 0.99
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-5)
    assert quant._arrays["codes"].dtype == np.int8 and quant.search(Q, 5, filter=[9, 10, 11])[1][0, 3] == -1


def test_int8_save_load_mmap_round_trip(tmp_path):
    index = FlatIndex(48, "ip", dtype="int8")
    index.add(X)
    index.remove_ids([5])
    index.save(tmp_path / "ix8")
    assert sorted(p.name for p in (tmp_path / "ix8").iterdir()) == [
        ".minillm.json", "codes.npy", "ids.npy", "index.json", "norm2.npy", "scales.npy", "vectors.npy"]
    loaded = FlatIndex.load(tmp_path / "ix8", mmap=True)
    assert isinstance(loaded._arrays["codes"], np.memmap)
    for a, b in zip(loaded.search(Q, 5), index.search(Q, 5)):
        np.testing.assert_array_equal(a, b)
    loaded.add_with_ids(X[5:6], [5])  # a private copy of every array on the first write
    assert loaded.search(X[5], 1)[1][0] == 5


def test_fewer_than_k_and_empty():
    index = FlatIndex(4, "l2")
    D, I = index.search(np.ones((2, 4), np.float32), 3)
    assert (I == -1).all() and np.isinf(D).all() and (D > 0).all()
    index.add_with_ids(np.eye(4, dtype=np.float32)[:2], [10, 20])
    D, I = index.search(np.ones(4, np.float32), 3)
    assert I.tolist()[:2] in ([10, 20], [20, 10]) and I[2] == -1 and D[2] == np.inf
    ip = FlatIndex(4)
    ip.add(np.eye(4, dtype=np.float32)[:1])
    assert ip.search(np.ones(4, np.float32), 2)[0][1] == -np.inf


def test_remove_ids_keeps_other_ids_stable():
    index = FlatIndex(48)
    ids = np.arange(1000, 1000 + len(X))
    index.add_with_ids(X, ids)
    target = 1000 + 7
    assert index.search(X[7], 1)[1][0] == target
    assert index.remove_ids(np.arange(1000, 1100)) == 100
    assert index.ntotal == len(X) - 100
    assert index.search(X[500], 1)[1][0] == 1500  # moved rows keep their ids
    assert index.search(X[7], 1)[1][0] != target
    np.testing.assert_array_equal(index.reconstruct(1500), X[500])
    with pytest.raises(KeyError):
        index.reconstruct(target)
    assert index.remove_ids([1]) == 0
    new_ids = index.add(X[:2])
    assert new_ids.min() > ids.max()
    index.reset()
    assert index.ntotal == 0


def test_filter_returns_k_when_k_pass():
    index = FlatIndex(48)
    index.add(X)
    allowed = np.arange(0, 3000, 7)
    D, I = index.search(Q, 10, filter=allowed)
    assert (I >= 0).all() and np.isin(I, allowed).all()
    exact = np.sort(Q @ X[allowed].T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(D, exact, atol=1e-4)
    mask = np.zeros(index.ntotal, bool)
    mask[[3, 5]] = True
    D, I = index.search(Q[:1], 4, filter=mask)
    assert sorted(I[0][:2].tolist()) == [3, 5] and (I[0][2:] == -1).all()


def test_save_load_mmap_round_trip(tmp_path):
    index = FlatIndex(48, "l2")
    index.add_with_ids(X, np.arange(len(X)) * 3)
    index.remove_ids([0, 3])
    index.save(tmp_path / "ix")
    for mmap in (True, False):
        loaded = FlatIndex.load(tmp_path / "ix", mmap=mmap)
        assert loaded.ntotal == index.ntotal and isinstance(loaded._vectors, np.memmap) == mmap
        for a, b in zip(loaded.search(Q, 5), index.search(Q, 5)):
            np.testing.assert_array_equal(a, b)
    loaded.add_with_ids(X[:1], [999999])  # writable copy on first write
    assert loaded.search(X[0], 1)[1][0] in (999999,)
    (tmp_path / "ix" / "index.json").write_text('{"format": "minillm-flat-index", "version": 99}')
    with pytest.raises(ValueError, match="version"):
        FlatIndex.load(tmp_path / "ix")
    with pytest.raises(FileNotFoundError):
        FlatIndex.load(tmp_path / "nothing")


def test_damaged_ids_are_refused_on_load(tmp_path):
    index = FlatIndex(48)
    index.add(X[:10])
    index.save(tmp_path / "ix")
    ids = np.load(tmp_path / "ix" / "ids.npy")
    np.save(tmp_path / "ix" / "ids.npy", np.concatenate([ids[:9], ids[:1]]))  # id 0 twice, id 9 gone
    with pytest.raises(ValueError, match="duplicate ids"):
        FlatIndex.load(tmp_path / "ix")
    np.save(tmp_path / "ix" / "ids.npy", ids + 100)  # above next_id: a later add would reuse them
    with pytest.raises(ValueError, match="next_id"):
        FlatIndex.load(tmp_path / "ix")


def test_torch_in_torch_out():
    index = FlatIndex(48)
    index.add(torch.from_numpy(X))
    D, I = index.search(torch.from_numpy(Q), 3)
    assert isinstance(D, torch.Tensor) and I.dtype == torch.int64


def test_concurrent_searches_during_writes():
    index = FlatIndex(48)
    index.add_with_ids(X, np.arange(len(X)))
    want = index.search(Q, 5)[1]
    errors = []

    def reader():
        for _ in range(20):
            if not np.array_equal(index.search(Q, 5)[1], want):
                errors.append(1)

    def writer():
        for i in range(20):  # zero vectors score 0: never among the best of 3000 random rows
            index.add_with_ids(np.zeros((1, 48), np.float32), [10_000 + i])

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and index.ntotal == len(X) + 20


@pytest.mark.parametrize("call,exc,word", [
    (lambda ix: ix.add(np.ones((2, 5), np.float32)), ValueError, "(n, 48)"),
    (lambda ix: ix.search(np.ones((2, 5), np.float32), 1), ValueError, "(Q, 48)"),
    (lambda ix: ix.search(Q, 0), ValueError, "k must"),
    (lambda ix: ix.add(np.ones((2, 48), np.int32)), TypeError, "floating"),
    (lambda ix: ix.add_with_ids(X[:2], [1, 1]), ValueError, "duplicates"),
    (lambda ix: ix.add_with_ids(X[:2], [5, 6]) or ix.add_with_ids(X[:1], [5]), ValueError, "already"),
    (lambda ix: ix.add(np.full((1, 48), np.nan, np.float32)), ValueError, "NaN"),
    (lambda ix: ix.search(Q, 2, filter=np.ones(3, bool)), ValueError, "boolean filter"),
])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word.replace("(", r"\(").replace(")", r"\)")):
        call(FlatIndex(48))


def test_bad_construction():
    for kwargs, word in [({"dim": 0}, "dim"), ({"dim": 4, "metric": "dot"}, "metric"),
                         ({"dim": 4, "dtype": "bfloat16"}, "dtype")]:
        with pytest.raises(ValueError, match=word):
            FlatIndex(**kwargs)


def test_remove_ids_refuses_non_integers():
    index = FlatIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(TypeError, match="ids must be integers"):
        index.remove_ids([1.5])  # used to truncate to 1 and remove that vector
    with pytest.raises(TypeError, match="ids must be integers"):
        index.remove_ids(np.array([True]))
    assert index.ntotal == 4 and index.remove_ids([1]) == 1 and index.ntotal == 3


def test_a_huge_k_is_refused_before_allocating():
    index = FlatIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="more than the 4 stored vectors"):
        index.search(np.ones(4, dtype=np.float32), 2 ** 31)
    D, I = index.search(np.ones((2, 4), dtype=np.float32), 9)  # FAISS's padding where it is small
    assert I.shape == (2, 9) and (I[:, 4:] == -1).all()
