"""Files and folders a command is given: paths resolved once, outputs checked early, writes atomic.

Every writer in the package goes through `atomic_write` (one file) or `replace_folder` (a whole
report): a reader, a crash or a full disk never leaves a half-written output under its final
name, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO


def resolve(path: str) -> str:
    """The absolute form of a path as a user types it: `~` expanded, relative to the current folder.

    Symlinks are kept (not resolved), so the path the user sees is the path reports name; a
    trailing slash is dropped.
    """
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Writes `path` through `write(file)` under a hidden temporary name in its folder, then renames.

    The data is flushed and fsynced before the rename, so the new name never points at a partial
    file; on any failure the temporary file is removed and the old `path` (if any) is untouched.

    Raises:
      IsADirectoryError: `path` is a folder.
      OSError: the write failed (full disk, permissions); nothing is left behind.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; give a file name")
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """`atomic_write` of bytes."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    """`atomic_write` of UTF-8 text (newlines as given)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


@contextlib.contextmanager
def replace_folder(target: str) -> Iterator[str]:
    """Yields a fresh temporary folder beside `target`; on success it replaces `target` whole.

    Whatever `target` held before (an older report) stays intact until the new folder is complete,
    and is then swapped out in two renames and deleted. On failure the temporary folder is removed
    and `target` is left as it was.
    """
    parent, base = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield staging
        old = None
        if os.path.lexists(target):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
            os.rename(target, old)
        os.rename(staging, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_folder(path: str, option: str) -> str:
    """Resolves an output folder and checks it can be one before any work starts.

    Returns:
      The absolute path.

    Raises:
      ValueError: `path` names a file, or a folder (or its nearest existing parent) that is not
        writable.
    """
    path = resolve(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a file, not a folder; give a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable; choose another folder")
    return path


def check_not_inside(output: str, inputs: Sequence[str], option: str) -> None:
    """Raises ValueError if the output folder is, or is inside, one of the input folders.

    Writing there would mix outputs into the inputs (and re-read them on the next run) or, with
    --overwrite, replace the user's originals.
    """
    out = os.path.realpath(output)
    for given in inputs:
        source = os.path.realpath(resolve(given))
        if os.path.isdir(source) and (out == source or out.startswith(source.rstrip(os.sep) + os.sep)):
            raise ValueError(
                f"{option} {output}: is inside the input folder {given}; outputs would mix with (or replace) "
                "the inputs. Choose an output folder outside it"
            )
