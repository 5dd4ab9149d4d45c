"""The GPU check: the test subset and the training numbers that matter on an NVIDIA GPU, in one JSON.

  scripts/gpu_check.sh                              # a fresh GPU machine: installs .[gpu,test], runs this
  .venv/bin/python scripts/gpu_check.py --out gpu_check.json
  .venv/bin/python scripts/gpu_check.py --dry-run   # any machine: everything but the GPU steps, < 1 min

In order (the tests first, while no process of this run holds the GPU):
1. tests: TEST_FILES in a pytest subprocess, without the parity tests against the PyTorch/Keras
   references and the CPU-kernel tests (TEST_DESELECT), and without the multi-device tests where
   the machine has fewer GPUs than they need (MULTI_DEVICE_TESTS);
2. training: the benchmark's training rows (scripts/benchmark.py `jax_row`, `interleave`: compiled
   ahead of time, interleaved, medians after warm-up rounds) of --models at 256x256, width 64, in
   each --dtypes and --batches, beside a bfloat16 and a float32 matmul; a row that cannot fit in the
   GPU's memory is skipped with its reason (`training_skipped`);
3. per row: MFU (FLOP/s, direct-convolution FLOPs from XLA's cost analysis, over the bfloat16
   matmul's FLOP/s measured in this run), the compiled executable's memory (`memory_analysis()`:
   arguments + outputs - aliased + temporaries) and the compile time;
4. precision: --gap-steps steps in float32 and in bfloat16 from the same initial parameters on the
   same photo crops; the loss of each step, and, at the float32 run's final parameters, the
   relative gap between the two dtypes' gradients, and the parameters' gap.
--dry-run collects the tests (`pytest --collect-only`), lowers each row's step and the matmuls
instead of compiling them, traces the precision run with `jax.eval_shape`, and writes the JSON with
null measurements: the same keys as a real run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from typing import Any

import bench_inference  # Beside this file: the photo list.
import benchmark  # Beside this file: the training rows, the matmul peak and their scoring.
import jax
import jax.numpy as jnp
import numpy as np
import optax
import skimage.data

from smsanet_jax import config_util, files, parallel, train
from smsanet_jax import state as state_lib

DTYPES = ("float32", "bfloat16")
TEST_FILES = (
    "tests/smsanet_test.py",
    "tests/attention_test.py",
    "tests/basenet_test.py",
    "tests/pfanet_test.py",
    "tests/losses_test.py",
    "tests/colorspace_test.py",
    "tests/train_test.py",
    "tests/train_loop_test.py",
)
# Parity with the PyTorch/Keras references and the weight converters run on the CPU whatever the
# backend; PFANet-K's per-image test needs TensorFlow's Keras; the two-process test is about CPU
# collectives (gloo).
TEST_DESELECT = ("torch", "keras", "converter", "saliency_k", "two_processes")
# Tests that build a mesh of N devices: run where the machine has N GPUs.
MULTI_DEVICE_TESTS = {
    "one_device_equals_eight_devices": 8,
    "traces_once_and_transfers_nothing_implicitly": 2,
    "keeps_pfanet_frozen_and_trains_colorizer": 2,
}
TEST_ENV = {
    # pytest and the training processes some tests start share the GPU: none may take 75% of it.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # The tests' tolerances are float32's; by default float32 convolutions run in TF32 on the GPU.
    "JAX_DEFAULT_MATMUL_PRECISION": "highest",
}
# The measured values of a training row; a dry run has the other row keys and nulls for these.
MEASURED = (
    "images_per_second",
    "step_seconds_median",
    "step_seconds",
    "flops_per_second",
    "mfu",
    "fraction_of_peak",
    "compile_seconds",
    "memory_bytes",
)
TRAINING_KEYS = ("name", "model", "label", "dtype", "batch", "image_size", "width", "conv_impl", "device")
MATMUL_KEYS = ("name", "dtype", "n", "flops", "step_seconds_median", "flops_per_second")
FIT = 0.95  # Of the GPU's memory (bytes_limit) a row may plan to use: allocator fragmentation needs the rest.
SOFTWARE = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax", "nvidia-cudnn-cu12")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- Tests -------------------------------------------------------------------------------------


def pytest_command(gpus: int) -> list[str]:
    """The pytest command of the GPU subset on a machine with `gpus` GPUs."""
    deselect = [*TEST_DESELECT, *(name for name, needed in MULTI_DEVICE_TESTS.items() if needed > gpus)]
    return [
        sys.executable,
        "-m",
        "pytest",
        *TEST_FILES,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        f"not ({' or '.join(deselect)})",
    ]


def start_tests(gpus: int, dry_run: bool, junit: str) -> subprocess.Popen:
    """Starts the subset: collected only for a dry run, else run with a JUnit report at `junit`."""
    command = [*pytest_command(gpus), "--collect-only" if dry_run else f"--junitxml={junit}"]
    return subprocess.Popen(
        command,
        cwd=benchmark.ROOT,
        env={**os.environ, **TEST_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_tests(
    proc: subprocess.Popen, started: float, gpus: int, dry_run: bool, junit: str, timeout: float
) -> dict[str, Any]:
    """Waits for the subset started at `started` (killing it `timeout` seconds after) and summarises it."""
    try:
        output, _ = proc.communicate(timeout=max(1.0, started + timeout - time.perf_counter()))
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        timed_out = True
    result = {
        "command": shlex.join(pytest_command(gpus)),
        "environment": TEST_ENV,
        "gpus": gpus,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "collected": None,
        "deselected": None,
        **dict.fromkeys(("tests", "passed", "failures", "errors", "skipped", "failed"), None),
        "output_tail": output[-4000:],
    }
    if dry_run:
        found = re.findall(r"(?:(\d+)/)?(\d+) tests? collected(?: \((\d+) deselected\))?", output)
        if found:
            selected, total, deselected = found[-1]
            result["collected"] = int(selected or total)
            result["deselected"] = int(deselected or 0)
    elif os.path.exists(junit):
        result.update(junit_summary(junit))
    return result


def junit_summary(path: str) -> dict[str, Any]:
    """Counts of a JUnit XML report, and the failed tests' names."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for suite in suites
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "failed": failed}


