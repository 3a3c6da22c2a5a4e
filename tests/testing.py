"""Shared test fixtures: tiny data, tiny configs, a two-replica strategy on two logical CPUs."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_instdisc import config as config_lib  # noqa: E402
from tf_instdisc import data as data_lib  # noqa: E402
from tf_instdisc import distribute  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = data_lib.FASHION_MNIST_DIRS[0]
NUM_LOGICAL_CPUS = 2

# Split the CPU before any test touches a device (pytest imports every test module, and so this one, first).
distribute.split_cpu(NUM_LOGICAL_CPUS)


def tiny_arrays(n: int = 64, *, shape: tuple[int, int, int] = (8, 8, 1), num_classes: int = 4, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Class-dependent uint8 images [n, H, W, C] (each class a brightness level plus noise) and labels [n]."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % num_classes
  base = (labels * (200 // max(num_classes - 1, 1)))[:, None, None, None]
  images = np.clip(base + rng.normal(0, 20, (n, *shape)), 0, 255).astype(np.uint8)
  return images, labels.astype(np.int64)


def tiny_source(n: int = 64, *, n_eval: int = 32, shape: tuple[int, int, int] = (8, 8, 1), num_classes: int = 4
                ) -> data_lib.DataSource:
  train_images, train_labels = tiny_arrays(n, shape=shape, num_classes=num_classes, seed=0)
  eval_images, eval_labels = tiny_arrays(n_eval, shape=shape, num_classes=num_classes, seed=1)
  return data_lib.source_from_arrays("tiny", train_images, train_labels, eval_images, eval_labels,
                                     num_classes=num_classes)


def tiny_config(model_dir: str = "/tmp/unused", **overrides) -> config_lib.Config:
  """A small valid config; overrides are field names (= flag names) from any section."""
  sections = {
      "data": dict(dataset="fashion_mnist", max_train_examples=64, max_eval_examples=32),
      "augment": {},
      "model": dict(arch="convnet_small", embedding_dim=16),
      "bank": {},
      "loss": dict(num_negatives=16),
      "optim": {},
      "train": dict(model_dir=model_dir, batch_size=16, epochs=2, steps_per_loop=2),
      "eval": dict(knn_k=5, eval_batch_size=32),
  }
  owners = config_lib.field_names()
  for name, value in overrides.items():
    sections[owners[name]][name] = value
  cfg = config_lib.Config(**{name: config_lib.SECTIONS[name](**values) for name, values in sections.items()})
  return config_lib.validate(cfg)


def replace(cfg: config_lib.Config, **overrides) -> config_lib.Config:
  """cfg with some fields (by flag name) replaced."""
  owners = config_lib.field_names()
  for name, value in overrides.items():
    section = owners[name]
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
  return cfg


@functools.cache
def two_replica_strategy() -> tf.distribute.MirroredStrategy:
  """MirroredStrategy over two logical CPUs (set up when this module is imported), one per process.

  One shared object: each new MirroredStrategy numbers its collective instances from the same start, and the
  process-wide collective executor then refuses a second strategy's all-gather of another dtype under a key that
  an earlier one used ("expected ... data_type 1 but got ... data_type 9").
  """
  return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)])


def has_fashion_mnist() -> bool:
  return os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


def python() -> str:
  return sys.executable


def digest(directory: str) -> dict[str, bytes | None]:
  """{relative path: bytes} of every file under directory, and {relative path: None} of every directory: equal
  digests before and after a command mean it changed nothing there."""
  entries = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs:
      entries[os.path.relpath(os.path.join(root, name), directory) + os.sep] = None
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        entries[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return entries


def checkpoint_values(model_dir: str) -> dict[str, object]:
  """Every variable of the latest checkpoint in model_dir, but the save counter (it counts saves, not steps) and the
  object graph (it holds Python-side names such as "sgd_4", which count the optimizers built in the process)."""
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if "save_counter" not in name and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


NOTEBOOK_HEADING = "## In a notebook"


def notebook_example() -> str:
  """The README's notebook example: the first ```python block after its notebook heading."""
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    text = f.read()
  start = text.index(NOTEBOOK_HEADING)
  match = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL)
  if match is None:
    raise AssertionError(f"no python block under {NOTEBOOK_HEADING!r} in README.md")
  return match.group(1)
