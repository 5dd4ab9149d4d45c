"""Training and inference speed on the current backend, side by side with the PyTorch reference.

  .venv/bin/python scripts/benchmark.py --out results.json            # everything: 10-15 min on 2 idle CPU cores
  .venv/bin/python scripts/benchmark.py --models smsanet --batches 1  # the headline row only
  .venv/bin/python scripts/benchmark.py --quick --out /tmp/b.json     # tiny sizes: a smoke test

Measured in one run, each group interleaved (A B C A B C ..., after compiling and WARMUP_ROUNDS
untimed rounds) so that load from other processes hits every contestant alike, and reported as medians:
- training images/s of BaseNet, SMSANet (alpha 0) and SMSANet with the salient loss (random PFANet
  weights: the cost is the same), per batch size and dtype (bfloat16 on GPU/TPU, or with --bf16),
  beside the PyTorch BaseNet step (tests/reference: the SIGGRAPH17 module, the same Huber loss and
  torch.optim.Adam, with as many threads as JAX's CPU backend uses) run three ways (--torch-variants:
  eager NCHW, channels_last, and torch.compile of the channels_last model, where its compiler
  works: if not, `pytorch_skipped` says why), the PyTorch counterpart of the salient-loss row
  (that step plus the reference PFANet-S forward on the two RGB renderings under no_grad, eager)
  and a square matmul, whose FLOP/s is the peak each step is scored against;
- FLOPs per image from XLA's cost analysis of the step in its standard form (`conv_impl="xla"`,
  lowered), used for every row including the PyTorch one: the executable's own count (kept as
  `compiled_flops_per_image`) misses most of the fast CPU convolutions' weight gradients, whose
  taps are a loop that XLA's cost analysis counts once. It counts direct convolutions: the fast
  CPU convolutions' Winograd forms multiply 2.25x less, so their FLOP/s is the direct-equivalent
  rate and can pass the matmul peak. And the compiled memory footprint (arguments + outputs +
  temporaries);
- the quickstart model's step with each --conv-impl (the fast CPU convolutions against XLA's);
- images/s of `colorize` (random weights of configs/smsanet.py) on photos of each --photo-sizes.
- with --runtime-batches: BaseNet's network alone (L -> ab) in JAX (both conv implementations),
  onnxruntime (the `export --format onnx` file) and PyTorch eager, per batch (`runtime_group`).
Extra `--config.key=value` arguments override the training and inference configs. JSON (--out)
holds every measurement, `ratio_vs_pytorch` (SMSANet alpha 0, float32, batch 1, over the eager
PyTorch step), `ratio_vs_pytorch_best` (the same row over the fastest PyTorch variant, named by
`pytorch_best_variant`), `ratio_vs_pytorch_salient` (SMSANet + salient loss over its PyTorch
counterpart) and `fraction_of_peak` (the SMSANet row, bfloat16 on GPU/TPU, over the matmul peak).
Each JAX training row's `vs_pytorch` and `vs_pytorch_best` compare it with the PyTorch rows of its
batch and loss (Huber alone, or with the salient loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_inference  # Beside this file: photo folders and random-weight files for `colorize`.
import jax
import jax.numpy as jnp
import numpy as np

from smsanet_jax import colorize, colorspace, config_util, files, inference, parallel, train
from smsanet_jax import state as state_lib
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.cpu import malloc, native

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The PyTorch contestants run the tests' reference modules: `tests.reference` from the repository root.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
# name -> (label, config file, overrides).
MODELS = {
    "basenet": ("BaseNet", "basenet.py", ()),
    "smsanet": ("SMSANet (alpha 0)", "smsanet_huber.py", ()),
    "smsanet_salient": ("SMSANet + salient loss", "smsanet.py", ("--config.init.pfanet=random",)),
}
# Shrinks every config to the tiny test model (configs/tiny.py): seconds instead of minutes.
QUICK_OVERRIDES = (
    "--config.image_size=32",
    "--config.model.width=8",
    "--config.model.n_scales=3",
    "--config.loss.pfanet_size=32",
)
# The PyTorch peers: name -> (label, config file, overrides); the salient one is SMSANet + salient loss's.
TORCH_MODELS = {
    "basenet": ("BaseNet, PyTorch", "basenet.py", ()),
    "basenet_salient": ("BaseNet + salient loss, PyTorch", "basenet_salient.py", ("--config.init.pfanet=random",)),
}
# How the PyTorch BaseNet step runs: name -> (label suffix, torch memory format, torch.compile'd).
TORCH_VARIANTS = {
    "eager": ("", "contiguous_format", False),
    "channels_last": (", channels_last", "channels_last", False),
    "compile": (", channels_last + torch.compile", "channels_last", True),
}
HEADLINE_MODEL, HEADLINE_BATCH = "smsanet", 1
# Untimed rounds before the timed ones: a CPU process's heap grows for its first ~3 steps (see
# smsanet_jax/cpu/malloc.py), and the first calls of a program pay one-off costs.
WARMUP_ROUNDS = 3
# Top-level JSON keys, table order.
GROUPS = ("training", "pytorch", "matmul_peak", "conv_impl", "inference", "runtimes")


@dataclasses.dataclass
class Contestant:
    """One thing to time: `step()` dispatches one unit of work, `sync(out)` waits for it to finish."""

    name: str
    step: Callable[[], Any]
    images: int  # Images per step (for a matmul: 1).
    sync: Callable[[Any], Any] = jax.block_until_ready
    row: dict = dataclasses.field(default_factory=dict)  # What the JSON row says besides the times.


# --- Timing ------------------------------------------------------------------------------------


def _run(contestant: Contestant, calls: int) -> float:
    """Seconds per step over `calls` back-to-back steps (a fast device queues them asynchronously)."""
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = contestant.step()
    contestant.sync(out)
    return (time.perf_counter() - start) / calls


def interleave(contestants: Sequence[Contestant], repeats: int, min_time: float) -> list[dict]:
    """Times each contestant `repeats` times, round-robin, after WARMUP_ROUNDS round-robin warm-up steps.

    A step shorter than `min_time` seconds is repeated within each timing so that dispatch and
    timer overheads vanish (only on fast devices; on a CPU every step here takes longer).

    Args:
        contestants: already compiled work.
        repeats: timed runs per contestant.
        min_time: shortest timed run, in seconds.

    Returns:
        One row per contestant: its `row`, the per-step seconds of each run, their median and
        images per second.
    """
    for r in range(WARMUP_ROUNDS):
        warm = {c.name: _run(c, 1) for c in contestants}
        # The last (warmest) round sets how many steps make a timed run.
        calls = {name: max(1, math.ceil(min_time / max(seconds, 1e-9))) for name, seconds in warm.items()}
        _log(
            f"  warm-up {r + 1}/{WARMUP_ROUNDS}: "
            + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in warm.items())
        )
    times = {c.name: [] for c in contestants}
    for r in range(repeats):
        for c in contestants:
            times[c.name].append(_run(c, calls[c.name]))
        _log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{c.name} {times[c.name][-1]:.3f} s" for c in contestants))
    rows = []
    for c in contestants:
        median = float(np.median(times[c.name]))
        rows.append(
            {
                **c.row,
                "name": c.name,
                "images_per_step": c.images,
                "calls_per_run": calls[c.name],
                "step_seconds": times[c.name],
                "step_seconds_median": median,
                "images_per_second": c.images / median,
            }
        )
    return rows


# --- Contestants -------------------------------------------------------------------------------


def _random_rgb(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _memory(compiled) -> dict[str, int] | None:
    """Bytes the compiled executable needs on its device (None where the backend does not say)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    peak = (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    )
    return {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "total": peak,
    }


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per executable.
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None


