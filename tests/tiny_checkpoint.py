"""A tiny trained checkpoint (configs/tiny.py, 4 steps on the sample photos), trained once per test session."""

import os

from smsanet_jax import config_util, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
_CACHE = {}


def trained_workdir(tmp_path_factory) -> tuple[str, str]:
    """(workdir, tfds data dir) of the tiny run; test modules share it through this module's cache."""
    if "workdir" not in _CACHE:
        base = tmp_path_factory.mktemp("tiny_checkpoint")
        data_dir, workdir = str(base / "tfds"), str(base / "run")
        data.prepare("sample_photos", data_dir=data_dir)
        train.train_and_evaluate(config_util.load_config(TINY, [f"--config.data.data_dir={data_dir}"]), workdir)
        _CACHE.update(workdir=workdir, data_dir=data_dir)
    return _CACHE["workdir"], _CACHE["data_dir"]
