"""train_and_evaluate end to end: artefacts, exact resume, what users type, preemption, NaN stop, multi-process."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from smsanet_jax import checkpointing, config_util, evaluation, inference, losses, reporting, train
from smsanet_jax.cpu import conv as cpu_conv
from tests.cli_utils import one_error_line, photo_folder, run_cli
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
    _, _, variables, step = inference.load_trained(workdir)
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
    assert inference.load_trained(workdir)[0].model.width == 8  # The workdir's config is kept.


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


# --- What users type: each mistake is one line and exit status 2, and nothing is lost ---------------

BAD_CONFIGS = {
    "keep_checkpoints=0": "--config.keep_checkpoints=0: must be at least 1",
    "checkpoint_every_steps=0": "--config.checkpoint_every_steps=0: must be at least 1",
    "log_every_steps=0": "--config.log_every_steps=0: must be at least 1",
    "eval_every_steps=0": "--config.eval_every_steps=0: must be at least 1",
    "num_train_steps=0": "--config.num_train_steps=0: must be at least 1",
    "num_train_steps=-5": "--config.num_train_steps=-5: must be at least 1",
    "global_batch_size=0": "--config.global_batch_size=0: must be at least 1",
    "global_batch_size=12": "global_batch_size=12 must be a multiple of the 8 devices",
    "eval_batch_size=0": "--config.eval_batch_size=0: must be at least 1",
    "eval_num_examples=-1": "--config.eval_num_examples=-1: must be at least 0",
    "seed=-1": "--config.seed=-1: must be in [0, 2^32)",
    "dtype=float16": "--config.dtype=float16: must be one of float32, bfloat16",
    "conv_impl=gpu": "--config.conv_impl=gpu: must be one of auto, xla, cpu",
    "model.attention=transformer": "--config.model.attention=transformer: must be one of none, smsa, cbam, se",
    "image_size=0": "--config.image_size=0: must be at least 1",
    "image_size=36": "--config.image_size=36: must be a multiple of 32 for this network",
    "loss.alpha=-1.0": "--config.loss.alpha=-1.0: must be a number >= 0",
    "loss.norm=l3": "--config.loss.norm=l3: must be one of l1, l2",
    "loss.pfanet_variant=x": "--config.loss.pfanet_variant=x: must be one of s, k",
    "optimizer.learning_rate=0.0": "--config.optimizer.learning_rate=0.0: must be a number above 0",
    "data.num_workers=-1": "data.num_workers=-1: must be 0",
    "data.gray_threshold=500.0": "data.gray_threshold=500: must be in [0, 386.8)",
}


def train_argv(workdir, data_dir, *overrides):
    return ["train", "--config", TINY, "--workdir", workdir, f"--config.data.data_dir={data_dir}", *overrides]


@pytest.mark.parametrize("override", sorted(BAD_CONFIGS))
def test_a_bad_config_value_is_one_clear_line_before_any_work(data_dir, tmp_path, capsys, override):
    workdir = str(tmp_path / "run")
    status, err = run_cli(capsys, train_argv(workdir, data_dir, f"--config.{override}"))
    assert status == 2
    line = one_error_line(err)
    assert line.startswith("smsanet-jax train: error: ") and BAD_CONFIGS[override] in line, line
    assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_workdir_naming_a_file_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    status, err = run_cli(capsys, ["train", "--config", TINY, "--workdir", str(path)])
    assert status == 2
    assert one_error_line(err) == f"smsanet-jax train: error: --workdir {path}: is a file, not a folder; give a folder"
    assert path.read_text() == "mine"


FOLDER_RUN = [
    "--config.num_train_steps=2",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=1",
    "--config.eval_num_examples=0",
]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """(workdir, data dir, photo folder) of 2 steps on a folder of 3 photos, checkpointed at 1 and 2."""
    base = tmp_path_factory.mktemp("folder_run")
    photos = photo_folder(base / "photos")
    data_dir, workdir = str(base / "tfds"), str(base / "run")
    train.train_and_evaluate(config_for(data_dir, f"--config.data.name={photos}", *FOLDER_RUN), workdir)
    return workdir, data_dir, photos


def resume_argv(tmp_path, folder_run, *overrides):
    """A copy of the folder run's workdir, and the command that resumes it with `overrides`."""
    workdir = str(tmp_path / "run")
    shutil.copytree(folder_run[0], workdir)
    argv = train_argv(workdir, folder_run[1], f"--config.data.name={folder_run[2]}", *FOLDER_RUN, *overrides)
    return workdir, argv


