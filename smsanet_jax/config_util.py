"""Loading experiment configs the ml_collections way: a python file plus `--config.a.b=v` overrides."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags


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
