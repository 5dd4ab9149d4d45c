"""The glibc malloc tunables: merged with the user's own, and applied by restarting the process in place."""

import os
import subprocess
import sys

from smsanet_jax.cpu import malloc

# Prints a line before and after the restart: a restarted process runs its start again.
SHOW_TUNABLES = (
    "import os; from smsanet_jax.cpu import malloc; "
    "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
    "malloc.reexec_with_tuned_malloc(); "
    "print('end', os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
)


def test_tunables_are_added_and_the_users_own_kept():
    tuned = malloc.with_tunables("")
    assert sorted(item.split("=")[0] for item in tuned.split(":")) == sorted(malloc.TUNABLES)
    assert malloc.with_tunables(tuned) == tuned
    mine = malloc.with_tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=4096")
    assert mine.startswith("glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=4096:")
    assert mine.count("arena_max") == 1 and "glibc.malloc.hugetlb=1" in mine


def run(env_changes) -> tuple[int, list[tuple[str, int, str]]]:
    """Runs SHOW_TUNABLES; returns the PID it was started with and its (stage, PID, GLIBC_TUNABLES) lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT_VARIABLE)}
    with subprocess.Popen(
        [sys.executable, "-c", SHOW_TUNABLES], env={**env, **env_changes}, stdout=subprocess.PIPE, text=True
    ) as process:
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    lines = [line.split(maxsplit=2) for line in out.splitlines()]
    return process.pid, [(stage, int(pid), tunables) for stage, pid, tunables in lines]


def test_the_process_restarts_with_them_under_the_same_pid():
    pid, lines = run({})
    tuned = malloc.with_tunables("")
    assert lines == [("start", pid, "None"), ("start", pid, tuned), ("end", pid, tuned)]


def test_opting_out_leaves_the_process_alone():
    pid, lines = run({malloc.OPT_OUT_VARIABLE: "0"})
    assert lines == [("start", pid, "None"), ("end", pid, "None")]


def test_it_loads_before_jax():
    """The entry points restart with the tunables before JAX is imported, so that none of it runs twice."""
    script = "import sys; from smsanet_jax.cpu import malloc; print('jax' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert completed.stdout.strip() == "False"
