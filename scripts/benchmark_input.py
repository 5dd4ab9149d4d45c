"""Measures the training input pipeline: images/s of 256x256 crops from realistic JPEG files.

  .venv/bin/python scripts/benchmark_input.py [--workers 0 1 2] [--batches 20] [--batch-size 32]

It writes --num-files JPEGs of about 500x375 (quality 90, cut from the sample photos), prepares them
as an image-folder dataset, and times the grain training loader (decode, short-side resize, random
crop and flip, near-grayscale test) with each worker count after one warm-up batch (which absorbs
the worker start-up). It also times the per-image work in this process alone, which bounds what one
worker process can do, and the effect of reduced-size JPEG decoding on large sources.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

from smsanet_jax import data
from smsanet_jax.data import decode, sample_photos, transforms


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


def time_loader(name: str, data_dir: str, workers: int, args: argparse.Namespace) -> float:
    """Images/s of the training loader after a warm-up batch."""
    loader = data.make_train_loader(
        name=name,
        data_dir=data_dir,
        image_size=args.image_size,
        local_batch_size=args.batch_size,
        seed=0,
        num_workers=workers,
        process_index=0,
        process_count=1,
    )
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    return args.batches * args.batch_size / (time.perf_counter() - start)


def time_per_image(paths: list[str], image_size: int, reduced: bool) -> float:
    """Images/s of decode + crop + gray test in this process (no grain): one worker's ceiling."""
    blobs = [open(p, "rb").read() for p in paths]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for blob in blobs:
        image = decode.decode_rgb(blob, target_size=image_size if reduced else None)
        transforms.ab_spread(transforms.random_crop(image, image_size, rng))
    return len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-files", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

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
            rate = time_loader(name, data_dir, workers, args)
            print(f"{workers:7d}  {rate:8.1f}  {rate / max(workers, 1):10.1f}")


if __name__ == "__main__":
    main()