def test_keep_one_keeps_only_the_newest_and_no_evaluation_runs(folder_run):
    workdir = folder_run[0]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert not os.path.exists(os.path.join(workdir, "eval"))
    assert inference.load_trained(workdir)[3] == 2


def test_resume_with_fewer_steps_is_a_clear_error_and_keeps_the_config(folder_run, tmp_path, capsys):
    workdir, argv = resume_argv(tmp_path, folder_run, "--config.num_train_steps=1")
    status, err = run_cli(capsys, argv)
    assert status == 2
    assert one_error_line(err).endswith(
        f"error: --config.num_train_steps=1: the checkpoint in {workdir} is already at step 2; ask for at least 2 "
        "steps to continue it, or use a new --workdir"
    )
    assert inference.load_trained(workdir)[0].num_train_steps == 2  # config.json is the checkpoint's.


def test_resume_with_another_batch_size_names_the_option(folder_run, tmp_path, capsys):
    _, argv = resume_argv(tmp_path, folder_run, "--config.global_batch_size=16")
    status, err = run_cli(capsys, argv)
    assert status == 2
    assert one_error_line(err).endswith(
        "error: --config.global_batch_size: the checkpoint at step 2 was saved with 8, now 16; use the checkpoint's "
        "settings, or a new --workdir"
    )


def test_resume_on_changed_data_names_the_option(folder_run, tmp_path, capsys):
    photos = photo_folder(tmp_path / "more_photos", ("astronaut", "chelsea", "coffee", "rocket"))
    _, argv = resume_argv(tmp_path, folder_run, f"--config.data.name={photos}")
    status, err = run_cli(capsys, argv)
    assert status == 2
    line = one_error_line(err)
    assert "error: --config.data.name: the checkpoint at step 2 was saved with dataset " in line
    pattern = r"--config.data.name: the checkpoint at step 2 was saved with num_records (\d+), now (\d+)"
    then, now = re.search(pattern, line).groups()
    assert int(now) > int(then)  # A photo more in the (training split of the) folder.


def test_resume_of_a_checkpoint_without_data_identity_translates_grains_check(folder_run, tmp_path, capsys):
    """Checkpoints of older versions recorded no data identity: grain's own mismatch becomes one line."""
    workdir, argv = resume_argv(tmp_path, folder_run, "--config.global_batch_size=16")
    meta_file = os.path.join(workdir, "checkpoints", "2", "meta", "metadata")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    del meta["data"]
    with open(meta_file, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    status, err = run_cli(capsys, argv)
    assert status == 2
    line = one_error_line(err)
    assert "the checkpoint at step 2 in " in line and "was saved with other data settings (DataSource" in line, line


def test_full_disk_is_one_clear_line_and_keeps_the_checkpoint(folder_run, tmp_path, capsys, monkeypatch):
    workdir, argv = resume_argv(tmp_path, folder_run, "--config.num_train_steps=3")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 0))
    status, err = run_cli(capsys, argv)
    assert status == 2
    assert one_error_line(err).startswith(
        f"smsanet-jax train: error: {workdir}/checkpoints: no space left on device while saving the checkpoint "
        "at step 3: 0 MiB free, it needs about "
    )
    monkeypatch.undo()
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert inference.load_trained(workdir)[3] == 2


def test_final_checkpoint_survives_a_failing_final_evaluation(folder_run, tmp_path, monkeypatch):
    workdir, _ = resume_argv(tmp_path, folder_run)

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(evaluation, "evaluate_to_folder", broken)
    overrides = ["--config.num_train_steps=3", "--config.eval_num_examples=2", "--config.data.eval_split=train"]
    config = config_for(folder_run[1], f"--config.data.name={folder_run[2]}", "--config.keep_checkpoints=1", *overrides)
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        train.train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    assert inference.load_trained(workdir)[3] == 3  # Saved, complete and intact.


def test_the_run_records_its_convolution_path(folder_run, tmp_path, monkeypatch, caplog):
    workdir, _ = resume_argv(tmp_path, folder_run)
    texts = []
    monkeypatch.setattr(reporting.MetricWriter, "text", lambda self, tag, text: texts.append((tag, text)))
    caplog.set_level(logging.INFO)
    config = config_for(folder_run[1], f"--config.data.name={folder_run[2]}", "--config.num_train_steps=2")
    train.train_and_evaluate(config, workdir)  # Already at step 2: resumes and stops.
    path = cpu_conv.describe(config.conv_impl)
    assert texts == [("run/convolutions", path)]
    assert f"convolutions: {path}" in caplog.messages


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
