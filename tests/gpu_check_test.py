"""scripts/gpu_check: the dry run's JSON (every key, nulls for the GPU's numbers), its options, its pieces."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {
    "dry_run",
    "headline",
    "training",
    "training_skipped",
    "matmul_peak",
    "bfloat16_vs_float32",
    "tests",
    "machine",
    "software",
    "environment",
    "float32_matmul_precision",
    "seconds",
    "settings",
}
ROW_KEYS = {
    "name",
    "model",
    "label",
    "dtype",
    "batch",
    "image_size",
    "width",
    "conv_impl",
    "device",
    "flops_per_image",
    "images_per_second",
    "step_seconds_median",
    "step_seconds",
    "flops_per_second",
    "mfu",
    "fraction_of_peak",
    "compile_seconds",
    "memory_bytes",
}
GAP_KEYS = {
    "model",
    "batch",
    "steps",
    "data",
    "gradient_at",
    "loss_float32",
    "loss_bfloat16",
    "final_loss_relative_gap",
    "max_loss_relative_gap",
    "gradient_relative_gap",
    "gradient_cosine",
    "params_gap_over_update",
}


@pytest.fixture
def gpu_check(monkeypatch):
    """scripts/gpu_check.py as a module (it imports the benchmark beside it)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check  # pylint: disable=import-outside-toplevel

    return gpu_check


