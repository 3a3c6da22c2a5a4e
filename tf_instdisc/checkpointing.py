"""One checkpoint of everything that is state: the InstanceDiscrimination model (weights, bank, Z, its step counter,
the parametric classifier) and the optimizer.

Built by `make_checkpoint`, restored by `restore_or_initialize`: one path, no partial restores on resume. Before a
resume, `check_resume` compares the run in the model dir with the one being started and refuses to mix them.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import tensorflow as tf

from tf_instdisc import config as config_lib

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"  # The run's full config (config_lib.to_dict), rewritten at every accepted start.
RUN_FILE = "run.json"  # What a checkpoint in this dir must match: dataset, size, arch, embedding_dim, objective.
FLAGS_FILE = "flags.txt"  # The flags of the last accepted train.py start (FLAGS.flags_into_string()).
BANK_KEY = "model/memory_bank/rows/.ATTRIBUTES/VARIABLE_VALUE"
STEP_KEY = "model/step/.ATTRIBUTES/VARIABLE_VALUE"
# Checkpoints of tf_instdisc 0.1 (a functional embedding model beside a separate bank module) have this key.
LEGACY_BANK_KEY = "bank/bank/.ATTRIBUTES/VARIABLE_VALUE"


def make_checkpoint(*, model, optimizer) -> tf.train.Checkpoint:
  """The run's single checkpoint object. The optimizer must already be built (its slots exist)."""
  return tf.train.Checkpoint(model=model, optimizer=optimizer)


def refuse_legacy(path: str) -> None:
  """Raises ValueError naming checkpoint `path` when tf_instdisc 0.1 wrote it (it cannot restore into 0.2)."""
  try:
    names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError):
    return  # Unreadable: the restore that follows names it.
  if LEGACY_BANK_KEY in names and BANK_KEY not in names:
    raise ValueError(
        f"checkpoint {path} was written by tf_instdisc 0.1, before the InstanceDiscrimination model: its layout "
        "does not restore into this version. Train afresh in a new --model_dir, or export or evaluate this one "
        "with tf_instdisc 0.1 (git checkout eb158d9).")


def make_manager(checkpoint: tf.train.Checkpoint, model_dir: str, *, max_to_keep: int) -> tf.train.CheckpointManager:
  return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, CHECKPOINT_SUBDIR), max_to_keep=max_to_keep)


def restore_or_initialize(manager: tf.train.CheckpointManager) -> str | None:
  """Restores the latest checkpoint if there is one; returns its path, or None for a fresh start.

  Every object of the run must find its values in the checkpoint (assert_existing_objects_matched).

  Raises:
    ValueError: naming the checkpoint when it cannot be read (corrupt or from another run).
  """
  path = manager.latest_checkpoint
  if path is None:
    return None
  refuse_legacy(path)
  try:
    manager.checkpoint.restore(path).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:  # IndexError: a truncated data file.
    raise ValueError(f"cannot restore checkpoint {path} (corrupt, or from another run): {e}") from e
  return path


