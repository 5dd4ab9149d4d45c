"""Loading experiment configs the ml_collections way: a python file plus `--config.a.b=v` overrides."""

from __future__ import annotations

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
    config_path = Path(path).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
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
        # absl/ml_collections report a misspelt key as e.g. AttributeError("'nokey'").
        raise ValueError(
            f"{path} with {' '.join(overrides) or 'no overrides'}: {e} "
            "(keys and value types are fixed by the config file)"
        ) from e


def jsonable(value: Any) -> Any:
    """Config values as JSON would give them back (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