@pytest.mark.slow
def test_dry_run_writes_every_key_with_null_measurements(tmp_path):
    """What a user runs on a CPU machine: the shell script, relative output path, defaults otherwise."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "gpu.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"dry run: {seconds:.0f} s")
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert set(results) == TOP_KEYS and results["dry_run"] is True
    rows = results["training"]
    assert [(r["model"], r["dtype"], r["batch"]) for r in rows] == [
        (model, dtype, batch)
        for model in ("smsanet", "basenet")
        for dtype in ("float32", "bfloat16")
        for batch in (16, 64, 128)
    ]
    for row in rows:
        assert set(row) == ROW_KEYS, row["name"]
        assert (row["image_size"], row["width"], row["conv_impl"]) == (256, 64, "xla")
        assert 4e11 < row["flops_per_image"] < 5e11  # The full network: ~438 GFLOP per training image.
        assert row["images_per_second"] is None and row["mfu"] is None and row["memory_bytes"] is None
    assert [m["dtype"] for m in results["matmul_peak"]] == ["float32", "bfloat16"]
    assert set(results["bfloat16_vs_float32"]) == GAP_KEYS
    assert results["bfloat16_vs_float32"]["steps"] == 20
    tests = results["tests"]
    assert tests["returncode"] == 0 and tests["collected"] > 40 and tests["deselected"] > 10
    assert "not (torch or keras" in tests["command"]
    assert set(results["headline"]) == {"best_mfu", "bfloat16_speedup", "mfu_reference"}
    assert results["training_skipped"] == []


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batches", "0"], "--batches: [0] not allowed"),
        (["--batches", ""], "--batches: empty"),
        (["--batches", "sixteen"], "--batches: invalid"),
        (["--batches", "16,64,16"], "--batches: [16] given twice"),
        (["--dtypes", "float16"], "--dtypes: ['float16'] not allowed; give float32 and/or bfloat16"),
        (["--models", "resnet"], "--models: ['resnet'] not allowed"),
        (["--gap-steps", "0"], "--gap-steps: 0 is below 1"),
        (["--repeats", "-1"], "--repeats: -1 is below 1"),
        (["--tests-timeout", "0"], "--tests-timeout: 0 is below 1"),
        (["--out", "."], "--out: . is a folder; give a file name"),
        (["--out", "no/such/folder/gpu.json"], "--out: the folder of no/such/folder/gpu.json does not exist"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options_are_one_clear_line(gpu_check, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(options)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_brief(gpu_check):
    args, overrides = gpu_check.parse_args([])
    assert (args.models, args.batches, args.dtypes) == (["smsanet", "basenet"], [16, 64, 128], ["float32", "bfloat16"])
    assert (args.gap_steps, args.gap_batch, args.out.endswith("gpu_check.json")) == (20, 16, True)
    assert overrides == ["--config.num_devices=1"]


def test_multi_device_tests_run_only_where_the_gpus_are(gpu_check):
    one, eight = (gpu_check.pytest_command(gpus)[-1] for gpus in (1, 8))
    assert "one_device_equals_eight_devices" in one and "traces_once" in one
    assert "one_device_equals_eight_devices" not in eight and "traces_once" not in eight
    assert all(name in eight for name in gpu_check.TEST_DESELECT)


def test_junit_summary_counts_and_names_failures(gpu_check, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.a_test" name="test_ok"/>'
        '<testcase classname="tests.a_test" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.b_test" name="test_broken"><error message="y"/></testcase>'
        '<testcase classname="tests.b_test" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.junit_summary(str(path))
    assert summary == {
        "tests": 4,
        "failures": 1,
        "errors": 1,
        "skipped": 1,
        "passed": 1,
        "failed": ["tests.a_test::test_bad", "tests.b_test::test_broken"],
    }


@dataclasses.dataclass
class _Row:
    name: str
    row: dict


def test_rows_that_cannot_fit_are_skipped_greediest_first(gpu_check):
    gb = 10**9
    rows = [_Row(f"b{n}", {"memory_bytes": {"arguments": gb, "total": n * gb}}) for n in (2, 20, 60, 90)]
    kept, skipped = gpu_check.fitting(rows, 80 * gb)
    # b90 needs 89 GB besides the 4 GB of states; then b60 needs 59 + 3: fits in 76.
    assert [r.name for r in kept] == ["b2", "b20", "b60"]
    assert [s["name"] for s in skipped] == ["b90"] and "93.0 GB" in skipped[0]["reason"]
    assert gpu_check.fitting(rows, None) == (rows, [])  # A backend that does not say: keep all.


def test_gradient_probe_keeps_the_params_and_stores_the_gradient(gpu_check):
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    loss = lambda p: jnp.sum(p["w"] ** 3)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=gpu_check.gradient_probe())
    stepped = state.apply_gradients(grads=jax.grad(loss)(params))
    np.testing.assert_array_equal(stepped.params["w"], params["w"])
    np.testing.assert_array_equal(stepped.opt_state["w"], 3 * params["w"] ** 2)
    assert isinstance(gpu_check.gradient_probe(), optax.GradientTransformation)


def test_photo_batches_are_real_photo_crops_and_repeatable(gpu_check):
    first, again = gpu_check.photo_batches(2, 3, 64), gpu_check.photo_batches(2, 3, 64)
    assert first.shape == (2, 3, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert all(crop.std() > 5 for crop in first.reshape(-1, 64, 64, 3))  # Photos, not flat fields.


@pytest.mark.slow
def test_the_measurements_run_on_a_cpu_at_tiny_sizes(tmp_path):
    """--allow-cpu: the measuring path (rows, MFU, memory, precision run) end to end; numbers unchecked."""
    out = tmp_path / "cpu.json"
    tiny = ["--config.image_size=32", "--config.model.width=8", "--config.model.n_scales=3"]
    options = ["--models", "basenet", "--batches", "2", "--matmul-size", "256", "--repeats", "1"]
    options += ["--gap-steps", "2", "--gap-batch", "2", "--min-time", "0.01"]
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--allow-cpu", "--no-tests", "--out", str(out), *tiny, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == TOP_KEYS and results["dry_run"] is False and results["tests"] is None
    for row in results["training"]:
        assert set(row) == ROW_KEYS and row["images_per_second"] > 0 and 0 < row["mfu"]
        assert row["memory_bytes"]["total"] > 0 and row["compile_seconds"] > 0
    gap = results["bfloat16_vs_float32"]
    assert len(gap["loss_float32"]) == len(gap["loss_bfloat16"]) == 2
    assert np.isfinite(gap["gradient_relative_gap"]) and -1 <= gap["gradient_cosine"] <= 1
    assert results["headline"]["bfloat16_speedup"]["basenet b2"] > 0
