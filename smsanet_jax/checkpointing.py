"""Orbax checkpoints of a training run, verified before they are used.

A training checkpoint holds three items saved at the same step: the train state, each process's
grain iterator state (so a resumed run reads exactly the next batches), and JSON metadata: what
the caller records (the model config and the data identity, so that a workdir reused with another
model or other data fails clearly instead of inside orbax or grain) plus `state_sha256`, the
SHA-256 of the train state as it was saved (`tree_sha256`), and `data_sha256`, that of each
process's iterator state.

Orbax verifies no array bytes on restore (its zarr3 layout checksums only the shard index, and
the default OCDBT layout nothing), so a checkpoint overwritten in place restores garbage. The
checksum rides in the metadata item, which orbax commits in the same step folder as the state:
no checkpoint exists without its checksum, and none needs a second write after the asynchronous
save. `restore_latest` tries the steps newest first: a step with a missing item, files orbax
cannot read, or arrays or an iterator state that differ from their checksums is reported (one
warning naming the step and what is wrong) and the next older step is tried. In a writable
workdir those damaged steps are moved to `damaged_checkpoints/` beside `checkpoints/` (kept for
inspection, never deleted), so that training saves those steps afresh. A checkpoint written before checksums existed (no
`state_sha256`) is restored unverified, with a warning saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE_SHA256 = "state_sha256"
# One SHA-256 per process of its data iterator's saved state, in process order.
DATA_SHA256 = "data_sha256"
DAMAGED_FOLDER = "damaged_checkpoints"
# Room kept free beyond a checkpoint's array bytes: orbax's metadata files (~2% for a small
# network) and the TensorBoard and report files written meanwhile.
_FREE_SPACE_MARGIN = 1.1
_FREE_SPACE_SLACK_BYTES = 4 << 20
# A damage description quotes this much of the library's error.
_REASON_CHARS = 240


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was written for another model or other data."""


class NoIntactCheckpointError(ValueError):
    """The workdir has checkpoints, but none restores and matches its checksum."""


class _DamagedCheckpoint(Exception):
    """One step cannot be trusted; `restore_latest` reports it and tries an older one."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A verified checkpoint: its step, the restored train state and its JSON metadata."""

    step: int
    state: Any
    meta: Mapping[str, Any]


def _host_array(leaf: Any) -> np.ndarray:
    """One full copy of a leaf on the host; replicated arrays of several processes included."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.sharding.is_fully_replicated:
            raise ValueError(f"tree_sha256 needs replicated arrays, got one sharded as {leaf.sharding}")
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(jax.device_get(leaf))


def tree_sha256(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in path order (device-independent)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = _host_array(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _brief(error: BaseException) -> str:
    """The root cause of a library's error, first line, shortened: enough to tell one damage from another.

    tensorstore wraps its precise complaint ("Requested byte range ... is not valid for value of
    size ...") in errors that print the whole array spec.
    """
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether an error (or one it came from) is a full disk; tensorstore reports it in text."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class _OrbaxDiskFullFilter(logging.Filter):
    """Drops orbax's own reports of a full disk: each of its writer threads logs the traceback
    (~330 lines for one failed save), and `Checkpointer` reports it once, as an OSError naming the
    step. Debug logging (the CLI's `-v`) keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG) or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (_is_disk_full(error) or "No space left on device" in record.getMessage())


_ORBAX_DISK_FULL_FILTER = _OrbaxDiskFullFilter()


def _data_sha256(data: ocp.args.CheckpointArgs) -> str | None:
    """SHA-256 of this process's data iterator state; None for args that hold no iterator.

    grain's save and restore args hold the iterator as `item`; grain writes exactly `get_state()`
    and restores it with `set_state`, which round-trips, so the state read back hashes like the
    state saved.
    """
    get_state = getattr(getattr(data, "item", None), "get_state", None)
    return None if get_state is None else hashlib.sha256(get_state()).hexdigest()


def _data_checksums(data: ocp.args.CheckpointArgs) -> dict[str, list[str]]:
    """{DATA_SHA256: every process's digest, in process order} (a collective), or {} for args without an iterator."""
    digest = _data_sha256(data)
    if digest is None:
        return {}
    if jax.process_count() == 1:
        return {DATA_SHA256: [digest]}
    rows = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return {DATA_SHA256: [bytes(row).hex() for row in np.asarray(rows)]}


def _true_on_every_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _process_zero_value(value: int) -> int:
    """Process 0's `value` (below 2**31) on every process; the value itself with one process.

    JAX without x64 carries int32, so larger values (a disk's byte count) must be scaled first.
    """
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(min(value, 2**31 - 1))))


