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


def _shape_errors(converted: Mapping, expected: Mapping, prefix: str = "", report_missing: bool = True) -> list[str]:
    """Compares two nested dicts of arrays; lists every extra or mis-shaped (and missing) leaf."""
    errors = []
    for key in sorted(set(converted) | set(expected)):
        where = f"{prefix}/{key}"
        if key not in expected:
            errors.append(f"{where}: not in the network")
        elif key not in converted:
            if report_missing:
                errors.append(f"{where}: missing from the checkpoint")
        elif isinstance(expected[key], Mapping):
            errors.extend(_shape_errors(converted[key], expected[key], where, report_missing))
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
    missing = sorted(wanted - present)
    errors = [f"missing key {k}" for k in missing]
    errors += [f"unexpected key {k}" for k in sorted(present - wanted)]
    variables: Variables = {"params": {}, "batch_stats": {}}
    for entry in table:
        if not set(_torch_keys(entry)) <= present:
            continue  # Reported as missing keys; convert the rest so shape errors are reported too.
        params, stats = _entry_from_torch(entry, state_dict)
        _set_path(variables["params"], entry.flax, params)
        if stats:
            _set_path(variables["batch_stats"], entry.flax, stats)
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    # Leaves of skipped modules are missing here by construction: already reported as missing keys.
    errors += _shape_errors(variables, {k: v for k, v in expected.items() if k in variables},
                            report_missing=not missing)
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


def _siggraph17_block(name: str, convs: Sequence[int], bn: int | None = None) -> list[Entry]:
    """Entries of one `modelK` Sequential: convs at the given indices, then its BN (BaseNet names them by index)."""
    entries = [Entry(f"{name}.{i}", (name, f"conv{i}"), "conv") for i in convs]
    if bn is not None:
        entries.append(Entry(f"{name}.{bn}", (name, f"bn{bn}"), "bn"))
    return entries


# In the released state dict's order; `model_class` (never computed) is not part of BaseNet.
SIGGRAPH17_TABLE: tuple[Entry, ...] = (
    *_siggraph17_block("model1", (0, 2), bn=4),
    *_siggraph17_block("model2", (0, 2), bn=4),
    *_siggraph17_block("model3", (0, 2, 4), bn=6),
    *_siggraph17_block("model4", (0, 2, 4), bn=6),
    *_siggraph17_block("model5", (0, 2, 4), bn=6),
    *_siggraph17_block("model6", (0, 2, 4), bn=6),
    *_siggraph17_block("model7", (0, 2, 4), bn=6),
    Entry("model8up.0", ("model8up",), "conv_transpose"),
    *_siggraph17_block("model8", (1, 3), bn=5),  # Decoder blocks open with a ReLU at index 0.
    Entry("model9up.0", ("model9up",), "conv_transpose"),
    *_siggraph17_block("model9", (1,), bn=3),
    Entry("model10up.0", ("model10up",), "conv_transpose"),
    *_siggraph17_block("model10", (1,)),
    Entry("model3short8.0", ("model3short8",), "conv"),
    Entry("model2short9.0", ("model2short9",), "conv"),
    Entry("model1short10.0", ("model1short10",), "conv"),
    Entry("model_out.0", ("model_out",), "conv"),
)
SIGGRAPH17_CLASS_HEAD = "model_class."


def siggraph17_from_torch(state_dict: Mapping[str, np.ndarray], width: int = 64,
                          source: str = "SIGGRAPH17 checkpoint") -> Variables:
    """Converts a SIGGRAPH17 generator state dict (e.g. the released siggraph17 .pth) to BaseNet variables.

    The classification head (`model_class.*`) is dropped: BaseNet never computes it. The result also
    initialises the backbone of SMSANet (and the CBAM / SE variants), whose paths are BaseNet's.

    Args:
      state_dict: torch key -> array, as from `load_torch`.
      width: BaseNet width the weights are for (64 for the released network).
      source: how error messages name the checkpoint.

    Returns:
      {"params", "batch_stats"} for `BaseNet(width=width)`.

    Raises:
      ConversionError: naming every missing or unexpected key and every shape mismatch.
    """
    import jax  # pylint: disable=import-outside-toplevel
    from smsanet_jax.models.basenet import BaseNet  # pylint: disable=import-outside-toplevel

    # Checked against shapes only: eval_shape allocates nothing, and 8x8 is the smallest valid input.
    expected = jax.eval_shape(
            BaseNet(width=width).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32))
    kept = {k: v for k, v in state_dict.items() if not k.startswith(SIGGRAPH17_CLASS_HEAD)}
    return from_torch(kept, SIGGRAPH17_TABLE, expected, source)


def siggraph17_to_torch(variables: Variables) -> dict[str, np.ndarray]:
    """Exports BaseNet variables (or the BaseNet part of an SMSANet's) as a SIGGRAPH17 state dict.

    Attention params are ignored. The result has no `model_class` head and no
    `num_batches_tracked`: load it into the torch model with `load_state_dict(sd, strict=False)`
    (or add the class head's weights first).

    Args:
      variables: {"params", "batch_stats"} of a BaseNet or SMSANet.

    Returns:
      torch key -> float32 numpy array in torch layout.
    """
    return to_torch(variables, SIGGRAPH17_TABLE)


# --- PFANet ------------------------------------------------------------------------------------
