"""Native (C++) XLA:CPU kernels for the Winograd transforms, built by `prepare()` outside any trace.

The tile transforms move 4x the activations through memory and were a quarter of a CPU training
step. XLA fuses each into two passes over a 4x expanded array, and the zero padding into a copy
of its own; `native.cc` does a tile at a time in cache, in one pass, padding included: 1.3-2x
faster per transform, about 10% on the SMSANet step with the kernel transforms.

`prepare()` compiles it with the machine's C++ compiler ($CXX, else g++; warnings on) against the
XLA FFI headers of the installed jaxlib, once per cache, and registers it with XLA once per
process. Whoever builds a model for a run calls it (through `conv.prepare`) before the first
trace; a trace only reads `available()`, so the compiler never runs inside one, and a trace made
before `prepare()` keeps the XLA transforms. The library is cached in $SMSANET_NATIVE_CACHE
(default ~/.cache/smsanet_jax) under a name that hashes the source, the jaxlib version, the
compiler, its flags and the CPU, so a cache shared by different machines or upgrades never serves
a stale build. Without a compiler (after one warning), or with SMSANET_NATIVE=0, `available()`
stays False and `winograd.py` keeps its XLA formulations of the transforms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_TARGETS = {"smsanet_windows_to_planes": "SmsanetWindowsToPlanes", "smsanet_planes_to_pixels": "SmsanetPlanesToPixels"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra")
DISABLE_VARIABLE = "SMSANET_NATIVE"
NOT_PREPARED = "not prepared before tracing"
# Why the transforms cannot run: NOT_PREPARED until `prepare()`, then None once they are registered.
_unavailable: str | None = NOT_PREPARED


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags, which `-march=native` code depends on."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _cache_dir() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "smsanet_jax"
    return pathlib.Path(os.environ.get("SMSANET_NATIVE_CACHE", default))


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compile_command(output: str) -> list[str]:
    """The command line that builds the library at `output`."""
    return [_compiler(), *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", output]


def build() -> pathlib.Path:
    """Compiles the library unless the cache holds it; returns its path.

    Raises:
        OSError, subprocess.CalledProcessError: when it cannot be built.
    """
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), jaxlib.__version__, _compiler(), *_FLAGS, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"smsanet_native-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place, so that processes building at once
    # (the hosts of a job on one machine) never load a half-written file. The compiler writes the
    # file itself, which `files.atomic_write` (a writer handed an open file, in a layer above
    # this one) does not fit.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        completed = subprocess.run(_compile_command(partial), check=True, capture_output=True, text=True)
        if completed.stderr:
            logging.debug("compiler warnings for %s:\n%s", _SOURCE.name, completed.stderr)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def _registered_library() -> ctypes.CDLL:
    """Builds and loads the library and registers its kernels with XLA:CPU: once per process,
    as XLA refuses a second registration of the same names from another file."""
    library = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def _tracing() -> bool:
    """Whether a jit, make_jaxpr or eval_shape trace is under way: a new constant is then a tracer."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _load() -> str | None:
    """Builds and registers the library; returns None, or why the transforms cannot run."""
    if os.environ.get(DISABLE_VARIABLE) == "0":
        return f"{DISABLE_VARIABLE}=0"
    try:
        _registered_library()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = str(getattr(error, "stderr", None) or error).strip()
        warnings.warn(
            f"smsanet_jax: could not build the native Winograd transforms ({detail}); "
            "using the XLA ones, which are slower",
            RuntimeWarning,
            stacklevel=3,
        )
        lines = detail.splitlines() or [type(error).__name__]
        return "build failed: " + next((line for line in lines if "error" in line), lines[0])
    return None


def prepare() -> str | None:
    """Builds (or finds in the cache) and registers the native transforms, once per process.

    Call it outside any trace, before the model's first one: traces only read `available()`.

    Returns:
        None when the transforms are registered, else why not ("SMSANET_NATIVE=0", "build failed: ...").

    Raises:
        RuntimeError: when called inside a jit trace before the library is loaded.
    """
    global _unavailable
    if _unavailable == NOT_PREPARED:
        if _tracing():
            raise RuntimeError(
                "smsanet_jax.cpu.native.prepare() was called inside a jit trace; call it (or "
                "smsanet_jax.cpu.conv.prepare) before tracing, so that the compiler never runs in one"
            )
        _unavailable = _load()
    return _unavailable


