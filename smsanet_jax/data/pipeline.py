"""grain loaders: infinite shuffled training batches and padded, masked evaluation batches."""

from __future__ import annotations

import functools
import logging
import math

import grain
import jax
import numpy as np
from absl import flags

from smsanet_jax.data import decode, sources, transforms

# Zhang et al.'s `ab_thresh`: training crops whose a range + b range is below this are skipped.
DEFAULT_GRAY_THRESHOLD = 5.0
# The largest a range + b range any sRGB crop can have (a in [-86.2, 98.2], b in [-107.9, 94.5]):
# a threshold at or above it skips every crop.
_MAX_AB_SPREAD = 386.8
# Training images kept in memory per process (split between its worker processes), decoded and
# resized to the crop size's short side, so a small dataset of large photos is decoded and resized
# once, not once per crop. Filled first come, first kept.
DEFAULT_DECODE_CACHE_BYTES = 256 << 20
# A training shard in which this many examples in a row are unusable is broken data, not bad luck:
# stop with an error instead of filtering forever.
MAX_CONSECUTIVE_SKIPS = 1000
# Skipped examples named in the log, per worker process; after that they are only counted.
_MAX_NAMED_SKIPS = 5
# Per-example skip counts ride in the batches from the worker processes to the main process,
# where `LoaderIterator` removes them.
_UNREADABLE = "_skipped_unreadable"
_GRAY = "_skipped_gray"


class _SkipLog:
    """Names the first few skipped examples of a worker process."""

    def __init__(self):
        self._named = 0

    def __call__(self, name: str, reason: str) -> None:
        if self._named < _MAX_NAMED_SKIPS:
            self._named += 1
            last = self._named == _MAX_NAMED_SKIPS
            logging.warning(
                "skipping %s: %s%s", name, reason, " (further skips are counted, not named)" if last else ""
            )


class _ResizedImages:
    """Training images by record id, decoded and resized to the crop size's short side, up to a byte budget.

    First come, first kept; never evicted: keeping the first images that fit costs nothing on
    datasets far larger than the budget, where no policy would hit often. A kept image is exactly
    what a fresh decode and resize give, so the batches do not depend on the budget.
    """

    def __init__(self, size: int, max_bytes: int):
        self._size = size
        self._max_bytes = max_bytes
        self._images: dict[int, np.ndarray] = {}
        self._bytes = 0

    def get(self, record: dict) -> np.ndarray:
        """uint8 [H, W, 3], short side `size` (raises decode.UnreadableImageError, never cached)."""
        key = int(record["id"])
        image = self._images.get(key)
        if image is None:
            decoded = decode.decode_rgb(record["image"], target_size=self._size)
            image = transforms.resize_short_side(decoded, self._size)
            if self._bytes + image.nbytes <= self._max_bytes:
                self._images[key] = image
                self._bytes += image.nbytes
        return image


class _TrainExample(grain.transforms.Map):
    """Record -> {"rgb", "id"}: decode and short-side resize (kept while the budget lasts), crop, flip; or a skip.

    The crop and flip are drawn from the seed and the record's position in the *global* stream,
    so they do not depend on the number of processes or workers, nor on the decode cache.
    """

    def __init__(self, image_size: int, gray_threshold: float, seed: int, cache_bytes: int):
        self._size = image_size
        self._gray_threshold = gray_threshold
        self._seed = seed
        self._images = _ResizedImages(image_size, cache_bytes)

    def map(self, record: dict) -> dict:
        try:
            image = self._images.get(record)
        except decode.UnreadableImageError as e:
            return {"skip": _UNREADABLE, "reason": f"unreadable ({e})", "name": record["name"]}
        rng = np.random.default_rng([self._seed, record["position"]])
        rgb = transforms.random_crop(image, self._size, rng)
        if self._gray_threshold > 0:
            spread = transforms.ab_spread(rgb)
            if spread < self._gray_threshold:
                return {
                    "skip": _GRAY,
                    "reason": f"near-grayscale crop (ab spread {spread:.2f} < gray_threshold {self._gray_threshold:g})",
                    "name": record["name"],
                }
        return {"rgb": rgb, "id": record["id"]}


