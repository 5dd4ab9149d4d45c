"""tfds builder for a local folder of images, keyed by the folder's content (not its file times).

Listing (which files, which are skipped and why) is `folders.list_folder`.

Splits: top-level `train/`, `val/` (or `validation/`) and `test/` subfolders name the splits.
Without them a file goes to `validation` when a hash of its relative path falls in the lowest
VALIDATION_PERCENT of 100 buckets, independently of the other files; if that leaves validation
(or train) empty in a folder of two or more readable images, the file with the smallest
(largest) path hash moves there, so every such folder can be trained *and* evaluated. A folder
with only one readable image is an error at preparation: evaluation needs a validation image.

Identity: a prepared folder dataset is named `<folder name>-<hash of its relative paths, sizes
and file content hashes>`, so touching or copying the files (new times, same bytes) finds the
same prepared data, and a training run stays resumable. Hashing reads every file once; a small
cache under the data dir maps a listing with its file times to the content key, so unchanged
folders are only listed, not read, when a run starts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os

import tensorflow_datasets as tfds
import tqdm

from smsanet_jax import files as file_io
from smsanet_jax.data import decode
from smsanet_jax.data.folders import FolderListing, log_skipped

# Top-level subfolders that name a split; without any of them the split comes from a path hash.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
# Share of images hashed into `validation` when the folder has no split subfolders.
VALIDATION_PERCENT = 5
BUILDER_NAME = "smsanet_image_folder"
_VERSION = "1.0.0"
# Part of the key: bump it when what the builder writes changes, so stale data is not reused.
_LAYOUT = "2"
# Listing fingerprint -> content key: a folder of small files in the data dir.
_KEY_CACHE = ".smsanet_folder_keys"
# Readability is checked on a reduced-size decode (JPEG DCT scaling): it reads every byte, so a
# truncated or corrupt file still fails, at a fraction of the cost of a full decode.
_CHECK_SIZE = 64
_HASH_CHUNK = 1 << 20


def image_features() -> tfds.features.FeaturesDict:
    """Features of the datasets this package builds.

    `image` holds the original file's bytes unchanged (any format `decode.decode_rgb` reads; the
    loaders read it with `tfds.decode.SkipDecoding`), `file_name` its path relative to the source.
    """
    return tfds.features.FeaturesDict({"image": tfds.features.Image(), "file_name": tfds.features.Text()})


def _file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (or of why it cannot be read: it is then skipped as unreadable)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return digest.hexdigest()


def content_key(listing: FolderListing) -> str:
    """`<folder name>-<hash of relative paths, sizes and content>`: reads every file once (threads)."""
    paths = [os.path.join(listing.root, p) for p in listing.relpaths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(
            tqdm.tqdm(pool.map(_file_digest, paths), total=len(paths), desc="hashing images", unit=" images")
        )
    content = [(relpath, size, d) for (relpath, size, _), d in zip(listing.files, digests)]
    return f"{listing.slug}-{hashlib.sha256(repr((_LAYOUT, content)).encode()).hexdigest()[:16]}"


def dataset_key(listing: FolderListing, data_dir: str) -> str:
    """The content key of `listing`, from the cache under `data_dir` when the files are unchanged."""
    cached = os.path.join(data_dir, _KEY_CACHE, f"{_LAYOUT}-{listing.fingerprint}")
    try:
        with open(cached, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        pass
    key = content_key(listing)
    try:
        file_io.write_text(cached, key)
    except OSError as e:  # A read-only data dir: the key is recomputed next time, nothing else.
        logging.info("cannot cache the content key of %s in %s: %s", listing.root, cached, e)
    return key


def builder_dir(data_dir: str, key: str) -> str:
    """Where the prepared dataset of content key `key` lives (or will live) under `data_dir`."""
    return os.path.join(data_dir, BUILDER_NAME, key, _VERSION)


def assign_splits(relpaths: list[str]) -> dict[str, list[str]]:
    """Split name -> files: by top-level split folder if there is one, else by a hash of the path.

    The hash rule puts each file in `validation` with probability VALIDATION_PERCENT / 100,
    independently of the other files, so adding images never moves existing ones between splits
    (except the one a fallback moved: see the module docstring).

    Raises:
      ValueError: no split folders and fewer than two files (no validation image possible).
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
    if not relpaths:
        return {}
    if len(relpaths) == 1:
        raise ValueError(
            f"only one readable image ({relpaths[0]}): training evaluates on a validation split, which needs "
            "a second image; add images (or train/ and val/ subfolders)"
        )
    by_hash = sorted(relpaths, key=lambda path: hashlib.sha256(path.encode()).digest())
    validation = {path for path in relpaths if _bucket(path) < VALIDATION_PERCENT}
    if not validation:
        validation = {by_hash[0]}
    elif len(validation) == len(relpaths):
        validation.discard(by_hash[-1])
    return {
        "train": [p for p in relpaths if p not in validation],
        "validation": [p for p in relpaths if p in validation],
    }


def _bucket(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 100


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
    relpaths = listing.relpaths
    paths = [os.path.join(listing.root, p) for p in relpaths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(
            tqdm.tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images", unit=" images")
        )
    readable = [p for p, r in zip(relpaths, reasons) if r is None]
    skipped = [(p, r) for p, r in zip(relpaths, reasons) if r is not None]
    log_skipped(f"skipping {len(skipped)} of {len(relpaths)} files that are not readable images", skipped)
    if not readable:
        raise ValueError(
            f"{listing.root}: none of its {len(relpaths)} image files could be decoded, e.g. "
            + "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        )
    return readable, skipped


class SmsanetImageFolder(tfds.core.GeneratorBasedBuilder):
    """The images of one folder (one config per content key), stored as their original bytes."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Original file bytes and relative paths."}

    def __init__(
        self,
        *,
        key: str,
        listing: FolderListing,
        splits: dict[str, list[str]],
        skipped: list[tuple[str, str]],
        **kwargs,
    ):
        self._listing = listing
        self._splits = splits
        self._skipped = skipped
        super().__init__(config=tfds.core.BuilderConfig(name=key, description=listing.root), **kwargs)

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


def build(listing: FolderListing, data_dir: str, key: str) -> None:
    """Checks every image of `listing` and writes the dataset (array_record) under `data_dir`.

    The unreadable files are recorded in the dataset's metadata (`skipped`): they are part of
    the content, unlike the entries `list_folder` skipped (links, FIFOs), which are reported anew
    each time the folder is listed.

    Raises:
      ValueError: no readable image, or a single one in a folder without split subfolders.
    """
    readable, unreadable = check_images(listing)
    try:
        splits = assign_splits(readable)
    except ValueError as e:
        raise ValueError(f"{listing.root}: {e}") from None
    builder = SmsanetImageFolder(
        key=key,
        listing=listing,
        splits=splits,
        skipped=unreadable,
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