def count_gpus() -> int:
    """GPUs JAX sees, asked of a child process so that this one holds no GPU memory yet.

    Raises:
        RuntimeError: JAX sees no GPU.
    """
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"JAX sees no GPU ({last}); is jax[cuda12] installed (scripts/gpu_check.sh) and the NVIDIA "
            "driver present? --dry-run checks everything else on any machine"
        )
    return int(proc.stdout.split()[-1])


# --- Training rows -----------------------------------------------------------------------------


def training_rows(args: argparse.Namespace, overrides: Sequence[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(training rows, matmul rows, skipped rows): the benchmark's rows measured, MFU against the bfloat16 matmul.

    A row whose step cannot fit on the GPU beside the other rows' resident state is skipped, and
    says so, rather than ending the run.
    """
    contestants, skipped = [], []
    for model in args.models:
        for dtype in args.dtypes:
            for batch in args.batches:
                try:
                    contestants.append(benchmark.jax_row(model, dtype, batch, overrides))
                except jax.errors.JaxRuntimeError as error:
                    if "RESOURCE_EXHAUSTED" not in str(error):
                        raise
                    skipped.append({"name": f"{model} {dtype} b{batch}", "reason": str(error).splitlines()[0][:500]})
    contestants, too_big = fitting(contestants, (jax.devices()[0].memory_stats() or {}).get("bytes_limit"))
    skipped += too_big
    gc.collect()  # The skipped rows' states go before the others run.
    matmuls = [benchmark.matmul(args.matmul_size, dtype) for dtype in DTYPES]
    rows = benchmark.interleave([*contestants, *matmuls], args.repeats, args.min_time)
    benchmark.score(rows)
    peak = next(r["flops_per_second"] for r in rows if r["kind"] == "matmul" and r["dtype"] == "bfloat16")
    training = [r for r in rows if r["kind"] == "training"]
    for r in training:
        r["mfu"] = r["flops_per_second"] / peak if r["flops_per_second"] else None
    keep = lambda r, keys: {k: r.get(k) for k in keys}
    return (
        [keep(r, (*TRAINING_KEYS, "flops_per_image", *MEASURED)) for r in training],
        [keep(r, MATMUL_KEYS) for r in rows if r["kind"] == "matmul"],
        skipped,
    )


def fitting(contestants: list, limit: int | None) -> tuple[list, list[dict]]:
    """The contestants whose step fits in `limit` bytes beside every kept one's arguments; the rest as skipped.

    While a step runs, every contestant's arguments (state and batch) stay resident; the step adds
    its outputs and temporaries (`memory_analysis`). The greediest step goes first until all fit.
    """
    if not limit:
        return contestants, []
    memory = lambda c: c.row["memory_bytes"] or {"total": 0, "arguments": 0}
    kept, skipped = list(contestants), []
    while kept:
        resident = sum(memory(c)["arguments"] for c in kept)
        worst = max(kept, key=lambda c: memory(c)["total"] - memory(c)["arguments"])
        need = resident + memory(worst)["total"] - memory(worst)["arguments"]
        if need <= FIT * limit:
            break
        kept.remove(worst)
        reason = (
            f"needs {need / 1e9:.1f} GB with the other rows' states; {FIT:.0%} of the GPU is {FIT * limit / 1e9:.1f} GB"
        )
        _log(f"skipping {worst.name}: {reason}")
        skipped.append({"name": worst.name, "reason": reason, "memory_bytes": worst.row["memory_bytes"]})
    return kept, skipped


def lowered_rows(args: argparse.Namespace, overrides: Sequence[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """The dry run's rows: each step lowered as the GPU runs it (XLA's convolutions), nothing measured."""
    training = []
    for model in args.models:
        label, config_file, _ = benchmark.MODELS[model]
        for dtype in args.dtypes:
            for batch in args.batches:
                row_overrides = [*benchmark.row_overrides(model, dtype, batch, overrides), "--config.conv_impl=xla"]
                flops = benchmark.lowered_flops_per_image(benchmark.CONFIGS / config_file, row_overrides)
                config = config_util.load_config(str(benchmark.CONFIGS / config_file), row_overrides)
                row = {
                    "name": f"{model} {dtype} b{batch}",
                    "model": model,
                    "label": label,
                    "dtype": dtype,
                    "batch": batch,
                    "image_size": config.image_size,
                    "width": config.model.width,
                    "conv_impl": "xla",
                    "device": None,
                    "flops_per_image": flops,
                }
                training.append({**row, **dict.fromkeys(MEASURED)})
                _log(f"lowered {row['name']}: {flops / 1e9 if flops else float('nan'):.1f} GFLOP/image")
    matmuls = []
    for dtype in DTYPES:
        n = args.matmul_size
        operand = jax.ShapeDtypeStruct((n, n), jnp.dtype(dtype))
        jax.jit(jnp.matmul).lower(operand, operand)
        matmuls.append({"name": f"matmul {dtype}", "dtype": dtype, "n": n, "flops": 2.0 * n**3})
    return training, [{**dict.fromkeys(MATMUL_KEYS), **m} for m in matmuls], []


# --- bfloat16 against float32 ------------------------------------------------------------------


def photo_batches(steps: int, batch: int, size: int, seed: int = 0) -> np.ndarray:
    """[steps, batch, size, size, 3] uint8: random size x size crops (half of them mirrored) of real photos."""
    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in bench_inference.PHOTOS]
    rng = np.random.default_rng(seed)

    def crop() -> np.ndarray:
        photo = photos[rng.integers(len(photos))]
        y, x = (rng.integers(0, photo.shape[i] - size + 1) for i in (0, 1))
        out = photo[y : y + size, x : x + size]
        return out[:, ::-1] if rng.random() < 0.5 else out

    return np.stack([np.stack([crop() for _ in range(batch)]) for _ in range(steps)])


def gradient_probe() -> optax.GradientTransformation:
    """An "optimizer" that leaves the parameters alone and keeps the step's gradient as its state."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _probe_state(config, source: state_lib.TrainState) -> state_lib.TrainState:
    """A state with `source`'s parameters and statistics (copied: the step donates it) for `gradient_probe`."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return state_lib.TrainState.create(
        apply_fn=state_lib.build_model(config).apply,
        params=copy(source.params),
        tx=gradient_probe(),
        batch_stats=copy(source.batch_stats),
    )


def _norm(tree: Any) -> float:
    return float(optax.global_norm(tree))


def _difference(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b)


def precision_gap(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
    """bfloat16 against float32: --gap-steps steps from the same init on the same photos (traced only if dry)."""
    _, config_file, _ = benchmark.MODELS[args.gap_model]
    extra = ["--config.conv_impl=xla"] if args.dry_run else []
    configs = {
        dtype: config_util.load_config(
            str(benchmark.CONFIGS / config_file),
            [*benchmark.row_overrides(args.gap_model, dtype, args.gap_batch, overrides), *extra],
        )
        for dtype in DTYPES
    }
    size = configs["float32"].image_size
    batches = photo_batches(args.gap_steps, args.gap_batch, size)
    mesh = parallel.make_mesh(1)
    result = {
        "model": args.gap_model,
        "batch": args.gap_batch,
        "steps": args.gap_steps,
        "data": f"random {size}x{size} crops of scikit-image photos ({', '.join(bench_inference.PHOTOS)}), "
        "the same for both dtypes",
        "gradient_at": "the float32 run's parameters after its last step, on the first batch",
        **dict.fromkeys(
            (
                "loss_float32",
                "loss_bfloat16",
                "final_loss_relative_gap",
                "max_loss_relative_gap",
                "gradient_relative_gap",
                "gradient_cosine",
                "params_gap_over_update",
            )
        ),
    }
    if args.dry_run:
        _trace_precision_run(configs, mesh, batches.shape[1:])
        return result
    return {**result, **_measure_precision_run(configs, mesh, batches)}


def _trace_precision_run(configs: dict, mesh: jax.sharding.Mesh, batch_shape: tuple[int, ...]) -> None:
    """What the precision run compiles, traced on abstract values: each dtype's step and gradient probe."""
    batch = {"rgb": jax.ShapeDtypeStruct(batch_shape, jnp.uint8, sharding=parallel.batch_sharded(mesh))}
    for dtype, config in configs.items():
        abstract = state_lib.abstract_train_state(config, state_lib.build_model(config), mesh)
        step, pfanet = train.jit_train_step(config, mesh), train.load_pfanet(config, mesh)
        out, _ = jax.eval_shape(step, abstract, batch, pfanet)
        probe = abstract.replace(tx=gradient_probe(), opt_state=abstract.params)
        grads, _ = jax.eval_shape(step, probe, batch, pfanet)
        assert jax.tree.structure(grads.opt_state) == jax.tree.structure(out.params), dtype
        _log(f"traced the {dtype} precision run and its gradient probe")


def _measure_precision_run(configs: dict, mesh: jax.sharding.Mesh, batches: np.ndarray) -> dict[str, Any]:
    """Trains each dtype on `batches` from the same init; the losses and gaps of `precision_gap`."""
    losses, final, pfanets = {}, {}, {}
    for dtype, config in configs.items():
        state = state_lib.create_train_state(config, state_lib.build_model(config), mesh)
        if dtype == "float32":
            initial = jax.device_get(state.params)
        step, pfanet = train.jit_train_step(config, mesh), train.load_pfanet(config, mesh)
        pfanets[dtype], curve = pfanet, []
        for photos in batches:
            state, metrics = step(state, parallel.make_global({"rgb": photos}, mesh), pfanet)
            curve.append(metrics["total"])
        losses[dtype] = [float(x) for x in jax.device_get(curve)]
        final[dtype] = state
        _log(f"{dtype}: loss {losses[dtype][0]:.5f} -> {losses[dtype][-1]:.5f} in {len(batches)} steps")
    first = parallel.make_global({"rgb": batches[0]}, mesh)
    grads = {}
    for dtype, config in configs.items():
        probed, _ = train.jit_train_step(config, mesh)(_probe_state(config, final["float32"]), first, pfanets[dtype])
        grads[dtype] = probed.opt_state
    g32, g16 = grads["float32"], grads["bfloat16"]
    dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)))
    relative = [abs(b - a) / abs(a) for a, b in zip(losses["float32"], losses["bfloat16"])]
    update = _norm(_difference(jax.device_get(final["float32"].params), initial))
    return {
        "loss_float32": losses["float32"],
        "loss_bfloat16": losses["bfloat16"],
        "final_loss_relative_gap": relative[-1],
        "max_loss_relative_gap": max(relative),
        "gradient_relative_gap": _norm(_difference(g16, g32)) / _norm(g32),
        "gradient_cosine": dot / (_norm(g32) * _norm(g16)),
        # How far the bfloat16 run ended from the float32 one, in units of how far float32 moved.
        "params_gap_over_update": _norm(_difference(final["bfloat16"].params, final["float32"].params)) / update,
    }


