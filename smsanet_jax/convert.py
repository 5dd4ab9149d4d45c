"""Weight converters between PyTorch / Keras checkpoints and our Flax variables.

A converter is a table of `Entry`s, each naming one torch module and the Flax path of the
module that holds the same weights. `from_torch` and `to_torch` walk such a table; every key that
is missing, unexpected or of the wrong shape is reported together in one `ConversionError`.
torch and h5py (the `convert` extra) are imported only by the functions that read their files,
so the rest of the package works without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from smsanet_jax import files, weights
from smsanet_jax.models.basenet import BaseNet
from smsanet_jax.models.pfanet import PFANet

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
        # The PFANet port saves numpy scalars (its test MAE) beside the weights; allow just those.
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
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


def _numpy_scalar_globals() -> list:
    """What a pickled numpy scalar refers to, under numpy 2 and numpy 1 module names."""
    scalar = np._core.multiarray.scalar  # pylint: disable=protected-access
    return [scalar, np.dtype, type(np.dtype(np.float32)), (scalar, "numpy.core.multiarray.scalar")]


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
        return ({"scale": get("weight"), "bias": get("bias")}, {"mean": get("running_mean"), "var": get("running_var")})
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


def from_torch(
    state_dict: Mapping[str, np.ndarray], table: Sequence[Entry], expected: Variables, source: str = "checkpoint"
) -> Variables:
    """Converts a torch state dict with `table` and checks it against `expected` (e.g. eval_shape).

    Raises:
      ConversionError: naming every missing or unexpected torch key and every shape mismatch.
    """
    wanted = {k for e in table for k in _torch_keys(e)}
    present = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    errors = [f"missing key {k}" for k in sorted(wanted - present)]
    errors += [f"unexpected key {k}" for k in sorted(present - wanted)]
    variables: Variables = {"params": {}, "batch_stats": {}}
    for entry in table:
        if not set(_torch_keys(entry)) <= present:
            continue  # Already reported as missing; the other modules still get shape-checked.
        params, stats = _entry_from_torch(entry, state_dict)
        _set_path(variables["params"], entry.flax, params)
        if stats:
            _set_path(variables["batch_stats"], entry.flax, stats)
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    mismatches = weights.shape_errors(variables, {k: v for k, v in expected.items() if k in variables})
    if errors:  # Leaves of missing keys are absent from `variables`; they are reported already.
        mismatches = [e for e in mismatches if not e.endswith("missing from the checkpoint")]
    errors += mismatches
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


def siggraph17_from_torch(
    state_dict: Mapping[str, np.ndarray], width: int = 64, source: str = "SIGGRAPH17 checkpoint"
) -> Variables:
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

    # Checked against shapes only: eval_shape allocates nothing, and 8x8 is the smallest valid input.
    expected = jax.eval_shape(
        BaseNet(width=width).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)
    )
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


def _pfanet_layers() -> tuple[tuple[Entry, str | None], ...]:
    """Every PFANet layer: its PyTorch-port (S) entry and its Keras (K) layer name.

    The two Dense layers of the channel attention are unnamed in the Keras model (None here).
    """
    rows: list[tuple[Entry, str | None]] = []
    index = 0  # Index in torchvision's vgg16().features: a ReLU follows every conv, a pool every block.
    for block, n_convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        for i in range(1, n_convs + 1):
            rows.append((Entry(f"vgg16.{index}", ("vgg16", f"conv{block}_{i}"), "conv"), f"block{block}_conv{i}"))
            index += 2
        index += 1
    for level in (3, 4, 5):
        torch_name, keras_name, module = f"cpfe_conv{level}_3", f"C{level}_cfe", f"cpfe{level}"
        rows.append((Entry(f"{torch_name}.conv_1_1", (module, "conv_1x1"), "conv", bias=False), f"{keras_name}_cfe0"))
        for i, rate in enumerate((3, 5, 7), start=1):
            rows.append(
                (
                    Entry(f"{torch_name}.conv_dil_{rate}", (module, f"conv_dil{rate}"), "conv", bias=False),
                    f"{keras_name}_cfe{i}_dilation",
                )
            )
        rows.append((Entry(f"{torch_name}.bn", (module, "bn"), "bn"), f"{keras_name}_BN"))
    rows += [
        (Entry("cha_att.linear_1", ("channel_att", "fc1"), "linear"), None),
        (Entry("cha_att.linear_2", ("channel_att", "fc2"), "linear"), None),
        (Entry("hl_conv1", ("hl_conv",), "conv"), "C345_conv"),
        (Entry("hl_bn1", ("hl_bn",), "bn"), "C345_BN"),
    ]
    for i, keras_conv, keras_bn in ((1, "C1_conv", "C1_BN_BN"), (2, "C2_conv", "C2_BN_BN"), (3, "C12_conv", "C12_BN")):
        rows += [
            (Entry(f"ll_conv_{i}", (f"ll_conv{i}",), "conv"), keras_conv),
            (Entry(f"ll_bn_{i}", (f"ll_bn{i}",), "bn"), keras_bn),
        ]
    # Branch g of the spatial attention: conv a then BN, conv b then BN (kernels (1,9)/(9,1) or the reverse).
    for g, (a, b) in ((1, ("conv1k", "convk1")), (2, ("convk1", "conv1k"))):
        for i, conv in enumerate((a, b), start=1):
            rows += [
                (
                    Entry(f"spa_att.grp{g}_{conv}", ("spatial_att", f"grp{g}_{conv}"), "conv"),
                    f"spatial_attention_{g}_conv{i}",
                ),
                (Entry(f"spa_att.grp{g}_bn{i}", ("spatial_att", f"grp{g}_bn{i}"), "bn"), f"attention{g}_{i}_BN"),
            ]
    rows.append((Entry("ff_conv_1", ("out_conv",), "conv"), "sa"))
    return tuple(rows)


_PFANET_LAYERS = _pfanet_layers()
PFANET_TABLE: tuple[Entry, ...] = tuple(entry for entry, _ in _PFANET_LAYERS)
# Keras layer name -> Flax path; and the Flax paths of the unnamed Dense layers, found by kernel shape.
PFANET_KERAS_NAMES: dict[str, tuple[str, ...]] = {k: e.flax for e, k in _PFANET_LAYERS if k is not None}
_PFANET_KERAS_UNNAMED = tuple(e.flax for e, k in _PFANET_LAYERS if k is None)
# Keras weight name -> (collection, Flax leaf).
_KERAS_LEAVES = {
    "kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}


def _pfanet_shapes(variant: str) -> Variables:

    # Shapes only (nothing allocated); 16x16 is the smallest valid input.
    return jax.eval_shape(PFANet(variant).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32))


def pfanet_from_torch(state_dict: Mapping[str, np.ndarray], source: str = "PFANet checkpoint") -> Variables:
    """Converts a PyTorch-port PFANet state dict (e.g. its released best-model .pth) to `PFANet("s")` variables.

    Args:
      state_dict: torch key -> array, as from `load_torch` (which unwraps {"model": ...} checkpoints).
      source: how error messages name the checkpoint.

    Returns:
      {"params", "batch_stats"} for `PFANet("s")`.

    Raises:
      ConversionError: naming every missing or unexpected key and every shape mismatch.
    """
    return from_torch(state_dict, PFANET_TABLE, _pfanet_shapes("s"), source)


def pfanet_to_torch(variables: Variables) -> dict[str, np.ndarray]:
    """Exports `PFANet("s")` variables as a PyTorch-port state dict (without `num_batches_tracked`)."""
    return to_torch(variables, PFANET_TABLE)


def _decode_names(names: Any) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _keras_h5_layers(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight name: array} of a Keras HDF5 file in the legacy by-layer-name layout.

    Reads weights files (`save_weights("x.h5")`, Keras 2) and whole-model files (`model.save("x.h5")`,
    weights under "model_weights"); weight names lose their scope and ":0" ("C1_conv/kernel:0" -> "kernel").
    """
    import h5py  # pylint: disable=import-outside-toplevel

    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                hint = (
                    " (this looks like the Keras 3 .weights.h5 layout; save the model with "
                    "model.save('x.h5') to get the by-layer-name layout)"
                    if "layers" in root
                    else ""
                )
                raise ConversionError(f"{path}: not a Keras HDF5 file with weights by layer name{hint}")
            layers = {}
            for layer in _decode_names(root.attrs["layer_names"]):
                group = root[layer]
                weights = {
                    n.split("/")[-1].split(":")[0]: np.asarray(group[n], np.float32)
                    for n in _decode_names(group.attrs.get("weight_names", []))
                }
                if weights:
                    layers[layer] = weights
            return layers
    except (OSError, KeyError, RuntimeError) as e:  # h5py's errors for truncated or foreign files.
        raise ConversionError(f"{path}: not a readable Keras HDF5 file ({type(e).__name__}: {e})") from e