def jax_training(name: str, config_file: Path, overrides: Sequence[str], row: dict) -> Contestant:
    """The jitted, sharded train step of a config on a fixed random batch, compiled ahead of time.

    Args:
        name: the contestant's name.
        config_file: a config in configs/.
        overrides: `--config.key=value` overrides (batch size, dtype, devices included).
        row: facts for the JSON row.

    Returns:
        The contestant; its row gains the FLOPs per image (`lowered_flops_per_image`), the
        executable's own count, the compiled memory and the compile time.
    """
    config = config_util.load_config(str(config_file), overrides)
    mesh = parallel.make_mesh(config.num_devices)
    state = state_lib.create_train_state(config, state_lib.build_model(config), mesh)
    pfanet_variables = train.load_pfanet(config, mesh)
    batch = parallel.make_global({"rgb": _random_rgb(config.global_batch_size, config.image_size)}, mesh)
    start = time.perf_counter()
    compiled = train.jit_train_step(config, mesh).lower(state, batch, pfanet_variables).compile()
    compile_seconds = time.perf_counter() - start
    compiled_flops = _cost_flops(compiled)
    holder = [state]  # The step donates the state: each call replaces it.

    def step():
        holder[0], metrics = compiled(holder[0], batch, pfanet_variables)
        return holder[0], metrics

    row = {
        **row,
        "framework": "jax",
        "batch": config.global_batch_size,
        "image_size": config.image_size,
        "width": config.model.width,
        "dtype": config.dtype,
        "salient_loss": bool(config.loss.alpha),
        "conv_impl": "cpu" if cpu_conv.use_fast_path(config.conv_impl) else "xla",
        "device": mesh.devices.flat[0].device_kind,
        "devices": mesh.size,
        "compile_seconds": compile_seconds,
        "memory_bytes": _memory(compiled),
        "flops_per_image": lowered_flops_per_image(config_file, overrides),
        # The executable's cost analysis describes one device's share of the partitioned step.
        "compiled_flops_per_image": (compiled_flops * mesh.size / config.global_batch_size if compiled_flops else None),
    }
    return Contestant(name, step, config.global_batch_size, row=row)


