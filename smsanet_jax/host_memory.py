"""A glibc malloc setting that makes XLA:CPU's per-step temporaries cheap to fault in.

XLA:CPU mallocs a step's temporaries (1.4 GB for SMSANet at 256x256, batch 1) on every call and
frees them afterwards. glibc maps blocks that large fresh from the kernel each time, so every step
faults some 400k new 4 KiB pages in, which the kernel zeroes one by one: 20% of a CPU training
step. With glibc.malloc.hugetlb=1 (glibc >= 2.35) glibc asks for transparent huge pages for them
(madvise), 2 MiB at a time. PyTorch's CPU allocator has the same problem and the same cure, which
`scripts/benchmark.py` therefore gives both frameworks alike. (Also keeping the freed memory in
the process, with mmap_max=0, trim_threshold and arena_max=1, removed the remaining faults but
measured no faster.)

glibc reads tunables only at start-up, so the command-line entry points restart themselves with
it (`reexec_with_tuned_malloc`). SMSANET_MALLOC_TUNING=0 opts out; a value the user already set in
GLIBC_TUNABLES wins.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = {"glibc.malloc.hugetlb": "1"}  # madvise(MADV_HUGEPAGE) on what malloc maps.
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
