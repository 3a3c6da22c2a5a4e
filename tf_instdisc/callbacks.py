"""Keras callbacks for InstanceDiscrimination.fit: a weighted-kNN monitor, a throughput meter, and the neighbour
search of a model built with neighbours > 0 (NeighbourSearch: without it the neighbour term stays off).

Both write into the epoch's `logs`, so put them before TensorBoard, CSVLogger or ModelCheckpoint(monitor=...) in
the callbacks list: Keras calls callbacks in list order and those read the same dict.

  model.fit(train, epochs=10, callbacks=[
      tf_instdisc.KnnMonitor(test_ds, train_labels=labels),     # logs["knn_top1"], logs["knn_top5"]
      tf_instdisc.Throughput(batch_size=256),                   # logs["images_per_sec"]
      keras.callbacks.CSVLogger("log.csv")])
"""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_instdisc import data as data_lib
from tf_instdisc import knn
from tf_instdisc import schedules


def _embed_labelled(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings float32 [M, D] and labels [M] of a dataset of (images, labels) or {"image", "label"} batches."""

  def as_dict(*batch):
    if len(batch) == 1 and isinstance(batch[0], dict):
      return batch[0]
    return {data_lib.IMAGE_KEY: batch[0], data_lib.LABEL_KEY: batch[1]}

  return knn.compute_embeddings(model, dataset.map(as_dict))


class KnnMonitor(keras.callbacks.Callback):
  """Weighted kNN top-1/top-5 of a labelled eval set at most every `every_epochs` epochs (paper Sec. 3.4), within a
  share of the fit's wall time.

  Keys: the memory bank (train_labels[i] is the label of instance i: cheap, the paper's monitor), or, with
  `train_data`, clean features of that labelled dataset recomputed through the current network (exact, slower).

  As train.py's monitor (schedules.monitor_due): after the first due epoch of a fit and after its last epoch always,
  after the other due epochs only while the monitor's time stays within `time_share` of the fit's wall time so far.
  An epoch without it has no knn keys in its logs (CSVLogger writes NA; ModelCheckpoint(monitor="knn_top1") skips
  it); time_share=None evaluates after every every_epochs-th epoch, and only then.

  Args:
    eval_data: batches of (images, labels) or {"image", "label"}, un-augmented.
    train_labels: int [N], the label of each bank row (instance id order); needed when keys are the bank.
    train_data: batches of (images, labels) to embed as keys instead of the bank.
    k: neighbours.
    temperature: the vote's tau.
    num_classes: C; by default 1 + the largest label seen.
    every_epochs: run after every this many epochs at most (and never more often).
    prefix: the logs' keys are prefix + "top1" / "top5".
    time_share: the most of the fit's wall time its evaluations may take (train.py's
      schedules.MONITOR_TIME_SHARE by default); None: no limit.
  """

  def __init__(self, eval_data: tf.data.Dataset, *, train_labels: np.ndarray | None = None,
               train_data: tf.data.Dataset | None = None, k: int = 200, temperature: float = 0.07,
               num_classes: int | None = None, every_epochs: int = 1, prefix: str = "knn_",
               time_share: float | None = schedules.MONITOR_TIME_SHARE):
    super().__init__()
    if (train_labels is None) == (train_data is None):
      raise ValueError("KnnMonitor: give train_labels (keys: the memory bank) or train_data (keys: its clean "
                       "features), not both and not neither")
    if k < 1 or temperature <= 0 or every_epochs < 1:
      raise ValueError(f"KnnMonitor: k >= 1, temperature > 0 and every_epochs >= 1 needed, got k={k}, "
                       f"temperature={temperature}, every_epochs={every_epochs}")
    if time_share is not None and not time_share >= 0:
      raise ValueError(f"KnnMonitor: time_share must be >= 0 (a fraction of the wall time) or None, got {time_share}")
    self.eval_data, self.train_data = eval_data, train_data
    self.train_labels = None if train_labels is None else np.asarray(train_labels, np.int64)
    self.k, self.temperature, self.num_classes = k, temperature, num_classes
    self.every_epochs, self.prefix, self.time_share = every_epochs, prefix, time_share
    self._started_at, self._seconds, self._last_seconds = time.time(), 0.0, None

  def evaluate(self) -> dict[str, float]:
    """{prefix + "top1": acc, prefix + "top5": acc} of the model now, in [0, 1]."""
    queries, query_labels = _embed_labelled(self.model, self.eval_data)
    if self.train_data is None:
      bank = self.model.memory_bank
      if len(self.train_labels) != bank.num_instances:
        raise ValueError(f"KnnMonitor: train_labels has {len(self.train_labels)} labels, the bank "
                         f"{bank.num_instances} rows")
      keys, key_labels = bank.as_float32(), self.train_labels
    else:
      features, key_labels = _embed_labelled(self.model, self.train_data)
      keys = tf.constant(features)
    num_classes = self.num_classes or int(max(key_labels.max(), query_labels.max())) + 1
    scores = knn.knn_accuracy(queries, query_labels, keys, key_labels, k=self.k, temperature=self.temperature,
                              num_classes=num_classes)
    return {f"{self.prefix}top1": scores["knn_top1"], f"{self.prefix}top5": scores["knn_top5"]}

  def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
    self._started_at, self._seconds, self._last_seconds = time.time(), 0.0, None  # This fit's accounts.

  def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    if logs is None:
      return
    if self.time_share is None:
      due = (epoch + 1) % self.every_epochs == 0
    else:
      due = schedules.monitor_due(
          epoch, epochs=(self.params or {}).get("epochs") or 0, every=self.every_epochs,
          monitor_seconds=self._seconds, last_monitor_seconds=self._last_seconds,
          wall_seconds=time.time() - self._started_at, share=self.time_share)
    if due:
      start = time.time()
      logs.update(self.evaluate())
      self._last_seconds = time.time() - start
      self._seconds += self._last_seconds


class Throughput(keras.callbacks.Callback):
  """Training images per second of each epoch, as logs["images_per_sec"] (wall time of the epoch's steps).

  Args:
    batch_size: the global batch size of the training dataset.
  """

  def __init__(self, batch_size: int):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"Throughput: batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self._start, self._steps = 0.0, 0

  def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    self._start, self._steps = time.time(), 0

  def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
    self._steps = batch + 1  # With steps_per_execution > 1, `batch` is the last step of the execution.

  def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    if logs is not None:
      logs["images_per_sec"] = self._steps * self.batch_size / max(time.time() - self._start, 1e-9)


class NeighbourSearch(keras.callbacks.Callback):
  """Finds the bank's nearest rows (`InstanceDiscrimination.refresh_neighbours`) before the epochs train.py's
  --neighbour_start and --neighbour_every_epochs pick, for a model built with neighbours > 0. Put it in `fit`'s
  callbacks; fit's `epochs` and `initial_epoch` set the schedule.

  Args:
    start: fraction of the epochs after which the neighbour term starts, in [0, 1).
    every_epochs: search again every N epochs.
  """

  def __init__(self, start: float = 0.5, every_epochs: int = 5):
    super().__init__()
    if not 0.0 <= start < 1.0:
      raise ValueError(f"NeighbourSearch: start must be in [0, 1), got {start}")
    if every_epochs < 1:
      raise ValueError(f"NeighbourSearch: every_epochs must be >= 1, got {every_epochs}")
    self.start, self.every_epochs = start, every_epochs
    self._first_epoch: int | None = None

  def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
    if not getattr(self.model, "loss_config", None) or not self.model.loss_config.neighbours:
      raise ValueError("NeighbourSearch: the model was built without neighbours (InstanceDiscrimination("
                       "neighbours=M))")
    self._first_epoch = None

  def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    if self._first_epoch is None:
      self._first_epoch = epoch  # fit(initial_epoch=...) of a resume.
    if schedules.neighbour_search_due(epoch, epochs=self.params["epochs"], start=self.start,
                                      every=self.every_epochs, first_epoch=self._first_epoch):
      self.model.refresh_neighbours()