def _subtree(tree: Mapping, path: Sequence[str]) -> Mapping:
    try:
        return _get_path(tree, path)
    except KeyError:
        return {}


def pfanet_from_keras_h5(path: str) -> Variables:
    """Converts official (Keras) PFANet weights, e.g. `PFA_00050.h5`, to `PFANet("k")` variables.

    Layers are matched by name (the official model's names); the channel attention's two unnamed
    Dense layers (auto-named dense_*) are matched by their kernel shapes, 384x96 and 96x384.

    Args:
      path: a Keras HDF5 weights or model file in the legacy by-layer-name layout.

    Returns:
      {"params", "batch_stats"} for `PFANet("k")`.

    Raises:
      ConversionError: naming every missing or unexpected layer and every mismatched weight, or
        naming the file if it is not a readable Keras HDF5 file.
    """
    layers = _keras_h5_layers(path)
    expected = _pfanet_shapes("k")
    paths = {name: flax for name, flax in PFANET_KERAS_NAMES.items() if name in layers}
    errors = [f"missing layer {name}" for name in PFANET_KERAS_NAMES if name not in layers]
    unnamed = [name for name in layers if name not in PFANET_KERAS_NAMES]
    for flax in _PFANET_KERAS_UNNAMED:
        want = tuple(_get_path(expected["params"], flax)["kernel"].shape)
        found = [n for n in unnamed if "kernel" in layers[n] and tuple(layers[n]["kernel"].shape) == want]
        if len(found) == 1:
            paths[found[0]] = flax
        else:
            errors.append(f"need exactly one Dense layer with kernel {want} for {'/'.join(flax)}, found {found}")
    errors += [f"unexpected layer {name}" for name in unnamed if name not in paths]

    variables: Variables = {"params": {}, "batch_stats": {}}
    for name, flax in paths.items():
        for weight, value in layers[name].items():
            # An unknown weight name lands under its own name, so the shape check reports it.
            collection, leaf = _KERAS_LEAVES.get(weight, ("params", weight))
            _set_path(variables[collection], (*flax, leaf), value)
    for name, flax in paths.items():
        for collection in ("params", "batch_stats"):
            errors += weights.shape_errors(
                _subtree(variables[collection], flax),
                _subtree(expected[collection], flax),
                f"layer {name} ({collection}/{'/'.join(flax)})",
            )
    if errors:
        raise ConversionError(f"{path} does not match PFANet (Keras layout):\n  " + "\n  ".join(errors))
    return variables