def lower_train_step(config_file: Path, overrides: Sequence[str]) -> tuple[Any, jax.stages.Lowered]:
    """A config's train step lowered on abstract inputs: (config, lowered); nothing allocated or compiled.

    Only a salient-loss config with `init.pfanet=random` initialises (small) PFANet weights.
    """
    config = config_util.load_config(str(config_file), overrides)
    mesh = parallel.make_mesh(config.num_devices)
    state = state_lib.abstract_train_state(config, state_lib.build_model(config), mesh)
    shape = (config.global_batch_size, config.image_size, config.image_size, 3)
    batch = {"rgb": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=parallel.batch_sharded(mesh))}
    pfanet_variables = train.load_pfanet(config, mesh)
    return config, train.jit_train_step(config, mesh).lower(state, batch, pfanet_variables)


def lowered_flops_per_image(config_file: Path, overrides: Sequence[str]) -> float | None:
    """FLOPs per image of a config's train step, from the cost analysis of its standard form.

    The step is lowered with XLA's own convolutions (`conv_impl="xla"`, loop-free: a while loop's
    body counts once in XLA's cost analysis, and the fast CPU weight gradients loop over taps) on
    abstract inputs, so nothing is allocated or compiled. The count, before XLA's optimisations, is
    within about 1% of the compiled step's; transposed convolutions count no multiplications by
    the zeros of their dilated input.
    """
    config, lowered = lower_train_step(config_file, [*overrides, "--config.conv_impl=xla"])
    cost = lowered.cost_analysis()
    return float(cost["flops"]) / config.global_batch_size if cost and cost.get("flops") else None


def torch_training(config: Any, variant: str, threads: int, flops_per_image: float | None, row: dict) -> Contestant:
    """The PyTorch step of a BaseNet config: SIGGRAPH17 forward, the config's loss, Adam (tests/reference).

    The loss is Zhang's Huber on ab / 110, plus, with `loss.alpha`, the salient loss: a PFANet-S
    forward (random weights, eval mode) on the two RGB renderings under no_grad, as the JAX step.
    Runs on CUDA when JAX runs on a GPU and torch sees one, else on the CPU with `threads` threads.

    Args:
        config: a loaded BaseNet config (batch, image size, width, loss, optimizer, seed).
        variant: a TORCH_VARIANTS key. "compile" compiles here, with one untimed step.
        threads: torch's CPU threads.
        flops_per_image: the JAX step's count for the same network and loss, to score FLOP/s.
        row: facts for the JSON row.

    Returns:
        The contestant.

    Raises:
        Whatever torch.compile raises where its compiler does not work.
    """
    import torch  # Optional, as are the reference modules that import it: only these contestants need them.

    from tests.reference import torch_losses, torch_pfanet, torch_siggraph17

    label, memory_format_name, compiled = TORCH_VARIANTS[variant]
    memory_format = getattr(torch, memory_format_name)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = torch_siggraph17.SIGGRAPH17(width=config.model.width).to(device, memory_format=memory_format).train()
    o = config.optimizer
    optimizer = torch.optim.Adam(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2))
    network = torch.compile(model, dynamic=False) if compiled else model
    loss = config.loss
    pfanet = torch_pfanet.SODModel().to(device, memory_format=memory_format).eval() if loss.alpha else None
    batch, size = config.global_batch_size, config.image_size
    l, ab = (
        torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).to(device).contiguous(memory_format=memory_format)
        for x in colorspace.rgb_uint8_to_l_ab(jnp.asarray(_random_rgb(batch, size)))
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = torch_losses.total(
            network(l),
            ab,
            l,
            alpha=loss.alpha,
            pfanet=pfanet,
            size=loss.pfanet_size,
            threshold=loss.threshold,
            norm=loss.norm,
        )
        value.backward()
        optimizer.step()
        return value

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    compile_seconds = None
    if compiled:  # torch.compile compiles on the first call: here, so that a failure is known before timing.
        start = time.perf_counter()
        sync(step())
        compile_seconds = time.perf_counter() - start
    row = {
        **row,
        "label": row["label"] + label,
        "framework": "pytorch",
        "variant": variant,
        "memory_format": memory_format_name,
        "batch": batch,
        "image_size": size,
        "width": config.model.width,
        "dtype": "float32",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "flops_per_image": flops_per_image,
        "compile_seconds": compile_seconds,
    }
    return Contestant(row["name"], step, batch, sync=sync, row=row)


def matmul(n: int, dtype: str) -> Contestant:
    """An n x n x n matmul on the first device: the FLOP/s every step is compared with."""
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.dtype(dtype))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    row = {
        "kind": "matmul",
        "label": f"matmul {n}x{n}",
        "dtype": dtype,
        "n": n,
        "flops": 2.0 * n**3,
        "device": jax.devices()[0].device_kind,
    }
    return Contestant(f"matmul {dtype}", lambda: compiled(a, b), 1, row=row)


