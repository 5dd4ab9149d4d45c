"""Orbax checkpoints of a training run, and single-file weights for converted or exported models.

A training checkpoint holds three items saved at the same step: the train state, each process's
grain iterator state (so a resumed run reads exactly the next batches), and JSON metadata with the
model config (so a workdir reused with another model shape fails clearly instead of inside orbax).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import grain.python as grain
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was written for another model shape."""


def _diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class Checkpointer:
    """Keeps the newest `keep` checkpoints, saved asynchronously at the steps the caller picks."""

    def __init__(self, workdir: str, keep: int = 1, read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: Mapping[str, Any]) -> bool:
        """Starts an asynchronous save of `step` (unless it exists); returns whether one was started."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.PyGrainCheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )
        if saved:
            logging.info("saving checkpoint at step %d", step)
        return saved

    def check_model(self, step: int, model_config: Mapping[str, Any]) -> None:
        """Raises CheckpointMismatchError if `step` was saved with another model config."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        differences = _diff(meta.get("model", {}), jsonable(model_config))
        if differences:
            raise CheckpointMismatchError(
                f"{self.directory} holds step {step} of a model with another shape:\n  "
                + "\n  ".join(differences)
                + "\nUse a new --workdir, or the checkpoint's model settings."
            )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state (sharded like `abstract_state`) and rewinds `data_iterator` in place."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain.PyGrainCheckpointRestore(data_iterator)
            ),
        )
        return restored["state"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restores only the train state (inference: no data iterator needed)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"
        ]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def jsonable(value: Any) -> Any:
    """Config values as JSON would give them back (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def save_variables(path: str, variables: Mapping[str, Any], kind: str, **meta: Any) -> None:
    """Writes Flax variables to one msgpack file (atomically: a temporary name, then a rename)."""
    payload = {
        "kind": kind,
        "meta": jsonable(meta),
        "variables": flax.serialization.to_state_dict({k: _to_numpy(v) for k, v in variables.items()}),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_variables(path: str, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a file written by `save_variables`; returns (variables, meta).

    Raises:
      ValueError: the file is missing, not such a file, or holds another kind of network.
    """
    try:
        with open(path, "rb") as f:
            payload = flax.serialization.msgpack_restore(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such weights file") from None
    except Exception as e:  # msgpack raises several types on foreign or truncated data.
        raise ValueError(f"{path}: not a smsanet-jax weights file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or "variables" not in payload:
        raise ValueError(f"{path}: not a smsanet-jax weights file")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path}: holds {payload.get('kind')!r} weights, expected {kind!r}")
    return payload["variables"], payload.get("meta", {})
