"""The C++ Winograd transforms against NumPy loops over windows, their fallbacks, and their build outside traces."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsanet_jax import parallel
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.cpu import native, winograd


def windows_to_planes_reference(x, matrix, window, stride, padding):
    """planes[b * s + a, (n, p, q)] = sum_ij M[a, i] M[b, j] xpad[n, stride p + i, stride q + j], in float64."""
    xpad = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    rows, cols = ((xpad.shape[k] - window) // stride + 1 for k in (1, 2))
    windows = np.stack(
        [
            np.stack(
                [xpad[:, stride * p : stride * p + window, stride * q : stride * q + window] for q in range(cols)], 1
            )
            for p in range(rows)
        ],
        1,
    )  # [N, P, Q, i, j, C]
    planes = np.einsum("ai,bj,npqijc->banpqc", matrix, matrix, windows)
    return planes.reshape(len(matrix) ** 2, -1, x.shape[-1])


def planes_to_pixels_reference(planes, matrix, window, stride, shape, padding):
    """The transpose of `windows_to_planes_reference`, by adding every window into a padded image."""
    (top, bottom), (left, right) = padding
    n, h, w, c = shape
    rows, cols = (h + top + bottom - window) // stride + 1, (w + left + right - window) // stride + 1
    side = matrix.shape[1]
    planes = np.asarray(planes, np.float64).reshape(side, side, n, rows, cols, c)  # [b, a, N, P, Q, C]
    pixels = np.einsum("ia,jb,banpqc->npqijc", matrix, matrix, planes)
    image = np.zeros((n, h + top + bottom, w + left + right, c))
    for p in range(rows):
        for q in range(cols):
            image[:, stride * p : stride * p + window, stride * q : stride * q + window] += pixels[:, p, q]
    return image[:, top : top + h, left : left + w]


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# (matrix, window, stride): the transforms of winograd.py's two algorithms (the output
# transforms and adjoints are these, transposed).
TRANSFORMS = {
    "F(2x2,3x3) input": (np.array(winograd.F2X2_3X3.b_t), 4, 2),
    "F(2x2,3x3) output adjoint": (np.array(winograd.F2X2_3X3.a_t).T, 2, 2),
    "F(2x2,3x3) kernel": (np.array(winograd.F2X2_3X3.g), 3, 3),
    "F(3x3,2x2) input": (np.array(winograd.F3X3_2X2.b_t), 4, 3),
    "F(3x3,2x2) output adjoint": (np.array(winograd.F3X3_2X2.a_t).T, 3, 3),
    "F(3x3,2x2) kernel": (np.array(winograd.F3X3_2X2.g), 2, 2),
}
# (batch, height, width, channels, padding): odd sizes, channels that are no multiple of the
# vector width or that the kernels split into slices (> 4096), padding on every side or none,
# and images smaller than a window.
GEOMETRIES = [
    (2, 9, 7, 5, ((1, 2), (1, 1))),
    (1, 8, 8, 16, ((0, 0), (0, 0))),
    (1, 2, 3, 3, ((1, 3), (2, 2))),
    (1, 5, 4, 4100, ((1, 1), (0, 1))),
]


@pytest.fixture(autouse=True)
def needs_native():
    """Where there is a C++ compiler the native transforms must build; elsewhere their tests skip."""
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("no C++ compiler: the native transforms cannot be built here")
    assert native.prepare() is None


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n,h,w,c,padding", GEOMETRIES)
def test_windows_to_planes_matches_numpy(name, n, h, w, c, padding):
    matrix, window, stride = TRANSFORMS[name]
    x = random((n, h, w, c), seed=0)
    got = native.windows_to_planes(x, matrix, window, stride, padding)
    chex.assert_trees_all_close(
        np.asarray(got), windows_to_planes_reference(x, matrix, window, stride, padding), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n,h,w,c,padding", GEOMETRIES)
def test_planes_to_pixels_is_the_transpose(name, n, h, w, c, padding):
    """planes_to_pixels takes the transposed matrix, as winograd.py's output transform and input adjoint do."""
    matrix, window, stride = TRANSFORMS[name]
    planes_shape = windows_to_planes_reference(np.zeros((n, h, w, c)), matrix, window, stride, padding).shape
    planes = random(planes_shape, seed=1)
    got = native.planes_to_pixels(planes, matrix.T, window, stride, (n, h, w, c), padding)
    expected = planes_to_pixels_reference(planes, matrix.T, window, stride, (n, h, w, c), padding)
    chex.assert_trees_all_close(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_a_sharded_batch_is_transformed_where_it_lies():
    """Over the 8 test devices each transforms its own images: no all-gather, the same planes."""
    matrix, window, stride = TRANSFORMS["F(2x2,3x3) input"]
    padding = ((1, 1), (1, 1))
    batch = parallel.batch_sharded(parallel.make_mesh())
    x = jax.device_put(random((8, 6, 6, 16), seed=2), batch)
    planes_fn = jax.jit(lambda x: native.windows_to_planes(x, matrix, window, stride, padding))
    pixels_fn = jax.jit(lambda planes: native.planes_to_pixels(planes, matrix.T, window, stride, x.shape, padding))
    planes = planes_fn(x)
    for compiled in (planes_fn.lower(x).compile(), pixels_fn.lower(planes).compile()):
        assert "all-gather" not in compiled.as_text()
    # The single-device form of the same calls.
    expected_planes = native._windows_to_planes_call(
        np.asarray(x), native._geometry(matrix, window, stride, x.shape, padding)
    )
    chex.assert_trees_all_close(planes, expected_planes.reshape(planes.shape))
    expected_pixels = native._planes_to_pixels_call(
        expected_planes, native._geometry(matrix.T, window, stride, x.shape, padding)
    )
    chex.assert_trees_all_close(pixels_fn(planes), expected_pixels)


def test_vmap_joins_the_images():
    """Under (nested) vmap, the same as transforming each batch on its own."""
    matrix, window, stride = TRANSFORMS["F(3x3,2x2) input"]
    padding = ((1, 0), (0, 1))
    x = random((2, 3, 2, 5, 4, 4), seed=3)  # [vmap, vmap, N, H, W, C]

    def round_trip(x):
        planes = native.windows_to_planes(x, matrix, window, stride, padding)
        return planes, native.planes_to_pixels(planes, matrix.T, window, stride, x.shape, padding)

    planes, pixels = jax.jit(jax.vmap(jax.vmap(round_trip)))(x)
    for i in range(2):
        for j in range(3):
            expected = round_trip(x[i, j])
            chex.assert_trees_all_close((planes[i, j], pixels[i, j]), expected)


def test_inconsistent_shapes_are_an_error_not_a_crash():
    x = jnp.ones((1, 6, 6, 3))
    bad_result = jax.ShapeDtypeStruct((16, 1, 5, 3), jnp.float32)  # 3 x 3 windows would need 9 tiles.
    call = jax.ffi.ffi_call("smsanet_windows_to_planes", bad_result, vmap_method="sequential")
    with pytest.raises(Exception, match="shapes do not agree"):
        call(
            x,
            matrix=np.eye(4, dtype=np.float32).ravel(),
            window=np.int64(4),
            stride=np.int64(2),
            pad_top=np.int64(1),
            pad_left=np.int64(1),
            rows=np.int64(3),
            cols=np.int64(3),
        ).block_until_ready()


@pytest.fixture
def unprepared(monkeypatch):
    """This process as before `prepare()` (the library, once registered, stays registered)."""
    monkeypatch.setattr(native, "_unavailable", native.NOT_PREPARED)


def test_opting_out_leaves_the_xla_transforms(monkeypatch, unprepared):
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    assert native.prepare() == "SMSANET_NATIVE=0"
    assert not native.available()
    assert not winograd._native_transforms(jnp.ones(3))


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("SMSANET_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        native.build()
    assert list(tmp_path.iterdir()) == []  # No half-built library.


def test_a_failed_build_warns_and_falls_back(monkeypatch, unprepared):
    def fail():
        raise OSError("no compiler")

    # The library stays registered in this process: XLA takes each kernel name once.
    monkeypatch.setattr(native, "_registered_library", fail)
    with pytest.warns(RuntimeWarning, match="could not build the native Winograd transforms"):
        assert native.prepare() == "build failed: no compiler"
    assert cpu_conv.describe("cpu") == "cpu (xla transforms: build failed: no compiler)"
    with pytest.raises(RuntimeError, match=r"not available \(build failed: no compiler\)"):
        native.windows_to_planes(jnp.ones((1, 4, 4, 1)), np.eye(4), 4, 2)


def test_the_library_is_built_once_per_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SMSANET_NATIVE_CACHE", str(tmp_path))
    library = native.build()
    assert list(tmp_path.iterdir()) == [library]
    built = library.stat().st_mtime_ns
    assert native.build() == library and library.stat().st_mtime_ns == built


def test_the_source_compiles_without_warnings(tmp_path):
    command = [*native._compile_command(str(tmp_path / "library.so")), "-Werror"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr


def test_traces_never_build_the_library(monkeypatch, unprepared):
    """Before prepare() a trace keeps the XLA transforms and builds nothing; prepare() in a trace is an error."""
    tracing_at_build = []
    registered = native._registered_library

    def recording_build():
        tracing_at_build.append(native._tracing())
        return registered()

    monkeypatch.setattr(native, "_registered_library", recording_build)
    # Shapes no other test traces: jit keeps each trace, and one made before prepare() stays XLA's.
    conv = functools.partial(cpu_conv.conv2d, padding=((1, 1), (1, 1)))
    kernel = jnp.ones((3, 3, 128, 128))
    assert "smsanet_windows_to_planes" not in str(jax.make_jaxpr(conv)(jnp.ones((1, 10, 6, 128)), kernel))
    assert cpu_conv.describe("auto") == "cpu (xla transforms: not prepared before tracing)"
    with pytest.raises(RuntimeError, match="inside a jit trace"):
        jax.jit(lambda x: native.prepare() or x)(1.0)
    assert tracing_at_build == []
    assert cpu_conv.prepare("auto") == "cpu+native"
    assert tracing_at_build == [False]
    assert "smsanet_windows_to_planes" in str(jax.make_jaxpr(conv)(jnp.ones((1, 6, 10, 128)), kernel))
