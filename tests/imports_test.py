"""The models, losses, metrics and colour code import without TensorFlow (checked in a clean process)."""

import subprocess
import sys
import textwrap

MODULES = (
    "smsanet_jax.colorspace",
    "smsanet_jax.metrics",
    "smsanet_jax.losses",
    "smsanet_jax.models",
    "smsanet_jax.models.basenet",
    "smsanet_jax.models.attention",
    "smsanet_jax.models.smsanet",
    "smsanet_jax.models.pfanet",
)


def test_core_modules_import_without_tensorflow():
    # A fresh interpreter: the test process itself may already have TensorFlow loaded.
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {MODULES!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        assert not loaded, f"TensorFlow was imported: {{loaded[:5]}}"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