# --- Report ------------------------------------------------------------------------------------


def headline(training: list[dict]) -> dict[str, Any]:
    """The best MFU, and bfloat16's speed-up over float32 per model and batch."""
    measured = [r for r in training if r["mfu"] is not None]
    best = max(measured, key=lambda r: r["mfu"], default=None)
    rate = {(r["model"], r["batch"], r["dtype"]): r["images_per_second"] for r in training}
    speedup = {
        f"{model} b{batch}": (rate[(model, batch, "bfloat16")] / rate[(model, batch, "float32")])
        if rate.get((model, batch, "bfloat16")) and rate.get((model, batch, "float32"))
        else None
        for model, batch, _ in rate
    }
    return {
        "best_mfu": {"row": best["name"] if best else None, "mfu": best["mfu"] if best else None},
        "bfloat16_speedup": speedup,
        "mfu_reference": "bfloat16 matmul of this run (matmul_peak)",
    }


def gpu_facts() -> dict[str, Any]:
    """What nvidia-smi and JAX say about the GPU (nulls where they cannot tell)."""
    facts = {"nvidia_smi": None, "bytes_limit": None}
    try:
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        facts["nvidia_smi"] = proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    stats = jax.devices()[0].memory_stats() or {}
    facts["bytes_limit"] = stats.get("bytes_limit")
    return facts


