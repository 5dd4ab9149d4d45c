"""Datasets (tfds, array_record) and grain loaders: sample photos, image folders, ImageNet, tfds names."""

from smsanet_jax.data.decode import UnreadableImageError, decode_rgb
from smsanet_jax.data.pipeline import (
    DEFAULT_GRAY_THRESHOLD,
    Loader,
    LoaderIterator,
    make_eval_loader,
    make_train_loader,
    select_examples,
)
from smsanet_jax.data.sources import (
    ImageSource,
    PreparedDataset,
    default_data_dir,
    example_name,
    open_source,
    prepare,
    read_image,
)

__all__ = [
    "DEFAULT_GRAY_THRESHOLD",
    "ImageSource",
    "Loader",
    "LoaderIterator",
    "PreparedDataset",
    "UnreadableImageError",
    "decode_rgb",
    "default_data_dir",
    "example_name",
    "make_eval_loader",
    "make_train_loader",
    "open_source",
    "prepare",
    "read_image",
    "select_examples",
]
