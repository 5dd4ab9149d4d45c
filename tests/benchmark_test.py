"""scripts/benchmark.py: --quick end to end (every JSON key, speed unchecked), its PyTorch salient step, bad options."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
import skimage.color
import torch

from smsanet_jax import convert, losses
from smsanet_jax.models import pfanet
from tests.reference import torch_losses, torch_pfanet

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"name", "dtype", "step_seconds", "step_seconds_median", "images_per_second"}
TORCH_ROWS = {("basenet", "eager"), ("basenet", "channels_last"), ("basenet", "compile"), ("basenet_salient", "eager")}


def _benchmark(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB")  # skimage: out-of-gamut colours, clipped as intended.
@pytest.mark.parametrize("size", [32, 64])  # PFANet at the image size, and resized to twice it and back.
def test_pytorch_salient_loss_is_the_jax_loss(size):
    """The salient row's PyTorch peer computes the same loss from the same PFANet weights: like for like."""
    rng = np.random.default_rng(0)
    lab = np.stack([rng.uniform(0, 100, (2, 32, 32)), *rng.uniform(-100, 100, (2, 2, 32, 32))], -1).astype(np.float32)
    l, ab = lab[..., :1], lab[..., 1:]
    pred = (0.5 * ab + rng.normal(0, 10, ab.shape)).astype(np.float32)
    torch.manual_seed(0)
    model = torch_pfanet.SODModel().eval()
    variables = convert.pfanet_from_torch({k: v.numpy() for k, v in model.state_dict().items()})
    saliency_fn = functools.partial(pfanet.saliency, variables, variant="s", size=size)

    rgb = _nhwc(torch_losses.lab_to_rgb(_nchw(lab)))
    np.testing.assert_allclose(rgb, skimage.color.lab2rgb(lab.astype(np.float64)), atol=1e-5)
    true_mask, pred_mask = losses.saliency_masks(saliency_fn, l, ab, pred, threshold=0.5)
    masks = torch_losses.saliency_masks(model, _nchw(l), _nchw(ab), _nchw(pred), size, threshold=0.5)
    assert 0 < float(np.mean(true_mask)) < 1  # Both classes occur, so the masks are a real check.
    chex.assert_trees_all_equal((np.asarray(true_mask), np.asarray(pred_mask)), tuple(_nhwc(m) for m in masks))
    expected, _ = losses.total(pred, ab, l, alpha=1.0, saliency_fn=saliency_fn, threshold=0.5)
    got = torch_losses.total(_nchw(pred), _nchw(ab), _nchw(l), alpha=1.0, pfanet=model, size=size, threshold=0.5)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--torch-variants", "fast"], "--torch-variants: unknown fast; choose from eager,channels_last,compile"),
        (["--torch-variants", ""], "--torch-variants: empty"),
        (["--models", "resnet"], "unknown models"),
        (["--out", "scripts"], "--out: scripts is a folder or in a folder that does not exist"),
        (["--out", "no/such/dir/b.json"], "--out: no/such/dir/b.json is a folder or in a folder that does not exist"),
    ],
)
def test_bad_options_are_one_clear_line(monkeypatch, capsys, option, message):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import benchmark  # pylint: disable=import-outside-toplevel

    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(option)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_every_measurement(tmp_path):
    out = tmp_path / "results.json"
    # Unoptimised XLA code compiles several times faster; --quick's numbers are not meant to be fast.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    proc = _benchmark("--quick", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| measurement |" in proc.stdout and "ratio_vs_pytorch" in proc.stdout

    results = json.loads(out.read_text())
    for key in (
        "ratio_vs_pytorch",
        "ratio_vs_pytorch_best",
        "ratio_vs_pytorch_salient",
        "pytorch_best_variant",
        "pytorch_skipped",
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
    # The fastest variant includes the eager one, so JAX's lead over it can only be smaller.
    assert 0 < results["ratio_vs_pytorch_best"] <= results["ratio_vs_pytorch"]
    assert results["ratio_vs_pytorch_salient"] > 0
    skipped = {(s["name"].split()[1], s["variant"]) for s in results["pytorch_skipped"]}
    assert skipped <= {("basenet", "compile")}, results["pytorch_skipped"]  # Only torch.compile may not work.
    assert {(r["model"], r["variant"]) for r in results["pytorch"]} == TORCH_ROWS - skipped
    rates = {(r["model"], r["batch"]): r["images_per_second"] for r in results["pytorch"] if r["variant"] == "eager"}
    for row in results["training"]:  # Each JAX row against the PyTorch step with its loss.
        peer = "basenet_salient" if row["salient_loss"] else "basenet"
        assert row["vs_pytorch"] == pytest.approx(row["images_per_second"] / rates[(peer, row["batch"])])
        assert row["vs_pytorch_best"] <= row["vs_pytorch"]
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


def test_input_benchmark_times_the_quickstart_step_with_each_feed():
    """scripts/benchmark_input.py quickstart, tiny: the loader table and the train step fed three ways."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_input.py"), "quickstart"]
        + ["--batches", "1", "--repeats", "1", "--train-steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    feeds = [line for line in lines if line.startswith(("compute only", "loader, decode cache"))]
    assert len(feeds) == 3, result.stdout
    assert feeds[0].rstrip().endswith("100%")
    assert all(float(line.split()[-2]) > 0 for line in feeds)  # images/s
