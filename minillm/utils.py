"""Small helpers shared across minillm: atomic file writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}"


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yields a fresh folder to fill; on success it replaces `path` with two renames.

    A crash at any moment leaves the old folder at `path`, or (between the renames) beside it as
    `.NAME.old`, which find_dir() returns; a failure inside the block leaves `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new, old = _sibling(path, "new"), _sibling(path, "old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        yield new
        for f in new.rglob("*"):  # data on disk before the folder becomes the real one
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def find_dir(path: PathLike, marker: str) -> Optional[Path]:
    """`path`, or the previous version a crash inside atomic_dir left beside it, if it holds `marker`."""
    path = Path(path)
    for candidate in (path, _sibling(path, "old")):
        if (candidate / marker).is_file():
            return candidate
    return None
