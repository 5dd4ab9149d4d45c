"""tfds builder `sample_photos`: the colour photographs inside scikit-image's wheel (no download).

Nine photos: seven for `train`, and two natural scenes held out for `validation` (chelsea, the
cat, and coffee), so that the quickstart's evaluation grids show photos it never trained on. The
two stereo motorcycle views stay together in `train` because they are nearly the same picture.
Synthetic images (colorwheel, logo, chessboards) and grayscale ones are left out.
"""

from __future__ import annotations

import os

import skimage.data
import tensorflow_datasets as tfds

from smsanet_jax.data import image_folder

TRAIN_FILES = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",  # immunohistochemistry
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
VALIDATION_FILES = ("chelsea.png", "coffee.png")


class SamplePhotos(tfds.core.GeneratorBasedBuilder):
    """scikit-image's colour photographs, stored as their original file bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Seven training and two validation photos from scikit-image."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="The colour photographs that ship inside scikit-image (skimage.data).",
            features=image_folder.image_features(),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The files are already on disk.
        missing = [
            f for f in TRAIN_FILES + VALIDATION_FILES if not os.path.exists(os.path.join(skimage.data.data_dir, f))
        ]
        if missing:
            raise FileNotFoundError(
                f"scikit-image's data folder {skimage.data.data_dir} lacks {', '.join(missing)}; "
                "reinstall scikit-image from its wheel"
            )
        return {"train": self._generate_examples(TRAIN_FILES), "validation": self._generate_examples(VALIDATION_FILES)}

    def _generate_examples(self, files):
        for name in files:
            with open(os.path.join(skimage.data.data_dir, name), "rb") as f:
                yield name, {"image": f.read(), "file_name": name}