def read_config(model_dir: str) -> config_lib.Config:
  """The config a model dir was trained with (its CONFIG_FILE).

  Raises:
    ValueError: naming the file when it is missing, unreadable or not a config.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    with open(path) as f:
      return config_lib.from_dict(json.load(f))
  except FileNotFoundError as e:
    raise ValueError(f"--model_dir: {path} does not exist (is {model_dir} a train.py model dir?)") from e
  except (OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
    raise ValueError(f"--model_dir: {path} is not a readable config ({type(e).__name__}: {e})") from e


def restore_model(model, model_dir: str) -> tuple[str, int]:
  """Restores the InstanceDiscrimination model (not the optimizer) from the latest checkpoint in model_dir
  (export and evaluation use this).

  Returns:
    (checkpoint path, the training step it was taken at).

  Raises:
    ValueError: naming --model_dir or the checkpoint when there is none, or it does not fit `model`.
  """
  directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
  path = tf.train.latest_checkpoint(directory)
  if path is None:
    raise ValueError(f"--model_dir: no checkpoint in {directory}")
  refuse_legacy(path)
  try:
    tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    step = int(tf.train.load_variable(path, STEP_KEY))
  except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:
    raise ValueError(f"cannot restore the model from checkpoint {path} (corrupt, or another model): {e}") from e
  return path, step


def run_identity(*, dataset: str, num_instances: int, arch: str, embedding_dim: int, objective: str,
                 image_shape: tuple[int, ...], bank_dtype: str = "float32") -> dict[str, Any]:
  """The facts of a run that a checkpoint depends on; flags that may change across a resume are not in it."""
  return {"dataset": dataset, "num_instances": num_instances, "arch": arch, "embedding_dim": embedding_dim,
          "objective": objective, "image_shape": list(image_shape), "bank_dtype": bank_dtype}


_FLAG_OF = {"dataset": "dataset", "num_instances": "max_train_examples", "arch": "arch",
            "embedding_dim": "embedding_dim", "objective": "objective", "image_shape": "image_size",
            "bank_dtype": "bank_dtype"}


def check_resume(model_dir: str, identity: dict[str, Any]) -> None:
  """Refuses to resume a model dir whose checkpoints come from a different run.

  Compares with RUN_FILE, and the bank shape stored in the latest checkpoint with (num_instances, embedding_dim).

  Raises:
    ValueError: naming the flag that differs and both values; nothing in the model dir is touched.
  """
  run_path = os.path.join(model_dir, RUN_FILE)
  if os.path.exists(run_path):
    try:
      with open(run_path) as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{run_path} is unreadable ({e}); move it away or use a new --model_dir") from e
    for key, value in identity.items():
      if key in saved and saved[key] != value:
        raise ValueError(
            f"--{_FLAG_OF[key]}: --model_dir={model_dir} holds a run with {key}={saved[key]!r}, this run has "
            f"{value!r}. Resume with the same settings or use a new --model_dir.")
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
  if latest is None:
    return
  refuse_legacy(latest)
  shapes = tf.train.load_checkpoint(latest).get_variable_to_shape_map()
  expected = [identity["num_instances"], identity["embedding_dim"]]
  if BANK_KEY in shapes and list(shapes[BANK_KEY]) != expected:
    raise ValueError(
        f"--max_train_examples/--embedding_dim: checkpoint {latest} has a memory bank of shape {shapes[BANK_KEY]}, "
        f"this run needs {expected}. Resume with the same dataset and embedding size or use a new --model_dir.")


def read_run_identity(model_dir: str) -> dict[str, Any]:
  """The run identity (dataset, num_instances, arch, ...) a model dir was trained with.

  Raises:
    ValueError: naming the file when it is missing or unreadable.
  """
  path = os.path.join(model_dir, RUN_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--model_dir: cannot read {path} ({type(e).__name__}: {e})") from e


def save_run_identity(model_dir: str, identity: dict[str, Any]) -> None:
  write_json_atomic(os.path.join(model_dir, RUN_FILE), identity)


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to a temporary file and renames it over `path`: readers never see half a file."""
  write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> None:
  """Writes text to a temporary file and renames it over `path`: a crash leaves the old file or the new one.

  A failed write (disk full, permissions) removes the temporary file and raises the OSError.
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def trim_events(directory: str, max_step: int) -> int:
  """Drops the TensorBoard events after `max_step` from the event files in `directory`; the number dropped.

  A resume trains the steps after its checkpoint again and writes their summaries again: without this, TensorBoard
  would show two points for each (the killed run's and the resumed run's). Each file that loses events is rewritten
  under a temporary name and renamed over itself, so a kill during the trim leaves every file whole (old or new).
  A record that a kill cut short at a file's end goes too.
  """
  dropped = 0
  for path in sorted(tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*"))):
    if path.endswith(".tmp"):
      os.remove(path)  # A trim that a kill cut short; the file it was replacing is still whole.
      continue
    kept, changed = [], False
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        event = tf.compat.v1.Event.FromString(record)
        if event.step > max_step and not event.HasField("file_version"):
          changed, dropped = True, dropped + 1
        else:
          kept.append(record)
    except tf.errors.DataLossError:
      changed = True
    if not changed:
      continue
    tmp = f"{path}.tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in kept:
        writer.write(record)
    os.replace(tmp, path)
  return dropped
