"""Linear classifiers on frozen features (paper Tables 1-3): a linear SVM or multinomial logistic regression.

Features are standardised with the training set's mean and deviation. The L2 penalty is chosen on a seeded
held-out part of the training set (`val_fraction`), then the classifier is refitted on the whole training set
with it and scored once on the test set. Shapes: N = train examples, M = test examples, F = feature size,
C = classes.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

LOSSES = ("logistic", "svm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
  loss: str = "logistic"  # logistic: softmax cross-entropy; svm: one-vs-rest squared hinge (LIBLINEAR's default).
  epochs: int = 30
  batch_size: int = 512
  learning_rate: float = 1e-2  # Adam, cosine-decayed to 0 over the fit (1e-3 left the probes under-fitted).
  weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)  # L2 penalties tried on the held-out part.
  val_fraction: float = 0.1
  seed: int = 0


def validate(cfg: ProbeConfig) -> ProbeConfig:
  """Raises ValueError naming the flag (linear_<field>) of a bad value; returns cfg."""
  checks = [
      (cfg.loss in LOSSES, "linear_loss", f"got {cfg.loss!r}, expected one of {', '.join(LOSSES)}"),
      (cfg.epochs > 0, "linear_epochs", "must be > 0"),
      (cfg.batch_size > 0, "linear_batch_size", "must be > 0"),
      (cfg.learning_rate > 0, "linear_learning_rate", "must be > 0"),
      (len(cfg.weight_decays) > 0 and all(w >= 0 for w in cfg.weight_decays), "linear_weight_decays",
       "must be one or more values >= 0"),
      (0.0 < cfg.val_fraction < 1.0, "linear_val_fraction", "must be in (0, 1)"),
  ]
  for ok, flag, message in checks:
    if not ok:
      raise ValueError(f"--{flag}: {message}")
  return cfg


def _loss(loss: str, logits: tf.Tensor, labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  if loss == "logistic":
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
  signs = 2.0 * tf.one_hot(labels, num_classes) - 1.0  # +1 for the true class, -1 for the others.
  return tf.reduce_mean(tf.reduce_sum(tf.square(tf.nn.relu(1.0 - signs * logits)), axis=1))


def fit(features: np.ndarray, labels: np.ndarray, *, num_classes: int, loss: str, weight_decay: float, epochs: int,
        batch_size: int, learning_rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Trains logits = x W + b by Adam (cosine-decayed) on mini-batches; returns (W float32 [F, C], b float32 [C])."""
  rng = np.random.default_rng(seed)
  dims = features.shape[1]
  weights = tf.Variable(tf.zeros([dims, num_classes]))
  bias = tf.Variable(tf.zeros([num_classes]))
  steps = epochs * -(-len(features) // batch_size)
  optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1)))

  @tf.function(reduce_retracing=True)
  def step(x, y):
    with tf.GradientTape() as tape:
      objective = _loss(loss, tf.matmul(x, weights) + bias, y, num_classes)
      objective += 0.5 * weight_decay * tf.reduce_sum(tf.square(weights))
    optimizer.apply_gradients(zip(tape.gradient(objective, [weights, bias]), [weights, bias]))
    return objective

  for _ in range(epochs):
    order = rng.permutation(len(features))
    for start in range(0, len(order), batch_size):
      index = order[start:start + batch_size]
      step(tf.constant(features[index]), tf.constant(labels[index]))
  return weights.numpy(), bias.numpy()


def accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{"top1", "top5"} in [0, 1] of class scores [M, C] against labels [M]."""
  top = np.argsort(-scores, axis=1)[:, :min(5, scores.shape[1])]
  return {"top1": float(np.mean(top[:, 0] == labels)), "top5": float(np.mean(np.any(top == labels[:, None], 1)))}


def evaluate(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
             test_labels: np.ndarray, *, num_classes: int, cfg: ProbeConfig) -> dict[str, object]:
  """Chooses the L2 penalty on a held-out part of the train set, refits on all of it and scores the test set.

  Returns:
    {"top1", "top5" (test, in [0, 1]), "weight_decay" (chosen), "val_top1" {penalty: held-out top-1},
     "dims", "train_examples", "seconds"}.
  """
  validate(cfg)
  start = time.time()
  train_labels = np.asarray(train_labels, np.int64)
  mean = train_features.mean(axis=0, dtype=np.float64).astype(np.float32)
  std = train_features.std(axis=0, dtype=np.float64).astype(np.float32) + 1e-6
  train_x = (train_features - mean) / std
  test_x = (test_features - mean) / std
  order = np.random.default_rng(cfg.seed).permutation(len(train_x))
  num_val = max(1, int(round(cfg.val_fraction * len(train_x))))
  val, fit_part = order[:num_val], order[num_val:]
  common = dict(num_classes=num_classes, loss=cfg.loss, epochs=cfg.epochs, batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, seed=cfg.seed)
  val_top1 = {}
  for weight_decay in cfg.weight_decays:
    weights, bias = fit(train_x[fit_part], train_labels[fit_part], weight_decay=weight_decay, **common)
    val_top1[weight_decay] = accuracy(train_x[val] @ weights + bias, train_labels[val])["top1"]
    logging.info("linear probe (%s, %d dims): weight decay %g -> held-out top-1 %.2f%%", cfg.loss,
                 train_x.shape[1], weight_decay, 100 * val_top1[weight_decay])
  best = max(cfg.weight_decays, key=lambda w: (val_top1[w], -w))
  weights, bias = fit(train_x, train_labels, weight_decay=best, **common)
  scores = accuracy(test_x @ weights + bias, np.asarray(test_labels, np.int64))
  return {**scores, "weight_decay": best, "val_top1": {str(k): v for k, v in val_top1.items()},
          "dims": int(train_x.shape[1]), "train_examples": int(len(train_x)), "seconds": time.time() - start}
