"""glibc malloc settings that stop XLA:CPU from faulting its temporaries in again on every step.

XLA:CPU mallocs a step's temporaries (1.4 GB for SMSANet at 256x256, batch 1) on every call and
frees them afterwards. glibc maps blocks that large fresh from the kernel each time, so every step
faults some 400k new 4 KiB pages in, which the kernel zeroes one by one: 20% of a CPU training
step. The tunables below keep freed memory in one heap that is never trimmed, so the next step
reuses it without a fault, and back that heap with transparent huge pages. Huge pages alone
(glibc.malloc.hugetlb=1) helped as much for one program, but left SMSANet's step 20% slower in a
process that also ran BaseNet's, as the benchmark does. PyTorch's CPU allocator has the same
problem and the same cure, which `scripts/benchmark.py` therefore gives both frameworks alike.
The cost: the process keeps its peak heap until it exits.

glibc reads tunables only at start-up, so the command-line entry points restart themselves with
them (`reexec_with_tuned_malloc`). SMSANET_MALLOC_TUNING=0 opts out; tunables the user already set
in GLIBC_TUNABLES win over these.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = {
    "glibc.malloc.hugetlb": "1",  # madvise(MADV_HUGEPAGE) on the heap (glibc >= 2.35).
    "glibc.malloc.mmap_max": "0",  # Large blocks from the heap too, not from mmap.
    "glibc.malloc.trim_threshold": str(2**62),  # Never hand the heap's top back.
    "glibc.malloc.arena_max": "1",  # One heap, so that every thread's frees serve every thread.
}
OPT_OUT_VARIABLE = "SMSANET_MALLOC_TUNING"


def with_tunables(current: str) -> str:
    """A GLIBC_TUNABLES value with `TUNABLES` added to `current`, whose own settings are kept.

    Args:
        current: the GLIBC_TUNABLES value so far ("" when unset).

    Returns:
        `current` with every tunable it does not set appended, or `current` unchanged.
    """
    settings = [item for item in current.split(":") if item]
    present = {item.split("=", 1)[0] for item in settings}
    settings += [f"{name}={value}" for name, value in TUNABLES.items() if name not in present]
    return ":".join(settings)


def reexec_with_tuned_malloc() -> None:
    """Restarts this Python process (same arguments, same PID) with `TUNABLES` if it lacks them.

    Does nothing off Linux/glibc, when SMSANET_MALLOC_TUNING=0, or once GLIBC_TUNABLES holds them.
    Call it first thing in a program's entry point: whatever ran before it runs again.
    """
    if os.environ.get(OPT_OUT_VARIABLE) == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    tuned = with_tunables(current)
    if tuned == current:
        return
    os.environ["GLIBC_TUNABLES"] = tuned
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
