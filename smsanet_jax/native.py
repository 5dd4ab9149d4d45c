"""Native (C++) XLA:CPU kernels for the Winograd tile transforms, built on first use.

The transforms move 4x the activations through memory and are a quarter of a CPU training step.
XLA fuses each into two passes over a 4x expanded array, and the zero padding into a copy of its
own; `native.cc` does a tile at a time in cache, in one pass, padding included: 1.3-2x faster per
transform, 6-10% on the SMSANet step. It is compiled with the machine's C++ compiler ($CXX, else
g++) against the XLA FFI headers of the installed jaxlib, the first time a process needs it, and
cached in $SMSANET_NATIVE_CACHE (default ~/.cache/smsanet_jax) under a name that hashes the
source, the jaxlib version, the compiler and the CPU, so a cache shared by different machines or
upgrades never serves a stale build. Without a compiler (after one warning), or with
SMSANET_NATIVE=0, `available()` is False and ops.py keeps its XLA formulations of the transforms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile
import warnings

import jax
import jaxlib
import numpy as np

_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_TARGETS = {"smsanet_windows_to_planes": "SmsanetWindowsToPlanes",
            "smsanet_planes_to_pixels": "SmsanetPlanesToPixels"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
DISABLE_VARIABLE = "SMSANET_NATIVE"


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


def build() -> pathlib.Path:
    """Compiles the library unless the cache holds it; returns its path.

    Raises:
        OSError, subprocess.CalledProcessError: when it cannot be built.
    """
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), jaxlib.__version__, compiler, *_FLAGS,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"smsanet_native-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place, so that processes building at once
    # (the hosts of a job on one machine) never load a half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", partial],
                       check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def available() -> bool:
    """Whether the native transforms are built and registered with XLA:CPU (once per process)."""
    if os.environ.get(DISABLE_VARIABLE) == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"smsanet_jax: could not build the native Winograd transforms ({detail}); "
                      "using the XLA ones, which are slower", RuntimeWarning, stacklevel=2)
        return False
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _window_counts(image_shape: tuple[int, ...], window: int, stride: int, padding) -> dict[str, np.int64]:
    """The kernels' geometry attributes: leading padding and windows per column and row."""
    (top, bottom), (left, right) = padding
    return {"pad_top": np.int64(top), "pad_left": np.int64(left),
            "rows": np.int64((image_shape[1] + top + bottom - window) // stride + 1),
            "cols": np.int64((image_shape[2] + left + right - window) // stride + 1)}


def windows_to_planes(x: jax.Array, matrix, window: int, stride: int, padding=((0, 0), (0, 0))) -> jax.Array:
    """[N, H, W, C] float32 -> [s * s, N * P * Q, C]: M d M^T of every window d of the padded image.

    Windows of `window` x `window` pixels start every `stride` pixels of the image zero-padded by
    `padding` ((top, bottom), (left, right)), P x Q of them; plane b * s + a of window d is
    sum_ij M[a, i] M[b, j] d[i, j] for the [s, window] matrix M.
    """
    matrix = np.asarray(matrix, np.float32)
    geometry = _window_counts(x.shape, window, stride, padding)
    tiles = x.shape[0] * int(geometry["rows"]) * int(geometry["cols"])
    result = jax.ShapeDtypeStruct((matrix.shape[0] ** 2, tiles, x.shape[3]), x.dtype)
    return jax.ffi.ffi_call("smsanet_windows_to_planes", result, vmap_method="sequential")(
            x, matrix=matrix.ravel(), window=np.int64(window), stride=np.int64(stride), **geometry)


def planes_to_pixels(planes: jax.Array, matrix, window: int, stride: int, shape: tuple[int, int, int, int],
                     padding=((0, 0), (0, 0))) -> jax.Array:
    """The transpose of `windows_to_planes` for a [window, s] matrix M: overlapping windows add up.

    Returns the [N, H, W, C] image of the given shape in which window (p, q) of its padded frame
    adds sum_ab M[i, a] M[j, b] planes[b * s + a] to pixel (stride * p + i, stride * q + j) of
    that frame; what lands on the padding is dropped.
    """
    matrix = np.asarray(matrix, np.float32)
    result = jax.ShapeDtypeStruct(shape, planes.dtype)
    return jax.ffi.ffi_call("smsanet_planes_to_pixels", result, vmap_method="sequential")(
            planes, matrix=matrix.ravel(), window=np.int64(window), stride=np.int64(stride),
            **_window_counts(shape, window, stride, padding))
