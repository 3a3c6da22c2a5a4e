"""One checkpoint of all state: bit-exact round trip, resume checks, corrupt files."""

from __future__ import annotations

import glob
import json
import os

from tests import testing

import numpy as np
import tensorflow as tf

from tf_instdisc import checkpointing
from tf_instdisc import config as config_lib
from tf_instdisc import train_lib

_IDENTITY = dict(dataset="tiny", num_instances=64, arch="convnet_small", embedding_dim=16, objective="nce",
                 image_shape=(8, 8, 1))


def _state(cfg):
  return train_lib.build_state(cfg, num_instances=64, input_shape=(8, 8, 1), steps_per_epoch=4)


class RoundTripTest(tf.test.TestCase):

  def test_save_restore_is_bit_exact_for_every_piece_of_state(self):
    model_dir = self.get_temp_dir()
    cfg = testing.tiny_config(model_dir, objective="parametric")
    saved = _state(cfg)
    saved.bank.bank.assign(tf.random.stateless_normal([64, 16], seed=[1, 2]))
    saved.bank.normalizer.assign(123.25)
    saved.model.step.assign(17)
    for variable in saved.optimizer.variables:
      if "float" in str(variable.dtype):
          variable.assign(tf.random.stateless_normal(variable.shape, seed=[3, 4], dtype=variable.dtype))
    manager = checkpointing.make_manager(saved.checkpoint, model_dir, max_to_keep=2)
    manager.save(checkpoint_number=17)

    restored = _state(testing.tiny_config(model_dir, objective="parametric", seed=9))
    path = checkpointing.restore_or_initialize(checkpointing.make_manager(restored.checkpoint, model_dir,
                                                                          max_to_keep=2))
    self.assertEndsWith(path, "ckpt-17")
    self.assertAllEqual(restored.bank.bank, saved.bank.bank)
    self.assertEqual(float(restored.bank.normalizer), 123.25)
    self.assertEqual(int(restored.model.step), 17)
    for mine, theirs in zip(restored.model.weights, saved.model.weights, strict=True):
      self.assertAllEqual(mine, theirs)
    for mine, theirs in zip(restored.optimizer.variables, saved.optimizer.variables, strict=True):
      self.assertAllEqual(mine, theirs)
    self.assertAllEqual(restored.classifier.kernel, saved.classifier.kernel)

  def test_fresh_dir_restores_nothing(self):
    cfg = testing.tiny_config(self.get_temp_dir())
    state = _state(cfg)
    manager = checkpointing.make_manager(state.checkpoint, os.path.join(self.get_temp_dir(), "empty"), max_to_keep=1)
    self.assertIsNone(checkpointing.restore_or_initialize(manager))

  def test_corrupt_checkpoint_names_it(self):
    model_dir = self.get_temp_dir()
    cfg = testing.tiny_config(model_dir)
    manager = checkpointing.make_manager(_state(cfg).checkpoint, model_dir, max_to_keep=1)
    manager.save(checkpoint_number=1)
    for path in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-1.data-*")):
      with open(path, "wb") as f:
        f.write(b"garbage")
    other = checkpointing.make_manager(_state(cfg).checkpoint, model_dir, max_to_keep=1)
    with self.assertRaisesRegex(ValueError, "ckpt-1"):
      checkpointing.restore_or_initialize(other)


class ModelOnlyRestoreTest(tf.test.TestCase):
  """restore_model and read_config: what export and evaluation use to reopen a finished run."""

  def test_restores_the_model_weights_and_reports_the_step(self):
    model_dir = self.create_tempdir().full_path
    saved = _state(testing.tiny_config(model_dir))
    saved.model.step.assign(42)
    checkpointing.make_manager(saved.checkpoint, model_dir, max_to_keep=1).save(checkpoint_number=42)
    model = _state(testing.tiny_config(model_dir, seed=5)).model  # Other initial weights.
    path, step = checkpointing.restore_model(model, model_dir)
    self.assertEndsWith(path, "ckpt-42")
    self.assertEqual(step, 42)
    for mine, theirs in zip(model.weights, saved.model.weights, strict=True):
      self.assertAllEqual(mine, theirs)

  def test_a_model_dir_of_version_0_1_is_refused_with_what_to_do(self):
    # 0.1 checkpointed a functional model beside a separate bank module: "bank/bank/..." at the top level.
    model_dir = self.create_tempdir().full_path
    legacy = tf.Module()
    legacy.bank = tf.Variable(tf.zeros([64, 16]))
    tf.train.CheckpointManager(tf.train.Checkpoint(bank=legacy), os.path.join(model_dir, "checkpoints"),
                               max_to_keep=1).save(checkpoint_number=4)
    before = testing.digest(model_dir)
    state = _state(testing.tiny_config(model_dir))
    for attempt in (lambda: checkpointing.restore_model(state.model, model_dir),
                    lambda: checkpointing.restore_or_initialize(
                        checkpointing.make_manager(state.checkpoint, model_dir, max_to_keep=1)),
                    lambda: checkpointing.check_resume(model_dir, {"num_instances": 64, "embedding_dim": 16})):
      with self.assertRaisesRegex(ValueError, r"ckpt-4 was written by tf_instdisc 0\.1.*new --model_dir"):
        attempt()
    self.assertEqual(testing.digest(model_dir), before)

  def test_no_checkpoint_names_model_dir(self):
    model = _state(testing.tiny_config()).model
    with self.assertRaisesRegex(ValueError, "--model_dir: no checkpoint"):
      checkpointing.restore_model(model, self.create_tempdir().full_path)

  def test_other_architecture_names_the_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    checkpointing.make_manager(_state(testing.tiny_config(model_dir)).checkpoint, model_dir,
                               max_to_keep=1).save(checkpoint_number=1)
    wider = _state(testing.tiny_config(model_dir, embedding_dim=32)).model
    with self.assertRaisesRegex(ValueError, "ckpt-1"):
      checkpointing.restore_model(wider, model_dir)

  def test_read_config_round_trip_and_errors(self):
    model_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, "config.json does not exist"):
      checkpointing.read_config(model_dir)
    cfg = testing.tiny_config(model_dir)
    checkpointing.write_json_atomic(os.path.join(model_dir, checkpointing.CONFIG_FILE), config_lib.to_dict(cfg))
    self.assertEqual(checkpointing.read_config(model_dir), cfg)
    with open(os.path.join(model_dir, checkpointing.CONFIG_FILE), "w") as f:
      f.write('{"model": {"no_such_field": 1}}')
    with self.assertRaisesRegex(ValueError, "config.json is not a readable config"):
      checkpointing.read_config(model_dir)


