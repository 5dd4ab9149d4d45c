"""Experiment configs the ml_collections way (a python file plus `--config.a.b=v` overrides), and their checks."""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from smsanet_jax import losses
from smsanet_jax.cpu import conv as cpu_conv
from smsanet_jax.models import basenet, pfanet


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from `path` and applies `--config.key=value` overrides; returns it locked.

    Variants import their base as `from configs import smsanet`, so the folder that holds the
    `configs/` package goes on sys.path first.
    """
    config_path = Path(path).expanduser().resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {path}: no such config file (e.g. configs/smsanet.py)")
    package_root = str(config_path.parent.parent)
    if package_root not in sys.path:
        sys.path.insert(0, package_root)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"overrides must look like --config.key=value, got {bad}")
    argv = ["smsanet-jax", f"--config={config_path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
        return flag_values.config
    except (flags.Error, AttributeError, KeyError, TypeError) as e:
        raise ValueError(_override_error(path, config_path, overrides, e)) from e


def _override_error(path: str, config_path: Path, overrides: Sequence[str], error: Exception) -> str:
    """One line naming the override that failed: an unknown key (with close matches) or a bad value."""
    base = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=base, lock_config=True)
    base(["smsanet-jax", f"--config={config_path}"])
    keys = sorted(_flat_keys(base.config.to_dict()))
    for override in overrides:
        key = override[len("--config.") :].split("=", 1)[0]
        if key not in keys and not any(k.startswith(key + ".") for k in keys):
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; see {path} for the keys"
            return f"--config.{key}: no such key in {path}{hint}"
    message = error.args[0] if error.args else str(error)
    return f"{path}: {message} (keys and value types are fixed by the config file)"


def _flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _flat_keys(value, prefix + key + ".")
    return keys


def jsonable(value: Any) -> Any:
    """Config values as JSON would give them back (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --- Training configs ---------------------------------------------------------------------------

# How much smaller than the input each BaseNet block's feature maps are: three 2x subsamplings
# before model4, three 2x up-samplings after model7 (models/basenet.py); train_test checks this
# table against the network.
BLOCK_SUBSAMPLING = {
    "model1": 1,
    "model2": 2,
    "model3": 4,
    "model4": 8,
    "model5": 8,
    "model6": 8,
    "model7": 8,
    "model8": 4,
    "model9": 2,
    "model10": 1,
}


def image_size_multiple(model: ml_collections.ConfigDict) -> int:
    """What the image side must be a multiple of for this network.

    BaseNet needs a multiple of 8; SMSA pools its feature maps over 2^(n_scales-1)-pixel patches,
    so after a block subsampled s times the input side must divide by s * 2^(n_scales-1).
    """
    multiple = basenet.SIZE_MULTIPLE
    if model.attention == "smsa":
        coarsest = 2 ** (model.n_scales - 1)
        # Every factor is a power of two, so the largest is the least common multiple.
        multiple = max([multiple] + [BLOCK_SUBSAMPLING[block] * coarsest for block in model.blocks])
    return multiple


def validate_train_config(config: ml_collections.ConfigDict, dtypes: Collection[str]) -> None:
    """Checks a training config before any work starts: every bad key, in one line.

    The data settings (`data.*`) are checked by the training loader, which is built next and
    before any data is read.

    Args:
      config: a training config (configs/smsanet.py names every field).
      dtypes: the compute dtypes the train state supports (`state.DTYPES`; passed in because
        `state` imports this module through `weights`).

    Raises:
      ValueError: one line naming each bad key as `--config.key=value` and what it must be.
    """
    problems = [
        f"--config.{key}={_show(value)}: must be {allowed}" for key, value, allowed in _train_rules(config, dtypes)
    ]
    if problems:
        raise ValueError("; ".join(problems))


def _train_rules(config: ml_collections.ConfigDict, dtypes: Collection[str]) -> Iterator[tuple[str, Any, str]]:
    """(key, value, what it must be) of every key that breaks its rule."""
    at_least = {
        "num_train_steps": 1,
        "global_batch_size": 1,
        "num_devices": 0,
        "log_every_steps": 1,
        "checkpoint_every_steps": 1,
        "keep_checkpoints": 1,
        "eval_every_steps": 1,
        "eval_num_examples": 0,
        "eval_batch_size": 1,
        "model.width": 1,
        "model.reduction": 1,
        "loss.pfanet_size": 1,
    }
    for key, minimum in at_least.items():
        value = _get(config, key)
        if value < minimum:
            yield key, value, f"at least {minimum}"
    if not 0 <= config.seed < 2**32:
        yield "seed", config.seed, "in [0, 2^32)"
    choices = {
        "dtype": tuple(dtypes),
        "conv_impl": cpu_conv.IMPLS,
        "model.attention": basenet.ATTENTIONS,
        "loss.norm": losses.NORMS,
        "loss.pfanet_variant": pfanet.VARIANTS,
    }
    for key, allowed in choices.items():
        if _get(config, key) not in allowed:
            yield key, _get(config, key), f"one of {', '.join(allowed)}"
    yield from _model_rules(config)
    yield from _real_rules(config)


def _model_rules(config: ml_collections.ConfigDict) -> Iterator[tuple[str, Any, str]]:
    """The network's settings, and the image size they allow."""
    model = config.model
    network_ok = model.attention in basenet.ATTENTIONS
    unknown = [b for b in model.blocks if b not in basenet.BLOCK_NAMES]
    if unknown:
        network_ok = False
        yield "model.blocks", ",".join(model.blocks), f"names from {', '.join(basenet.BLOCK_NAMES)}"
    if model.attention == "smsa" and model.n_scales < 2:
        network_ok = False
        yield "model.n_scales", model.n_scales, "at least 2 with SMSA (a spatial scale and the channel scale)"
    if config.image_size < 1:
        yield "image_size", config.image_size, "at least 1"
    elif network_ok and config.image_size % image_size_multiple(model):
        yield "image_size", config.image_size, f"a multiple of {image_size_multiple(model)} for this network"
    size = config.loss.pfanet_size
    if size >= 1 and size % pfanet.SIZE_MULTIPLE:
        yield "loss.pfanet_size", size, f"a multiple of {pfanet.SIZE_MULTIPLE}"


def _real_rules(config: ml_collections.ConfigDict) -> Iterator[tuple[str, Any, str]]:
    """Learning rate, Adam's betas and the loss weights: finite, in their ranges."""
    o, loss = config.optimizer, config.loss
    if not (math.isfinite(o.learning_rate) and o.learning_rate > 0):
        yield "optimizer.learning_rate", o.learning_rate, "a number above 0 (the paper: 1e-5)"
    for key in ("b1", "b2"):
        if not 0 <= o[key] < 1:
            yield f"optimizer.{key}", o[key], "in [0, 1) (Adam's decay rates; the paper: 0.9, 0.999)"
    if not (math.isfinite(loss.alpha) and loss.alpha >= 0):
        yield "loss.alpha", loss.alpha, "a number >= 0 (the salient loss weight; 0 turns it off)"
    if not 0 <= loss.threshold <= 1:
        yield "loss.threshold", loss.threshold, "in [0, 1] (a PFANet probability)"


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
