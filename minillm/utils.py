"""Small helpers shared across minillm: atomic file writes and atomic folder saves."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, List, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX: saves of one path from two processes are not serialised
    fcntl = None

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a temporary file beside `path`, then renames it over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(Path(directory))  # the rename itself on disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


# A folder minillm writes with atomic_dir carries this marker: {"kind": ..., "complete": bool}. A save replaces
# only a folder it can tell minillm wrote (the marker, or, for folders saved before the marker existed, nothing
# but the files that kind of folder holds); anything else at the path is refused, never removed.
MARKER_NAME = ".minillm.json"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(folder: Path) -> Optional[dict]:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(folder: Path, kind: str, complete: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "complete": complete}) + "\n")

    atomic_write(folder / MARKER_NAME, write)


def _written_by_minillm(folder: Path, kind: str, names: Collection[str]) -> bool:
    """True for a folder a save of `kind` may replace: minillm's marker of that kind, an empty folder, or (saved
    before the marker existed) a folder holding nothing but names such a save writes."""
    marker = _read_marker(folder)
    if marker is not None:
        return marker.get("kind") == kind
    return all(entry.name in names for entry in folder.iterdir())


def _leftovers(path: Path, tag: str) -> List[Path]:
    """Folders earlier saves of `path` left beside it: .NAME.new-* / .NAME.old-* (and .NAME.new / .NAME.old, the
    fixed names of minillm before 0.1.1), oldest first."""
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.{tag}*")
             if p.is_dir() and not p.is_symlink() and (p.name == f".{path.name}.{tag}" or
                                                       p.name.startswith(f".{path.name}.{tag}-"))]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _complete(folder: Path) -> bool:
    return bool((_read_marker(folder) or {}).get("complete"))


@contextlib.contextmanager
def _path_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (a .NAME.lock file beside it, flock), for a whole save."""
    with open(path.parent / f".{path.name}.lock", "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _recover(path: Path, kind: str, names: Collection[str]) -> None:
    """Under the lock: finish a save a crash interrupted between its two renames (the complete new folder goes
    in), or undo one (the previous folder goes back), then remove what earlier saves left beside `path`."""
    if not path.exists() and not path.is_symlink():
        complete = [p for p in _leftovers(path, "new") if _complete(p)]
        previous = [p for p in _leftovers(path, "old") if _written_by_minillm(p, kind, names)]
        if complete or previous:
            os.replace((complete or previous)[-1], path)  # installed before anything is removed
            _fsync_dir(path.parent)
    for p in _leftovers(path, "new") + _leftovers(path, "old"):
        if _written_by_minillm(p, kind, names) or _complete(p):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: PathLike, kind: str, names: Collection[str] = ()) -> Iterator[Path]:
    """Yields a fresh folder to fill; on success it takes `path`'s place, atomically.

    `kind` names what is saved ("store", "index", "checkpoint"); `names` are the entries such a folder holds.
    Refused with FileExistsError, before anything is written: a `path` that is a file or a link, or a non-empty
    folder minillm did not write as this kind (no marker, and entries other than `names`). A save holds a lock
    file beside `path` (.NAME.lock) for its whole length, so two savers of one path take turns; the folder is
    filled under a unique temporary name, every file and the folder are fsynced, then a marker says it is
    complete and two renames swap it in (the parent folder fsynced after them). A crash at any moment leaves the
    previous folder at `path`, or, between the renames, the previous one and the complete new one beside it:
    find_dir() finds the latter, and the next save installs it before removing anything. A failure inside the
    block leaves `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = set(names) | {MARKER_NAME}
    with _path_lock(path):
        _recover(path, kind, names)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise FileExistsError(f"refusing to save a minillm {kind} to {path}: a file or link is there; "
                                  f"choose a new or empty folder")
        if path.is_dir() and not _written_by_minillm(path, kind, names):
            raise FileExistsError(f"refusing to replace {path}: it holds files a minillm {kind} save did not write "
                                  f"(it is not a saved minillm {kind}), and saving would remove them; choose a new "
                                  f"or empty folder")
        new = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
        try:
            _write_marker(new, kind, complete=False)
            yield new
            for f in sorted(new.rglob("*"), key=lambda p: -len(p.parts)):  # data on disk before the swap
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                elif f.is_dir():
                    _fsync_dir(f)
            _write_marker(new, kind, complete=True)
            _fsync_dir(new)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # onto the empty folder mkdtemp made: a unique name, one rename
        os.replace(new, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: PathLike, kind: str) -> bool:
    """Removes a complete folder minillm saved as `kind` (its marker says so); anything else is left alone and
    False returned. Under the path's save lock, the folder is first renamed to a hidden .NAME.del-* name (which
    no load or save reads), so a crash mid-removal never leaves a half-deleted folder under its own name."""
    path = Path(path)
    with _path_lock(path):
        marker = _read_marker(path) if path.is_dir() and not path.is_symlink() else None
        if not marker or marker.get("kind") != kind or not marker.get("complete"):
            return False
        doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.del-", dir=path.parent))
        os.replace(path, doomed)
        _fsync_dir(path.parent)
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        (path.parent / f".{path.name}.lock").unlink()
    except OSError:
        pass
    return True


def find_dir(path: PathLike, marker: str) -> Optional[Path]:
    """The folder a load should read: `path` if it holds `marker` (a file every save of that kind writes), else
    what a crash between atomic_dir's two renames left beside it: the complete new folder, then the previous
    one. Loads take no lock and change nothing."""
    path = Path(path)
    if (path / marker).is_file():
        return path
    if path.exists():
        return None
    for candidate in [p for p in reversed(_leftovers(path, "new")) if _complete(p)] + list(
            reversed(_leftovers(path, "old"))):
        if (candidate / marker).is_file():
            return candidate
    return None


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: Optional[bool] = None, **kwargs: Any):
    """A tqdm bar on stderr, or None. `enabled`: True shows it anywhere, False never, None (the default of
    minillm's long jobs) only when stderr is a terminal: redrawn lines (tqdm's carriage returns) would flood a CI
    log or a redirected file, where the jobs' logging lines say the same. kwargs go to tqdm (total, desc, ...).
    With an iterable, returns the wrapped iterable (the iterable itself when there is no bar)."""
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)

