"""Test-wide JAX setup: 8 fake CPU devices, a compilation cache shared by all tests, and the CPU fast path prepared.

Most test time is XLA compiling the same small networks again (in-process tests and CLI
subprocesses alike); a persistent cache for the session turns repeats into cache hits.
"""

import os
import tempfile

import jax
import pytest

from smsanet_jax.cpu import conv as cpu_conv

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="smsanet-jax-test-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session", autouse=True)
def prepared_convolutions():
    """As a run prepares its model before tracing: the native CPU transforms built, or found in the cache."""
    cpu_conv.prepare("auto")
