"""Weighted kNN classification over embeddings (paper Sec. 3.4): class weight sum of exp(s_i / tau) over the top k.

Shapes: Q = queries, N = keys (bank rows or clean train features), D = embedding_dim, C = num_classes. Keys are
scanned in chunks, so memory stays O(Q x chunk) even at N = 1.28M. Evaluation writes nothing.
"""

from __future__ import annotations

import inspect
import time
import weakref
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib

DEFAULT_CHUNK = 65536

# The tf.functions of an evaluation are made once, not per call: TensorFlow counts the traces of every tf.function
# made from the same Python code together, so one made per call traced at every call and, from the fifth, logged
# "N out of the last N calls to <lambda> triggered tf.function retracing" at every epoch's monitor.
_EMBED_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its embedding tf.function.


def embedding_function(model: Callable[..., Any]) -> Callable[[tf.Tensor], tf.Tensor]:
  """`model(images, training=False)` as a tf.function, made once per model and kept while the model lives.

  reduce_retracing: a batch of another size (the last, short batch of a split) traces once more, a function of any
  batch size, and no batch size traces after that. A model that cannot be weakly referenced (or a bound method,
  a new object at each access) gets a function of its own at each call.
  """
  if not inspect.ismethod(model):
    try:
      function = _EMBED_FUNCTIONS.get(model)
    except TypeError:  # Not weakly referable or not hashable.
      pass
    else:
      if function is None:
        model_ref = weakref.ref(model)  # Weak: the function, a value of the cache, must not keep its key alive.
        function = tf.function(lambda images: model_ref()(images, training=False), reduce_retracing=True)
        _EMBED_FUNCTIONS[model] = function
      return function
  return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def top_k_neighbors(queries: tf.Tensor, keys: tf.Tensor, *, k: int, chunk_size: int = DEFAULT_CHUNK
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Exact top-k by cosine similarity, scanning keys chunk by chunk.

  Args:
    queries: [Q, D] float32, unit norm.
    keys: [N, D] float32, unit norm (static N).
    k: neighbours per query, clipped to N.
    chunk_size: keys compared at once.

  Returns:
    (scores [Q, k] float32 descending, ids [Q, k] int64 into keys).
  """
  num_keys = int(keys.shape[0])
  k = min(k, num_keys)
  best_scores, best_ids = None, None
  for start in range(0, num_keys, chunk_size):
    chunk = keys[start:start + chunk_size]
    scores, ids = tf.math.top_k(tf.matmul(queries, chunk, transpose_b=True), k=min(k, int(chunk.shape[0])))
    ids = tf.cast(ids, tf.int64) + start
    if best_scores is not None:
      scores, ids = tf.concat([best_scores, scores], 1), tf.concat([best_ids, ids], 1)
      scores, order = tf.math.top_k(scores, k=min(k, int(scores.shape[1])))
      ids = tf.gather(ids, order, batch_dims=1)
    best_scores, best_ids = scores, ids
  return best_scores, best_ids


def vote(neighbor_scores: tf.Tensor, neighbor_labels: tf.Tensor, *, temperature: float, num_classes: int
         ) -> tf.Tensor:
  """Class scores [Q, C]: sum over neighbours of exp(s / temperature), one-hot by the neighbour's label.

  Args:
    neighbor_scores: [Q, k] float32 cosine similarities.
    neighbor_labels: [Q, k] int in [0, C).
    temperature: tau > 0.
    num_classes: C.
  """
  weights = tf.exp(neighbor_scores / temperature)  # [Q, k]
  return tf.einsum("qk,qkc->qc", weights, tf.one_hot(neighbor_labels, num_classes, dtype=weights.dtype))


def knn_predict(queries: tf.Tensor, keys: tf.Tensor, key_labels: tf.Tensor, *, k: int, temperature: float,
                num_classes: int, chunk_size: int = DEFAULT_CHUNK) -> tf.Tensor:
  """Weighted kNN class scores [Q, C] for queries [Q, D] against keys [N, D] labelled key_labels [N] int."""
  scores, ids = top_k_neighbors(queries, keys, k=k, chunk_size=chunk_size)
  return vote(scores, tf.gather(key_labels, ids), temperature=temperature, num_classes=num_classes)


@tf.function
def _top_classes(queries: tf.Tensor, keys: tf.Tensor, key_labels: tf.Tensor, temperature: tf.Tensor, *, k: int,
                 num_classes: int) -> tf.Tensor:
  """The min(5, C) best classes [Q, min(5, C)] of each query's weighted kNN vote, best first.

  One function for every call (see _EMBED_FUNCTIONS): it traces once per shape of queries and keys and per k and C
  (Python ints: they fix shapes); the temperature is a tensor, so a sweep over it does not trace again. No
  reduce_retracing: the chunked scan needs the static number of keys.
  """
  scores = knn_predict(queries, keys, key_labels, k=k, temperature=temperature, num_classes=num_classes)
  return tf.math.top_k(scores, k=min(5, num_classes)).indices


class Progress:
  """Logs "<what> done/total, rate, ETA" at most every log_every_seconds (long passes over ImageNet)."""

  def __init__(self, total: int | None, log_every_seconds: float = 30.0, *, what: str = "images"):
    self.total, self.every, self.what = total, log_every_seconds, what
    self.done = 0
    self.start = self.last_log = time.time()

  def update(self, count: int) -> None:
    self.done += count
    if self.total and time.time() - self.last_log > self.every:
      self.last_log = time.time()
      rate = self.done / (self.last_log - self.start)
      logging.info("%s %d/%d, %.0f img/s, ETA %.0f s", self.what, self.done, self.total, rate,
                   (self.total - self.done) / rate)


def compute_embeddings(model: keras.Model, dataset: tf.data.Dataset, *, total: int | None = None,
                       log_every_seconds: float = 30.0, split: data_lib.Split | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Embeds a dataset of {"image", "label", ...} batches in order: (float32 [M, D], int64 [M]).

  With `total` (the number of images), logs progress every log_every_seconds: an ImageNet pass takes a while.

  Args:
    model: images -> embeddings.
    dataset: batches of the split's views, in the split's order (data.make_eval_dataset).
    total: the number of images, for progress.
    log_every_seconds: progress interval.
    split: the split `dataset` reads: an image file the pipeline cannot read or decode is then named.

  Raises:
    ValueError: f"--data_dir: cannot decode image {path}" for a folder split's bad file (see
      data.name_undecodable); other pipeline errors propagate unchanged.
  """
  embed = embedding_function(model)
  features, labels = [], []
  progress = Progress(total, log_every_seconds, what="embedded")
  iterator = iter(dataset)
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except data_lib.DECODE_ERRORS as e:  # Only the input pipeline's errors: a model error is not a file's fault.
      if split is None:
        raise
      data_lib.name_undecodable(split, e, start=progress.done)  # In order: the bad file is at done or later.
    features.append(embed(batch[data_lib.IMAGE_KEY]).numpy())
    labels.append(batch[data_lib.LABEL_KEY].numpy())
    progress.update(len(features[-1]))
  return np.concatenate(features), np.concatenate(labels)


def embed_split(model: keras.Model, split: data_lib.Split, augment_cfg: config_lib.AugmentConfig, *,
                image_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings float32 [M, D] and labels int64 [M] of a split's clean (evaluation) views, in order, with progress.

  Raises:
    ValueError: naming --data_dir and the file, when an image of the split cannot be read or decoded.
  """
  dataset = data_lib.make_eval_dataset(split, augment_cfg, image_size=image_size, batch_size=batch_size)
  return compute_embeddings(model, dataset, total=split.num_examples, split=split)


def knn_accuracy(query_features: np.ndarray, query_labels: np.ndarray, keys: tf.Tensor, key_labels: np.ndarray, *,
                 k: int, temperature: float, num_classes: int, query_batch: int = 256) -> dict[str, float]:
  """Top-1 and top-5 accuracy of weighted kNN, streaming over query batches.

  Returns:
    {"knn_top1": float, "knn_top5": float} in [0, 1].
  """
  key_label_tensor = tf.constant(key_labels, tf.int64)
  temperature_tensor = tf.constant(temperature, tf.float32)
  query_features = np.asarray(query_features, np.float32)
  top1 = top5 = 0
  for start in range(0, len(query_features), query_batch):
    queries = query_features[start:start + query_batch]
    labels = query_labels[start:start + query_batch]
    # Every batch is query_batch rows (the last padded with zero rows, whose classes are dropped): one shape, so
    # one trace for all the batches of all the calls with keys of one shape.
    padded = np.pad(queries, [(0, query_batch - len(queries)), (0, 0)])
    ranked = _top_classes(tf.constant(padded), keys, key_label_tensor, temperature_tensor, k=k,
                          num_classes=num_classes).numpy()[:len(queries)]
    top1 += int(np.sum(ranked[:, 0] == labels))
    top5 += int(np.sum(np.any(ranked == labels[:, None], axis=1)))
  count = max(len(query_features), 1)
  return {"knn_top1": top1 / count, "knn_top5": top5 / count}


class KnnEvaluator:
  """kNN accuracy of an eval split against given keys (the bank, or clean train features) and train labels.

  `split`, the split eval_dataset reads (in order), lets a file the pipeline cannot decode be named.
  """

  def __init__(self, eval_dataset: tf.data.Dataset, train_labels: np.ndarray, *, k: int, temperature: float,
               num_classes: int, split: data_lib.Split | None = None):
    self.eval_dataset = eval_dataset
    self.train_labels = train_labels
    self.k, self.temperature, self.num_classes = k, temperature, num_classes
    self.split = split

  def run(self, model: keras.Model, keys: tf.Tensor) -> Iterator[tuple[str, float]]:
    """Yields ("knn_top1", acc) and ("knn_top5", acc) for the eval split embedded by `model` against `keys`.

    Raises:
      ValueError: naming --data_dir and the file, when `split` was given and one of its images cannot be decoded.
    """
    features, labels = compute_embeddings(model, self.eval_dataset, split=self.split)
    results = knn_accuracy(features, labels, keys, self.train_labels, k=self.k, temperature=self.temperature,
                           num_classes=self.num_classes)
    yield from results.items()
