"""Semi-supervised fine-tuning (paper Figure 6): a small labelled subset, the pretrained network against scratch.

The backbone (pretrained, or the same architecture freshly initialised) gets a new linear classifier and the whole
network is trained on a seeded, class-stratified subset of the labels, with the run's own training augmentation,
by SGD (momentum 0.9) at lr 0.01 decayed x0.1 at 3/7 and 6/7 of the epochs, the paper's 70-epoch schedule scaled.
Then it is scored on the eval split (top-1, top-5). Both arms use the same subset, recipe and seed.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import linear_probe
from tf_instdisc import model as model_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
  epochs: int = 70  # The paper's; its decays at 30 and 60 become 3/7 and 6/7 of `epochs`.
  batch_size: int = 64
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4  # Coupled, as the trainer.
  seed: int = 0


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
  """Raises ValueError naming the flag (finetune_<field>) of a bad value; returns cfg."""
  checks = [(cfg.epochs > 0, "finetune_epochs", "must be > 0"),
            (cfg.batch_size > 0, "finetune_batch_size", "must be > 0"),
            (cfg.learning_rate > 0, "finetune_learning_rate", "must be > 0"),
            (0 <= cfg.momentum < 1, "finetune_momentum", "must be in [0, 1)"),
            (cfg.weight_decay >= 0, "finetune_weight_decay", "must be >= 0")]
  for ok, flag, message in checks:
    if not ok:
      raise ValueError(f"--{flag}: {message}")
  return cfg


def label_subset(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
  """Sorted positions of a class-stratified `fraction` of the labelled examples (at least one per class).

  Depends only on (labels, fraction, seed): every method compared at one fraction trains on the same images.
  Subsets of one seed are nested: the 1% subset lies inside the 2% one.

  Raises:
    ValueError: naming --label_fractions when fraction is not in (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"--label_fractions: {100 * fraction:g}% is not in (0, 100]")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels[labels >= 0]):
    members = np.flatnonzero(labels == label)
    order = members[rng.permutation(len(members))]
    chosen.append(order[:max(1, int(round(fraction * len(members))))])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros([0], np.int64)


def build_classifier(embedding_model: keras.Model, num_classes: int, *, seed: int) -> keras.Model:
  """images -> the embedding model's backbone (its weights, shared) -> pooled -> Dense(num_classes) logits."""
  backbone = model_lib.backbone_of(embedding_model)
  inputs = keras.Input(embedding_model.input_shape[1:], name="images")
  logits = keras.layers.Dense(num_classes, dtype="float32", name="classifier",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(backbone(inputs))
  return keras.Model(inputs, logits, name="finetune_classifier")


def finetune(embedding_model: keras.Model, source: data_lib.DataSource, indices: np.ndarray, *,
             data_cfg: config_lib.DataConfig, augment_cfg: config_lib.AugmentConfig, cfg: FinetuneConfig,
             eval_batch_size: int = 256, name: str = "") -> dict[str, float]:
  """Fine-tunes embedding_model's backbone plus a new classifier on source.train[indices]; scores source.eval.

  Args:
    embedding_model: pretrained (restored) or untrained (scratch) model from model.build_embedding_model; its
      backbone weights are changed in place.
    source: labelled train and eval splits.
    indices: the labelled subset (label_subset).
    data_cfg, augment_cfg: the run's (image size, augmentation).
    cfg: the recipe.
    eval_batch_size: batch of the scoring pass.
    name: for log lines ("pretrained", "scratch").

  Returns:
    {"top1", "top5" in [0, 1], "labelled_examples", "steps", "final_loss", "seconds"}.
  """
  validate(cfg)
  if source.eval is None or source.num_classes == 0:
    raise ValueError(f"--dataset: {source.name} has no labelled eval split to score fine-tuning on")
  start = time.time()
  subset = dataclasses.replace(source, train=data_lib.take_indices(source.train, indices))
  batch_size = min(cfg.batch_size, subset.train.num_examples)
  steps_per_epoch = subset.train.num_examples // batch_size
  total = steps_per_epoch * cfg.epochs
  classifier = build_classifier(embedding_model, source.num_classes, seed=cfg.seed)
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
      [int(total * 3 / 7), int(total * 6 / 7)], [cfg.learning_rate, cfg.learning_rate * 0.1,
                                                  cfg.learning_rate * 0.01])
  optimizer = keras.optimizers.SGD(schedule, momentum=cfg.momentum)
  trainable = classifier.trainable_variables

  @tf.function(reduce_retracing=True)
  def step(images, labels):
    with tf.GradientTape() as tape:
      logits = classifier(images, training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, trainable)
    grads = [g + cfg.weight_decay * v for g, v in zip(grads, trainable)]
    optimizer.apply_gradients(zip(grads, trainable))
    return loss

  loss = float("nan")
  for epoch in range(cfg.epochs):
    dataset = data_lib.make_train_dataset(subset, data_cfg, augment_cfg, batch_size=batch_size, seed=cfg.seed,
                                          epoch=epoch)
    for batch in dataset:
      loss = float(step(batch[data_lib.IMAGE_KEY], batch[data_lib.LABEL_KEY]))
    if (epoch + 1) % max(1, cfg.epochs // 5) == 0 or epoch + 1 == cfg.epochs:
      logging.info("fine-tune %s (%d labels): epoch %d/%d loss %.4f", name, len(indices), epoch + 1, cfg.epochs,
                   loss)
  image_size = data_lib.resolve_image_size(source, data_cfg.image_size)
  predict = tf.function(lambda images: classifier(images, training=False), reduce_retracing=True)
  scores, labels = [], []
  for batch in data_lib.make_eval_dataset(source.eval, augment_cfg, image_size=image_size,
                                          batch_size=eval_batch_size):
    scores.append(predict(batch[data_lib.IMAGE_KEY]).numpy())
    labels.append(batch[data_lib.LABEL_KEY].numpy())
  result = linear_probe.accuracy(np.concatenate(scores), np.concatenate(labels))
  return {**result, "labelled_examples": int(len(indices)), "steps": total, "final_loss": loss,
          "seconds": time.time() - start}
