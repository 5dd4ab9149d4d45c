"""Exported colorizers: the conventions both export formats share, and ONNX colorization without JAX.

`smsanet-jax export` writes the colorizer's inference as a StableHLO file (a serialised
`jax.export.Exported`, with a JSON file beside it) or an ONNX model (the same JSON in its
`metadata_props`, under `METADATA_KEY`). Both take, in this order,

  l        float32 [N, S, S, 1]  CIE L* in [0, 100]
  ab_hint  float32 [N, S, S, 2]  raw CIE a*, b* of the point hints (Lab units); zeros without hints
  mask     float32 [N, S, S, 1]  1 where a hint is given, else 0

and give `ab`, float32 [N, S, S, 2], the predicted raw a*, b* (within (-110, 110)). S is fixed by
the export (`image_size` in the metadata); N is free unless the export fixed it (`batch`).

This module needs NumPy, Pillow and onnxruntime only: `OnnxColorizer` is a `colorize.PhotoNetwork`
that runs the network in onnxruntime and the full-resolution merge in NumPy, so colorizing works
where JAX is not installed (docs/export.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from smsanet_jax import colorspace, full_resolution, hints

try:
    import onnxruntime
except ImportError:  # The `onnx` extra is not installed: `OnnxNetwork` says how to get it.
    onnxruntime = None

METADATA_KEY = "smsanet_jax"  # The ONNX metadata_props key of the metadata JSON.
FORMAT = "smsanet-jax-colorizer"
FORMAT_VERSION = 1
INPUT_CHANNELS = {"l": 1, "ab_hint": 2, "mask": 1}  # The inputs, in order, and their channels.
OUTPUT_NAME = "ab"
INSTALL_HINT = "pip install 'smsanet-jax[onnx]' (docs/export.md)"


def parse_metadata(text: str | bytes, where: str) -> dict[str, Any]:
    """The metadata JSON of an exported colorizer, checked to be one of this format's.

    Args:
      text: the JSON text.
      where: what it was read from, for error messages (e.g. "--onnx model.onnx").

    Raises:
      ValueError: not JSON, not a smsanet-jax colorizer's metadata, or a newer format version.
    """
    try:
        metadata = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: its metadata is not JSON ({e}); export the model again") from e
    if not isinstance(metadata, Mapping) or metadata.get("format") != FORMAT:
        raise ValueError(f"{where}: not a smsanet-jax colorizer export; make one with smsanet-jax export")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: export format version {metadata.get('format_version')!r}, this smsanet-jax reads "
            f"{FORMAT_VERSION}; export the model again with this version"
        )
    return dict(metadata)


def network_inputs(
    metadata: Mapping[str, Any], l: Any, ab_hint: Any = None, mask: Any = None, *, where: str
) -> list[np.ndarray]:
    """[l, ab_hint, mask] as float32 arrays of the export's shapes; absent hints become zeros.

    Raises:
      ValueError: an input whose shape the export does not take (another image size, or another
        batch where the export fixed it), naming the expected shape.
    """
    l = np.asarray(l, np.float32)
    size, batch = metadata["image_size"], metadata["batch"]
    if l.ndim != 4 or l.shape[1:] != (size, size, 1):
        raise ValueError(f"{where}: exported for L of shape [N, {size}, {size}, 1], got {list(l.shape)}")
    if batch is not None and l.shape[0] != batch:
        raise ValueError(f"{where}: exported for a fixed batch of {batch}, got {l.shape[0]} rows")
    arrays = [l]
    for name, value in (("ab_hint", ab_hint), ("mask", mask)):
        shape = l.shape[:3] + (INPUT_CHANNELS[name],)
        value = np.zeros(shape, np.float32) if value is None else np.asarray(value, np.float32)
        if value.shape != shape:
            raise ValueError(f"{where}: {name} must have shape {list(shape)} to match L, got {list(value.shape)}")
        arrays.append(value)
    return arrays


class OnnxNetwork:
    """An exported ONNX colorizer in onnxruntime: L (and hints) in, raw ab out, as NumPy arrays.

    Attributes:
      metadata: the export's metadata (config, params_sha256, image_size, batch, ...).
      size: the network's input side.
      batch: the fixed batch of the export, or None when any batch runs.
    """

    def __init__(self, path: str, *, option: str = "--onnx"):
        """Opens `path` in onnxruntime (on every provider it has, the CPU last).

        Raises:
          FileNotFoundError: no such file.
          ValueError: onnxruntime missing, a damaged or truncated file, or an ONNX model that is
            not a smsanet-jax colorizer export (or whose inputs do not match its metadata).
        """
        where = f"{option} {path}"
        if onnxruntime is None:
            raise ValueError(f"{where}: running ONNX models needs onnxruntime; {INSTALL_HINT}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: no such file")
        try:
            self._session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
        except Exception as e:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) types.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{where}: not a readable ONNX model (damaged or truncated?): {reason}") from e
        stored = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise ValueError(
                f"{where}: an ONNX model, but not a smsanet-jax colorizer export (no {METADATA_KEY!r} "
                "metadata); make one with smsanet-jax export --format onnx"
            )
        self.metadata = parse_metadata(stored, where)
        self.size, self.batch = self.metadata["image_size"], self.metadata["batch"]
        self._where = where
        self._check_signature()

    def _check_signature(self) -> None:
        names = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if names != list(INPUT_CHANNELS) or outputs != [OUTPUT_NAME]:
            raise ValueError(
                f"{self._where}: its inputs {names} and outputs {outputs} are not a colorizer's "
                f"({list(INPUT_CHANNELS)} -> [{OUTPUT_NAME!r}]); export the model again"
            )
        for node in self._session.get_inputs():
            if list(node.shape[1:]) != [self.size, self.size, INPUT_CHANNELS[node.name]]:
                raise ValueError(
                    f"{self._where}: input {node.name} has shape {node.shape}, but the metadata says "
                    f"{self.size}x{self.size} images; the file was altered, export the model again"
                )

    def __call__(self, l: Any, ab_hint: Any = None, mask: Any = None) -> np.ndarray:
        """Raw ab [N, S, S, 2] for L [N, S, S, 1] in [0, 100], optional raw ab hints and mask.

        Raises:
          ValueError: inputs of shapes the export does not take (see `network_inputs`).
        """
        arrays = network_inputs(self.metadata, l, ab_hint, mask, where=self._where)
        return self._session.run([OUTPUT_NAME], dict(zip(INPUT_CHANNELS, arrays)))[0]


class OnnxColorizer:
    """A `colorize.PhotoNetwork` on an exported ONNX file: onnxruntime and NumPy, no JAX.

    The same photos give the same colorizations as `inference.PhotoColorizer` on the exported
    model, within one uint8 level (the network within 1e-3 ab units, the merge in NumPy).
    """

    def __init__(self, path: str, *, batch_size: int = 8, option: str = "--onnx"):
        """Opens the ONNX file (see `OnnxNetwork`); a fixed-batch export fixes `batch_size` too.

        Raises:
          FileNotFoundError, ValueError: see `OnnxNetwork`; `batch_size` < 1.
        """
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.network = OnnxNetwork(path, option=option)
        self.size = self.network.size
        self.batch_size = self.network.batch or batch_size

    def network_ab(self, photos: Sequence[hints.Photo]) -> np.ndarray:
        """The network's raw ab [len(photos), S, S, 2] (padded with zero rows to a fixed batch)."""
        rows = self.network.batch or len(photos)
        stacked = {k: hints.padded_stack([getattr(p, k) for p in photos], rows) for k in ("small", "ab_hint", "mask")}
        l, _ = colorspace.rgb_uint8_to_l_ab(stacked["small"])
        return self.network(l, stacked["ab_hint"], stacked["mask"])[: len(photos)]

    def __call__(self, photos: Sequence[hints.Photo], pad_to: int | None = None) -> list[np.ndarray]:
        """Full-resolution uint8 RGB colorizations of at most `batch_size` photos.

        `pad_to` is accepted for the protocol and not needed: onnxruntime compiles nothing per
        batch size, so only a fixed-batch export is padded (to its own batch).
        """
        del pad_to
        ab = self.network_ab(photos)
        return [full_resolution.merge(p.rgb, ab[i]) for i, p in enumerate(photos)]
