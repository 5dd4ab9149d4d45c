"""The README's first command, run as a new user runs it: from a fresh copy, no argument, relative paths."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a clone holds: everything but the environment and what runs leave behind.
_NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "runs", "results", "__pycache__", "*.egg-info", ".*cache")
# Shortened by the script's own override arguments; the relative default workdir is kept.
_SHORT = [
    "--config.num_train_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=4",
    "--config.log_every_steps=2",
    "--config.image_size=64",
    "--config.model.width=8",
    "--config.eval_num_examples=2",
    "--config.eval_batch_size=2",
]


@pytest.mark.slow
def test_quickstart_from_a_fresh_copy_then_colorize_and_evaluate_its_relative_workdir(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=_NOT_IN_A_CLONE, copy_function=shutil.copy2)
    venv = os.path.dirname(os.path.dirname(sys.executable))
    # The test environment already holds the `data` extra (its `test` extra is a superset): the
    # script must not reinstall this venv from the copy.
    stamp = os.path.join(venv, ".smsanet-installed-data")
    open(stamp, "a").close()
    os.utime(stamp)  # Newer than the copy's pyproject.toml (copied with its own time).
    env = {
        **os.environ,
        "SMSANET_VENV": venv,
        "TFDS_DATA_DIR": str(tmp_path / "tfds"),
        "PATH": os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"],
    }

    def run(*argv):
        done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done

    run("bash", "scripts/quickstart.sh", *_SHORT)
    workdir = clone / "runs" / "quickstart"
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "4"
    assert (workdir / "eval" / "step_0000004" / "summary.json").is_file()
    assert sorted(os.listdir(workdir / "colorized")) == ["astronaut.png", "chelsea.png", "coffee.png"]

    run("smsanet-jax", "colorize", "runs/quickstart/gray", "--workdir", "runs/quickstart", "--out", "colorized")
    assert sorted(os.listdir(clone / "colorized")) == ["astronaut.png", "chelsea.png", "coffee.png"]
    report = run(
        "smsanet-jax",
        "evaluate",
        "--workdir",
        "runs/quickstart",
        "--images",
        "runs/quickstart/gray",
        "--out",
        "results/quickstart",
        "--image-size",
        "64",
    )
    assert "psnr" in report.stdout
    assert (clone / "results" / "quickstart" / "summary.json").is_file()
