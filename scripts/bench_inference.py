"""Images/s of `colorize` (1024x768 photos, full-resolution output) and `evaluate` (256x256) on this machine.

  .venv/bin/python scripts/bench_inference.py --config configs/quickstart.py --images 16
  .venv/bin/python scripts/bench_inference.py --config configs/basenet.py --images 4   # full width

The network gets random weights of the config's shape (speed does not depend on the values).
Each command runs twice on the same photos; the second, compiled run is timed.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
import skimage.data
from PIL import Image

from smsanet_jax import colorize, config_util, evaluation, inference, state, weights

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _random_weights(config_path: str, overrides: list[str], path: str) -> None:
    config = config_util.load_config(config_path, overrides)
    size = config.image_size
    variables = state.build_model(config).init(jax.random.key(0), np.zeros((1, size, size, 1), np.float32))
    weights.save_variables(path, jax.device_get(variables), kind="benchmark")


def _photos(folder: str, count: int, size: tuple[int, int]) -> None:
    os.makedirs(folder)
    for i in range(count):
        image = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        image.resize(size, Image.Resampling.BICUBIC).save(os.path.join(folder, f"photo{i:03d}.jpg"), quality=90)


def _timed(fn) -> float:
    fn("warmup")
    start = time.perf_counter()
    fn("timed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "weights.msgpack")
        _random_weights(args.config, overrides, weights_path)
        colorizer = inference.load_colorizer(params=weights_path, config=args.config, overrides=overrides)
        network = inference.PhotoColorizer(colorizer, batch_size=args.batch_size)
        photos = os.path.join(tmp, "photos")
        _photos(photos, args.images, (1024, 768))
        seconds = _timed(lambda run: colorize.colorize(network, [photos], os.path.join(tmp, f"colorized_{run}")))
        width = colorizer.provenance["config"]["model"]["width"]
        print(
            f"colorize  1024x768 -> 1024x768, width {width}: {args.images / seconds:.2f} images/s "
            f"({seconds / args.images:.2f} s/image, {jax.device_count()} {jax.default_backend()} devices)",
            file=sys.stderr,
        )
        seconds = _timed(
            lambda run: evaluation.evaluate(colorizer, evaluation.FolderImages(photos), batch_size=args.batch_size)
        )
        print(
            f"evaluate  256x256 crops of 1024x768 JPEGs, width {width}: {args.images / seconds:.2f} images/s "
            f"({seconds / args.images:.2f} s/image)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
