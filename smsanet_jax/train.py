"""Training: the train state, one jit-compiled sharded step, and the loop around it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from smsanet_jax import (
    checkpointing,
    colorspace,
    config_util,
    data,
    evaluation,
    files,
    inference,
    losses,
    parallel,
    reporting,
    weights,
)
from smsanet_jax import state as state_lib
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.models import pfanet as pfanet_lib


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static part of the loss: everything `train_step` is specialised on."""

    alpha: float
    norm: str
    threshold: float
    pfanet_variant: str
    pfanet_size: int
    dtype: Any
    conv_impl: str

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossSettings:
        return cls(
            alpha=float(config.loss.alpha),
            norm=config.loss.norm,
            threshold=float(config.loss.threshold),
            pfanet_variant=config.loss.pfanet_variant,
            pfanet_size=config.loss.pfanet_size,
            dtype=state_lib.DTYPES[config.dtype],
            conv_impl=config.conv_impl,
        )


def load_pfanet(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """The frozen PFANet variables for the salient loss, replicated; None when alpha is 0."""
    if not config.loss.alpha:
        return None
    variant = config.loss.pfanet_variant
    if config.init.pfanet == "random":
        # Only for tests of the loss plumbing: a random PFANet gives meaningless masks.
        module = pfanet_lib.PFANet(variant=variant)
        size = config.loss.pfanet_size
        variables = jax.jit(module.init)(jax.random.key(config.seed + 1), jnp.zeros((1, size, size, 3)))
    elif config.init.pfanet:
        variables, _ = weights.load_pfanet(config.init.pfanet, variant)
    else:
        raise ValueError(
            "loss.alpha > 0 needs PFANet weights: convert them with "
            "`smsanet-jax convert-weights pfanet-s SRC DST` and pass --config.init.pfanet=DST "
            "(or set --config.loss.alpha=0)"
        )
    return jax.device_put(variables, parallel.replicated(mesh))


def train_step(
    state: state_lib.TrainState, batch: Mapping[str, jax.Array], pfanet_variables: Any, *, settings: LossSettings
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """One Adam update on a global batch of uint8 RGB images; BN statistics span the global batch."""
    l, ab = colorspace.rgb_uint8_to_l_ab(batch["rgb"])
    saliency_fn = None
    if settings.alpha:
        saliency_fn = functools.partial(
            pfanet_lib.saliency,
            pfanet_variables,
            variant=settings.pfanet_variant,
            size=settings.pfanet_size,
            dtype=settings.dtype,
            conv_impl=settings.conv_impl,
        )

    def loss_fn(params):
        pred, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, l, train=True, mutable=["batch_stats"]
        )
        loss, terms = losses.total(
            pred, ab, l, alpha=settings.alpha, saliency_fn=saliency_fn, threshold=settings.threshold, norm=settings.norm
        )
        return loss, (terms, updates["batch_stats"])

    (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {**terms, "grad_norm": optax.global_norm(grads)}


def jit_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """`train_step` compiled once: batch sharded over `data`, state and PFANet replicated, state donated."""
    step = functools.partial(train_step, settings=LossSettings.from_config(config))
    replicated = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


class PreemptionWatcher:
    """True once the job should stop: SIGTERM here, or JAX's preemption sync point across hosts."""

    def __init__(self, checkpointer: checkpointing.Checkpointer):
        self._checkpointer = checkpointer
        self._signalled = False
        # With several processes JAX's preemption service owns SIGTERM and agrees on a step.
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._signalled = True

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._checkpointer.manager.reached_preemption(step)
        return self._signalled

    def close(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def _check_finite(step: int, host_metrics: Mapping[str, float], checkpointer) -> None:
    bad = {k: v for k, v in host_metrics.items() if not np.isfinite(v)}
    if bad:
        checkpointer.wait()
        raise NonFiniteLossError(
            f"non-finite values at step {step}: {bad}; stopping. The last good checkpoint "
            f"(step {checkpointer.latest_step()}) is untouched; lower the learning rate or use float32."
        )


def _data_dir(config) -> str | None:
    return config.data.data_dir or None


# Where each part of a checkpoint's data identity comes from: the option that changes it.
_DATA_OPTIONS = {
    "dataset": "--config.data.name",
    "num_records": "--config.data.name",
    "split": "--config.data.train_split",
    "global_batch_size": "--config.global_batch_size",
    "num_workers": "--config.data.num_workers",
    "process_count": "--num-processes",
    "seed": "--config.seed",
}


def _train_loader(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> data.Loader:
    return data.make_train_loader(
        name=config.data.name,
        split=config.data.train_split,
        data_dir=_data_dir(config),
        image_size=config.image_size,
        local_batch_size=parallel.local_batch_size(config.global_batch_size, mesh),
        seed=config.seed,
        num_workers=config.data.num_workers,
        gray_threshold=config.data.gray_threshold,
    )


def _checkpoint_meta(config: ml_collections.ConfigDict, loader: data.Loader) -> dict[str, Any]:
    """What a checkpoint is only valid for: the model shape and the data its iterator state reads."""
    identity = {k: v for k, v in loader.identity.items() if k in _DATA_OPTIONS}
    return {
        "model": config_util.jsonable(config.model.to_dict()),
        "data": {**identity, "global_batch_size": config.global_batch_size},
    }


def _check_resumable(current: Mapping[str, Any], step: int, saved: Mapping[str, Any]) -> None:
    """Raises CheckpointMismatchError naming every setting in which the run differs from checkpoint `step`."""
    problems = []
    for section, option_of in (("model", lambda key: f"--config.model.{key}"), ("data", _DATA_OPTIONS.get)):
        if section not in saved:  # Older checkpoints recorded no data identity: grain's check remains.
            continue
        then, now = saved[section], current[section]
        for key in sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k)):
            option = option_of(key)
            what = "" if option.endswith(key) else f"{key} "  # The option alone does not say which part.
            was, is_now = then.get(key), now.get(key)
            problems.append(f"{option}: the checkpoint at step {step} was saved with {what}{was!r}, now {is_now!r}")
    if problems:
        raise checkpointing.CheckpointMismatchError(
            "; ".join(problems) + "; use the checkpoint's settings, or a new --workdir"
        )


def _start(config, model, mesh, workdir, checkpointer, batches, meta) -> tuple[int, state_lib.TrainState]:
    """(step, state) to train on from: the newest intact checkpoint's (the iterator restored in
    place), or step 0 and a fresh state.

    Raises:
      ValueError: the checkpoint is for another model or other data, or already past `num_train_steps`.
    """
    restored = checkpointer.restore_latest(
        state_lib.abstract_train_state(config, model, mesh),
        data=grain.PyGrainCheckpointRestore(batches),
        check=functools.partial(_check_resumable, meta),
    )
    if restored is None:
        return 0, state_lib.create_train_state(config, model, mesh)
    if restored.step > config.num_train_steps:
        raise ValueError(
            f"--config.num_train_steps={config.num_train_steps}: the checkpoint in {workdir} is already at step "
            f"{restored.step}; ask for at least {restored.step} steps to continue it, or use a new --workdir"
        )
    logging.info("resumed from step %d in %s", restored.step, workdir)
    return restored.step, restored.state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
    """Trains (resuming from `workdir`'s newest intact checkpoint) to `config.num_train_steps`.

    Raises:
      ValueError: a bad config value, a checkpoint that does not suit the config, or checkpoints
        none of which is intact (each names the option or folder to change).
      OSError: a full disk (the older checkpoints stay intact).
    """
    config_util.validate_train_config(config, state_lib.DTYPES)
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    mesh = parallel.make_mesh(config.num_devices)
    loader = _train_loader(config, mesh)  # Checks the data settings before any data is read.
    batches = iter(loader)
    model = state_lib.build_model(config)  # Logs the convolution path it prepared.
    conv_path = cpu_conv.describe(config.conv_impl)
    pfanet_variables = load_pfanet(config, mesh)
    with contextlib.ExitStack() as closing:  # Closed in reverse order, however the run ends.
        checkpointer = closing.enter_context(
            contextlib.closing(checkpointing.Checkpointer(workdir, config.keep_checkpoints))
        )
        meta = _checkpoint_meta(config, loader)
        start, state = _start(config, model, mesh, workdir, checkpointer, batches, meta)
        if lead:  # Only now: a config the checkpoint rejected must not replace the workdir's own.
            files.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        step_fn = jit_train_step(config, mesh)
        writer = closing.enter_context(
            contextlib.closing(reporting.MetricWriter(os.path.join(workdir, "tensorboard"), enabled=lead))
        )
        writer.text("run/convolutions", conv_path)
        progress = reporting.Progress(config.num_train_steps, config.global_batch_size, start, enabled=lead)
        preemption = closing.enter_context(contextlib.closing(PreemptionWatcher(checkpointer)))
        if lead and start < config.num_train_steps:
            logging.info("compiling the train step (%d devices, global batch %d)", mesh.size, config.global_batch_size)
        for step in range(start + 1, config.num_train_steps + 1):
            batch = next(batches)
            state, step_metrics = step_fn(state, parallel.make_global({"rgb": batch["rgb"]}, mesh), pfanet_variables)
            last = step == config.num_train_steps
            stopping = preemption.requested(step)
            saving = last or stopping or step % config.checkpoint_every_steps == 0
            if saving or step % config.log_every_steps == 0:
                host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                _check_finite(step, host, checkpointer)
                _log_step(config, writer, progress, workdir if lead else None, step, host, batch["id"])
            if saving:  # Before the evaluation: a failing evaluation must not cost the steps.
                checkpointer.save(step, state, grain.PyGrainCheckpointSave(batches), meta)
            if config.eval_num_examples and (last or step % config.eval_every_steps == 0):
                _report_eval(config, state, writer, workdir, step)
            if stopping:
                logging.warning("stopped for preemption after step %d; rerun the same command to resume", step)
                break
    return state


def _log_step(config, writer, progress, ids_workdir, step, host, ids) -> None:
    """The progress line, the train scalars and (on process 0, `ids_workdir` set) the batch's ids."""
    rate = progress.update(step, {"loss": host["total"]})
    writer.scalars(
        step,
        {
            **{f"train/{k}": v for k, v in host.items()},
            "train/learning_rate": config.optimizer.learning_rate,
            "train/images_per_second": rate,
        },
    )
    if ids_workdir:
        _append_ids(ids_workdir, step, ids)


def _append_ids(workdir: str, step: int, ids: np.ndarray) -> None:
    """Which examples each logged step trained on (process 0's share): resumption can be audited."""
    with open(os.path.join(workdir, "batch_ids.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "ids": np.asarray(ids).tolist()}) + "\n")


def _report_eval(config, state, writer, workdir, step) -> None:
    """The evaluation protocol on held-out images: a report in eval/step_N, scalars and a grid."""
    colorizer = inference.Colorizer(
        state.apply_fn,
        {"params": state.params, "batch_stats": state.batch_stats},
        {"source": workdir, "step": step, "params_sha256": None, "config": config_util.jsonable(config.to_dict())},
    )
    images = evaluation.DatasetImages(
        config.data.name,
        config.data.eval_split,
        data_dir=_data_dir(config),
        image_size=config.image_size,
        num_images=config.eval_num_examples,
        seed=config.seed,
    )
    result = evaluation.evaluate_to_folder(
        colorizer,
        images,
        os.path.join(workdir, "eval", f"step_{step:07d}"),
        overwrite=True,
        batch_size=config.eval_batch_size,
        num_devices=config.num_devices,
    )
    means = {k: result.summary[k]["mean"] for k in evaluation.METRICS}
    writer.scalars(step, {f"eval/{k}": v for k, v in means.items()})
    logging.info(
        "step %d eval on %d images: %s", step, result.summary["n"], ", ".join(f"{k} {v:.4f}" for k, v in means.items())
    )
    writer.image(step, "eval/gray_prediction_truth", result.grid)
