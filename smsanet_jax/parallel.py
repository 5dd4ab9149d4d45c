"""One data-parallel mesh over every device of every process, and the arrays placed on it."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int = 300,
) -> None:
    """Starts JAX's multi-controller runtime when more than one process takes part.

    Explicit arguments win; otherwise a SLURM job with several tasks is detected and
    `jax.distributed.initialize()` reads its environment. A plain single process does nothing,
    because `initialize` fails on a machine with no cluster environment.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    if not (explicit or slurm):
        return
    # CPU-only processes need a collectives backend to talk to each other; GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_seconds,
        )
    else:
        jax.distributed.initialize(initialization_timeout=timeout_seconds)
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over all devices (or the first `num_devices`, single-process only)."""
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("num_devices must be 0 (all devices) when several processes take part")
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch; it must split evenly over the devices."""
    if global_batch_size % mesh.size:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of the {mesh.size} devices in the mesh"
        )
    return global_batch_size // jax.process_count()


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, on the host."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def round_up_to_devices(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is at least `batch_size`."""
    return -(-batch_size // mesh.size) * mesh.size


def make_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local slice of the batch into one batch-sharded global array."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
