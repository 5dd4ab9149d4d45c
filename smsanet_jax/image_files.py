"""Batches of image files through a network: inputs found, outputs planned, failures reported per file.

The colorize and saliency commands take files, globs and folders, process them in batches, and
never stop for one bad input: a missing, unreadable or non-image input (or one whose output
already exists, without `overwrite`, or would replace the input itself) is reported by name and
skipped while the others are processed. Outputs are written atomically (`files.atomic_write`).
NumPy and Pillow only: no JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from smsanet_jax import files, reporting
from smsanet_jax.data import decode, folders

FORMATS = {"png": "PNG", "jpg": "JPEG"}
JPEG_QUALITY = 95
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Input:
    """One image to process: its path, and its name relative to what was given (output path)."""

    path: str
    name: str  # The file's base name, or its path inside the folder that was given.


@dataclasses.dataclass
class Report:
    """What a run did: outputs written, and (input, reason) for everything skipped."""

    written: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def fail(self, what: str, reason: str) -> None:
        logging.error("skipping %s: %s", what, reason)
        self.failed.append((what, reason))


def find_inputs(specs: Sequence[str], report: Report) -> list[Input]:
    """Expands files, folders (recursively, image extensions only) and glob patterns, in order.

    A spec that matches nothing is recorded in `report`. A file given twice is kept once.
    """
    found: list[Input] = []
    for spec in specs:
        if os.path.isdir(spec):
            found += _folder_inputs(spec, report)
        elif os.path.lexists(spec) or not glob.has_magic(spec):
            found += _file_input(spec, report)
        else:
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                report.fail(spec, "no file matches this pattern")
            for match in matches:
                found += _folder_inputs(match, report) if os.path.isdir(match) else _file_input(match, report)
    unique, seen = [], set()
    for item in found:
        key = os.path.realpath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _file_input(path: str, report: Report) -> list[Input]:
    """A file the user named; a FIFO, device, dangling link or link loop is reported, never opened."""
    problem = folders.regular_file_problem(path)
    if problem:
        report.fail(path, problem)
        return []
    return [Input(path, os.path.basename(path))]


def _folder_inputs(folder: str, report: Report) -> list[Input]:
    try:
        listing = folders.list_folder(folder)
    except ValueError as e:
        report.fail(folder, str(e))
        return []
    for relpath, reason in listing.skipped:
        report.fail(os.path.join(folder, relpath), reason)
    return [Input(os.path.join(folder, relpath), relpath) for relpath, _, _ in listing.files]


def output_path(out_dir: str, name: str, suffix: str, fmt: str) -> str:
    stem = os.path.splitext(name)[0]
    return os.path.join(out_dir, f"{stem}{suffix}.{fmt}")


def plan(
    inputs: Sequence[Input], out_dir: str, suffixes: Sequence[str], fmt: str, overwrite: bool, report: Report
) -> list[tuple[Input, list[str]]]:
    """Inputs with their output paths; drops (and reports) name clashes and existing outputs."""
    planned, owner = [], {}
    for item in inputs:
        paths = [output_path(out_dir, item.name, s, fmt) for s in suffixes]
        clash = next((owner[p] for p in paths if p in owner), None)
        if clash is not None:
            report.fail(item.path, f"its output {paths[0]} would also be written for {clash}")
            continue
        if os.path.realpath(item.path) in {os.path.realpath(p) for p in paths}:
            report.fail(item.path, "its output would replace it; choose another --out")
            continue
        existing = [p for p in paths if os.path.exists(p)]
        if existing and not overwrite:
            report.fail(item.path, f"{existing[0]} already exists (use --overwrite to replace it)")
            continue
        owner.update(dict.fromkeys(paths, item.path))
        planned.append((item, paths))
    return planned


def write_image(path: str, image: np.ndarray, fmt: str, overwrite: bool) -> None:
    """Writes an image atomically (`files.atomic_write`).

    Raises:
      FileExistsError: `path` appeared meanwhile and `overwrite` is False.
    """
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists (use --overwrite to replace it)")
    options = {"quality": JPEG_QUALITY} if fmt == "jpg" else {}
    files.atomic_write(path, lambda f: Image.fromarray(image).save(f, format=FORMATS[fmt], **options))


def read_rgb(path: str) -> np.ndarray:
    """The upright 8-bit RGB pixels of an image file (see `decode.decode_rgb`)."""
    with open(path, "rb") as f:
        encoded = f.read()
    return np.asarray(decode.decode_rgb(encoded))


def run(
    planned: Sequence[tuple[Input, list[str]]],
    report: Report,
    *,
    batch_size: int,
    fmt: str,
    overwrite: bool,
    load: Callable[[Input], Any],
    infer: Callable[[list[Any]], list[list[np.ndarray]]],
    num_threads: int | None = None,
) -> Report:
    """Loads (threads, one batch ahead), infers a batch at a time, writes (threads); records failures."""
    progress = reporting.Progress(len(planned), 1)
    batches = [planned[i : i + batch_size] for i in range(0, len(planned), batch_size)]
    threads = num_threads or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        writes, done = [], 0
        for batch, loaded in prefetch(batches, lambda entry: load(entry[0]), pool):
            good = []
            for (item, paths), future in zip(batch, loaded):
                try:
                    good.append((item, paths, future.result()))
                except (OSError, ValueError) as e:  # Unreadable image (a ValueError), bad hints, I/O.
                    report.fail(item.path, _reason(e))
            outputs = infer([example for _, _, example in good]) if good else []
            for (item, paths, _), images in zip(good, outputs):
                writes.append(
                    (item, paths, [pool.submit(write_image, p, im, fmt, overwrite) for p, im in zip(paths, images)])
                )
            done += len(batch)
            progress.update(done)
        for item, paths, futures in writes:
            errors = [_reason(e) for e in (f.exception() for f in futures) if e is not None]
            if errors:
                report.fail(item.path, "; ".join(errors))
            else:
                report.written.extend(paths)
    return report


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, decode.UnreadableImageError):
        return f"not a readable image ({error})"
    return str(error) or type(error).__name__


def prefetch(
    batches: Sequence[Sequence[T]], load: Callable[[T], R], pool: concurrent.futures.Executor
) -> Iterator[tuple[Sequence[T], list[concurrent.futures.Future[R]]]]:
    """Yields (batch, futures of `load(item)` for its items), with the next batch already loading.

    The one place that reads a folder of images ahead of the devices (colorize, saliency and the
    evaluation of a folder use it): while the caller works on a batch, the pool decodes the next.
    """
    submit = lambda batch: [pool.submit(load, item) for item in batch]
    pending = submit(batches[0]) if batches else []
    for k, batch in enumerate(batches):
        current = pending
        pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
        yield batch, current
