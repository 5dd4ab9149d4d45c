"""The export command: a colorizer's inference as a StableHLO or ONNX file, checked before it is kept.

The exported function is the network in inference mode (BatchNorm running statistics) with its
weights embedded: L, raw ab hints and mask in, raw ab out (conventions: `exported`). It is always
traced with the portable XLA convolutions (`conv_impl="xla"`): the CPU fast path's custom calls
exist only inside this process's XLA. The batch dimension is symbolic unless fixed.

Every export is run once from the file it wrote (deserialised for StableHLO, onnxruntime for ONNX)
on a test input and compared with the JAX model; a difference over `PARITY_TOLERANCE` raw ab units
fails the export and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export as jax_export

import smsanet_jax
from smsanet_jax import exported, files, inference, state

FORMATS = ("stablehlo", "onnx")
ONNX_OPSET = 21  # ONNX 1.16 (2024); onnxruntime runs it from 1.18 on.
STABLEHLO_PLATFORMS = ("cpu", "cuda")  # One file lowered for both; jax.export picks the caller's.
PARITY_TOLERANCE = 1e-3  # Raw ab units, max abs over the test input.
PARITY_BATCH = 2  # Rows of the test input of a dynamic-batch export: one without hints, one with.
# jax2onnx pins an older orbax-checkpoint than the project's, which its converter never imports.
JAX2ONNX_INSTALL = "pip install 'smsanet-jax[export]' && pip install --no-deps jax2onnx==0.17.1 (docs/export.md)"
_LARGEST_SIZE_STEP = 1024  # The coarsest size step searched for an error message (2^10).


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
      path: the exported file.
      metadata_path: the StableHLO export's JSON beside it (None for ONNX, which carries it).
      num_bytes: the exported file's size.
      max_abs_error: max |ab_file - ab_jax| on the test input, raw ab units.
      metadata: the export's metadata (see `exported`).
    """

    path: str
    metadata_path: str | None
    num_bytes: int
    max_abs_error: float
    metadata: dict[str, Any]


def metadata_path(path: str) -> str:
    """The JSON beside a StableHLO export."""
    return path + ".json"


