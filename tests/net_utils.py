"""Helpers for the multi-process tests: a free coordinator port, waiting for every process."""

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for jax.distributed's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_all(procs, timeout: float = 600) -> list[str]:
    """Each process's output once all have exited; every one is killed if any overruns `timeout`."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
