"""scripts/benchmark.py --quick end to end: it runs, prints a table and writes every JSON key (speed unchecked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"name", "dtype", "step_seconds", "step_seconds_median", "images_per_second"}


@pytest.mark.slow
def test_quick_run_writes_every_measurement(tmp_path):
    out = tmp_path / "results.json"
    # Unoptimised XLA code compiles several times faster; --quick's numbers are not meant to be fast.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| measurement |" in proc.stdout and "ratio_vs_pytorch" in proc.stdout

    results = json.loads(out.read_text())
    for key in (
        "ratio_vs_pytorch",
        "fraction_of_peak",
        "conv_impl_speedup",
        "training",
        "pytorch",
        "matmul_peak",
        "conv_impl",
        "inference",
        "memory",
        "machine",
        "load_average",
        "settings",
    ):
        assert key in results, key
    assert results["ratio_vs_pytorch"] > 0  # torch is a test dependency.
    assert 0 < results["fraction_of_peak"]
    assert results["conv_impl_speedup"] > 0
    assert results["memory"]["peak_rss_bytes"] > 0
    assert {(r["model"], r["dtype"], r["batch"]) for r in results["training"]} == {
        ("basenet", "float32", 1),
        ("smsanet", "float32", 1),
        ("smsanet_salient", "float32", 1),
    }
    assert [r["conv_impl"] for r in results["conv_impl"]] == ["xla", "cpu"]
    assert [r["photo_size"] for r in results["inference"]] == [[32, 32], [128, 96]]
    for row in (
        *results["training"],
        *results["pytorch"],
        *results["matmul_peak"],
        *results["conv_impl"],
        *results["inference"],
    ):
        assert ROW_KEYS <= set(row), row["name"]
        assert len(row["step_seconds"]) == 5
        assert row["images_per_second"] > 0
    peak = results["matmul_peak"][0]["flops_per_second"]
    for row in (*results["training"], *results["pytorch"]):
        assert row["flops_per_image"] > 0
        assert row["fraction_of_peak"] == pytest.approx(row["flops_per_second"] / peak)