def software() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in SOFTWARE}


# --- Command line ------------------------------------------------------------------------------


def _csv(cast: Callable[[str], Any], allowed: Sequence[str] | None = None, what: str = "") -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [cast(x) for x in text.split(",") if x]
        if not values:
            raise argparse.ArgumentTypeError(f"empty; give {what}")
        bad = [v for v in values if (allowed is not None and v not in allowed) or (allowed is None and v < 1)]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not allowed; give {what}")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{twice} given twice; give each once")
        return values

    return parse


def _at_least(minimum: float, cast: Callable[[str], Any] = int) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = cast(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The options and the `--config.*` overrides (of every row's config)."""
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="everything but the GPU steps, on any machine")
    models = ",".join(benchmark.MODELS)
    parser.add_argument(
        "--models",
        type=_csv(str, list(benchmark.MODELS), f"some of {models}"),
        default=["smsanet", "basenet"],
        help=f"training rows' models, of {models} (default smsanet,basenet)",
    )
    parser.add_argument(
        "--batches",
        type=_csv(int, what="positive batch sizes, e.g. 16,64,128"),
        default=[16, 64, 128],
        help="batch sizes (default 16,64,128)",
    )
    parser.add_argument(
        "--dtypes",
        type=_csv(str, DTYPES, "float32 and/or bfloat16"),
        default=list(DTYPES),
        help="compute dtypes (default float32,bfloat16)",
    )
    parser.add_argument("--repeats", type=_at_least(1), default=5, help="timed runs per row (median reported)")
    parser.add_argument("--min-time", type=_at_least(0.01, float), default=0.2, help="shortest timed run, seconds")
    parser.add_argument("--matmul-size", type=_at_least(128), default=8192, help="side of the peak matmuls")
    parser.add_argument("--gap-model", choices=list(benchmark.MODELS), default="smsanet", help="precision run's model")
    parser.add_argument("--gap-batch", type=_at_least(1), default=16, help="precision run's batch (default 16)")
    parser.add_argument("--gap-steps", type=_at_least(1), default=20, help="precision run's steps (default 20)")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip the test subset")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="measure on whatever backend JAX has: a smoke test of this script (with small --config.* sizes)",
    )
    parser.add_argument("--tests-timeout", type=_at_least(1), default=300, help="seconds the tests may take")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    out = files.resolve(args.out)
    if os.path.isdir(out):
        parser.error(
            f"--out: {args.out} is a folder; give a file name, e.g. {os.path.join(args.out, 'gpu_check.json')}"
        )
    if not os.path.isdir(os.path.dirname(out)):
        parser.error(f"--out: the folder of {args.out} does not exist; create it first")
    args.out = out
    return args, ["--config.num_devices=1", *overrides]