def unavailable_reason() -> str | None:
    """None when the native transforms are registered, else why not (`NOT_PREPARED` before `prepare()`)."""
    return _unavailable


def available() -> bool:
    """Whether `prepare()` registered the native transforms; never builds anything."""
    return _unavailable is None


class _Geometry(NamedTuple):
    """A transform's static attributes (hashable, for `custom_partitioning`)."""

    matrix: tuple[tuple[float, ...], ...]
    window: int
    stride: int
    pad_top: int
    pad_left: int
    rows: int  # Windows per image column and row.
    cols: int
    height: int  # Of the image.
    width: int

    def attributes(self) -> dict[str, Any]:
        """The FFI attributes: `height` and `width` come from the image buffer's own shape."""
        attributes = {
            name: np.int64(value) for name, value in self._asdict().items() if name not in ("matrix", "height", "width")
        }
        return {**attributes, "matrix": np.asarray(self.matrix, np.float32).ravel()}


def _geometry(matrix, window: int, stride: int, image_shape: tuple[int, ...], padding) -> _Geometry:
    """The attributes of a transform (the kernels must be `available()`)."""
    if not available():
        raise RuntimeError(
            f"the native Winograd transforms are not available ({_unavailable}): call prepare() before "
            "tracing, or use winograd.py's XLA formulations"
        )
    (top, bottom), (left, right) = padding
    height, width = image_shape[1:3]
    return _Geometry(
        tuple(map(tuple, np.asarray(matrix, np.float32).tolist())),
        window,
        stride,
        top,
        left,
        (height + top + bottom - window) // stride + 1,
        (width + left + right - window) // stride + 1,
        height,
        width,
    )


def _windows_to_planes_call(x: jax.Array, geometry: _Geometry) -> jax.Array:
    """The custom call on one device's images: [N, H, W, C] -> [s * s, N, P * Q, C]."""
    result = jax.ShapeDtypeStruct(
        (len(geometry.matrix) ** 2, x.shape[0], geometry.rows * geometry.cols, x.shape[3]), x.dtype
    )
    return jax.ffi.ffi_call("smsanet_windows_to_planes", result, vmap_method="sequential")(x, **geometry.attributes())


def _planes_to_pixels_call(planes: jax.Array, geometry: _Geometry) -> jax.Array:
    """The custom call on one device's images: [s * s, N, P * Q, C] -> [N, H, W, C]."""
    result = jax.ShapeDtypeStruct((planes.shape[1], geometry.height, geometry.width, planes.shape[3]), planes.dtype)
    return jax.ffi.ffi_call("smsanet_planes_to_pixels", result, vmap_method="sequential")(
        planes, **geometry.attributes()
    )


def _split_by_image(call: Callable, image_axes: tuple[int, int], rule: str, replicated: tuple[str, ...]) -> Callable:
    """`call(array, geometry)`, partitioned over the image axis of its operand and result.

    XLA cannot see inside a custom call, so by default it gathers a sharded batch onto every
    device and transforms all of it on each. Every image's transform is independent: each device
    transforms its own images (at `image_axes` = (operand axis, result axis)), the other axes
    whole.
    """
    partitioned = custom_partitioning(call, static_argnums=(1,))

    def shardings(mesh, arg_shapes, result_shape):
        operand = arg_shapes[0]
        spec = tuple(operand.sharding.spec) + (None,) * operand.ndim
        images = spec[image_axes[0]]
        operand_spec, result_spec = [None] * operand.ndim, [None] * result_shape.ndim
        operand_spec[image_axes[0]], result_spec[image_axes[1]] = images, images
        return NamedSharding(mesh, P(*operand_spec)), NamedSharding(mesh, P(*result_spec))

    def partition(geometry, mesh, arg_shapes, result_shape):
        operand_sharding, result_sharding = shardings(mesh, arg_shapes, result_shape)
        return mesh, functools.partial(call, geometry=geometry), result_sharding, (operand_sharding,)

    def infer_sharding(geometry, mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, result_shape)[1]

    partitioned.def_partition(
        partition, infer_sharding_from_operands=infer_sharding, sharding_rule=rule, need_replication_factors=replicated
    )
    return partitioned