class Checkpointer:
    """Keeps the newest `keep` checkpoints, saved asynchronously at the steps the caller picks."""

    def __init__(self, workdir: str, keep: int = 1, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: must be at least 1 (the newest checkpoint is always kept)")
        self.directory = epath.Path(workdir) / "checkpoints"
        self._read_only = read_only
        self._saving: int | None = None  # The step of the save in flight, until it is waited for.
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            # A save cut short (full disk, a kill) leaves a temporary folder: the next run removes it.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
            )
            logging.getLogger("absl").addFilter(_ORBAX_DISK_FULL_FILTER)  # orbax logs through absl.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest step on disk, intact or not (`restore_latest` verifies)."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: ocp.args.CheckpointArgs, meta: Mapping[str, Any]) -> bool:
        """Starts an asynchronous save of `step` (unless it exists); returns whether one was started.

        `data` saves the data iterator (`grain.PyGrainCheckpointSave(iterator)`); the caller builds it,
        so that loading a model for inference never imports grain. `meta` is stored with the
        state's checksum added.

        Raises:
          OSError: ENOSPC, when the disk cannot hold the checkpoint (checked before writing, and
            reported for a previous save that ran out of space); older checkpoints are intact.
        """
        self.wait()
        self._check_free_space(step, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=data,
            meta=ocp.args.JsonSave({**meta, STATE_SHA256: tree_sha256(state), **_data_checksums(data)}),
        )
        with self._disk_full_as_oserror(step):
            saved = self.manager.save(step, args=args, force=True)
        if saved:
            self._saving = step
            logging.info("saving checkpoint at step %d", step)
        return saved

    def _check_free_space(self, step: int, state: Any) -> None:
        """Refuses a save the disk cannot hold: orbax's writer threads would fail it noisily."""
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) * _FREE_SPACE_MARGIN + _FREE_SPACE_SLACK_BYTES
        free_mib = _process_zero_value(shutil.disk_usage(self.directory).free // 2**20)
        if free_mib * 2**20 < needed:
            raise self._disk_full(step, f": {free_mib} MiB free, it needs about {needed / 2**20:.0f} MiB")

    @contextlib.contextmanager
    def _disk_full_as_oserror(self, step: int | None) -> Iterator[None]:
        """Turns orbax's full-disk errors (tensorstore's text) into one OSError naming the step."""
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            raise self._disk_full(step) from None

    def _disk_full(self, step: int | None, detail: str = "") -> OSError:
        """The one error a full disk gives (the CLI prints it as `DIR: message`)."""
        return OSError(
            errno.ENOSPC,
            f"no space left on device while saving the checkpoint at step {step}{detail}. The older checkpoints "
            "are intact; free some space and rerun the same command to resume",
            str(self.directory),
        )

    def restore_latest(
        self,
        abstract_state: Any,
        *,
        data: ocp.args.CheckpointArgs | None = None,
        check: Callable[[int, Mapping[str, Any]], None] | None = None,
        steps: Iterable[int] | None = None,
    ) -> Restored | None:
        """The newest intact checkpoint, restored and verified; None if there is no checkpoint.

        Args:
          abstract_state: shapes, dtypes and shardings of the train state (`state.abstract_train_state`).
          data: `grain.PyGrainCheckpointRestore(iterator)` restores the data iterator in place too.
          check: `check(step, meta)` before a step is restored; it raises (e.g.
            CheckpointMismatchError) when the checkpoint does not suit the run.
          steps: the steps to try, newest first (default: all on disk).

        Raises:
          NoIntactCheckpointError: there are checkpoints, but none is intact (each is reported).
          CheckpointMismatchError: from `check`, or grain's data mismatch, translated.
        """
        candidates = sorted(self.manager.all_steps() if steps is None else steps, reverse=True)
        damaged = []
        for step in candidates:
            try:
                restored = self._restore_verified(step, abstract_state, data, check)
            except _DamagedCheckpoint as e:
                damaged.append(step)
                later = "older checkpoints are tried" if step != candidates[-1] else "no older checkpoint is left"
                logging.warning("%s; %s", e, later)
                continue
            if _process_zero_value(step) != step:
                raise RuntimeError(
                    f"{self.directory}: the processes restored different steps; is it one shared folder?"
                )
            self._set_aside(damaged)
            return restored
        if not candidates:
            return None
        workdir = os.path.dirname(str(self.directory))
        raise NoIntactCheckpointError(
            f"--workdir {workdir}: no intact checkpoint (steps {', '.join(map(str, candidates))} are damaged, see the "
            "warnings above); use a new --workdir, or move checkpoints/ away to train from scratch here"
        )

    def _restore_verified(self, step: int, abstract_state: Any, data, check) -> Restored:
        where = f"the checkpoint at step {step} in {self.directory}"
        items = ["state", "meta"] + (["data"] if data is not None else [])
        missing = [item for item in items if not (self.directory / str(step) / item).exists()]
        if missing:
            folders = "folders are" if len(missing) > 1 else "folder is"
            raise _DamagedCheckpoint(f"{where} is damaged: its {' and '.join(missing)} {folders} missing")
        meta = self._restore_items(step, where, "its metadata cannot be read", meta=ocp.args.JsonRestore())["meta"]
        if check is not None:
            check(step, meta)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data is not None:
            args["data"] = data
        state = self._restore_items(step, where, "it cannot be restored", **args)["state"]
        if data is not None:
            self._verify_data(where, data, meta.get(DATA_SHA256))
        expected = meta.get(STATE_SHA256)
        if expected is None:
            logging.warning("%s has no checksum (saved by an older smsanet-jax): restored unverified", where)
        elif tree_sha256(state) != expected:
            raise _DamagedCheckpoint(
                f"{where} is damaged: its arrays differ from the checksum saved with them (the files changed after "
                "the save)"
            )
        return Restored(step, state, meta)

    @staticmethod
    def _verify_data(where: str, data: ocp.args.CheckpointArgs, expected: list[str] | None) -> None:
        """Raises _DamagedCheckpoint on every process if any process's restored iterator state fails its checksum."""
        if expected is None:  # Saved before data checksums: the state's own check warns about the old format.
            return
        index = jax.process_index()
        intact = len(expected) == jax.process_count() and _data_sha256(data) == expected[index]
        if not _true_on_every_process(intact):
            raise _DamagedCheckpoint(
                f"{where} is damaged: a data iterator state differs from the checksum saved with it (the files changed "
                "after the save)"
            )

    def _restore_items(self, step: int, where: str, failure: str, **items: ocp.args.CheckpointArgs) -> Any:
        """orbax's restore of some items, its errors told apart: grain's data mismatch, or damage."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Whatever orbax, tensorstore (bare Exceptions) and grain raise.
            if isinstance(e, ValueError) and "in checkpoint does not match" in str(e):  # grain's own check.
                raise CheckpointMismatchError(
                    f"{where} was saved with other data settings ({str(e).splitlines()[0]}); resume with the same "
                    "--config.data.*, --config.global_batch_size and number of processes, or use a new --workdir"
                ) from None
            raise _DamagedCheckpoint(f"{where} is damaged: {failure} ({_brief(e)})") from e

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of `checkpoints/`, so that training can save those steps again."""
        if self._read_only or not steps:
            return
        target = self.directory.parent / DAMAGED_FOLDER
        if jax.process_index() == 0:
            target.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                destination = target / f"{step}-{stamp}"
                (self.directory / str(step)).rename(destination)
                logging.warning("moved the damaged checkpoint at step %d to %s", step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("smsanet_jax.checkpointing.set_aside")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the save in flight.

        Raises:
          OSError: ENOSPC, naming the step, when that save ran out of space.
        """
        step, self._saving = self._saving, None
        with self._disk_full_as_oserror(step):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight (see `wait`), then closes the manager."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # A failed save raises again here: `wait` reported it.
                self.manager.close()
            raise
        self.manager.close()