# --- Files (the convert-weights command) -------------------------------------------------------

KINDS = ("siggraph17", "pfanet-s", "pfanet-k")
# Below this share of a network's tensors, a file is another network's, not a damaged copy.
_RECOGNISED_SHARE = 0.5


def _recognised(names: set[str], wanted: set[str]) -> bool:
    return len(names & wanted) >= _RECOGNISED_SHARE * len(wanted)


def _check_network(names: set[str], kind: str, path: str) -> None:
    """One short error when a file holds another network's weights (not a list of every key)."""
    tables = {
        "siggraph17": {k for e in SIGGRAPH17_TABLE for k in _torch_keys(e)},
        "pfanet-s": {k for e in PFANET_TABLE for k in _torch_keys(e)},
        "pfanet-k": set(PFANET_KERAS_NAMES),
    }
    if _recognised(names, tables[kind]):
        return
    guess = next((other for other, wanted in tables.items() if other != kind and _recognised(names, wanted)), None)
    found = len(names & tables[kind])
    raise ConversionError(
        f"{path} holds no {kind} weights: {found} of the {len(tables[kind])} "
        f"{'layers' if kind == 'pfanet-k' else 'tensors'} it should have are in it"
        + (
            f"; it looks like {guess} weights (convert-weights {guess} ...)"
            if guess
            else f" (it has e.g. {', '.join(sorted(names)[:3])})"
        )
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        return load_torch(path)
    except ConversionError as e:
        with open(path, "rb") as f:
            hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
        raise ConversionError(
            f"{e} (an HDF5 file: official Keras PFANet weights convert as pfanet-k)" if hdf5 else str(e)
        ) from e


def convert_file(kind: str, src: str, dst: str, overwrite: bool = False) -> dict[str, Any]:
    """Converts a published checkpoint into a weights file (`weights.save_variables`).

    `siggraph17`: a SIGGRAPH17 generator `.pth` state dict (width read from the file); `pfanet-s`:
    the PyTorch port's `.pth`; `pfanet-k`: the official Keras `.h5`. The output is what
    `--config.init.basenet` / `--config.init.pfanet` (train), `--params` (evaluate, colorize,
    saliency) read.

    Args:
      kind: one of `KINDS`.
      src: the checkpoint.
      dst: the weights file to write (atomically).
      overwrite: replace an existing `dst`.

    Returns:
      The metadata stored with the weights (source name and sha256; width for siggraph17).

    Raises:
      ConversionError: an unreadable file, another network's weights, or mismatched keys/shapes.
      ValueError: an unknown kind, or `dst` exists and `overwrite` is False.
      FileNotFoundError: `src` does not exist.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file")
    dst = files.resolve(dst)
    if os.path.isdir(dst):
        raise ValueError(f"DST {dst}: is a folder; give the weights file to write, e.g. {dst}/weights.msgpack")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"{dst} already exists (use --overwrite to replace it)")
    meta: dict[str, Any] = {"source": os.path.basename(src), "source_sha256": _sha256(src)}
    if kind == "pfanet-k":
        _check_network(set(_keras_h5_layers(src)), kind, src)
        variables = pfanet_from_keras_h5(src)
    else:
        state_dict = _read_torch(src)
        _check_network(set(state_dict), kind, src)
        if kind == "siggraph17":
            meta["width"] = int(np.shape(state_dict["model1.0.weight"])[0]) if "model1.0.weight" in state_dict else 64
            variables = siggraph17_from_torch(state_dict, width=meta["width"], source=src)
        else:
            variables = pfanet_from_torch(state_dict, source=src)
    weights.save_variables(dst, variables, kind, **meta)
    return meta