# The transforms mix pixels (h, w) with planes (t) and windows (k) within one image (n).
_windows_to_planes = _split_by_image(_windows_to_planes_call, (0, 1), "n h w c -> t n k c", ("h", "w"))
_planes_to_pixels = _split_by_image(_planes_to_pixels_call, (1, 0), "t n k c -> n h w c", ("t", "k"))


def _over_images(
    call: Callable, partitioned: Callable, geometry: _Geometry, image_axes: tuple[int, int]
) -> Callable[[jax.Array], jax.Array]:
    """`call(array, geometry)` as a function of `array` that shards and vmaps by image.

    Across devices it is `partitioned`: a `custom_partitioning` op puts a pointer to its Python
    callback into the program, so such programs never hit JAX's persistent compilation cache in
    another process, and single-device processes (every CPU training run but the multi-host tests)
    are spared it. Under `jax.vmap` (which `custom_partitioning` does not support) the mapped
    axis joins the images (`image_axes` = (operand axis, result axis)): one call for all.
    """
    operand_axis, result_axis = image_axes

    @jax.custom_batching.custom_vmap
    def transform(array):
        return (partitioned if jax.device_count() > 1 else call)(array, geometry)

    @transform.def_vmap
    def batched_transform(axis_size, in_batched, array):
        del axis_size  # The array's leading axis.
        if not in_batched[0]:
            return _over_images(call, partitioned, geometry, image_axes)(array), False
        array = jnp.moveaxis(array, 0, operand_axis)
        merged = array.reshape(*array.shape[:operand_axis], -1, *array.shape[operand_axis + 2 :])
        result = _over_images(call, partitioned, geometry, image_axes)(merged)
        result = result.reshape(
            *result.shape[:result_axis], array.shape[operand_axis], -1, *result.shape[result_axis + 1 :]
        )
        return jnp.moveaxis(result, result_axis, 0), True

    return transform


def windows_to_planes(x: jax.Array, matrix, window: int, stride: int, padding=((0, 0), (0, 0))) -> jax.Array:
    """[N, H, W, C] float32 -> [s * s, N * P * Q, C]: M d M^T of every window d of the padded image.

    Windows of `window` x `window` pixels start every `stride` pixels of the image zero-padded by
    `padding` ((top, bottom), (left, right)), P x Q of them; plane b * s + a of window d is
    sum_ij M[a, i] M[b, j] d[i, j] for the [s, window] matrix M.
    """
    geometry = _geometry(matrix, window, stride, x.shape, padding)
    planes = _over_images(_windows_to_planes_call, _windows_to_planes, geometry, (0, 1))(x)
    return planes.reshape(planes.shape[0], -1, planes.shape[3])


def planes_to_pixels(
    planes: jax.Array, matrix, window: int, stride: int, shape: tuple[int, int, int, int], padding=((0, 0), (0, 0))
) -> jax.Array:
    """The transpose of `windows_to_planes` for a [window, s] matrix M: overlapping windows add up.

    Returns the [N, H, W, C] image of the given shape in which window (p, q) of its padded frame
    adds sum_ab M[i, a] M[j, b] planes[b * s + a] to pixel (stride * p + i, stride * q + j) of
    that frame; what lands on the padding is dropped.
    """
    geometry = _geometry(matrix, window, stride, shape, padding)
    planes = planes.reshape(planes.shape[0], shape[0], geometry.rows * geometry.cols, planes.shape[2])
    return _over_images(_planes_to_pixels_call, _planes_to_pixels, geometry, (1, 0))(planes)
