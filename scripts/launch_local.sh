#!/usr/bin/env bash
# Starts N training processes on this machine that form one JAX cluster over loopback.
# Usage: scripts/launch_local.sh N --config configs/X.py --workdir DIR [--config.key=value ...]
# On a CPU-only machine each process gets DEVICES_PER_PROCESS fake CPU devices (default 1).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" data
N="${1:?usage: launch_local.sh N --config ... --workdir ...}"
shift
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [ -n "${DEVICES_PER_PROCESS:-}" ]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS ${XLA_FLAGS:-}"
fi
pids=()
for ((i = 0; i < N; i++)); do
  smsanet-jax train "$@" --coordinator "127.0.0.1:$PORT" --num-processes "$N" --process-id "$i" &
  pids+=($!)
done
# Forward SIGTERM/SIGINT to every process, so a preemption saves a checkpoint everywhere.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
