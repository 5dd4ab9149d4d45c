"""Test-wide JAX setup: 8 fake CPU devices so that sharding is always exercised."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
