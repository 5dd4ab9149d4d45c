"""The glibc malloc tunables: merged with the user's own, and applied by restarting the process."""

import os
import subprocess
import sys

from smsanet_jax import host_memory

SHOW_TUNABLES = (
    "import os; from smsanet_jax import host_memory; host_memory.reexec_with_tuned_malloc(); "
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
)


def test_tunables_are_added_and_the_users_own_kept():
    tuned = host_memory.with_tunables("")
    assert sorted(item.split("=")[0] for item in tuned.split(":")) == sorted(host_memory.TUNABLES)
    assert host_memory.with_tunables(tuned) == tuned
    mine = host_memory.with_tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=4096")
    assert mine.startswith("glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=4096:")
    assert mine.count("arena_max") == 1 and "glibc.malloc.hugetlb=1" in mine


def run(env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT_VARIABLE)}
    completed = subprocess.run(
        [sys.executable, "-c", SHOW_TUNABLES],
        env={**env, **env_changes},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout.split(maxsplit=1)


def test_the_process_restarts_with_them():
    _, tunables = run({})
    assert tunables.strip() == host_memory.with_tunables("")


def test_opting_out_leaves_the_process_alone():
    _, tunables = run({host_memory.OPT_OUT_VARIABLE: "0"})
    assert tunables.strip() == "None"
