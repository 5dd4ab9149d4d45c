"""The colorizer a command runs: a training workdir, converted weights plus a config, or the gray baseline."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smsanet_jax import checkpointing, config_util, convert, train

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
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


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
      params: a weights file written by `save_variables` (e.g. by `convert-weights siggraph17`).
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
        return Colorizer(
            gray_apply, {}, {"source": f"baseline:{baseline}", "step": None, "params_sha256": None, "config": None}
        )
    if workdir is not None:
        cfg, model, variables, step = train.load_trained(workdir)
        variables = jax.device_get(variables)
        source = workdir
    else:
        cfg = config_util.load_config(config, overrides)
        model = train.build_model(cfg)
        variables, _ = checkpointing.load_variables(params)
        variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
        # Shapes only: eval_shape allocates nothing. The config's image size suits its attention scales.
        size = cfg.image_size
        expected = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
        errors = convert.shape_errors(variables, expected)
        if errors:
            raise ValueError(
                f"{params} does not fit the network of {config}:\n  "
                + "\n  ".join(errors[:20])
                + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
            )
        step, source = None, params
    return Colorizer(
        model.apply,
        variables,
        {"source": source, "step": step, "params_sha256": params_sha256(variables), "config": _plain(cfg)},
    )


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return checkpointing.jsonable(config.to_dict())