class _GlobalStream:
    """This process's part of one global, endless, shuffled stream (a grain data source).

    The global stream is the split reshuffled every epoch from the seed. It is cut into chunks of
    `local_batch_size` and chunk c goes to process c % process_count, so global batch b is made of
    the same examples (with the same crops) whatever the number of processes: a run can move
    between 1 and N hosts and see the same data. Skipped examples shift only the stream of the
    process that skipped them.
    """

    # Positions are never exhausted in practice; grain only needs a finite length.
    _LENGTH = 2**62

    def __init__(
        self, source: sources.ImageSource, seed: int, local_batch_size: int, process_index: int, process_count: int
    ):
        self._source = source
        self._seed = seed
        self._chunk = local_batch_size
        self._process_index = process_index
        self._process_count = process_count

    def __len__(self) -> int:
        return self._LENGTH

    def __getitem__(self, index: int) -> dict:
        chunk, offset = divmod(int(index), self._chunk)
        position = (chunk * self._process_count + self._process_index) * self._chunk + offset
        epoch, i = divmod(position, len(self._source))
        return {**self._source[int(_permutation(self._seed, epoch, len(self._source))[i])], "position": position}

    def __repr__(self) -> str:
        return (
            f"GlobalStream({self._source!r}, process {self._process_index} of "
            f"{self._process_count}, chunks of {self._chunk})"
        )


# grain's reader threads call `_GlobalStream.__getitem__` concurrently, across epoch boundaries too:
# a cache keyed by the epoch (thread-safe) gives each read its own epoch's order.
@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records)


class _DropSkipped(grain.transforms.Filter):
    """Drops skip markers; the next kept example carries how many were dropped before it.

    grain filters cannot report what they drop, so the counts travel inside the kept examples
    (this is the only place that adds the fields; `LoaderIterator` removes them). Counts are per
    worker process and reset with it, which is all logging needs.
    """

    def __init__(self):
        self._counts = {_UNREADABLE: 0, _GRAY: 0}
        self._in_a_row = dict.fromkeys(self._counts, 0)
        self._log = _SkipLog()

    def filter(self, example: dict) -> bool:
        kind = example.get("skip")
        if kind is None:
            example.update({k: np.int32(v) for k, v in self._counts.items()})
            self._counts = dict.fromkeys(self._counts, 0)
            self._in_a_row = dict.fromkeys(self._counts, 0)
            return True
        self._counts[kind] += 1
        self._in_a_row[kind] += 1
        self._log(example["name"], example["reason"])
        if sum(self._in_a_row.values()) >= MAX_CONSECUTIVE_SKIPS:
            raise ValueError(_no_usable_examples(self._in_a_row, example))
        return False


def _no_usable_examples(in_a_row: dict[str, int], last: dict) -> str:
    """The one-line error for a stream that yields nothing usable, with what to do."""
    if not in_a_row[_UNREADABLE]:
        what, fix = (
            "near-grayscale",
            "lower data.gray_threshold (Zhang et al. use 5; 0 keeps every crop) or train on colour images",
        )
    elif not in_a_row[_GRAY]:
        what, fix = "unreadable", "the dataset's images are broken: prepare it again from readable files"
    else:
        what, fix = "unusable", "check the dataset's files, and lower data.gray_threshold if they are near-gray"
    return (
        f"{sum(in_a_row.values())} training examples in a row were {what} (the last: {last['name']}, "
        f"{last['reason']}): {fix}"
    )


