"""Measures the training input pipeline: images/s, and CPU time per image, of the grain loader.

  .venv/bin/python scripts/benchmark_input.py quickstart [--batches 40]
  .venv/bin/python scripts/benchmark_input.py jpegs [--workers 0 1 2] [--batches 20] [--batch-size 32]

`quickstart` is configs/quickstart.py's input: sample_photos (photos up to 1411x1411) to 64x64
crops, batch 8, no worker process, with the decode cache off (every example decoded afresh, as
before the cache) and on (the default). CPU ms per image counts every thread of this process (the
cost a training step on the same cores competes with), wall images/s the rate alone. Then
(unless --train-steps 0) the quickstart train step's images/s on one fixed batch (compute only)
and fed by the loader with the cache off and on, in train.py's loop, rounds alternating.

`jpegs` writes --num-files JPEGs of about 500x375 (quality 90, cut from the sample photos),
prepares them as an image-folder dataset, and times the loader (decode, short-side resize, random
crop and flip, near-grayscale test) with each worker count, without the decode cache: as on a
dataset far larger than the cache (ImageNet), where every example is decoded afresh. It also times the per-image work in
this process alone, which bounds what one worker process can do, and the effect of reduced-size
JPEG decoding on large sources.

Every loader is timed after one warm-up batch (which absorbs worker start-up); the decode cache
still fills during the first epoch, which a long run amortises.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

from smsanet_jax import data
from smsanet_jax.cpu import malloc
from smsanet_jax.data import decode, pipeline, sample_photos, sources, transforms


def write_jpegs(folder: str, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """`count` JPEGs of `size` (landscape; every fourth one portrait), quality 90, from the photos."""
    rng = np.random.default_rng(seed)
    names = sample_photos.TRAIN_FILES + sample_photos.VALIDATION_FILES
    photos = [Image.open(os.path.join(skimage.data.data_dir, n)).convert("RGB") for n in names]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = size if i % 4 else size[::-1]
        # A random window of the target aspect ratio, 60-100% of the largest that fits.
        scale = min(photo.width / width, photo.height / height) * rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        window = photo.crop((left, top, left + w, top + h))
        image = window.resize((width, height), Image.Resampling.BICUBIC)
        paths.append(os.path.join(folder, f"photo_{i:04d}.jpg"))
        image.save(paths[-1], "JPEG", quality=90)
    return paths


def time_loader(name: str, data_dir: str, workers: int, args: argparse.Namespace, **kwargs) -> tuple[float, float]:
    """(images/s, CPU ms per image in this process) of the training loader after a warm-up batch."""
    loader = data.make_train_loader(
        name=name,
        data_dir=data_dir,
        image_size=args.image_size,
        local_batch_size=args.batch_size,
        seed=0,
        num_workers=workers,
        process_index=0,
        process_count=1,
        **kwargs,
    )
    iterator = iter(loader)
    next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(iterator)
    images = args.batches * args.batch_size
    return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3


def time_per_image(paths: list[str], image_size: int, reduced: bool) -> float:
    """Images/s of decode + crop + gray test in this process (no grain): one worker's ceiling."""
    blobs = [open(p, "rb").read() for p in paths]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for blob in blobs:
        image = decode.decode_rgb(blob, target_size=image_size if reduced else None)
        transforms.ab_spread(transforms.random_crop(transforms.resize_short_side(image, image_size), image_size, rng))
    return len(blobs) / (time.perf_counter() - start)


def quickstart(args: argparse.Namespace) -> None:
    """configs/quickstart.py's input, decode cache off and on; then its train step fed by each."""
    with tempfile.TemporaryDirectory() as data_dir:
        data.prepare(sources.SAMPLE_PHOTOS, data_dir=data_dir)
        print(
            f"sample_photos -> {args.image_size}x{args.image_size} crops, batch {args.batch_size}, 0 workers, "
            f"{args.batches} timed batches, {os.cpu_count()} CPUs"
        )
        print("decode cache  images/s  CPU ms/image")
        for _ in range(args.repeats):
            for label, cache in (("off", 0), ("on", pipeline.DEFAULT_DECODE_CACHE_BYTES)):
                rate, cpu_ms = time_loader(sources.SAMPLE_PHOTOS, data_dir, 0, args, decode_cache_bytes=cache)
                print(f"{label:>12s}  {rate:8.1f}  {cpu_ms:12.2f}")
        if args.train_steps:
            time_quickstart_training(data_dir, args)


