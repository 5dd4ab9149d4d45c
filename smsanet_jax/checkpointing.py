"""Orbax checkpoints of a training run.

A training checkpoint holds three items saved at the same step: the train state, each process's
grain iterator state (so a resumed run reads exactly the next batches), and JSON metadata with the
model config (so a workdir reused with another model shape fails clearly instead of inside orbax).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from smsanet_jax import config_util


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

    def save(self, step: int, state: Any, data: ocp.args.CheckpointArgs, meta: Mapping[str, Any]) -> bool:
        """Starts an asynchronous save of `step` (unless it exists); returns whether one was started.

        `data` saves the data iterator (`grain.PyGrainCheckpointSave(iterator)`); the caller builds it,
        so that loading a model for inference never imports grain.
        """
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=data,
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
        differences = _diff(meta.get("model", {}), config_util.jsonable(model_config))
        if differences:
            raise CheckpointMismatchError(
                f"{self.directory} holds step {step} of a model with another shape:\n  "
                + "\n  ".join(differences)
                + "\nUse a new --workdir, or the checkpoint's model settings."
            )

    def restore(self, step: int, abstract_state: Any, data: ocp.args.CheckpointArgs) -> Any:
        """Restores the state (sharded like `abstract_state`) and the data iterator in place.

        `data` is `grain.PyGrainCheckpointRestore(iterator)`.
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=data),
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
