"""minillm.utils: folder saves never remove what they did not write, and survive kill -9 at every step (of the
save, and of the recovery of an earlier crash); two processes saving one path take turns."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from minillm import FlatIndex
from minillm.rag import HashingEmbedder, SimpleDocumentStore
from minillm.training.checkpoint import save_checkpoint
from minillm.utils import MARKER_NAME, atomic_dir, find_dir


def _index(version: int) -> FlatIndex:
    index = FlatIndex(4, "ip")
    index.add(np.full((10 + version, 4), version, dtype=np.float32))
    return index


@pytest.mark.parametrize("what", ["index", "store", "checkpoint"])
def test_a_save_refuses_a_folder_it_did_not_write(tmp_path, what):
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("a user's work")
    with pytest.raises(FileExistsError, match="refusing to replace .*results.*choose a new or empty folder"):
        if what == "index":
            _index(1).save(user)
        elif what == "store":
            store = SimpleDocumentStore(64, embedder=HashingEmbedder(64))
            store.add_documents(["a"], ids=["a"])
            store.save(user)
        else:
            from minillm.models import DecoderOnlyModel
            model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 11, "d_model": 8, "num_heads": 2,
                                      "num_layers": 1, "max_seq_len": 8})
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            save_checkpoint(user, model, None, opt, None, {"step": 1})
    assert (user / "notes.txt").read_text() == "a user's work"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results.") and p.name != ".results.lock"]


def test_a_file_at_the_path_is_refused_and_kept(tmp_path):
    target = tmp_path / "index"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="a file or link is there"):
        _index(1).save(target)
    assert target.read_text() == "not a folder"


def test_replaces_its_own_folders_empty_folders_and_pre_marker_saves(tmp_path):
    path = tmp_path / "idx"
    path.mkdir()  # empty: fine
    _index(1).save(path)
    assert json.loads((path / MARKER_NAME).read_text()) == {"kind": "index", "complete": True}
    _index(2).save(path)
    assert _version(path) == 2
    os.unlink(path / MARKER_NAME)  # as minillm wrote it before the marker: only an index's own files
    _index(3).save(path)
    assert _version(path) == 3
    # A folder of another kind is not this save's to replace.
    store = SimpleDocumentStore(64, embedder=HashingEmbedder(64))
    store.save(tmp_path / "store")
    with pytest.raises(FileExistsError):
        _index(1).save(tmp_path / "store")
    assert SimpleDocumentStore.load(tmp_path / "store", embedder=HashingEmbedder(64)) is not None


def test_a_failure_inside_the_save_leaves_the_folder_untouched(tmp_path):
    path = tmp_path / "idx"
    _index(1).save(path)
    with pytest.raises(RuntimeError):
        with atomic_dir(path, "index") as new:
            (new / "index.json").write_text("{}")
            raise RuntimeError("disk full")
    assert _version(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx"]


# Version V of each kind of folder minillm saves: an index of 10 + V rows of V, a store of 10 + V documents "v V",
# a checkpoint whose state says step V and whose weights are all V.
MAKE = textwrap.dedent('''
    import numpy as np
    import torch
    from minillm import FlatIndex
    from minillm.models import DecoderOnlyModel
    from minillm.rag import HashingEmbedder, SimpleDocumentStore
    from minillm.training.checkpoint import save_checkpoint

    def save(kind, path, version):
        if kind == "index":
            index = FlatIndex(4, "ip")
            index.add(np.full((10 + version, 4), version, dtype=np.float32))
            index.save(path)
        elif kind == "store":
            store = SimpleDocumentStore(8, embedder=HashingEmbedder(8))
            store.add_documents([f"v {version}"] * (10 + version), ids=[str(i) for i in range(10 + version)])
            store.compute_embeddings(show_progress=False)
            store.save(path)
        else:
            model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": 11, "d_model": 8,
                                      "num_heads": 2, "num_layers": 1, "max_seq_len": 8})
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(version)
            save_checkpoint(path, model, None, torch.optim.SGD(model.parameters(), lr=0.1), None,
                            {"step": version})
''')
exec(MAKE)
KINDS = ["index", "store", "checkpoint"]
MARKER_FILE = {"index": "index.json", "store": "store.sqlite", "checkpoint": "trainer_state.json"}


def _version(path, kind="index") -> int:
    """Which version a loadable folder of `kind` holds, checking its files agree with each other."""
    if kind == "index":
        index = FlatIndex.load(path, mmap=False)
        v = index.ntotal - 10
        assert np.all(np.asarray(index._arrays["vectors"][: index.ntotal]) == v), "vectors of another version"
        return v
    if kind == "store":  # load checks that documents and vectors come from one save
        store = SimpleDocumentStore.load(path, embedder=HashingEmbedder(8), mmap=False)
        v = len(store) - 10
        assert {d["text"] for d in store.documents} == {f"v {v}"}, "documents of another version"
        return v
    from minillm.models import PreTrainedModel
    from minillm.training.checkpoint import load_weights_dict

    v = json.loads((path / "trainer_state.json").read_text())["step"]
    assert all(bool((t == v).all()) for t in load_weights_dict(path).values()), "weights of another version"
    assert isinstance(PreTrainedModel.from_pretrained(path), PreTrainedModel)
    return v


# A child process saving version V of a kind over `path`, killed (SIGKILL) right after its K-th step: a rename
# or a removal of a folder (the steps whose order matters). K = 0 kills nothing and prints how many steps there were.
SAVE_AND_DIE = MAKE + textwrap.dedent('''
    import os, shutil, sys
    import minillm.utils as u
    kind, path, version, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    steps = 0
    def step(fn):
        def wrapped(*args, **kwargs):
            global steps
            out = fn(*args, **kwargs)
            steps += 1
            if steps == die_at:
                os.kill(os.getpid(), 9)
            return out
        return wrapped
    u.os.replace = step(os.replace)
    u.shutil.rmtree = step(shutil.rmtree)
    save(kind, path, version)
    print(steps)
''')


def _save(script, kind, path, version, die_at=0):
    res = subprocess.run([sys.executable, str(script), kind, str(path), str(version), str(die_at)],
                         capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300)
    if die_at:
        assert res.returncode in (0, -signal.SIGKILL), res.stderr
        return res.returncode == -signal.SIGKILL
    assert res.returncode == 0, res.stderr
    return int(res.stdout.split()[-1])


@pytest.fixture
def saver(tmp_path):
    script = tmp_path / "save_and_die.py"
    script.write_text(SAVE_AND_DIE)
    return script


@pytest.mark.parametrize("kind", KINDS)
def test_kill_at_every_step_of_a_save_leaves_a_loadable_folder(saver, kind, tmp_path):
    save(kind, tmp_path / "probe", 1)
    steps = _save(saver, kind, tmp_path / "probe", 2)  # the steps of a save over a save
    assert steps >= 4
    for k in range(1, steps + 1):
        path = tmp_path / f"dir{k}"
        save(kind, path, 1)
        assert _save(saver, kind, path, 2, die_at=k), f"step {k} of {steps} was not reached"
        assert _version(find_dir(path, MARKER_FILE[kind]), kind) in (1, 2), k
        save(kind, path, 3)  # the next save recovers and succeeds
        assert _version(path, kind) == 3
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".dir{k}.")) == [f".dir{k}.lock"]


@pytest.mark.parametrize("kind", KINDS)
def test_kill_during_the_recovery_of_a_crash_loses_nothing(saver, kind, tmp_path):
    # First crash: between the two renames (no folder at the path: the previous one and the complete new one
    # beside it). Then a save that recovers it is killed at each of its steps: the complete data must survive.
    path = tmp_path / "dir"
    save(kind, path, 1)
    for k in range(1, 20):  # the step after which the path is gone: between the renames
        assert _save(saver, kind, path, 2, die_at=k)
        if not path.exists():
            break
        save(kind, path, 1)
    assert not path.exists() and _version(find_dir(path, MARKER_FILE[kind]), kind) == 2
    steps = 12
    for k in range(1, steps + 1):
        case = tmp_path / f"case{k}"
        case.mkdir()
        for p in list(tmp_path.glob(".dir.*")) + ([path] if path.exists() else []):
            subprocess.run(["cp", "-a", str(p), str(case / p.name)], check=True)
        target = case / "dir"
        died = _save(saver, kind, target, 3, die_at=k)
        got = _version(find_dir(target, MARKER_FILE[kind]), kind)
        assert got in (2, 3), f"killed at step {k}: version {got}"
        if not died:
            assert got == 3
            break
    else:
        pytest.fail("the recovering save never finished within 12 steps")


TWO_SAVERS = textwrap.dedent('''
    import sys
    import numpy as np
    from minillm import FlatIndex
    path, version = sys.argv[1], int(sys.argv[2])
    for i in range(12):
        index = FlatIndex(4, "ip")
        index.add(np.full((10 + version, 4), version, dtype=np.float32))
        index.save(path)
''')


def test_two_processes_saving_one_path_take_turns(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_SAVERS)
    path = tmp_path / "idx"
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(v)], cwd=tempfile.gettempdir(),
                              stderr=subprocess.PIPE, text=True) for v in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert _version(path) in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")) == [".idx.lock"]


def test_progress_bar_only_on_a_terminal_unless_asked(monkeypatch):
    import io

    from minillm.utils import progress_bar

    items = [1, 2, 3]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a CI log or a redirected file
    assert progress_bar(items, desc="x") is items
    assert progress_bar(total=3) is None
    bar = progress_bar(items, enabled=True, desc="x")  # asked for: shown anyway
    assert list(bar) == items and bar is not items
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress_bar(total=3, desc="x")
    assert bar is not None
    bar.close()
    assert progress_bar(items, enabled=False) is items