class _EvalExample(grain.transforms.Map):
    """Record -> {"rgb", "id", "mask"}: full decode, short-side resize, centre crop (padding: no mask)."""

    def __init__(self, image_size: int):
        self._size = image_size
        self._log = _SkipLog()

    def map(self, record: dict) -> dict:
        unreadable = 0
        rgb = None
        if record["id"] >= 0:
            try:
                # Full-resolution decode: the reference pixels of the metrics must not depend on
                # libjpeg's reduced-size decoding.
                rgb = transforms.center_crop(decode.decode_rgb(record["image"]), self._size)
            except decode.UnreadableImageError as e:
                unreadable = 1
                self._log(record["name"], f"unreadable ({e}); masked out of the evaluation")
        return {
            "rgb": np.zeros((self._size, self._size, 3), np.uint8) if rgb is None else rgb,
            "id": record["id"],
            "mask": rgb is not None,
            _UNREADABLE: np.int32(unreadable),
            _GRAY: np.int32(0),
        }


class _PaddedSubset:
    """The records `ids` of a source, where id -1 is a padding record (a grain data source)."""

    def __init__(self, source: sources.ImageSource, ids: np.ndarray):
        self._source = source
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict:
        i = int(self._ids[index])
        return self._source[i] if i >= 0 else {"image": b"", "name": "", "id": np.int64(-1)}

    def __repr__(self) -> str:
        return f"PaddedSubset({self._source!r}, num_records={len(self)})"


class LoaderIterator:
    """Batches of one pass over a `Loader`; checkpointable like grain's own iterator.

    Works with orbax's `grain.PyGrainCheckpointSave(it)` / `PyGrainCheckpointRestore(it)`: the
    state is the wrapped grain iterator's. `skipped` counts, by reason, the examples dropped or
    masked since this iterator was created (it is not part of the saved state).
    """

    def __init__(self, iterator: grain.DataLoaderIterator, description: str):
        self._iterator = iterator
        self._description = description
        self.skipped = {"unreadable": 0, "near-grayscale": 0}
        self._next_report = 1

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.skipped["unreadable"] += int(np.sum(batch.pop(_UNREADABLE)))
        self.skipped["near-grayscale"] += int(np.sum(batch.pop(_GRAY)))
        total = sum(self.skipped.values())
        if total >= self._next_report:
            # Reported at 1, 2, 4, 8, ... skips: visible, never flooding the log.
            logging.info(
                "%s: %s so far",
                self._description,
                ", ".join(f"{v} {k}" for k, v in self.skipped.items()) + " examples skipped",
            )
            while self._next_report <= total:
                self._next_report *= 2
        return batch

    def get_state(self) -> bytes:
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Starts reading ahead; grain's checkpoint handler (`PyGrainCheckpointRestore`) calls it."""
        self._iterator.start_prefetch()


class Loader:
    """A grain DataLoader over one split; `iter(loader)` starts a pass (a `LoaderIterator`).

    Attributes:
      source: the split's `sources.ImageSource` (`source.name(id)`, `source.image(id)`).
      num_batches: batches per pass for evaluation loaders (the same on every process); None
        for the infinite training loader.
      identity: what a checkpointed iterator state is only valid for, as plain JSON values:
        `dataset` (the prepared dataset's stable name; for folders it holds the content key),
        `split`, `num_records`, `local_batch_size`, `num_workers`, `process_index`,
        `process_count` and `seed`. It names the data, never where it is stored.
    """

    def __init__(
        self,
        data_loader: grain.DataLoader,
        source: sources.ImageSource,
        description: str,
        identity: dict,
        num_batches: int | None = None,
    ):
        self._data_loader = data_loader
        self._description = description
        self.source = source
        self.identity = identity
        self.num_batches = num_batches

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(iter(self._data_loader), self._description)


def _identity(
    source: sources.ImageSource,
    local_batch_size: int,
    num_workers: int,
    process_index: int,
    process_count: int,
    seed: int,
) -> dict:
    """`Loader.identity`: plain ints and strings, so it can be stored in a checkpoint as JSON."""
    return {
        "dataset": source.dataset,
        "split": source.split,
        "num_records": len(source),
        "local_batch_size": int(local_batch_size),
        "num_workers": int(num_workers),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "seed": int(seed),
    }