def colorize_run(
    colorizer: inference.Colorizer, photos: str, out_dir: str, count: int, size: int, devices: int, row: dict
) -> Contestant:
    """`colorize` of a folder of `count` photos, in one batch, overwriting its outputs each time."""
    network = inference.PhotoColorizer(colorizer, batch_size=count, num_devices=devices, size=size)

    def step():
        report = colorize.colorize(network, [photos], out_dir, overwrite=True)
        if len(report.written) != count:
            raise RuntimeError(f"colorize wrote {len(report.written)} of {count} images: {report.failed}")

    step()  # Compiles the network and the full-resolution merge, so the warm-up is only a warm-up.
    return Contestant(row["name"], step, count, sync=lambda _: None, row=row)


# --- Groups ------------------------------------------------------------------------------------


def training_group(
    args: argparse.Namespace, dtypes: Sequence[str], overrides: Sequence[str]
) -> tuple[list[dict], list[dict]]:
    """Every selected model x batch x dtype, the PyTorch steps per batch and the matmuls, interleaved.

    Returns:
        (rows, skipped): the measured rows, and the PyTorch contestants that could not run and why.
    """
    contestants = [
        jax_row(model, dtype, batch, overrides) for model in args.models for dtype in dtypes for batch in args.batches
    ]
    if args.torch:
        torch_contestants, skipped = _torch_contestants(args, overrides)
        contestants += torch_contestants
    else:
        skipped = [{"name": "pytorch", "reason": "--no-torch"}]
    contestants += [matmul(args.matmul_size, dtype) for dtype in dtypes]
    return interleave(contestants, args.repeats, args.min_time), skipped


def row_overrides(model: str, dtype: str, batch: int, overrides: Sequence[str]) -> list[str]:
    """The config overrides of a MODELS row: the run's, the model's, its batch and dtype."""
    return [*overrides, *MODELS[model][2], f"--config.global_batch_size={batch}", f"--config.dtype={dtype}"]


def jax_row(model: str, dtype: str, batch: int, overrides: Sequence[str]) -> Contestant:
    """The compiled train step of a MODELS row (`jax_training`), named "MODEL DTYPE bBATCH"."""
    label, config_file, _ = MODELS[model]
    name = f"{model} {dtype} b{batch}"
    _log(f"compiling {name}")
    row = {"kind": "training", "model": model, "label": label}
    return jax_training(name, CONFIGS / config_file, row_overrides(model, dtype, batch, overrides), row)


def _torch_contestants(args: argparse.Namespace, overrides: Sequence[str]) -> tuple[list[Contestant], list[dict]]:
    """Each --torch-variants BaseNet step per batch, and the salient counterpart if the JAX salient rows run.

    Returns:
        (contestants, skipped): what could not run, as {"name", "variant", "batch", "reason"}.
    """
    if not _torch_available():
        return [], [{"name": "pytorch", "reason": "torch is not installed (pip install -e .[test])"}]
    models = ["basenet", *(["basenet_salient"] if "smsanet_salient" in args.models else [])]
    contestants, skipped = [], []
    for model in models:
        label, config_file, model_overrides = TORCH_MODELS[model]
        # The salient counterpart runs eagerly: it prices the salient loss like for like, not at PyTorch's best.
        variants = args.torch_variants if model == "basenet" else ["eager"]
        for batch in args.batches:
            batch_overrides = [
                *overrides,
                *model_overrides,
                f"--config.global_batch_size={batch}",
                "--config.dtype=float32",
            ]
            flops = lowered_flops_per_image(CONFIGS / config_file, batch_overrides)
            config = config_util.load_config(str(CONFIGS / config_file), batch_overrides)
            for variant in variants:
                name = f"pytorch {model}{'' if variant == 'eager' else ' ' + variant} b{batch}"
                row = {"kind": "training", "model": model, "label": label, "name": name}
                row["salient_loss"] = bool(config.loss.alpha)
                _log(f"preparing {name}")
                try:
                    contestants.append(torch_training(config, variant, _cpu_threads(), flops, row))
                except Exception as error:  # pylint: disable=broad-except
                    if not TORCH_VARIANTS[variant][2]:
                        raise
                    # torch.compile fails where its toolchain (a C++ compiler, or Triton on CUDA) does not work.
                    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:500]
                    _log(f"  skipped {name}: {reason}")
                    skipped.append({"name": name, "variant": variant, "batch": batch, "reason": reason})
    return contestants, skipped


