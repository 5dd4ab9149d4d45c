"""Micro-benchmark of the conv layers, forward and forward+backward, "cpu" vs "xla" at BaseNet's shapes.

Usage: python scripts/bench_ops.py [--rounds 5] [--only convT] [--dtype bfloat16] [--grads]

Implementations are timed interleaved (xla, cpu, xla, cpu, ...) after a warm-up call, and the
median and best of `--rounds` calls are reported, because other processes may share the cores.
GFLOP/s counts the useful multiply-adds of the op (2 * N * H_out * W_out * kh * kw * I * O for the
forward pass, three times that for forward + backward), so both implementations are scored alike.
Each op is the model's own layer (`layers.Conv` without bias, `layers.ConvTranspose4x4` with a zero
bias that XLA drops), so the timings follow the choice the models make.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.models import layers


class Case(NamedTuple):
    name: str
    op: str  # "conv" or "convT"
    size: int  # input height = width
    cin: int
    cout: int
    kernel: int = 3
    dilation: int = 1


# Full-size (256x256 input, batch 1) BaseNet layers, plus PFANet/attention shapes that take the
# same code.
CASES = (
    Case("model1.0", "conv", 256, 4, 64),
    Case("model1.2", "conv", 256, 64, 64),
    Case("model2.2", "conv", 128, 128, 128),
    Case("model3.2", "conv", 64, 256, 256),
    Case("model4.2", "conv", 32, 512, 512),
    Case("model5.0 (d2)", "conv", 32, 512, 512, dilation=2),
    Case("model1short10", "conv", 256, 64, 128),
    Case("model10.1", "conv", 256, 128, 128),
    Case("model_out 1x1", "conv", 256, 128, 2, kernel=1),
    Case("model8up", "convT", 32, 512, 256, kernel=4),
    Case("model9up", "convT", 64, 256, 128, kernel=4),
    Case("model10up", "convT", 128, 128, 128, kernel=4),
)


def make_op(case: Case, impl: str, dtype: jnp.dtype) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The layer of `case` as a function of (x, kernel)."""
    if case.op == "convT":
        transposed = layers.ConvTranspose4x4(case.cout, dtype, conv_impl=impl)
        bias = jnp.zeros((case.cout,), dtype)
        return lambda x, k: transposed.apply({"params": {"kernel": k, "bias": bias}}, x)
    conv = layers.Conv(case.cout, (case.kernel,) * 2, case.dilation, use_bias=False, dtype=dtype, conv_impl=impl)
    return lambda x, k: conv.apply({"params": {"kernel": k}}, x)


def timed_functions(case: Case, impl: str, dtype: jnp.dtype, grads: bool) -> dict[str, Callable]:
    """Jitted (x, kernel, dy) -> outputs for the forward pass, forward+backward and, optionally, each gradient."""
    op = make_op(case, impl, dtype)

    def fwd_bwd(argnums):
        def run(x, k, dy):
            y, vjp = jax.vjp(op, x, k)
            cotangents = vjp(dy)  # XLA drops whichever of the two is not returned.
            return y, tuple(cotangents[i] for i in argnums)

        return run

    # "fwd" is the forward pass where nothing is differentiated (inference), "fwd (in grad)" the one
    # a training step runs: wide 3x3 convs choose differently (`cpu/conv.py`, `_conv3x3_wide`).
    fns = {
        "fwd": lambda x, k, dy: op(x, k),
        "fwd (in grad)": lambda x, k, dy: jax.vjp(op, x, k)[0],
        "fwd+bwd": fwd_bwd((0, 1)),
    }
    if grads:
        fns.update({"fwd+dx": fwd_bwd((0,)), "fwd+dw": fwd_bwd((1,))})
    return {name: jax.jit(f) for name, f in fns.items()}


def forward_flops(case: Case, batch: int) -> float:
    out = 2 * case.size if case.op == "convT" else case.size
    taps = 4 if case.op == "convT" else case.kernel**2  # convT: each output pixel sees 2x2 taps.
    return 2.0 * batch * out * out * taps * case.cin * case.cout


def bench_case(case: Case, args: argparse.Namespace) -> list[dict]:
    """Times every pass of `case` for both implementations, interleaved; returns one row per pass."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    out = 2 * case.size if case.op == "convT" else case.size
    x = jnp.asarray(rng.standard_normal((args.batch, case.size, case.size, case.cin)), dtype)
    k = jnp.asarray(rng.standard_normal((case.kernel, case.kernel, case.cin, case.cout)) * 0.05, dtype)
    dy = jnp.asarray(rng.standard_normal((args.batch, out, out, case.cout)), dtype)
    impls = {impl: timed_functions(case, impl, dtype, args.grads) for impl in ("xla", "cpu")}
    flops = forward_flops(case, args.batch)
    rows = []
    for part in impls["cpu"]:
        times = {impl: [] for impl in impls}
        for fns in impls.values():
            jax.block_until_ready(fns[part](x, k, dy))  # Compile and warm up.
        # XLA's transposed-conv backward takes seconds per call: fewer rounds keep the run short.
        backward = "bwd" in part or "+d" in part
        rounds = args.rounds if case.op == "conv" or not backward else max(2, args.rounds // 2)
        for _ in range(rounds):
            for impl, fns in impls.items():
                start = time.perf_counter()
                jax.block_until_ready(fns[part](x, k, dy))
                times[impl].append(time.perf_counter() - start)
        part_flops = flops * {"fwd": 1, "fwd (in grad)": 1, "fwd+bwd": 3}.get(part, 2)
        median = {impl: float(np.median(t)) for impl, t in times.items()}
        rows.append(
            dict(
                case=case.name,
                shape=f"{case.cin}->{case.cout} @{case.size}",
                part=part,
                gflop=part_flops / 1e9,
                xla_ms=median["xla"] * 1e3,
                cpu_ms=median["cpu"] * 1e3,
                xla_gflops=part_flops / median["xla"] / 1e9,
                cpu_gflops=part_flops / median["cpu"] / 1e9,
                cpu_best_gflops=part_flops / min(times["cpu"]) / 1e9,
                speedup=median["xla"] / median["cpu"],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per implementation and pass")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--only", default="", help="substring of the case names to run")
    parser.add_argument("--grads", action="store_true", help="also time each gradient on its own")
    args = parser.parse_args()
    print(
        f"backend {jax.default_backend()}, jax {jax.__version__}, {os.cpu_count()} cpus, "
        f"cpu convs {cpu_conv.prepare('cpu')}, "
        f"load average {os.getloadavg()[0]:.1f}, dtype {args.dtype}, batch {args.batch}, "
        f"medians of {args.rounds} (convT backward: {max(2, args.rounds // 2)})"
    )
    print("| layer | shape | pass | GFLOP | xla ms | cpu ms | xla GFLOP/s | cpu GFLOP/s (best) | speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        if args.only not in case.name:
            continue
        for r in bench_case(case, args):
            print(
                f"| {r['case']} | {r['shape']} | {r['part']} | {r['gflop']:.2f} | {r['xla_ms']:.1f} | "
                f"{r['cpu_ms']:.1f} | {r['xla_gflops']:.0f} | {r['cpu_gflops']:.0f} ({r['cpu_best_gflops']:.0f}) | "
                f"{r['speedup']:.2f}x |",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