def _allow_worker_processes() -> None:
    """Lets grain start worker processes in programs that never parse absl flags.

    grain reads an absl flag when it starts workers (once jax's profiler is loaded), which raises
    UnparsedFlagAccessError under argparse CLIs and pytest; there the flag defaults are what is
    meant. Programs that parse absl flags are left alone.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _data_loader(
    source, sampler, shard_options, num_workers: int, local_batch_size: int, operations: list
) -> grain.DataLoader:
    if num_workers:
        _allow_worker_processes()
    # grain's default read-ahead (16 threads, 500 records per process) is sized for big hosts;
    # records here are cheap reads, and decoding, not reading, is the cost.
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(16, 2 * local_batch_size))
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=num_workers,
        shard_options=shard_options,
        read_options=read_options,
    )


def _check_sizes(image_size: int, local_batch_size: int, num_workers: int) -> None:
    for label, value, low in (("image_size", image_size, 1), ("local batch size", local_batch_size, 1)):
        if value < low:
            raise ValueError(f"{label} {value}: must be at least {low}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers}: must be 0 (decode in this process) or more")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def make_train_loader(
    *,
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int,
    local_batch_size: int,
    seed: int,
    num_workers: int = 0,
    gray_threshold: float = DEFAULT_GRAY_THRESHOLD,
    process_index: int | None = None,
    process_count: int | None = None,
    decode_cache_bytes: int = DEFAULT_DECODE_CACHE_BYTES,
) -> Loader:
    """Infinite training batches: this process's part of one global stream, reshuffled every epoch.

    The split is shuffled from `seed` and the epoch; the stream is dealt out to the processes in
    chunks of `local_batch_size` (see `_GlobalStream`), so with `num_workers=0` the global batches
    are the same whatever the number of processes. Each example is decoded (reduced-size JPEG
    decoding when it is at least twice `image_size`), resized so that its short side is
    `image_size`, randomly cropped to a square and randomly flipped, with randomness from `seed`
    and the example's global position. With worker processes each grain worker batches its own
    share of the stream, so an example's batch (not its crop) depends on `num_workers`, and a
    checkpointed iterator resumes only with the same `num_workers` and process count. Unreadable
    examples and near-grayscale crops are skipped (counted and logged). Decoded images, resized to
    the crop size's short side, are kept in memory up to `decode_cache_bytes`, so a small dataset
    is decoded once per process (or worker), not once per crop; the batches are the same with or
    without the cache.

    Args:
      name: dataset name (see `sources`); folders and sample_photos are prepared on demand.
      split: the split to read.
      data_dir: the tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      image_size: side S of the square crops.
      local_batch_size: examples per batch on this process.
      seed: shuffling and augmentation seed, in [0, 2**32).
      num_workers: grain worker processes decoding in parallel (0: in this process).
      gray_threshold: skip crops whose a range + b range (Lab units) is below this; 0 keeps all.
      process_index: this process's shard (default: `jax.process_index()`).
      process_count: number of shards (default: `jax.process_count()`).
      decode_cache_bytes: memory for decoded, resized images in this process, split between the
        workers; 0 decodes every example afresh.

    Returns:
      A `Loader` whose passes yield `{"rgb": uint8 [local_batch_size, S, S, 3],
      "id": int64 [local_batch_size]}` forever.

    Raises:
      ValueError: a bad name, split or argument; while iterating, a stream in which
        MAX_CONSECUTIVE_SKIPS examples in a row are unusable (the message says what to change).
    """
    process_index, process_count = _process(process_index, process_count)
    _check_sizes(image_size, local_batch_size, num_workers)
    if not 0 <= gray_threshold < _MAX_AB_SPREAD:
        raise ValueError(
            f"data.gray_threshold={gray_threshold:g}: must be in [0, {_MAX_AB_SPREAD:g}) (no crop has a larger "
            "a range + b range); Zhang et al. use 5, 0 keeps every crop"
        )
    source = sources.open_source(name, split, data_dir=data_dir)
    stream = _GlobalStream(source, seed, local_batch_size, process_index, process_count)
    sampler = grain.samplers.IndexSampler(len(stream), shuffle=False, num_epochs=1)
    loader = _data_loader(
        stream,
        sampler,
        grain.sharding.NoSharding(),
        num_workers,
        local_batch_size,
        [
            _TrainExample(image_size, gray_threshold, seed, decode_cache_bytes // max(1, num_workers)),
            _DropSkipped(),
            grain.transforms.Batch(local_batch_size, drop_remainder=True),
        ],
    )
    identity = _identity(source, local_batch_size, num_workers, process_index, process_count, seed)
    return Loader(loader, source, f"{name}:{split} training loader", identity)


def select_examples(num_records: int, num_examples: int | None, seed: int) -> np.ndarray:
    """A fixed random subset of `num_examples` ids (all ids if None or too many), sorted.

    It depends only on the arguments, never on the number of processes.
    """
    if num_examples is None or num_examples >= num_records:
        return np.arange(num_records, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_records, size=num_examples, replace=False)).astype(np.int64)


def pad_for_process(
    ids: np.ndarray, local_batch_size: int, process_index: int, process_count: int
) -> tuple[int, np.ndarray]:
    """This process's contiguous part of `ids`, padded with -1 to as many batches as every process runs.

    Part i is `ids[len * i // count : len * (i + 1) // count]`: disjoint parts that together are
    `ids`, in order. Every process gets the same number of batches (the largest part's), so
    collective operations line up; the padding ids (-1) are to be masked out.

    Returns:
      (number of batches, int64 [number of batches * local_batch_size]).
    """
    num_batches = math.ceil(math.ceil(len(ids) / process_count) / local_batch_size)
    start, stop = (len(ids) * i // process_count for i in (process_index, process_index + 1))
    padded = np.full(num_batches * local_batch_size, -1, np.int64)
    padded[: stop - start] = ids[start:stop]
    return num_batches, padded


def make_eval_loader(
    *,
    name: str,
    split: str,
    data_dir: str | None = None,
    image_size: int,
    local_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> Loader:
    """One pass over (a fixed subset of) a split, padded so every process runs the same batches.

    The selected ids (`select_examples`) are split into contiguous, disjoint per-process parts.
    Each example is decoded at full resolution, resized so that its short side is `image_size`
    and centre-cropped; nothing is skipped for colour. Padding (and the rare unreadable image)
    has `mask` False and zero pixels; padding has id -1.

    Args:
      name: dataset name (see `sources`).
      split: the split to read.
      data_dir: the tfds data dir.
      image_size: side S of the square crops.
      local_batch_size: examples per batch on this process.
      process_index: this process's part (default: `jax.process_index()`).
      process_count: number of parts (default: `jax.process_count()`).
      num_examples: evaluate on this many examples drawn with `seed` (the paper: 1000); None
        (or more than the split has) means all.
      seed: seed of the subset.
      num_workers: grain worker processes.

    Returns:
      A `Loader` whose passes yield `num_batches` dicts `{"rgb": uint8 [B, S, S, 3],
      "id": int64 [B], "mask": bool [B]}` with B = `local_batch_size`.
    """
    process_index, process_count = _process(process_index, process_count)
    _check_sizes(image_size, local_batch_size, num_workers)
    source = sources.open_source(name, split, data_dir=data_dir)
    ids = select_examples(len(source), num_examples, seed)
    if not len(ids):
        raise ValueError(f"{source!r} is empty")
    if num_examples is not None and num_examples > len(ids):
        logging.info("%s:%s has %d examples; evaluating on all of them, not %d", name, split, len(ids), num_examples)
    num_batches, padded = pad_for_process(ids, local_batch_size, process_index, process_count)
    loader = _data_loader(
        _PaddedSubset(source, padded),
        grain.samplers.IndexSampler(len(padded), shuffle=False, num_epochs=1),
        grain.sharding.NoSharding(),
        num_workers,
        local_batch_size,
        [_EvalExample(image_size), grain.transforms.Batch(local_batch_size)],
    )
    identity = _identity(source, local_batch_size, num_workers, process_index, process_count, seed)
    return Loader(loader, source, f"{name}:{split} evaluation loader", identity, num_batches)
