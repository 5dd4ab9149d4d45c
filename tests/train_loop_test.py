"""train_and_evaluate end to end: artefacts, exact resume, preemption, NaN stop, multi-process."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from smsanet_jax import checkpointing, config_util, losses, train
from tests.net_utils import communicate_all, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from smsanet_jax import data  # pylint: disable=import-outside-toplevel

    path = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("sample_photos", data_dir=path)
    return path


def config_for(data_dir, *overrides):
    return config_util.load_config(TINY, [f"--config.data.data_dir={data_dir}", *overrides])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "smsanet_jax", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def final_params(workdir):
    _, _, variables, step = train.load_trained(workdir)
    return jax.device_get(variables), step


def test_train_writes_artefacts_and_continues(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config_for(data_dir), workdir)
    assert os.path.isfile(os.path.join(workdir, "config.json"))
    assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["step_0000002", "step_0000004"]
    for name in ("summary.json", "per_image.csv", "images.txt", "grid.png"):
        assert os.path.isfile(os.path.join(workdir, "eval", "step_0000004", name))
    records = [r for r in read_jsonl(os.path.join(workdir, "tensorboard", "metrics.jsonl")) if "train/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    # A finished run asked for more steps continues from its last checkpoint.
    state = train.train_and_evaluate(config_for(data_dir, "--config.num_train_steps=6"), workdir)
    assert int(state.step) == 6


def test_resume_from_a_mid_run_checkpoint(data_dir, tmp_path):
    """A crash after step 3 resumes from the step-2 checkpoint, which the run kept iterating past."""
    import shutil  # pylint: disable=import-outside-toplevel

    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config_for(data_dir), workdir)  # Checkpoints at 2 and 4.
    straight = jax.device_get(state.params)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    resumed = train.train_and_evaluate(config_for(data_dir), workdir)
    chex.assert_trees_all_equal(straight, jax.device_get(resumed.params))


def test_model_shape_change_is_a_clear_error(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config_for(data_dir, "--config.num_train_steps=2"), workdir)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.width"):
        train.train_and_evaluate(config_for(data_dir, "--config.num_train_steps=3", "--config.model.width=16"), workdir)
    assert train.load_trained(workdir)[0].model.width == 8  # The workdir's config is kept.


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config_for(data_dir, "--config.num_train_steps=2"), workdir)
    good, _ = final_params(workdir)
    real_total = losses.total

    def nan_total(*args, **kwargs):
        loss, terms = real_total(*args, **kwargs)
        return loss * np.nan, {**terms, "total": terms["total"] * np.nan}

    monkeypatch.setattr(losses, "total", nan_total)
    with pytest.raises(train.NonFiniteLossError, match="step 3"):
        train.train_and_evaluate(config_for(data_dir), workdir)
    after, step = final_params(workdir)
    assert step == 2
    chex.assert_trees_all_equal(good, after)


@pytest.mark.slow
def test_exact_resume_in_a_new_process(data_dir, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    overrides = [f"--config.data.data_dir={data_dir}", "--config.num_train_steps=6"]
    for workdir, runs in (
        (straight, [overrides]),
        (split, [overrides[:1] + ["--config.num_train_steps=3"], overrides]),
    ):
        for run in runs:
            proc = cli(["train", "--config", TINY, "--workdir", workdir, *run])
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out
    a, _ = final_params(straight)
    b, _ = final_params(split)
    chex.assert_trees_all_equal(a, b)
    ids = lambda w: [r["ids"] for r in read_jsonl(os.path.join(w, "batch_ids.jsonl"))]
    assert ids(straight) == ids(split)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(data_dir, tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    overrides = [
        f"--config.data.data_dir={data_dir}",
        "--config.num_train_steps=12",
        "--config.checkpoint_every_steps=100",
    ]
    proc = cli(["train", "--config", TINY, "--workdir", straight, *overrides])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    proc = cli(["train", "--config", TINY, "--workdir", stopped, *overrides])
    ids_file = os.path.join(stopped, "batch_ids.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(ids_file) and len(read_jsonl(ids_file)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    _, step = final_params(stopped)
    assert 3 <= step < 12, out
    proc = cli(["train", "--config", TINY, "--workdir", stopped, *overrides])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    chex.assert_trees_all_equal(final_params(straight)[0], final_params(stopped)[0])


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed over loopback, gloo) against 1 process x 4."""
    # The paper's learning rate: see train_test.test_one_device_equals_eight_devices for why.
    lr = 1e-5
    overrides = [
        f"--config.data.data_dir={data_dir}",
        "--config.num_train_steps=3",
        f"--config.optimizer.learning_rate={lr}",
    ]
    single = str(tmp_path / "single")
    proc = cli(
        ["train", "--config", TINY, "--workdir", single, *overrides],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    multi = str(tmp_path / "multi")
    address = f"127.0.0.1:{free_port()}"
    procs = [
        cli(
            [
                "train",
                "--config",
                TINY,
                "--workdir",
                multi,
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                *overrides,
            ]
        )
        for i in range(2)
    ]
    outs = communicate_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    losses_of = lambda w: [
        r["train/total"] for r in read_jsonl(os.path.join(w, "tensorboard", "metrics.jsonl")) if "train/total" in r
    ]
    np.testing.assert_allclose(losses_of(multi), losses_of(single), rtol=1e-5)
    chex.assert_trees_all_close(final_params(multi)[0], final_params(single)[0], rtol=1e-5, atol=3 * 2 * lr)
