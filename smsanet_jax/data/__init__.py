"""Datasets (tfds, array_record) and grain loaders: sample photos, image folders, ImageNet, tfds names.

`decode` (robust image decoding) and `transforms` (resizing, crops) need only Pillow and NumPy;
inference imports them. The dataset and loader names below come from `sources` and `pipeline`,
which import tensorflow_datasets and grain, so they are loaded on first use (PEP 562): loading a
colorizer for inference never imports the training data stack.
"""

import importlib

_EXPORTS = {
    "DEFAULT_GRAY_THRESHOLD": "pipeline",
    "Loader": "pipeline",
    "LoaderIterator": "pipeline",
    "make_eval_loader": "pipeline",
    "make_train_loader": "pipeline",
    "pad_for_process": "pipeline",
    "select_examples": "pipeline",
    "ImageSource": "sources",
    "PreparedDataset": "sources",
    "default_data_dir": "sources",
    "example_name": "sources",
    "open_source": "sources",
    "prepare": "sources",
    "read_image": "sources",
    "UnreadableImageError": "decode",
    "decode_rgb": "decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