def time_quickstart_training(data_dir: str, args: argparse.Namespace) -> None:
    """Training images/s of configs/quickstart.py: on one fixed batch (compute only), and fed by the loader.

    The loop is train.py's: a host batch placed on the mesh each step, metrics fetched every
    `log_every_steps` (the only waits, as in training), so loading overlaps the dispatched step
    exactly as much as it does there. Rounds alternate the three feeds.
    """
    import jax  # Only this part needs JAX.

    from smsanet_jax import config_util, parallel, train
    from smsanet_jax import state as state_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_util.load_config(os.path.join(root, "configs", "quickstart.py"), [])
    mesh = parallel.make_mesh(config.num_devices)
    state = state_lib.create_train_state(config, state_lib.build_model(config), mesh)
    step_fn = train.jit_train_step(config, mesh)

    def loader_batches(cache_bytes: int):
        loader = data.make_train_loader(
            name=config.data.name,
            data_dir=data_dir,
            image_size=config.image_size,
            local_batch_size=config.global_batch_size,
            seed=config.seed,
            num_workers=0,
            gray_threshold=config.data.gray_threshold,
            decode_cache_bytes=cache_bytes,
        )
        return (parallel.make_global({"rgb": b["rgb"]}, mesh) for b in iter(loader))

    fixed = next(loader_batches(0))
    feeds = {
        "compute only (one batch)": itertools.repeat(fixed),
        "loader, decode cache off": loader_batches(0),
        "loader, decode cache on": loader_batches(pipeline.DEFAULT_DECODE_CACHE_BYTES),
    }
    rates = {name: [] for name in feeds}

    def run(feed, steps):
        nonlocal state
        start = time.perf_counter()
        for step in range(1, steps + 1):
            state, metrics = step_fn(state, next(feed), None)
            if step % config.log_every_steps == 0 or step == steps:
                jax.device_get(metrics)
        return steps * config.global_batch_size / (time.perf_counter() - start)

    for feed in feeds.values():
        run(feed, min(config.log_every_steps, args.train_steps))  # Compiles once, fills the cache's first batches.
    for _ in range(args.repeats):
        for name, feed in feeds.items():
            rates[name].append(run(feed, args.train_steps))
    print(f"quickstart train step, batch {config.global_batch_size}, {args.train_steps} steps per round")
    print("feed                        images/s (median)  of compute only")
    compute = float(np.median(rates["compute only (one batch)"]))
    for name, values in rates.items():
        median = float(np.median(values))
        print(f"{name:26s}  {median:17.1f}  {median / compute:14.0%}")


def jpegs(args: argparse.Namespace) -> None:
    """Realistic JPEGs to 256x256 crops with each worker count, and the per-image work alone."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, data_dir = os.path.join(tmp, "jpegs"), os.path.join(tmp, "tfds")
        os.makedirs(folder)
        paths = write_jpegs(folder, args.num_files, (500, 375))
        name = data.prepare(folder, data_dir=data_dir).name
        print(
            f"{args.num_files} JPEGs of 500x375 (q90) -> {args.image_size}x{args.image_size} crops, "
            f"batch {args.batch_size}, {args.batches} timed batches, {os.cpu_count()} CPUs"
        )
        large = write_jpegs(tmp, 32, (1024, 768), seed=1)
        for label, files, reduced in (
            ("500x375 sources", paths, True),
            ("1024x768 sources, full decode", large, False),
            ("1024x768 sources, reduced decode", large, True),
        ):
            rate = time_per_image(files, args.image_size, reduced)
            print(f"in this process, {label:33s} {rate:7.1f} images/s")
        print("workers  images/s  per worker")
        for workers in args.workers:
            rate, _ = time_loader(name, data_dir, workers, args, decode_cache_bytes=0)
            print(f"{workers:7d}  {rate:8.1f}  {rate / max(workers, 1):10.1f}")


def main() -> None:
    malloc.reexec_with_tuned_malloc()  # As the smsanet-jax command runs: the train step's speed depends on it.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("quickstart", "jpegs"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="jpegs: worker counts")
    parser.add_argument("--num-files", type=int, default=128, help="jpegs: files written")
    parser.add_argument("--batch-size", type=int, help="default: 8 (quickstart), 32 (jpegs)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--image-size", type=int, help="default: 64 (quickstart), 256 (jpegs)")
    parser.add_argument("--repeats", type=int, default=2, help="quickstart: rounds of cache off/on")
    parser.add_argument(
        "--train-steps", type=int, default=100, help="quickstart: train steps per round and feed (0 skips training)"
    )
    args = parser.parse_args()
    quick = args.case == "quickstart"
    args.batch_size = args.batch_size or (8 if quick else 32)
    args.image_size = args.image_size or (64 if quick else 256)
    (quickstart if quick else jpegs)(args)


if __name__ == "__main__":
    main()