def run(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
    """Every step of the module docstring; the JSON's content."""
    started = time.perf_counter()
    seconds = {}
    gpus = 1 if args.dry_run or args.allow_cpu else count_gpus()
    tests = None
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        tests_started = time.perf_counter()
        proc = start_tests(gpus, args.dry_run, junit) if args.tests else None
        if proc and not args.dry_run:  # Real tests need the GPU to themselves; a collection runs alongside.
            tests = finish_tests(proc, tests_started, gpus, args.dry_run, junit, args.tests_timeout)
        mark = time.perf_counter()
        if not (args.dry_run or args.allow_cpu) and jax.default_backend() != "gpu":
            raise RuntimeError(f"JAX runs on {jax.default_backend()}, not a GPU; --dry-run checks the rest")
        if not args.dry_run:
            # The precision run compiles two of the rows' programs again: from this run's cache.
            jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "compilation-cache"))
        training, matmuls, skipped = (lowered_rows if args.dry_run else training_rows)(args, overrides)
        seconds["training"] = time.perf_counter() - mark
        mark = time.perf_counter()
        gap = precision_gap(args, overrides)
        seconds["precision"] = time.perf_counter() - mark
        if proc and args.dry_run:
            tests = finish_tests(proc, tests_started, gpus, args.dry_run, junit, args.tests_timeout)
    since_install = os.environ.get("GPU_CHECK_STARTED_AT")
    return {
        "dry_run": args.dry_run,
        "headline": headline(training),
        "training": training,
        "training_skipped": skipped,
        "matmul_peak": matmuls,
        "bfloat16_vs_float32": gap,
        "tests": tests,
        "machine": {**benchmark.machine(), "gpu": gpu_facts(), "gpus": gpus},
        "software": software(),
        "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS", *TEST_ENV, "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        "float32_matmul_precision": jax.config.jax_default_matmul_precision,  # None: TF32 on recent GPUs.
        "seconds": {
            "tests": tests["seconds"] if tests else None,
            **seconds,
            "total": time.perf_counter() - started,
            # gpu_check.sh's start, installation included.
            "since_script_start": time.time() - float(since_install) if since_install else None,
        },
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "overrides": list(overrides)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        results = run(args, overrides)
    except RuntimeError as error:
        print(f"gpu_check.py: error: {error}", file=sys.stderr)
        return 2
    files.write_text(args.out, json.dumps(results, indent=2) + "\n")
    summary = results["headline"]
    _log(
        f"wrote {args.out} ({'dry run, ' if args.dry_run else ''}{results['seconds']['total']:.0f} s): "
        f"best MFU {summary['best_mfu']}, bfloat16 speed-up {summary['bfloat16_speedup']}"
    )
    tests = results["tests"]
    return 1 if tests and (tests["timed_out"] or tests["returncode"] not in (0, None)) else 0


if __name__ == "__main__":
    sys.exit(main())