class ResumeCheckTest(tf.test.TestCase):

  def test_same_identity_passes_and_each_difference_names_its_flag(self):
    model_dir = self.get_temp_dir()
    identity = checkpointing.run_identity(**_IDENTITY)
    checkpointing.save_run_identity(model_dir, identity)
    checkpointing.check_resume(model_dir, identity)
    for field, value, flag in (("dataset", "other", "--dataset"), ("num_instances", 65, "--max_train_examples"),
                               ("arch", "resnet18", "--arch"), ("embedding_dim", 32, "--embedding_dim"),
                               ("objective", "softmax", "--objective"), ("image_shape", (9, 9, 1), "--image_size"),
                               ("bank_dtype", "bfloat16", "--bank_dtype")):
      with self.subTest(field):
        with self.assertRaisesRegex(ValueError, flag):
          checkpointing.check_resume(model_dir, checkpointing.run_identity(**{**_IDENTITY, field: value}))

  def test_bank_shape_in_checkpoint_is_checked_without_run_file(self):
    model_dir = self.get_temp_dir()
    cfg = testing.tiny_config(model_dir)
    checkpointing.make_manager(_state(cfg).checkpoint, model_dir, max_to_keep=1).save(checkpoint_number=1)
    with self.assertRaisesRegex(ValueError, r"--max_train_examples/--embedding_dim: .*\[64, 16\]"):
      checkpointing.check_resume(model_dir, checkpointing.run_identity(**{**_IDENTITY, "num_instances": 80}))

  def test_unreadable_run_file_is_named(self):
    model_dir = self.get_temp_dir()
    with open(os.path.join(model_dir, checkpointing.RUN_FILE), "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, checkpointing.RUN_FILE):
      checkpointing.check_resume(model_dir, checkpointing.run_identity(**_IDENTITY))

  def test_write_json_atomic_leaves_no_temporary_file(self):
    path = os.path.join(self.get_temp_dir(), "x.json")
    checkpointing.write_json_atomic(path, {"a": np.float64(1.5).item()})
    with open(path) as f:
      self.assertEqual(json.load(f), {"a": 1.5})
    self.assertFalse(os.path.exists(path + ".tmp"))


class TrimEventsTest(tf.test.TestCase):

  def _write(self, directory: str, steps) -> None:
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
      for step in steps:
        tf.summary.scalar("train/loss", float(step), step=step)
    writer.close()

  def _points(self, directory: str) -> list[tuple[int, float]]:
    points = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
      for event in tf.compat.v1.train.summary_iterator(path):
        points += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value]
    return points

  def test_drops_the_steps_a_resume_trains_again_and_leaves_other_files_untouched(self):
    directory = self.get_temp_dir() + "/train"
    self._write(directory, [10, 20, 30])
    (path,) = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
    self.assertEqual(checkpointing.trim_events(directory, 20), 1)
    self.assertEqual(self._points(directory), [(10, 10.0), (20, 20.0)])
    before = os.stat(path).st_mtime_ns, testing.digest(directory)
    self.assertEqual(checkpointing.trim_events(directory, 20), 0)  # Nothing to drop: the file is not rewritten.
    self.assertEqual((os.stat(path).st_mtime_ns, testing.digest(directory)), before)
    self.assertEmpty(glob.glob(os.path.join(directory, "*.tmp")))

  def test_a_record_cut_short_by_a_kill_and_a_trim_cut_short_go(self):
    directory = self.get_temp_dir() + "/cut"
    self._write(directory, [10, 20])
    (path,) = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
    with open(path, "ab") as f:
      f.write(b"\x07\x00\x00")  # Half a record's length field.
    with open(path + ".tmp", "wb") as f:
      f.write(b"partial")
    self.assertEqual(checkpointing.trim_events(directory, 100), 0)
    self.assertEqual(self._points(directory), [(10, 10.0), (20, 20.0)])
    self.assertEqual(glob.glob(os.path.join(directory, "events.out.tfevents.*")), [path])

  def test_missing_directory_is_nothing_to_trim(self):
    self.assertEqual(checkpointing.trim_events(os.path.join(self.get_temp_dir(), "none"), 0), 0)


if __name__ == "__main__":
  tf.test.main()
