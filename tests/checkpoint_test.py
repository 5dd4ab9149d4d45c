"""Checkpoints you can trust: damage is reported by step and the newest intact checkpoint is used.

One tiny run (6 steps, checkpoints at 2, 4 and 6) is trained once; each test damages a copy.
"""

import errno
import glob
import json
import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from smsanet_jax import checkpointing, config_util, data, inference, parallel, train
from smsanet_jax import state as state_lib
from tests.cli_utils import one_error_line, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
RUN = [
    "--config.num_train_steps=6",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=3",
    "--config.eval_num_examples=0",
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(workdir with checkpoints 2, 4 and 6, tfds data dir)."""
    base = tmp_path_factory.mktemp("checkpoints")
    data_dir, workdir = str(base / "tfds"), str(base / "clean")
    data.prepare("sample_photos", data_dir=data_dir)
    train.train_and_evaluate(config_util.load_config(TINY, [f"--config.data.data_dir={data_dir}", *RUN]), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]
    return workdir, data_dir


def copy_of(clean, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(clean[0], workdir)
    return workdir


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def largest_array_file(workdir, step):
    found = [f for f in glob.glob(os.path.join(step_dir(workdir, step), "state", "**"), recursive=True)]
    return max((f for f in found if os.path.isfile(f)), key=os.path.getsize)


def overwrite_bytes(workdir, step, where=0.5):
    """1000 bytes of the largest array file, at `where` (a fraction of its size), set to 0xff."""
    path = largest_array_file(workdir, step)
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * where))
        f.write(b"\xff" * 1000)


def wrong_checksum(workdir, step):
    """As if the arrays had changed after the save: the checksum no longer matches them."""
    edit_meta(workdir, step, lambda meta: meta.update({checkpointing.STATE_SHA256: "0" * 64}))


def truncate(workdir, step):
    path = largest_array_file(workdir, step)
    os.truncate(path, os.path.getsize(path) // 2)


def remove_state(workdir, step):
    shutil.rmtree(os.path.join(step_dir(workdir, step), "state"))


def remove_metadata(workdir, step):
    os.remove(os.path.join(step_dir(workdir, step), "state", "_METADATA"))


def read_meta(workdir, step):
    """A checkpoint's JSON metadata item (orbax stores it as one plain JSON file)."""
    with open(os.path.join(step_dir(workdir, step), "meta", "metadata"), encoding="utf-8") as f:
        return json.load(f)


def edit_meta(workdir, step, edit):
    meta = read_meta(workdir, step)
    edit(meta)
    with open(os.path.join(step_dir(workdir, step), "meta", "metadata"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def warnings_of(caplog):
    """The warnings smsanet_jax.checkpointing logged (not orbax's own)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.module == "checkpointing"]


# The damage, and what the warning must say. Overwritten bytes usually restore as other numbers
# (found by the checksum); where they hit a compressed chunk's header, tensorstore refuses them.
DAMAGE = {
    "bytes_overwritten": (overwrite_bytes, ("arrays differ from the checksum", "cannot be restored")),
    "arrays_changed": (wrong_checksum, ("arrays differ from the checksum",)),
    "truncated": (truncate, ("cannot be restored (ValueError: OUT_OF_RANGE",)),
    "state_removed": (remove_state, ("its state folder is missing",)),
    "metadata_removed": (remove_metadata, ("cannot be restored",)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_and_the_newest_intact_one_loaded(clean, tmp_path, caplog, damage):
    damage_fn, reason = DAMAGE[damage]
    workdir = copy_of(clean, tmp_path)
    damage_fn(workdir, 6)
    caplog.set_level(logging.WARNING)
    _, _, variables, step = inference.load_trained(workdir)
    assert step == 4
    _, _, expected, _ = inference.load_trained(clean[0], step=4)
    chex.assert_trees_all_equal(jax.device_get(variables), jax.device_get(expected))
    (warning,) = warnings_of(caplog)
    assert "checkpoint at step 6" in warning and any(r in warning for r in reason), warning
    assert os.path.isdir(step_dir(workdir, 6))  # Inference reads; it never moves anything.


def test_orbax_alone_restores_overwritten_bytes_without_a_word(clean, tmp_path):
    """Why the checksum exists: orbax restores overwritten array bytes as if they were intact."""
    config = inference.load_trained(clean[0])[0]
    abstract = state_lib.abstract_train_state(config, state_lib.build_model(config), parallel.make_mesh())
    saved = read_meta(clean[0], 6)[checkpointing.STATE_SHA256]
    for attempt, where in enumerate((0.5, 0.3, 0.7, 0.2, 0.8)):  # Past compressed chunks' headers.
        workdir = copy_of(clean, tmp_path / str(attempt))
        overwrite_bytes(workdir, 6, where)
        checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            restored = checkpointer.manager.restore(6, args=args)["state"]
        except Exception:  # pylint: disable=broad-except  # A header was hit: tensorstore noticed.
            continue
        finally:
            checkpointer.close()
        assert checkpointing.tree_sha256(restored) != saved  # Restored, silently different.
        return
    pytest.fail("every overwrite hit a chunk header")


def test_checkpoint_without_checksum_is_trusted_with_a_warning(clean, tmp_path, caplog):
    workdir = copy_of(clean, tmp_path)
    edit_meta(workdir, 6, lambda meta: meta.pop(checkpointing.STATE_SHA256))
    caplog.set_level(logging.WARNING)
    _, _, variables, step = inference.load_trained(workdir)
    assert step == 6
    chex.assert_trees_all_equal(jax.device_get(variables), jax.device_get(inference.load_trained(clean[0])[2]))
    (warning,) = warnings_of(caplog)
    assert "step 6" in warning and "no checksum" in warning and "unverified" in warning


def test_no_intact_checkpoint_is_one_clear_error_naming_the_workdir(clean, tmp_path, capsys, caplog):
    workdir = copy_of(clean, tmp_path)
    for step in (2, 4, 6):
        remove_state(workdir, step)
    caplog.set_level(logging.WARNING)
    with pytest.raises(checkpointing.NoIntactCheckpointError, match="no intact checkpoint"):
        inference.load_trained(workdir)
    assert [w.split(" in ")[0] for w in warnings_of(caplog)] == [f"the checkpoint at step {s}" for s in (6, 4, 2)]
    # Training there is refused the same way, before anything is compiled or written.
    exit_status, err = run_cli(
        capsys, ["train", "--config", TINY, "--workdir", workdir, *RUN, f"--config.data.data_dir={clean[1]}"]
    )
    assert exit_status == 2
    assert one_error_line(err).startswith(f"smsanet-jax train: error: --workdir {workdir}: no intact checkpoint")
    assert os.listdir(os.path.join(workdir, "checkpoints")) and not os.path.exists(
        os.path.join(workdir, checkpointing.DAMAGED_FOLDER)
    )


@pytest.mark.slow
def edit_data_state(workdir, step):
    """The iterator state moved on by one example: valid JSON that grain would restore without a word."""
    path = os.path.join(step_dir(workdir, step), "data", "process_0-of-1.json")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    state["last_seen_indices"]["0"] += 1
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=4)


@pytest.mark.parametrize("damage", [overwrite_bytes, edit_data_state])
def test_training_resumes_from_the_newest_intact_checkpoint_exactly(clean, tmp_path, caplog, damage):
    """Step 6 damaged: the run resumes at 4, sets 6 aside, and trains 5 and 6 to the clean run's params."""
    workdir = copy_of(clean, tmp_path)
    damage(workdir, 6)
    caplog.set_level(logging.WARNING)
    config = config_util.load_config(TINY, [f"--config.data.data_dir={clean[1]}", *RUN])
    state = train.train_and_evaluate(config, workdir)
    assert "checkpoint at step 6" in warnings_of(caplog)[0] and "is damaged" in warnings_of(caplog)[0]
    (aside,) = os.listdir(os.path.join(workdir, checkpointing.DAMAGED_FOLDER))
    assert aside.startswith("6-")
    _, _, straight, _ = inference.load_trained(clean[0])
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(straight["params"]))
    _, _, saved, step = inference.load_trained(workdir)
    assert step == 6
    chex.assert_trees_all_equal(jax.device_get(saved), jax.device_get(straight))


# --- The Checkpointer on its own: small trees, no training -----------------------------------------


def small_state(seed):
    return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(64, 64)), jnp.float32), "step": jnp.int32(seed)}


