"""tfds builder for a local folder of images, keyed by a hash of the folder's path and file listing."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re

import tensorflow_datasets as tfds
import tqdm

from smsanet_jax.data import decode

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# Top-level subfolders that name a split; without any of them the split comes from a path hash.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
# Share of images hashed into `validation` when the folder has no split subfolders.
VALIDATION_PERCENT = 5
BUILDER_NAME = "smsanet_image_folder"
_VERSION = "1.0.0"
# Part of the key: bump it when what the builder writes changes, so stale data is not reused.
_LAYOUT = "1"
# Readability is checked on a reduced-size decode (JPEG DCT scaling): it reads every byte, so a
# truncated or corrupt file still fails, at a fraction of the cost of a full decode.
_CHECK_SIZE = 64
_MAX_LOGGED_SKIPS = 10


def image_features() -> tfds.features.FeaturesDict:
    """Features of the datasets this package builds.

    `image` holds the original file's bytes unchanged (any format `decode.decode_rgb` reads; the
    loaders read it with `tfds.decode.SkipDecoding`), `file_name` its path relative to the source.
    """
    return tfds.features.FeaturesDict({"image": tfds.features.Image(), "file_name": tfds.features.Text()})


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The image files under a folder, with what identifies their content cheaply."""

    root: str
    files: tuple[tuple[str, int, int], ...]  # (relative POSIX path, size, mtime_ns), sorted.

    @property
    def key(self) -> str:
        """`<folder name>-<hash of path and listing>`: a new key whenever a file changes."""
        digest = hashlib.sha256(repr((_LAYOUT, self.root, self.files)).encode()).hexdigest()
        slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(self.root).lower()).strip("_")
        return f"{slug or 'folder'}-{digest[:16]}"

    def builder_dir(self, data_dir: str) -> str:
        """Where the prepared dataset lives (or will live) under `data_dir`."""
        return os.path.join(data_dir, BUILDER_NAME, self.key, _VERSION)


def list_folder(root: str) -> FolderListing:
    """Lists image files (by extension, recursively, skipping hidden files and folders).

    Raises:
      ValueError: `root` is not a folder or holds no image file.
    """
    root = os.path.realpath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(directory, name)
            stat = os.stat(path)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            files.append((relpath, stat.st_size, stat.st_mtime_ns))
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"{root}: no image files ({extensions}) in it or below")
    return FolderListing(root, tuple(sorted(files)))


def assign_splits(relpaths: list[str]) -> dict[str, list[str]]:
    """Split name -> files: by top-level split folder if there is one, else by a hash of the path.

    The hash rule puts each file in `validation` with probability VALIDATION_PERCENT / 100,
    independently of the other files, so adding images never moves existing ones between splits.
    """
    by_folder = {path: SPLIT_FOLDERS.get(path.split("/")[0].lower()) for path in relpaths if "/" in path}
    if any(by_folder.values()):
        splits = {}
        for path in relpaths:
            if by_folder.get(path):
                splits.setdefault(by_folder[path], []).append(path)
        ignored = len(relpaths) - sum(len(v) for v in splits.values())
        if ignored:
            logging.warning(
                "%d images outside the split folders (%s) are not used", ignored, ", ".join(sorted(SPLIT_FOLDERS))
            )
        return splits
    splits = {}
    for path in relpaths:
        bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 100
        splits.setdefault("validation" if bucket < VALIDATION_PERCENT else "train", []).append(path)
    return splits


def _check_image(path: str) -> str | None:
    """None if the file decodes, else why not."""
    try:
        with open(path, "rb") as f:
            decode.decode_rgb(f.read(), target_size=_CHECK_SIZE)
    except (OSError, decode.UnreadableImageError) as e:
        return str(e)
    return None


def check_images(listing: FolderListing) -> tuple[list[str], list[tuple[str, str]]]:
    """Decodes every file (threads: Pillow releases the GIL); returns (readable, [(file, reason)]).

    Raises:
      ValueError: no file is readable.
    """
    relpaths = [f[0] for f in listing.files]
    paths = [os.path.join(listing.root, p) for p in relpaths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(
            tqdm.tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images", unit=" images")
        )
    readable = [p for p, r in zip(relpaths, reasons) if r is None]
    skipped = [(p, r) for p, r in zip(relpaths, reasons) if r is not None]
    if skipped:
        logging.warning(
            "skipping %d of %d files that are not readable images: %s%s",
            len(skipped),
            len(relpaths),
            "; ".join(f"{p} ({r})" for p, r in skipped[:_MAX_LOGGED_SKIPS]),
            " ..." if len(skipped) > _MAX_LOGGED_SKIPS else "",
        )
    if not readable:
        raise ValueError(
            f"{listing.root}: none of its {len(relpaths)} image files could be decoded, e.g. "
            + "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        )
    return readable, skipped


class SmsanetImageFolder(tfds.core.GeneratorBasedBuilder):
    """The images of one folder (one config per folder listing), stored as their original bytes."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Original file bytes and relative paths."}

    def __init__(
        self, *, listing: FolderListing, splits: dict[str, list[str]], skipped: list[tuple[str, str]], **kwargs
    ):
        self._listing = listing
        self._splits = splits
        self._skipped = skipped
        super().__init__(config=tfds.core.BuilderConfig(name=listing.key, description=listing.root), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images under {self._listing.root}.",
            features=image_features(),
            metadata=tfds.core.MetadataDict(source=self._listing.root, skipped=[list(s) for s in self._skipped]),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(files) for split, files in self._splits.items()}

    def _generate_examples(self, files):
        for relpath in files:
            with open(os.path.join(self._listing.root, relpath), "rb") as f:
                yield relpath, {"image": f.read(), "file_name": relpath}


def build(listing: FolderListing, data_dir: str) -> None:
    """Checks every image of `listing` and writes the dataset (array_record) under `data_dir`.

    Raises:
      ValueError: no readable image.
    """
    readable, skipped = check_images(listing)
    builder = SmsanetImageFolder(
        listing=listing, splits=assign_splits(readable), skipped=skipped, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