def export_colorizer(
    colorizer: inference.Colorizer,
    out: str,
    *,
    fmt: str,
    image_size: int = 256,
    batch: int | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Exports a colorizer's inference to `out`, runs the file once and checks it against JAX.

    Args:
      colorizer: from `inference.load_colorizer` (a workdir, or weights with their config).
      out: the file to write (StableHLO: its metadata goes to `out + ".json"`).
      fmt: "stablehlo" or "onnx".
      image_size: the side S of the exported [N, S, S, C] inputs; a multiple the network needs.
      batch: a fixed batch N; None exports a symbolic (any) batch.
      overwrite: replace existing output files.

    Returns:
      What was written, with the measured error.

    Raises:
      ValueError: a bad option (each named), the gray baseline, or an export that
        differs from the JAX model by more than `PARITY_TOLERANCE` (then nothing is written).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = check_out(out, fmt, overwrite)
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1 (leave it out for any batch size), got {batch}")
    infer = _inference_fn(colorizer)
    _check_image_size(infer, image_size)
    metadata = _metadata(colorizer, fmt, image_size, batch)
    if fmt == "onnx":
        data = _to_onnx(infer, image_size, batch, metadata)
    else:
        data = _to_stablehlo(infer, image_size, batch)
        metadata["file_sha256"] = hashlib.sha256(data).hexdigest()
    inputs = _test_inputs(image_size, batch or PARITY_BATCH)
    expected = np.asarray(jax.jit(functools.partial(colorizer.apply_fn, train=False))(colorizer.variables, *inputs))
    errors = []

    def write_and_check(f) -> None:
        f.write(data)
        f.flush()
        errors.append(_check_parity(f.name, fmt, metadata, inputs, expected))
        if fmt == "stablehlo":  # Written before the main file's rename: no export without its JSON.
            files.write_text(metadata_path(out), json.dumps(metadata, indent=2) + "\n")

    files.atomic_write(out, write_and_check)
    return ExportResult(out, metadata_path(out) if fmt == "stablehlo" else None, len(data), errors[0], metadata)


def check_out(out: str, fmt: str, overwrite: bool) -> str:
    """The absolute output path, checked before any work: a file name in a writable folder, new or replaceable.

    Raises:
      ValueError: `out` is a folder, its folder cannot be written or made, or an output exists and
        `overwrite` is False.
    """
    path = files.resolve(out)
    if os.path.isdir(path):
        raise ValueError(f"--out {out}: is a folder; give a file name (e.g. {os.path.join(out, 'colorizer.' + fmt)})")
    files.check_output_folder(os.path.dirname(path), "--out")
    outputs = [path] + ([metadata_path(path)] if fmt == "stablehlo" else [])
    existing = [p for p in outputs if os.path.lexists(p)]
    if existing and not overwrite:
        raise ValueError(f"--out {out}: {existing[0]} exists; pass --overwrite to replace it")
    return path


def _inference_fn(colorizer: inference.Colorizer) -> Callable[..., jax.Array]:
    """The colorizer's network as `fn(l, ab_hint, mask) -> ab`, XLA convolutions, weights closed over."""
    if colorizer.provenance["config"] is None:
        raise ValueError(f"{colorizer.provenance['source']}: a baseline has no network to export; give a model")
    config = ml_collections.ConfigDict(colorizer.provenance["config"])
    # How a run computes its convolutions is not part of the model (the weights are the same for
    # every conv_impl), so a workdir trained with conv_impl=cpu exports like any other.
    config.conv_impl = "xla"
    model = state.build_model(config)
    variables = jax.device_get(colorizer.variables)

    def infer(l, ab_hint, mask):
        return model.apply(variables, l, ab_hint, mask, train=False)

    return infer


def _specs(image_size: int, batch: int | str) -> list[jax.ShapeDtypeStruct]:
    return [
        jax.ShapeDtypeStruct((batch, image_size, image_size, c), jnp.float32) for c in exported.INPUT_CHANNELS.values()
    ]


def _traces(infer: Callable[..., jax.Array], image_size: int) -> bool:
    try:
        jax.eval_shape(infer, *_specs(image_size, 1))
    except ValueError:
        return False
    return True


def _check_image_size(infer: Callable[..., jax.Array], image_size: int) -> None:
    """Raises ValueError naming the size step the network needs (found with the model's own checks)."""
    if image_size > 0 and _traces(infer, image_size):
        return
    step = 8
    while step < _LARGEST_SIZE_STEP and not _traces(infer, step):
        step *= 2
    raise ValueError(
        f"--image-size {image_size}: this network takes sides that are positive multiples of {step} "
        f"(e.g. {step * max(1, round(256 / step))})"
    )


def _metadata(colorizer: inference.Colorizer, fmt: str, image_size: int, batch: int | None) -> dict[str, Any]:
    n = "N" if batch is None else batch
    provenance = colorizer.provenance
    metadata = {
        "format": exported.FORMAT,
        "format_version": exported.FORMAT_VERSION,
        "exported_as": fmt,
        "image_size": image_size,
        "batch": batch,
        "layout": "NHWC",
        "inputs": {
            "l": f"float32 [{n}, {image_size}, {image_size}, 1]: CIE L* in [0, 100]",
            "ab_hint": f"float32 [{n}, {image_size}, {image_size}, 2]: raw CIE a*, b* of point hints; zeros for none",
            "mask": f"float32 [{n}, {image_size}, {image_size}, 1]: 1 where a hint is given, else 0",
        },
        "outputs": {exported.OUTPUT_NAME: f"float32 [{n}, {image_size}, {image_size}, 2]: raw CIE a*, b*"},
        "config": provenance["config"],
        "params_sha256": provenance["params_sha256"],
        "source": provenance["source"],
        "step": provenance["step"],
        "smsanet_jax_version": smsanet_jax.__version__,
        "jax_version": jax.__version__,
    }
    if fmt == "onnx":
        metadata["opset"] = ONNX_OPSET
    else:
        metadata["platforms"] = list(STABLEHLO_PLATFORMS)
    return metadata


def _to_stablehlo(infer: Callable[..., jax.Array], image_size: int, batch: int | None) -> bytes:
    n = jax_export.symbolic_shape("N")[0] if batch is None else batch
    exported_fn = jax_export.export(jax.jit(infer), platforms=STABLEHLO_PLATFORMS)(*_specs(image_size, n))
    return bytes(exported_fn.serialize())


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Silences the converter's routine noise: jax2onnx logs its arguments (on the root logger) and a
    traceback for each plugin whose library (equinox, dm_pix, ...) is missing; onnx_ir warns about
    the shape values it leaves untyped."""
    quieter = {"": logging.WARNING, "jax2onnx": logging.ERROR, "onnx_ir": logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in quieter.items()}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def _to_onnx(infer: Callable[..., jax.Array], image_size: int, batch: int | None, metadata: Mapping) -> bytes:
    try:
        import jax2onnx  # pylint: disable=import-outside-toplevel  # Optional, installed apart (JAX2ONNX_INSTALL).
    except ImportError as e:
        raise ValueError(f"--format onnx needs jax2onnx: {JAX2ONNX_INSTALL}") from e
    n = "N" if batch is None else batch
    with _quiet_converter():
        model = jax2onnx.to_onnx(
            infer,
            [(n, image_size, image_size, c) for c in exported.INPUT_CHANNELS.values()],
            opset=ONNX_OPSET,
            model_name="smsanet_jax_colorizer",
            input_names=list(exported.INPUT_CHANNELS),
            output_names=[exported.OUTPUT_NAME],
        )
    model.metadata_props.add(key=exported.METADATA_KEY, value=json.dumps(metadata))
    return model.SerializeToString()


def _test_inputs(image_size: int, batch: int) -> list[np.ndarray]:
    """L uniform in [0, 100]; the first row without hints, the others with 1% of pixels hinted."""
    rng = np.random.default_rng(0)
    l = rng.uniform(0.0, 100.0, (batch, image_size, image_size, 1)).astype(np.float32)
    mask = (rng.random((batch, image_size, image_size, 1)) < 0.01).astype(np.float32)
    mask[0] = 0.0
    ab_hint = (rng.uniform(-100.0, 100.0, (batch, image_size, image_size, 2)) * mask).astype(np.float32)
    return [l, ab_hint, mask]


class StableHloNetwork:
    """A StableHLO export, deserialised: L (and hints) in, raw ab out, with no project model code.

    Attributes:
      metadata: the export's metadata (its JSON beside the file).
      size: the network's input side.
      batch: the fixed batch of the export, or None when any batch runs.
    """

    def __init__(self, path: str, metadata: Mapping[str, Any] | None = None, *, option: str = "--stablehlo"):
        """Loads `path`; `metadata` None reads the JSON beside it.

        Raises:
          FileNotFoundError: no such file.
          ValueError: a missing or foreign JSON, a file that is not the one the JSON describes
            (damaged, truncated, or another export), or one that does not deserialise.
        """
        where = f"{option} {path}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: no such file")
        if metadata is None:
            try:
                with open(metadata_path(path), "rb") as f:
                    metadata = exported.parse_metadata(f.read(), f"{where} (its JSON {metadata_path(path)})")
            except FileNotFoundError:
                raise ValueError(f"{where}: no {metadata_path(path)} beside it; export the model again") from None
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != metadata.get("file_sha256"):
            raise ValueError(
                f"{where}: not the file its JSON describes (damaged, truncated or another export); export it again"
            )
        try:
            self._exported = jax_export.deserialize(bytearray(data))
        except Exception as e:  # The flatbuffer reader raises struct.error, IndexError, ...
            raise ValueError(f"{where}: not a readable StableHLO export ({type(e).__name__}: {e})") from e
        self.metadata = dict(metadata)
        self.size, self.batch = metadata["image_size"], metadata["batch"]
        self._where = where

    def __call__(self, l: Any, ab_hint: Any = None, mask: Any = None) -> np.ndarray:
        """Raw ab [N, S, S, 2] for L [N, S, S, 1] in [0, 100], optional raw ab hints and mask.

        Raises:
          ValueError: inputs of shapes the export does not take (see `exported.network_inputs`).
        """
        arrays = exported.network_inputs(self.metadata, l, ab_hint, mask, where=self._where)
        return np.asarray(self._exported.call(*arrays))


def _check_parity(path: str, fmt: str, metadata: Mapping, inputs: list[np.ndarray], expected: np.ndarray) -> float:
    """Runs the written file on `inputs`; returns max |ab - expected|, raising ValueError over the tolerance."""
    if fmt == "onnx":
        network = exported.OnnxNetwork(path, option="--out")
    else:
        network = StableHloNetwork(path, metadata, option="--out")
    error = float(np.max(np.abs(network(*inputs) - expected)))
    if not error <= PARITY_TOLERANCE:  # NaN fails too.
        raise ValueError(
            f"--out: the {fmt} export differs from the JAX model by {error:.3g} raw ab units (max abs, "
            f"tolerance {PARITY_TOLERANCE:g}); nothing was written. Please report this with the model's config"
        )
    return error
