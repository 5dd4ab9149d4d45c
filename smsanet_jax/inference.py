"""The colorizer a command runs, and colorization of real photos at full resolution.

A `Colorizer` is a training workdir's latest checkpoint, converted weights plus the config of their
network, or the gray baseline (`load_colorizer`). `PhotoColorizer` runs it on photos of any size:
the photo is resized to 256x256 RGB (Pillow bicubic, antialiased, aspect ratio not kept, as Zhang
et al.'s `colorizers` demo does), its L goes through the network with the point hints, and only
the predicted ab is upsampled (bilinear, half-pixel centres) to the original size and merged with
the original full-resolution L, then converted to uint8 sRGB; out-of-gamut colours lose chroma
rather than lightness (`full_resolution.fit_chroma`), so the output's L is the original's within uint8 rounding.

Nothing here imports TensorFlow, tensorflow_datasets or grain.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smsanet_jax import checkpointing, colorspace, config_util, full_resolution, hints, parallel, state, weights

BASELINES = ("gray",)


@dataclasses.dataclass(frozen=True)
class Colorizer:
    """A colorization model ready to apply.

    Attributes:
      apply_fn: `apply_fn(variables, l, ab_hint=None, mask=None, train=False) -> ab`, with L in
        [0, 100] [N,H,W,1] and raw ab [N,H,W,2] (a Flax module's `apply`, or the gray baseline).
      variables: {"params", "batch_stats"} (empty for the baseline), on the host or replicated.
      provenance: what the model is, for reports: `source`, `step`, `params_sha256`, `config`.
    """

    apply_fn: Callable[..., jax.Array]
    variables: Mapping[str, Any]
    provenance: Mapping[str, Any]


def gray_apply(
    variables: Mapping[str, Any],
    l: jax.Array,
    ab_hint: jax.Array | None = None,
    mask: jax.Array | None = None,
    train: bool = False,
) -> jax.Array:
    """The gray baseline: ab = 0 everywhere, whatever the hints (the floor every model must beat)."""
    del variables, ab_hint, mask, train
    return jnp.zeros(l.shape[:-1] + (2,), jnp.float32)


def params_sha256(variables: Mapping[str, Any]) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in path order (device-independent)."""
    return checkpointing.tree_sha256(variables)


def load_trained(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, nn.Module, dict[str, Any], int]:
    """A trained model from a workdir: (config, model, {"params", "batch_stats"}, step).

    Raises:
      ValueError: the workdir has no config.json or no checkpoint, or none of its checkpoints is
        intact (damaged newer ones are reported and skipped).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--workdir {workdir}: no config.json here; is it a training workdir?")
    with open(config_path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    model = state.build_model(config)
    # Replicated over every device of every process: a one-device mesh is invalid with several processes.
    abstract = state.abstract_train_state(config, model, parallel.make_mesh())
    try:
        restored = checkpointer.restore_latest(abstract, steps=[step] if step else None)
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(f"--workdir {workdir}: no checkpoint in {checkpointer.directory}")
    return config, model, {"params": restored.state.params, "batch_stats": restored.state.batch_stats}, restored.step


def load_colorizer(
    *,
    workdir: str | None = None,
    params: str | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    baseline: str | None = None,
) -> Colorizer:
    """Loads exactly one of: a workdir's latest checkpoint, a weights file with its config, a baseline.

    Args:
      workdir: a training workdir (its config.json and latest checkpoint).
      params: a weights file written by `weights.save_variables` (e.g. by `convert-weights siggraph17`).
      config: the config file describing the network of `params` (e.g. configs/basenet.py).
      overrides: `--config.key=value` overrides of `config`.
      baseline: "gray" (ab = 0).

    Returns:
      The colorizer, with host (numpy) variables.

    Raises:
      ValueError: not exactly one source, `params` without `config`, an unknown baseline, or
        weights that do not fit the configured network (every mismatch is listed).
    """
    if sum(x is not None for x in (workdir, params, baseline)) != 1:
        raise ValueError("give exactly one model: --workdir DIR, --params FILE --config C, or --baseline gray")
    if (params is None) != (config is None):
        raise ValueError(
            "--params and --config go together (e.g. --params siggraph17.msgpack --config configs/basenet.py)"
        )
    if overrides and config is None:
        raise ValueError("--config.key=value overrides apply to --config; a workdir's config is fixed")
    if baseline is not None:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
        provenance = {"source": f"baseline:{baseline}", "step": None, "params_sha256": None, "config": None}
        return Colorizer(gray_apply, {}, provenance)
    if workdir is not None:
        cfg, model, variables, step = load_trained(workdir)
        variables = jax.device_get(variables)
        source = workdir
    else:
        cfg = config_util.load_config(config, overrides)
        model = state.build_model(cfg)
        variables = weights.model_variables(weights.load_variables(params)[0])
        weights.check_fits(variables, state.variable_shapes(cfg, model), params, f"the network of {config}")
        step, source = None, params
    return Colorizer(
        model.apply,
        variables,
        {
            "source": source,
            "step": step,
            "params_sha256": params_sha256(variables),
            "config": config_util.jsonable(cfg.to_dict()),
        },
    )


# --- Colorization ------------------------------------------------------------------------------


def _network_ab(apply_fn, variables: Any, rgb_small: jax.Array, ab_hint: jax.Array, mask: jax.Array) -> jax.Array:
    l, _ = colorspace.rgb_uint8_to_l_ab(rgb_small)
    return apply_fn(variables, l, ab_hint, mask, train=False).astype(jnp.float32)


@functools.lru_cache(maxsize=4)
def _compiled_network(apply_fn):
    """The jitted network of one model: colorizing again reuses the compilation."""
    return jax.jit(functools.partial(_network_ab, apply_fn))


# The full-resolution merge (NumPy-capable, see `full_resolution`), compiled once per photo size.
merge_full_resolution = jax.jit(full_resolution.merge)


class PhotoColorizer:
    """A colorizer's network on local devices, compiled once per batch shape, for `hints.Photo`s.

    Calls are padded with zero rows (to `batch_size`, or the caller's `pad_to`), so one compilation
    serves any number of photos.
    """

    def __init__(
        self, colorizer: Colorizer, *, batch_size: int = 1, num_devices: int = 0, size: int = hints.NETWORK_SIZE
    ):
        self.mesh = parallel.make_mesh(num_devices)
        self.batch_size = parallel.round_up_to_devices(batch_size, self.mesh)
        self.size = size
        self._variables = jax.device_put(colorizer.variables, parallel.replicated(self.mesh))
        self._network = _compiled_network(colorizer.apply_fn)

    def network_ab(self, photos: Sequence[hints.Photo], pad_to: int | None = None) -> np.ndarray:
        """The network's raw ab [len(photos), S, S, 2], run on a batch padded to `pad_to` rows.

        `pad_to` (default `batch_size`) is rounded up to a multiple of the devices.
        """
        rows = parallel.round_up_to_devices(pad_to or self.batch_size, self.mesh)
        stacked = {k: hints.padded_stack([getattr(p, k) for p in photos], rows) for k in ("small", "ab_hint", "mask")}
        batch = parallel.make_global(stacked, self.mesh)
        ab = self._network(self._variables, batch["small"], batch["ab_hint"], batch["mask"])
        return np.asarray(ab)[: len(photos)]

    def __call__(self, photos: Sequence[hints.Photo], pad_to: int | None = None) -> list[np.ndarray]:
        """Full-resolution uint8 RGB colorizations of `photos` (see `network_ab`)."""
        ab = self.network_ab(photos, pad_to)
        return [np.asarray(merge_full_resolution(p.rgb, ab[i])) for i, p in enumerate(photos)]
