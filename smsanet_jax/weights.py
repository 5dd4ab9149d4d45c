"""Weight files: one msgpack file of Flax variables, and everything that reads one into a network.

A weights file (`convert-weights` output, `--params`, `--config.init.*`) holds
`{"kind", "meta", "variables"}`. This module reads and writes them, checks them against the
network they are meant for (listing every mismatch), overlays them on a fresh state, and tells the
two PFANet layouts apart. Train, evaluate, colorize, saliency, export and demo all load through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from smsanet_jax import config_util, files
from smsanet_jax.models import pfanet

_MAX_LISTED = 20


def save_variables(path: str, variables: Mapping[str, Any], kind: str, **meta: Any) -> None:
    """Writes Flax variables to one msgpack file, atomically."""
    payload = {
        "kind": kind,
        "meta": config_util.jsonable(meta),
        "variables": flax.serialization.to_state_dict(_to_numpy(dict(variables))),
    }
    files.write_bytes(path, flax.serialization.msgpack_serialize(payload))


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_variables(path: str, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a file written by `save_variables`; returns (variables, meta).

    Raises:
      ValueError: the file is missing, not such a file, holds another kind of network, or has a
        leaf that is not an array.
    """
    try:
        with open(path, "rb") as f:
            payload = flax.serialization.msgpack_restore(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such weights file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a weights file") from None
    except Exception as e:  # msgpack raises several types on foreign or truncated data.
        raise ValueError(f"{path}: not a smsanet-jax weights file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("variables"), Mapping):
        raise ValueError(f"{path}: not a smsanet-jax weights file")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path}: holds {payload.get('kind')!r} weights, expected {kind!r}")
    bad = _non_arrays(payload["variables"])
    if bad:
        raise ValueError(f"{path}: {bad[0]} is not an array ({len(bad)} such entries); the file is damaged")
    return payload["variables"], payload.get("meta", {})


def _non_arrays(tree: Mapping, prefix: str = "") -> list[str]:
    bad = []
    for key, value in tree.items():
        where = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            bad += _non_arrays(value, where)
        elif not isinstance(value, np.ndarray):
            bad.append(where)
    return bad


def shape_errors(converted: Mapping, expected: Mapping, prefix: str = "") -> list[str]:
    """Compares two nested dicts of arrays (or shape structs); lists every missing, extra or mis-shaped leaf."""
    errors = []
    for key in sorted(set(converted) | set(expected)):
        where = f"{prefix}/{key}"
        if key not in expected:
            errors.append(f"{where}: not in the network")
        elif key not in converted:
            errors.append(f"{where}: missing from the checkpoint")
        elif isinstance(expected[key], Mapping) != isinstance(converted[key], Mapping):
            errors.append(f"{where}: a {'group' if isinstance(converted[key], Mapping) else 'leaf'} in the file")
        elif isinstance(expected[key], Mapping):
            errors.extend(shape_errors(converted[key], expected[key], where))
        elif tuple(np.shape(converted[key])) != tuple(expected[key].shape):
            errors.append(
                f"{where}: shape {tuple(np.shape(converted[key]))} in the checkpoint, "
                f"{tuple(expected[key].shape)} in the network"
            )
    return errors


def check_fits(variables: Mapping, expected: Mapping, what: str, target: str) -> None:
    """Raises ValueError listing every mismatch between `variables` and the shapes `expected`."""
    errors = shape_errors(variables, expected)
    if errors:
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise ValueError(f"{what} does not fit {target}:\n  " + "\n  ".join(errors[:_MAX_LISTED]) + more)


def model_variables(variables: Mapping) -> dict[str, Any]:
    """The `params` and `batch_stats` collections of a loaded file (anything else is dropped)."""
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def overlay(base: Mapping, loaded: Mapping, source: str, prefix: str = "") -> dict:
    """`base` with every leaf that `loaded` has replaced; `loaded` must be a sub-tree of `base`."""
    out = dict(base)
    for key, value in loaded.items():
        where = f"{prefix}/{key}"
        if key not in base:
            raise ValueError(f"{source}: {where} does not exist in this model")
        if isinstance(value, Mapping):
            out[key] = overlay(base[key], value, source, where)
        elif tuple(np.shape(value)) != tuple(base[key].shape):
            raise ValueError(
                f"{source}: {where} has shape {np.shape(value)}, the model wants "
                f"{tuple(base[key].shape)} (is model.width right?)"
            )
        else:
            out[key] = np.asarray(value, base[key].dtype)
    return out


def pfanet_variant(variables: Mapping) -> str:
    """ "k" (official Keras layout: 1x1 high-level conv) or "s" (the PyTorch port's 3x3), by layout."""
    hl_conv = variables.get("params", {}).get("hl_conv", {}).get("kernel")
    return "k" if hl_conv is not None and np.shape(hl_conv)[0] == 1 else "s"


def load_pfanet(path: str, variant: str | None = None) -> tuple[dict[str, Any], str]:
    """PFANet variables from a weights file, checked against the network, and their variant.

    Args:
      path: converted PFANet weights (`convert-weights pfanet-s|pfanet-k`).
      variant: the variant the caller is configured for ("s" or "k"); None accepts either.

    Raises:
      ValueError: the file holds no PFANet weights (every mismatch is listed), or the other variant.
    """
    variables = model_variables(load_variables(path)[0])
    found = pfanet_variant(variables)
    if variant is not None and found != variant:
        raise ValueError(
            f"{path}: holds PFANet-{found.upper()} weights, but loss.pfanet_variant is {variant!r}; "
            f"set --config.loss.pfanet_variant={found}"
        )
    side = pfanet.SIZE_MULTIPLE
    expected = jax.eval_shape(
        pfanet.PFANet(found).init, jax.random.key(0), jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    )
    errors = shape_errors(variables, expected)
    if errors:
        raise ValueError(
            f"{path}: not PFANet weights ({len(errors)} mismatches, e.g. {errors[0]}); convert "
            "them with `smsanet-jax convert-weights pfanet-s SRC DST` (pfanet-k for the Keras .h5)"
        )
    return variables, found