def conv_impl_group(args: argparse.Namespace) -> list[dict]:
    """The quickstart model's train step with each convolution implementation, interleaved."""
    config_file = CONFIGS / ("tiny.py" if args.quick else "quickstart.py")
    contestants = []
    for impl in args.conv_impl:
        _log(f"compiling the {config_file.stem} step with conv_impl={impl}")
        contestants.append(
            jax_training(
                f"{config_file.stem} {impl}",
                config_file,
                [f"--config.conv_impl={impl}", f"--config.num_devices={args.devices}"],
                {"kind": "conv_impl", "model": config_file.stem, "label": config_file.stem},
            )
        )
    return interleave(contestants, args.repeats, args.min_time)


def inference_group(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    """`colorize` with random SMSANet weights on photos of each size, interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = str(CONFIGS / "smsanet.py")
        weights_path = os.path.join(tmp, "weights.msgpack")
        bench_inference._random_weights(config_file, overrides, weights_path)
        colorizer = inference.load_colorizer(params=weights_path, config=config_file, overrides=overrides)
        size = colorizer.provenance["config"]["image_size"]
        contestants = []
        for width, height in args.photo_sizes:
            photos = os.path.join(tmp, f"photos_{width}x{height}")
            bench_inference._photos(photos, args.inference_images, (width, height))
            row = {
                "kind": "inference",
                "name": f"colorize {width}x{height}",
                "label": f"colorize {width}x{height}",
                "photo_size": [width, height],
                "network_size": size,
                "batch": args.inference_images,
                "width": colorizer.provenance["config"]["model"]["width"],
                "dtype": "float32",
                "device": jax.devices()[0].device_kind,
            }
            contestants.append(
                colorize_run(
                    colorizer,
                    photos,
                    os.path.join(tmp, f"out_{width}x{height}"),
                    args.inference_images,
                    size,
                    args.devices,
                    row,
                )
            )
        return interleave(contestants, args.repeats, args.min_time)


def runtime_group(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    """BaseNet inference (L -> ab, no merge) per runtime and --runtime-batches, interleaved.

    JAX with the fast CPU convolutions and with XLA's, onnxruntime on the `export --format onnx`
    file of the same random weights (its parity check's error is kept in the row), and PyTorch
    eager under no_grad (tests/reference, its own random weights: the speed is the same). Each
    row's `vs_pytorch` and `vs_onnxruntime` compare the JAX CPU-conv row of its batch with them.
    """
    import onnxruntime  # Optional, as is torch: only this group needs them.
    import torch

    from smsanet_jax import export, exported
    from tests.reference import torch_siggraph17

    config_file = str(CONFIGS / "basenet.py")
    config = config_util.load_config(config_file, overrides)
    size, width = config.image_size, config.model.width
    facts = {"kind": "runtime", "image_size": size, "width": width, "dtype": "float32"}
    contestants = []
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "weights.msgpack")
        bench_inference._random_weights(config_file, overrides, weights_path)
        onnx_file = os.path.join(tmp, "basenet.onnx")
        _log("exporting BaseNet to ONNX (and checking it against JAX)")
        colorizer = inference.load_colorizer(params=weights_path, config=config_file, overrides=overrides)
        result = export.export_colorizer(colorizer, onnx_file, fmt="onnx", image_size=size)
        network = exported.OnnxNetwork(onnx_file)
        torch.set_num_threads(_cpu_threads())
        torch_model = torch_siggraph17.SIGGRAPH17(width=width).eval()
        for batch in args.runtime_batches:
            l = np.asarray(colorspace.rgb_uint8_to_l_ab(_random_rgb(batch, size))[0])
            for impl in ("cpu", "xla"):
                loaded = inference.load_colorizer(
                    params=weights_path, config=config_file, overrides=[*overrides, f"--config.conv_impl={impl}"]
                )
                apply = jax.jit(functools.partial(loaded.apply_fn, train=False))
                variables = jax.device_put(loaded.variables)
                jax.block_until_ready(apply(variables, l))  # Compiled before the warm-up rounds.
                row = {**facts, "runtime": f"jax {impl}", "label": f"BaseNet inference, JAX {impl} convs"}
                contestants.append(Contestant(f"jax {impl} b{batch}", functools.partial(apply, variables, l), batch))
                contestants[-1].row = {**row, "batch": batch, "device": jax.devices()[0].device_kind}
            row = {**facts, "runtime": "onnxruntime", "label": "BaseNet inference, onnxruntime"}
            row.update(
                batch=batch,
                device=f"cpu, onnxruntime {onnxruntime.__version__}",
                onnx_opset=export.ONNX_OPSET,
                onnx_bytes=result.num_bytes,
                onnx_max_abs_error=result.max_abs_error,
            )
            ort_step = functools.partial(network, l)
            contestants.append(Contestant(f"onnxruntime b{batch}", ort_step, batch, lambda _: None, row))
            tensor = torch.from_numpy(l).permute(0, 3, 1, 2).contiguous()

            def torch_step(tensor=tensor):
                with torch.no_grad():
                    return torch_model(tensor)

            row = {**facts, "runtime": "pytorch", "label": "BaseNet inference, PyTorch eager", "batch": batch}
            row["device"] = f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"
            contestants.append(Contestant(f"pytorch b{batch}", torch_step, batch, lambda _: None, row))
        rows = interleave(contestants, args.repeats, args.min_time)
    rate = {(r["runtime"], r["batch"]): r["images_per_second"] for r in rows}
    for r in rows:
        if r["runtime"] == "jax cpu":
            r["vs_pytorch"] = r["images_per_second"] / rate["pytorch", r["batch"]]
            r["vs_onnxruntime"] = r["images_per_second"] / rate["onnxruntime", r["batch"]]
    return rows


# --- Summary -----------------------------------------------------------------------------------


def _pytorch_peers(rows: list[dict]) -> tuple[dict, dict]:
    """The PyTorch rows a JAX row is scored against, keyed by (batch, salient loss): eager, and the fastest."""
    eager, fastest = {}, {}
    for r in rows:
        if r.get("framework") != "pytorch":
            continue
        key = (r["batch"], r["salient_loss"])
        if r["variant"] == "eager":
            eager[key] = r
        if key not in fastest or r["images_per_second"] > fastest[key]["images_per_second"]:
            fastest[key] = r
    return eager, fastest


def score(rows: list[dict]) -> dict[str, Any]:
    """Adds FLOP/s, fraction of peak and the PyTorch ratios to the rows; returns the headline numbers.

    A JAX training row is compared with the PyTorch rows of its batch and loss: `vs_pytorch` with the
    eager step, `vs_pytorch_best` with the fastest variant (named by `pytorch_best`).

    Args:
        rows: every row of the run (mutated).

    Returns:
        `ratio_vs_pytorch`, `ratio_vs_pytorch_best`, `ratio_vs_pytorch_salient`, `fraction_of_peak`,
        `pytorch_best_variant` and the rows they come from.
    """
    peaks = {r["dtype"]: r["flops"] * r["images_per_second"] for r in rows if r["kind"] == "matmul"}
    for r in rows:
        if r["kind"] == "matmul":
            r["flops_per_second"] = peaks[r["dtype"]]
    eager, fastest = _pytorch_peers(rows)
    for r in rows:
        if r["kind"] not in ("training", "conv_impl"):
            continue
        flops = r.get("flops_per_image")
        r["flops_per_second"] = flops * r["images_per_second"] if flops else None
        peak = peaks.get(r["dtype"], peaks.get("float32"))
        r["fraction_of_peak"] = r["flops_per_second"] / peak if r["flops_per_second"] and peak else None
        key = (r["batch"], r["salient_loss"])
        if r.get("framework") == "jax" and r["kind"] == "training":
            if key in eager:
                r["vs_pytorch"] = r["images_per_second"] / eager[key]["images_per_second"]
            if key in fastest:
                r["vs_pytorch_best"] = r["images_per_second"] / fastest[key]["images_per_second"]
                r["pytorch_best"] = fastest[key]["name"]
    headline_dtype = "float32" if jax.default_backend() == "cpu" or "bfloat16" not in peaks else "bfloat16"
    find = lambda model, dtype: next(
        (
            r
            for r in rows
            if r.get("framework") == "jax"
            and r["kind"] == "training"
            and r["model"] == model
            and r["batch"] == HEADLINE_BATCH
            and r["dtype"] == dtype
        ),
        None,
    )

    def ratio(row: dict | None, peers: dict, salient: bool) -> float | None:
        peer = peers.get((HEADLINE_BATCH, salient))
        return row["images_per_second"] / peer["images_per_second"] if row and peer else None

    ratio_row, salient_row = find(HEADLINE_MODEL, "float32"), find("smsanet_salient", "float32")
    peak_row = find(HEADLINE_MODEL, headline_dtype)
    best = fastest.get((HEADLINE_BATCH, False))
    b = HEADLINE_BATCH
    return {
        "ratio_vs_pytorch": ratio(ratio_row, eager, False),
        "ratio_vs_pytorch_best": ratio(ratio_row, fastest, False),
        "ratio_vs_pytorch_salient": ratio(salient_row, eager, True),
        "pytorch_best_variant": best["variant"] if best else None,
        "fraction_of_peak": peak_row["fraction_of_peak"] if peak_row else None,
        "headline": {
            "ratio_vs_pytorch": f"{HEADLINE_MODEL} float32 b{b} / pytorch basenet b{b} images/s",
            "ratio_vs_pytorch_best": f"{HEADLINE_MODEL} float32 b{b} / the fastest PyTorch BaseNet variant b{b} "
            f"({best['name'] if best else 'none ran'}) images/s",
            "ratio_vs_pytorch_salient": f"smsanet_salient float32 b{b} / pytorch basenet_salient b{b} images/s",
            "fraction_of_peak": f"{HEADLINE_MODEL} {headline_dtype} b{b} FLOP/s "
            f"(direct-convolution FLOPs) / matmul {headline_dtype} FLOP/s",
        },
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    cpu_model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": cpu_model,
        "cpu_threads": _cpu_threads(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": _total_memory_gb(),
        "conv_path": cpu_conv.describe("auto"),  # The configs' convolutions: "cpu+native", "xla", ...
        # `smsanet_jax.cpu.native`: the C++ Winograd transforms (CPU only; SMSANET_NATIVE=0 opts out).
        "native_winograd_transforms": jax.default_backend() == "cpu" and native.available(),
        # `smsanet_jax.cpu.malloc`: set for both frameworks, or for neither (SMSANET_MALLOC_TUNING=0).
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def peak_memory(devices: int) -> dict[str, Any]:
    """Peak resident memory of this process, and the devices' own peak where they report one."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}  # Linux counts KiB.
    stats = [d.memory_stats() or {} for d in jax.local_devices()[:devices]]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    out["device_peak_bytes_in_use"] = max(peaks) if peaks else None
    return out


def _group(row: dict) -> str:
    """The top-level JSON key of a row."""
    if row["kind"] == "training":
        return "pytorch" if row["framework"] == "pytorch" else "training"
    return {"matmul": "matmul_peak", "conv_impl": "conv_impl", "inference": "inference", "runtime": "runtimes"}[
        row["kind"]
    ]


def _conv_impl_speedup(rows: list[dict]) -> float | None:
    """Quickstart images/s with the fast CPU convolutions over XLA's own (None unless both ran)."""
    rate = {r["conv_impl"]: r["images_per_second"] for r in rows if r["kind"] == "conv_impl"}
    return rate["cpu"] / rate["xla"] if "cpu" in rate and "xla" in rate else None


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def markdown(results: dict[str, Any]) -> str:
    """The run as a markdown table, with the machine and the headline numbers underneath."""
    lines = [
        "| measurement | device | dtype | batch | size | images/s | s/step (median) | GFLOP/image | GFLOP/s "
        "| of peak | vs PyTorch | vs best PyTorch | compiled memory GB |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for key in GROUPS for r in results[key]):
        size = (
            f"{r['photo_size'][0]}x{r['photo_size'][1]} -> {r['network_size']}"
            if r["kind"] == "inference"
            else f"{r['n']}^3"
            if r["kind"] == "matmul"
            else f"{r['image_size']}, width {r['width']}"
        )
        impl = f", {r['conv_impl']} convs" if r.get("conv_impl") else ""
        memory = (r.get("memory_bytes") or {}).get("total")
        lines.append(
            f"| {r['label']}{impl} | {r['device']} | {r['dtype']} | {r.get('batch', '')} | {size} | "
            f"{_fmt(r['images_per_second'], '.3g') if r['kind'] != 'matmul' else ''} | "
            f"{r['step_seconds_median']:.3g} | {_fmt(r.get('flops_per_image'), '.1f', 1e9)} | "
            f"{_fmt(r.get('flops_per_second'), '.1f', 1e9)} | {_fmt(r.get('fraction_of_peak'), '.0%')} | "
            f"{_fmt(r.get('vs_pytorch'), '.2f')} | {_fmt(r.get('vs_pytorch_best'), '.2f')} | "
            f"{_fmt(memory, '.2f', 1e9)} |"
        )
    m, mem = results["machine"], results["memory"]
    lines += [
        "",
        f"Machine: {m['backend']} backend, device `{m['device_kind']}` x {results['settings']['devices']} "
        f"used ({m['device_count']} present); CPU {m['cpu_model']}, {m['cpu_threads']} threads, "
        f"{m['memory_gb']:.0f} GB; JAX {m['jax_version']}, Python {m['python']}"
        + ("; native Winograd transforms" if m["native_winograd_transforms"] else "")
        + (f", PyTorch {results['torch_version']}" if results.get("torch_version") else "")
        + ".",
        f"Load average (1 min) {results['load_average']['start']:.2f} at the start, "
        f"{results['load_average']['end']:.2f} at the end; {results['wall_seconds'] / 60:.1f} min in all; "
        f"medians of {results['settings']['repeats']} interleaved runs after {WARMUP_ROUNDS} warm-up rounds.",
        f"Peak RSS {mem['peak_rss_bytes'] / 1e9:.2f} GB"
        + (f"; device peak {mem['device_peak_bytes_in_use'] / 1e9:.2f} GB" if mem["device_peak_bytes_in_use"] else "")
        + ".",
        f"ratio_vs_pytorch = {_fmt(results['ratio_vs_pytorch'], '.2f')} "
        f"({results['headline']['ratio_vs_pytorch']}); ratio_vs_pytorch_best = "
        f"{_fmt(results['ratio_vs_pytorch_best'], '.2f')} ({results['headline']['ratio_vs_pytorch_best']}); "
        f"ratio_vs_pytorch_salient = {_fmt(results['ratio_vs_pytorch_salient'], '.2f')} "
        f"({results['headline']['ratio_vs_pytorch_salient']}); fraction_of_peak = "
        f"{_fmt(results['fraction_of_peak'], '.1%')} ({results['headline']['fraction_of_peak']}); "
        f"conv_impl_speedup (quickstart step, cpu / xla convs) = {_fmt(results['conv_impl_speedup'], '.2f')}.",
        f"bfloat16: {results['settings']['bfloat16']}.",
        *(f"Not run: {s['name']}: {s['reason']}" for s in results["pytorch_skipped"]),
    ]
    return "\n".join(lines)


# --- Command line ------------------------------------------------------------------------------


def _cpu_threads() -> int:
    """Cores this process may use: XLA:CPU sizes its thread pool to them, and torch gets as many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def _total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return float("nan")


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _csv(cast: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [cast(x) for x in text.split(",") if x]


def _photo_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The options, with --quick's smaller defaults filled in, and the `--config.*` overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write every measurement here as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (32x32, width 8, configs/tiny.py for --conv-impl): a smoke test",
    )
    parser.add_argument("--models", type=_csv(str), default=list(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--batches", type=_csv(int), default=None, help="training batch sizes (default 1,4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contestant (median reported)")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also train in bfloat16 on a CPU (always done on GPU/TPU; slow on most CPUs)",
    )
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch steps")
    parser.add_argument(
        "--torch-variants",
        type=_csv(str),
        default=list(TORCH_VARIANTS),
        help=f"how the PyTorch BaseNet step runs, a subset of {','.join(TORCH_VARIANTS)}",
    )
    parser.add_argument(
        "--conv-impl",
        type=_csv(str),
        default=["xla", "cpu"],
        help="conv implementations compared on the quickstart model ('' skips)",
    )
    parser.add_argument(
        "--photo-sizes",
        type=_csv(_photo_size),
        default=None,
        help="colorize input photo sizes, WxH (default 256x256,1024x768; '' skips)",
    )
    parser.add_argument("--inference-images", type=int, default=None, help="photos per colorize run (default 4)")
    parser.add_argument(
        "--runtime-batches",
        type=_csv(int),
        default=[],
        help="BaseNet inference with JAX (cpu, xla convs), onnxruntime and PyTorch at these batches, e.g. 1,8",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="side of the peak matmul (default 4096 on a CPU, 8192 on GPU/TPU)"
    )
    parser.add_argument("--devices", type=int, default=1, help="devices of the data-parallel mesh")
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="shortest timed run in seconds; faster steps repeat within it (default 0.2)",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(files.resolve(args.out)))):
        parser.error(f"--out: {args.out} is a folder or in a folder that does not exist; give a JSON file's path")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    unknown = set(args.torch_variants) - set(TORCH_VARIANTS)
    if unknown or not args.torch_variants:
        what = f"unknown {','.join(sorted(unknown))}" if unknown else "empty"
        parser.error(f"--torch-variants: {what}; choose from {','.join(TORCH_VARIANTS)} (or --no-torch)")
    quick = args.quick
    defaults = {
        "batches": [1] if quick else [1, 4],
        "photo_sizes": [(32, 32), (128, 96)] if quick else [(256, 256), (1024, 768)],
        "inference_images": 2 if quick else 4,
        # A GPU/TPU needs a bigger matmul than a CPU to approach its peak.
        "matmul_size": 512 if quick else 8192 if _accelerator() else 4096,
        "min_time": 0.02 if quick else 0.2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    overrides = [*(QUICK_OVERRIDES if quick else ()), f"--config.num_devices={args.devices}", *overrides]
    return args, overrides


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    dtypes = ["float32", "bfloat16"] if _accelerator() or args.bf16 else ["float32"]
    _log(
        f"{jax.default_backend()} backend ({jax.devices()[0].device_kind}), load average {load_start:.2f}, "
        f"dtypes {dtypes}"
    )
    rows, torch_skipped = training_group(args, dtypes, overrides) if args.models else ([], [])
    gc.collect()  # The training states go before the next groups compile.
    if args.conv_impl:
        rows += conv_impl_group(args)
    if args.photo_sizes:
        rows += inference_group(args, overrides)
    if args.runtime_batches:
        rows += runtime_group(args, overrides)
    headline = score(rows)
    results = {
        **headline,
        **{key: [r for r in rows if _group(r) == key] for key in GROUPS},
        "conv_impl_speedup": _conv_impl_speedup(rows),
        "pytorch_skipped": torch_skipped,
        "machine": machine(),
        "memory": peak_memory(args.devices),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_seconds": time.perf_counter() - start,
        "torch_version": next((r["torch_version"] for r in rows if "torch_version" in r), None),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "dtypes": dtypes,
            "overrides": overrides,
            "bfloat16": "measured" if "bfloat16" in dtypes else "not measured: CPU without --bf16",
        },
    }
    print(markdown(results))
    if args.out:
        files.write_text(args.out, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    malloc.reexec_with_tuned_malloc()
    main()
