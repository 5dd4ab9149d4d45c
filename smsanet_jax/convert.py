"""Weight converters between PyTorch / Keras checkpoints and our Flax variables.

A converter is a table of `Entry`s, each naming one torch module and the Flax path of the
module that holds the same weights. `from_torch` and `to_torch` walk such a table; every key that
is missing, unexpected or of the wrong shape is reported together in one `ConversionError`.
torch and h5py are imported lazily so the core package works without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Variables = dict[str, Any]


class ConversionError(ValueError):
    """A checkpoint does not match the network it is converted to."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch module (`torch` key prefix) and where its weights live in the Flax tree."""

    torch: str
    flax: tuple[str, ...]
    kind: str  # "conv" | "conv_transpose" | "bn" | "linear"
    bias: bool = True


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def load_torch(path: str) -> dict[str, np.ndarray]:
    """Reads a `.pth` file as a flat dict of numpy arrays, never unpickling arbitrary objects.

    Accepts a bare state dict or a training checkpoint holding one under "model" or "state_dict".
    """
    import torch  # pylint: disable=import-outside-toplevel

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files.
        raise ConversionError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: holds no state dict of tensors")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_keys(entry: Entry) -> tuple[str, ...]:
    if entry.kind == "bn":
        names = _BN_KEYS
    else:
        names = ("weight", "bias") if entry.bias else ("weight",)
    return tuple(f"{entry.torch}.{n}" for n in names)


def _entry_from_torch(entry: Entry, sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Returns (params, batch_stats) leaves of one module."""
    get = lambda n: np.asarray(sd[f"{entry.torch}.{n}"], np.float32)
    if entry.kind == "bn":
        return ({"scale": get("weight"), "bias": get("bias")},
                {"mean": get("running_mean"), "var": get("running_var")})
    w = get("weight")
    if entry.kind == "conv":
        kernel = w.transpose(2, 3, 1, 0)  # [O,I,kh,kw] -> [kh,kw,I,O]
    elif entry.kind == "conv_transpose":
        kernel = w.transpose(2, 3, 0, 1)  # [I,O,kh,kw] -> [kh,kw,I,O]
    elif entry.kind == "linear":
        kernel = w.T  # [O,I] -> [I,O]
    else:
        raise ValueError(f"unknown entry kind {entry.kind!r}")
    params = {"kernel": kernel}
    if entry.bias:
        params["bias"] = get("bias")
    return params, {}


def _entry_to_torch(entry: Entry, params: Mapping, stats: Mapping) -> dict[str, np.ndarray]:
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    if entry.kind == "bn":
        s = {k: np.asarray(v, np.float32) for k, v in stats.items()}
        values = (p["scale"], p["bias"], s["mean"], s["var"])
    else:
        kernel = p["kernel"]
        if entry.kind == "conv":
            weight = kernel.transpose(3, 2, 0, 1)
        elif entry.kind == "conv_transpose":
            weight = kernel.transpose(2, 3, 0, 1)
        else:
            weight = kernel.T
        values = (weight, p["bias"]) if entry.bias else (weight,)
    return {k: np.ascontiguousarray(v) for k, v in zip(_torch_keys(entry), values)}


def _get_path(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _shape_errors(converted: Mapping, expected: Mapping, prefix: str = "") -> list[str]:
    """Compares two nested dicts of arrays; lists every missing, extra or mis-shaped leaf."""
    errors = []
    for key in sorted(set(converted) | set(expected)):
        where = f"{prefix}/{key}"
        if key not in expected:
            errors.append(f"{where}: not in the network")
        elif key not in converted:
            errors.append(f"{where}: missing from the checkpoint")
        elif isinstance(expected[key], Mapping):
            errors.extend(_shape_errors(converted[key], expected[key], where))
        elif tuple(converted[key].shape) != tuple(expected[key].shape):
            errors.append(f"{where}: shape {tuple(converted[key].shape)} in the checkpoint, "
                          f"{tuple(expected[key].shape)} in the network")
    return errors


def from_torch(state_dict: Mapping[str, np.ndarray], table: Sequence[Entry], expected: Variables,
               source: str = "checkpoint") -> Variables:
    """Converts a torch state dict with `table` and checks it against `expected` (e.g. eval_shape).

    Raises:
      ConversionError: naming every missing or unexpected torch key and every shape mismatch.
    """
    wanted = {k for e in table for k in _torch_keys(e)}
    present = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    errors = [f"missing key {k}" for k in sorted(wanted - present)]
    errors += [f"unexpected key {k}" for k in sorted(present - wanted)]
    if errors:
        raise ConversionError(f"{source} does not match the network:\n  " + "\n  ".join(errors))
    variables: Variables = {"params": {}, "batch_stats": {}}
    for entry in table:
        params, stats = _entry_from_torch(entry, state_dict)
        _set_path(variables["params"], entry.flax, params)
        if stats:
            _set_path(variables["batch_stats"], entry.flax, stats)
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    errors = _shape_errors(variables, {k: v for k, v in expected.items() if k in variables})
    if errors:
        raise ConversionError(f"{source} does not match the network:\n  " + "\n  ".join(errors))
    return variables


def to_torch(variables: Variables, table: Sequence[Entry]) -> dict[str, np.ndarray]:
    """Inverse of `from_torch`: a state dict of numpy arrays in torch layout."""
    state_dict: dict[str, np.ndarray] = {}
    for entry in table:
        params = _get_path(variables["params"], entry.flax)
        stats = _get_path(variables["batch_stats"], entry.flax) if entry.kind == "bn" else {}
        state_dict.update(_entry_to_torch(entry, params, stats))
    return state_dict


# --- SIGGRAPH17 (BaseNet) ----------------------------------------------------------------------


# --- PFANet ------------------------------------------------------------------------------------