def test_tree_sha256_sees_every_bit_and_every_name():
    tree = {"a": np.zeros(4, np.float32), "b": np.arange(3, dtype=np.int32)}
    base = checkpointing.tree_sha256(tree)
    assert checkpointing.tree_sha256(jax.device_put(tree)) == base  # Device or host: the same bytes.
    flipped = {**tree, "a": np.array([0, 0, 0, np.float32(1e-45)], np.float32)}
    assert checkpointing.tree_sha256(flipped) != base
    assert checkpointing.tree_sha256({"a": tree["a"], "c": tree["b"]}) != base
    assert checkpointing.tree_sha256({**tree, "b": tree["b"].astype(np.uint32)}) != base


def test_keep_must_be_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints=0: must be at least 1"):
        checkpointing.Checkpointer(str(tmp_path), keep=0)


def test_keep_one_never_deletes_the_newest(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    for step in (1, 2, 3):
        checkpointer.save(step, small_state(step), ocp.args.JsonSave({}), {})
    checkpointer.close()
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    restored = reader.restore_latest(small_state(0))
    reader.close()
    assert restored.step == 3
    chex.assert_trees_all_equal(jax.device_get(restored.state), jax.device_get(small_state(3)))


def test_full_disk_before_a_save_is_one_oserror_and_nothing_written(tmp_path, monkeypatch):
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(1, small_state(1), ocp.args.JsonSave({}), {})
    checkpointer.wait()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError) as raised:
        checkpointer.save(2, small_state(2), ocp.args.JsonSave({}), {})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "checkpoints")
    assert "while saving the checkpoint at step 2" in raised.value.strerror
    checkpointer.close()
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_full_disk_in_orbax_writer_threads_is_one_oserror_naming_the_step(tmp_path, monkeypatch):
    """A save that passed the space check and failed in orbax's threads reports ENOSPC at the next wait."""
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(1, small_state(1), ocp.args.JsonSave({}), {})
    checkpointer.wait()
    checkpointer.save(2, small_state(2), ocp.args.JsonSave({}), {})

    def failed_save():
        # What orbax re-raises from its finalize thread when tensorstore hits a full disk.
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed to write 2998272 bytes '
            "to file 11: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", failed_save)
    with pytest.raises(OSError) as raised:
        checkpointer.close()
    assert raised.value.errno == errno.ENOSPC
    assert "no space left on device while saving the checkpoint at step 2" in raised.value.strerror
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_orbax_tracebacks_of_a_full_disk_are_dropped_unless_debugging(tmp_path):
    checkpointing.Checkpointer(str(tmp_path)).close()  # Installs the filter on orbax's (absl's) logger.
    absl_logger = logging.getLogger("absl")

    def record(error):
        where = os.path.join(os.path.dirname(ocp.__file__), "_src", "checkpointers", "async_checkpointer.py")
        return logging.LogRecord("absl", logging.ERROR, where, 1, "save failed", (), (type(error), error, None))

    disk_full = ValueError("RESOURCE_EXHAUSTED: Failed to write 2998272 bytes to file 11: No space left on device")
    assert not absl_logger.filter(record(disk_full))
    assert absl_logger.filter(record(ValueError("something else broke")))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        assert absl_logger.filter(record(disk_full))
    finally:
        root.setLevel(level)


def test_a_save_cut_short_is_cleaned_up_by_the_next_run(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path))
    checkpointer.save(1, small_state(1), ocp.args.JsonSave({}), {})
    checkpointer.close()
    leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"  # What a full disk or a kill leaves.
    (leftover / "state").mkdir(parents=True)
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
    restored = checkpointer.restore_latest(small_state(0))
    checkpointer.save(2, small_state(2), ocp.args.JsonSave({}), {})
    checkpointer.close()
    assert restored.step == 1 and not leftover.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
