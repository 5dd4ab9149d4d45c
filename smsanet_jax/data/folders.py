"""The image files under a folder, and the entries that are skipped, each with its reason.

Image files are found by extension, recursively, skipping hidden files and folders. Symbolic
links are followed, folders at most once, so a link loop (or a second link to a folder already
listed) is skipped rather than walked forever. Dangling links, link loops and anything that is
not a regular file (a FIFO, a socket, a device) are never opened: `list_folder` returns them as
skipped entries with a reason. NumPy-free and tfds-free: inference commands list folders too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import stat

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
_MAX_LOGGED_SKIPS = 10


def _stat(path: str) -> tuple[os.stat_result | None, str | None]:
    """(stat following links, None), or (None, why the path cannot be read as a file or folder)."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        return None, "dangling symbolic link" if os.path.islink(path) else "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symbolic link loop"
        return None, e.strerror or str(e)


def _kind_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "not a regular file (a FIFO): not opened"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket): not opened"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device): not opened"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    return "not a regular file: not opened"


def regular_file_problem(path: str) -> str | None:
    """None if `path` is a regular file (after following links), else why not, without opening it.

    For paths a user gives directly (the colorize command): a FIFO named `photo.jpg` would block
    a reader forever, a dangling link or a link loop would raise deep inside a decoder.
    """
    st, problem = _stat(path)
    return problem or _kind_problem(st.st_mode)


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The image files under a folder, with what identifies their state cheaply."""

    root: str
    files: tuple[tuple[str, int, int], ...]  # (relative POSIX path, size, mtime_ns), sorted.
    skipped: tuple[tuple[str, str], ...] = ()  # (relative path, reason): entries not listed.

    @property
    def relpaths(self) -> list[str]:
        return [f[0] for f in self.files]

    @property
    def slug(self) -> str:
        """The folder's name, lower case, `_` for anything else: the readable part of keys."""
        return re.sub(r"[^a-z0-9]+", "_", os.path.basename(self.root).lower()).strip("_") or "folder"

    @property
    def fingerprint(self) -> str:
        """A hash of the path, the file names, sizes and times: changes whenever a file is touched."""
        return hashlib.sha256(repr((self.root, self.files)).encode()).hexdigest()[:32]


def list_folder(root: str) -> FolderListing:
    """Lists image files (see the module docstring for the rules); logs the entries it skips.

    Raises:
      ValueError: `root` is not a folder or holds no image file.
    """
    root = os.path.realpath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    found, skipped = [], []
    _walk(root, "", {_inode(os.stat(root))}, found, skipped)
    log_skipped(f"{root}: skipping {len(skipped)} entries that are not image files", skipped)
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        also = f" (skipped: {_first_few(skipped)})" if skipped else ""
        raise ValueError(f"{root}: no image files ({extensions}) in it or below{also}")
    return FolderListing(root, tuple(sorted(found)), tuple(sorted(skipped)))


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _walk(root: str, relative: str, listed: set, found: list, skipped: list) -> None:
    """Adds the image files of `root/relative` to `found`, recursively; problems to `skipped`."""
    try:
        with os.scandir(os.path.join(root, relative)) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
    except OSError as e:
        skipped.append((relative or ".", f"cannot list the folder: {e.strerror or e}"))
        return
    for name in names:
        relpath = f"{relative}/{name}" if relative else name
        is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        st, problem = _stat(os.path.join(root, relpath))
        if st is not None and stat.S_ISDIR(st.st_mode):
            if _inode(st) in listed:
                skipped.append((relpath, "symbolic link to a folder listed already (a loop or a second path)"))
            else:
                listed.add(_inode(st))
                _walk(root, relpath, listed, found, skipped)
        elif problem:  # A broken link (any name: it may have been meant as a folder).
            skipped.append((relpath, problem))
        elif is_image:
            problem = _kind_problem(st.st_mode)
            if problem:
                skipped.append((relpath, problem))
            else:
                found.append((relpath, st.st_size, st.st_mtime_ns))


def _first_few(entries) -> str:
    named = "; ".join(f"{p} ({r})" for p, r in entries[:_MAX_LOGGED_SKIPS])
    more = len(entries) - _MAX_LOGGED_SKIPS
    return named + (f"; and {more} more" if more > 0 else "")


def log_skipped(what: str, entries) -> None:
    if entries:
        logging.warning("%s: %s", what, _first_few(entries))
