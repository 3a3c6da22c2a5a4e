"""InstanceDiscrimination: the whole method as one keras.Model (Wu et al., CVPR 2018).

  f = normalise(BN?(W encoder(x)))                   the embedding, [B, D] float32 unit norm: model(images)
  loss = -log P(i | f)  over the memory bank V         exact softmax over all N rows (paper Eq. 2), or NCE with K
                                                       uniform noise rows and a constant Z (Eq. 6-8)
       (+ lambda ||f - v_i||^2, the proximal term)     (Sec. 3.3)
  v_i <- normalise(m v_i + (1 - m) f)                  written in place, after the loss has read V (Sec. 3.2)

Beyond the paper, each off by default: two views of every image with a symmetric loss (Ye et al., CVPR 2019) and
a CLD-style group term (Wang et al., CVPR 2021) and the bank's nearest rows as further positives (after AND, Huang
et al., ICML 2019; `refresh_neighbours` finds them). Shapes: B = per-replica batch, G = global batch, N =
num_instances, D = embedding_dim, K = num_negatives.

Usage (any encoder mapping images to features [B, F], any dataset of (image, instance_id) pairs):

  model = InstanceDiscrimination(encoder, num_instances=len(images), objective="nce")
  model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
  model.fit(with_instance_ids(images_ds).shuffle(n).batch(256, drop_remainder=True), epochs=10)

Under a tf.distribute strategy, build and compile the model inside `strategy.scope()`: every replica then holds a
copy of the bank and applies the same all-gathered update, so the copies stay identical (docs/design.md). train.py
(train_lib) drives this same train_step in its own loop.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import tensorflow as tf
from absl import logging
from keras import layers

from tf_instdisc import backbones
from tf_instdisc import config as config_lib
from tf_instdisc import distribute
from tf_instdisc import memory_bank
from tf_instdisc import objectives
from tf_instdisc import precision
from tf_instdisc import schedules

IMAGE_KEY, ID_KEY, SECOND_VIEW_KEY = "image", "instance_id", "image_view2"  # The batch dicts' keys (data.py's).
OBJECTIVES = ("nce", "softmax", "parametric")
GROUP_ITERATIONS = 5  # k-means rounds of the group term: enough for a batch of a few hundred unit vectors.
METRIC_NAMES = ("loss", "normalizer", "positive_similarity")


def with_instance_ids(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """A dataset of images -> one of (image, instance_id) pairs, ids 0, 1, ... in the dataset's order.

  Call it before any shuffle, so an image keeps its id across epochs. Elements may be images, (image, label, ...)
  tuples (the image is kept, the rest dropped) or dicts (an "instance_id" entry is added).

  Raises:
    ValueError: for a batched dataset (images of rank 4): ids would number batches, and a reshuffled source would
    give them new ids every epoch. Unbatch it and keep its order fixed, e.g.
    `keras.utils.image_dataset_from_directory(..., batch_size=None, shuffle=False)`.
  """
  spec = dataset.element_spec
  image_spec = spec.get(IMAGE_KEY) if isinstance(spec, dict) else spec[0] if isinstance(spec, tuple) else spec
  if isinstance(image_spec, tf.TensorSpec) and image_spec.shape.rank == 4:
    raise ValueError("with_instance_ids: the dataset is batched (images of rank 4, shape "
                     f"{image_spec.shape}); ids must number images, in an order fixed across epochs: pass "
                     "dataset.unbatch(), or keras.utils.image_dataset_from_directory(..., batch_size=None, "
                     "shuffle=False)")

  def pair(index, element):
    index = tf.cast(index, tf.int64)
    if isinstance(element, dict):
      return {**element, ID_KEY: index}
    if isinstance(element, tuple):
      element = element[0]
    return element, index

  return dataset.enumerate().map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _negative_similarities(views: list[tf.Tensor], ids: tf.Tensor, *, bank: memory_bank.MemoryBank,
                           cfg: config_lib.LossConfig, noise_seed: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
  """NCE noise ids [B, K] and each view's similarities to them [B, K]; every view meets the same noise rows."""
  batch = tf.shape(ids)[0]
  if cfg.negative_sampling == "shared":
    shared = bank.sample_negatives([cfg.num_negatives], seed=noise_seed)  # [K]
    noise_rows = bank.lookup(shared)  # [K, D]
    return (tf.broadcast_to(shared[None], [batch, cfg.num_negatives]),
            [tf.matmul(features, noise_rows, transpose_b=True) for features in views])
  offset = distribute.replica_id() * batch  # This replica's first row in the global batch.
  neg_ids = bank.sample_negatives([batch * _replicas(), cfg.num_negatives], seed=noise_seed)
  neg_ids = neg_ids[offset:offset + batch]  # [B, K]
  noise_rows = bank.lookup(neg_ids)  # [B, K, D]
  return neg_ids, [tf.einsum("bd,bkd->bk", features, noise_rows) for features in views]


def _replicas() -> int:
  ctx = tf.distribute.get_replica_context()
  return 1 if ctx is None else ctx.num_replicas_in_sync


def _group_term(views: list[tf.Tensor], positives: tf.Tensor, cfg: config_lib.LossConfig, noise_seed: tf.Tensor
                ) -> tf.Tensor:
  """[B]: features classified against the k-means groups of another view of the batch (CLD-style), over the
  global batch.

  Two views: each view against the other's groups, averaged (CLD's cross-level term). One view: the features
  against the groups of their own bank rows, the view of the same images the bank kept from earlier steps (no
  second forward pass). k-means runs on all-gathered rows without gradient, so N replicas group as one device.
  """
  batch = tf.shape(views[0])[0]
  offset = distribute.replica_id() * batch
  targets = [views[1], views[0]] if len(views) == 2 else [positives]
  terms = []
  for index, (features, other) in enumerate(zip(views, targets)):
    gathered = distribute.all_gather(tf.stop_gradient(other))  # [G, D]
    seed = tf.random.experimental.stateless_fold_in(noise_seed, 1 + index)
    centroids, assignments = objectives.spherical_kmeans(
        gathered, num_clusters=cfg.group_clusters, iterations=GROUP_ITERATIONS, seed=seed)
    terms.append(objectives.group_loss(features, centroids, assignments[offset:offset + batch],
                                       temperature=cfg.group_temperature))
  return tf.add_n(terms) / len(terms)


def compute_objective(views: list[tf.Tensor], ids: tf.Tensor, *, bank: memory_bank.MemoryBank,
                      classifier: keras.layers.Layer | None, cfg: config_lib.LossConfig, proximal_lambda: float,
                      noise_seed: tf.Tensor, neighbour_ids: tf.Tensor | None = None,
                      neighbour_weight: tf.Tensor | float = 0.0) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """Per-example loss [B] of the configured objective, reading (never writing) the bank; and diagnostics.

  `views` holds one [B, D] feature per augmented view (1 or 2). With two, each view's loss counts the other view's
  feature as a second positive and the per-example loss is the mean over both views (symmetric, Ye et al. 2019);
  the group term (cfg.group_clusters > 0) is added with weight cfg.group_weight. With `neighbour_ids` [B, M] (the
  examples' nearest bank rows), each view adds `neighbour_weight` times the mean positive term of those rows.

  Noise draws depend on (noise_seed, position in the global batch) only, never on the replica count: every
  replica draws the same shared K ids, or the same [global batch, K] block of which it takes its own rows. With
  the same noise_seed on every replica, N replicas train exactly as one device on the same global batch.
  """
  positives = bank.lookup(ids)  # [B, D]
  pos_similarity = [tf.reduce_sum(features * positives, axis=1) for features in views]  # each [B]
  view_similarity = [None] * len(views)
  if len(views) == 2:
    view_similarity = [tf.reduce_sum(views[0] * views[1], axis=1)] * 2  # [B], f . f'
  normalizer = tf.constant(0.0)
  if cfg.objective == "nce":
    neg_ids, neg_similarity = _negative_similarities(views, ids, bank=bank, cfg=cfg, noise_seed=noise_seed)
    estimate = distribute.all_reduce_mean(objectives.estimate_normalizer(
        pos_similarity[0], neg_similarity[0], temperature=cfg.temperature, num_instances=bank.num_instances))
    normalizer = bank.maybe_set_normalizer(estimate, momentum=cfg.normalizer_momentum)
    logits = functools.partial(objectives.nce_logits, temperature=cfg.temperature,
                               num_instances=bank.num_instances, num_negatives=cfg.num_negatives,
                               normalizer=normalizer)
    neg_mask = tf.not_equal(neg_ids, tf.cast(ids, tf.int64)[:, None]) if cfg.exclude_positive else None
    per_view = [objectives.nce_loss(logits(pos), logits(neg), neg_mask=neg_mask,
                                    view_logits=None if view is None else logits(view))
                for pos, neg, view in zip(pos_similarity, neg_similarity, view_similarity)]
    if neighbour_ids is not None:
      neighbour_rows = bank.lookup(neighbour_ids)  # [B, M, D]
      per_view = [loss + neighbour_weight * objectives.nce_neighbour_loss(
                      logits(tf.einsum("bd,bmd->bm", features, neighbour_rows)))
                  for loss, features in zip(per_view, views)]
  elif cfg.objective == "softmax":
    per_view = []
    for features, view in zip(views, view_similarity):
      similarities = bank.similarities(features)  # [B, N]
      loss = objectives.softmax_instance_loss(similarities, ids, temperature=cfg.temperature, view_similarity=view)
      if neighbour_ids is not None:
        loss += neighbour_weight * objectives.softmax_neighbour_loss(similarities, neighbour_ids,
                                                                     temperature=cfg.temperature)
      per_view.append(loss)
  else:  # parametric: w_i . f, no temperature (paper Eq. 1); the weights' norm sets the scale.
    per_view = [objectives.softmax_instance_loss(classifier(features), ids, temperature=1.0) for features in views]
  per_example = tf.add_n(per_view) / len(views)
  if cfg.group_clusters:
    per_example += cfg.group_weight * _group_term(views, positives, cfg, noise_seed)
  if proximal_lambda > 0.0:
    per_example += tf.add_n([objectives.proximal_loss(features, positives, proximal_lambda=proximal_lambda)
                             for features in views]) / len(views)
  return per_example, {"normalizer": normalizer, "positive_similarity": tf.reduce_mean(pos_similarity[0])}


@keras.saving.register_keras_serializable(package="tf_instdisc")
class InstanceDiscrimination(keras.Model):
  """Non-parametric instance discrimination around any encoder: the projection head, the memory bank, Z, the
  parametric baseline's classifier when used, and a step counter of its own.

  `model(images)` / `model.predict` give unit-norm float32 embeddings [B, D]. `fit` takes batches of
  `(images, instance_ids)`, `((view1, view2), instance_ids)` with views=2, or dicts with "image" ("image_view2")
  and "instance_id"; instance ids are int in [0, num_instances) and must not change between epochs
  (`with_instance_ids`). Batches must have the same size on every replica (batch with drop_remainder=True).

  Args:
    encoder: a Keras model or layer, images [B, ...] -> features [B, F] (e.g. keras.applications.ResNet50 with
      include_top=False, pooling="avg", a Sequential, or backbones.build_backbone).
    num_instances: N, the number of training images (bank rows).
    embedding_dim: D.
    objective: "nce" (K noise rows, constant Z), "softmax" (exact, all N rows) or "parametric" (a learned
      classifier of N classes, the paper's baseline).
    num_negatives: K of NCE.
    temperature: tau of the softmax / NCE logits.
    bank_momentum: m of the bank update (0 writes the new feature as is).
    proximal_lambda: weight of the proximal term (0: off).
    negative_sampling: "shared" (one draw of K per global batch) or "per_example".
    exclude_positive: drop noise rows that equal the example's own instance.
    normalizer_momentum: 0 keeps Z from the first batch (the paper); else Z is a moving average with this rate.
    views: 1, or 2 (each view's positives are its bank row and the other view's feature; the bank keeps their mean).
    group_clusters: > 0 adds the group term with this many k-means groups of the global batch.
    group_weight: the group term's weight.
    group_temperature: the group term's temperature.
    neighbours: M > 0 counts each instance's M nearest other bank rows as further positives, weighted
      neighbour_weight, once `refresh_neighbours` has found them (train_lib and callbacks.NeighbourRefresh call it
      on a schedule); until then the term is off.
    neighbour_weight: the neighbour term's weight.
    head_batchnorm: batch-normalise the projection before the L2 norm (not in the paper).
    head_hidden_dim: H > 0 puts a hidden layer Dense(H) -> BN -> ReLU before the projection (SimCLR's MLP head,
      Chen et al. 2020; not in the paper); 0 keeps the paper's linear projection.
    sync_batchnorm: the head's batch norm takes statistics over all replicas.
    weight_decay: coupled L2 on the trainable weights, added to the loss (PyTorch SGD's weight_decay, the paper's).
    bank_dtype: "float32", "bfloat16" or "float16" storage of the bank.
    seed: seeds the head, the bank's initial rows and the noise draws (with the step counter).
  """

  def __init__(self, encoder: keras.layers.Layer, num_instances: int, *, embedding_dim: int = 128,
               objective: str = "nce", num_negatives: int = 4096, temperature: float = 0.07,
               bank_momentum: float = 0.5, proximal_lambda: float = 0.0, negative_sampling: str = "shared",
               exclude_positive: bool = False, normalizer_momentum: float = 0.0, views: int = 1,
               group_clusters: int = 0, group_weight: float = 0.25, group_temperature: float = 0.2,
               neighbours: int = 0, neighbour_weight: float = 0.5, head_batchnorm: bool = False,
               head_hidden_dim: int = 0, sync_batchnorm: bool = False, weight_decay: float = 0.0,
               bank_dtype: str = "float32", seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    _check(isinstance(encoder, keras.layers.Layer), "encoder", f"must be a Keras layer or model, got {encoder!r}")
    _check(num_instances >= 1, "num_instances", f"must be >= 1, got {num_instances}")
    _check(embedding_dim >= 1, "embedding_dim", f"must be >= 1, got {embedding_dim}")
    _check(objective in OBJECTIVES, "objective", f"got {objective!r}, expected one of {', '.join(OBJECTIVES)}")
    _check(objective != "nce" or 1 <= num_negatives, "num_negatives", f"must be >= 1, got {num_negatives}")
    _check(temperature > 0, "temperature", f"must be > 0, got {temperature}")
    _check(0.0 <= bank_momentum < 1.0, "bank_momentum", f"must be in [0, 1), got {bank_momentum}")
    _check(proximal_lambda >= 0.0, "proximal_lambda", f"must be >= 0, got {proximal_lambda}")
    _check(views in (1, 2), "views", f"must be 1 or 2, got {views}")
    _check(negative_sampling in ("shared", "per_example"), "negative_sampling",
           f"got {negative_sampling!r}, expected shared or per_example")
    _check(group_clusters >= 0, "group_clusters", f"must be >= 0, got {group_clusters}")
    _check(neighbours >= 0, "neighbours", f"must be >= 0, got {neighbours}")
    _check(neighbours == 0 or objective != "parametric", "neighbours", "needs a non-parametric objective")
    _check(neighbours < num_instances, "neighbours", f"must be < num_instances ({num_instances}), got {neighbours}")
    _check(neighbour_weight >= 0.0, "neighbour_weight", f"must be >= 0, got {neighbour_weight}")
    _check(weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {weight_decay}")
    _check(head_hidden_dim >= 0, "head_hidden_dim", f"must be >= 0, got {head_hidden_dim}")
    self.encoder = encoder
    self.num_instances = int(num_instances)
    self.embedding_dim = int(embedding_dim)
    self.views, self.seed, self.weight_decay = int(views), int(seed), float(weight_decay)
    self.bank_momentum, self.proximal_lambda = float(bank_momentum), float(proximal_lambda)
    self.head_batchnorm, self.sync_batchnorm = bool(head_batchnorm), bool(sync_batchnorm)
    self.loss_config = config_lib.LossConfig(
        objective=objective, temperature=float(temperature), num_negatives=int(num_negatives),
        negative_sampling=negative_sampling, exclude_positive=bool(exclude_positive),
        normalizer_momentum=float(normalizer_momentum), group_clusters=int(group_clusters),
        group_weight=float(group_weight), group_temperature=float(group_temperature), neighbours=int(neighbours),
        neighbour_weight=float(neighbour_weight))
    # float32 head: the dot products with the bank and the temperature-scaled logits need the full mantissa.
    self.head_hidden_dim = int(head_hidden_dim)
    self.head_hidden = self.head_hidden_bn = self.head_hidden_relu = None
    if head_hidden_dim:  # Attributes only when used: a linear-head model's checkpoints and saved files are unchanged.
      self.head_hidden = layers.Dense(head_hidden_dim, use_bias=False, dtype="float32", name="head_hidden",
                                      kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))
      self.head_hidden_bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="float32",
                                                      name="head_hidden_bn", synchronized=sync_batchnorm)
      self.head_hidden_relu = layers.ReLU(dtype="float32", name="head_hidden_relu")
    self.projection = layers.Dense(embedding_dim, dtype="float32", name="projection",
                                   kernel_initializer=keras.initializers.GlorotUniform(seed=seed))
    self.projection_bn = None
    if head_batchnorm:
      self.projection_bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="float32",
                                                     name="projection_bn", synchronized=sync_batchnorm)
    self.normalize = layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalize")
    self.memory_bank = memory_bank.MemoryBank(num_instances, embedding_dim, seed=seed, dtype=bank_dtype)
    self.classifier = None
    if objective == "parametric":
      self.classifier = layers.Dense(num_instances, use_bias=False, dtype="float32", name="instance_classifier",
                                     kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed))
      self.classifier.build((None, embedding_dim))
    # The step counter: the resume position, the noise seed and the bank follow it, not optimizer.iterations
    # (a LossScaleOptimizer does not count a skipped step).
    self.step = self.add_weight(name="step", shape=(), dtype="int64", initializer="zeros", trainable=False,
                                aggregation="only_first_replica")
    self.trackers = {name: keras.metrics.Mean(name=name) for name in METRIC_NAMES}
    if neighbours:
      # Recomputed from the bank whenever needed (`refresh_neighbours`), so kept out of checkpoints and saved
      # models: set through __dict__, Keras and tf.train.Checkpoint do not track them. A resume finds them again.
      self.__dict__["_neighbour_ids"] = tf.Variable(
          tf.zeros([num_instances, neighbours], tf.int64), trainable=False, name="neighbour_ids")
      self.__dict__["_neighbours_found"] = tf.Variable(False, trainable=False, name="neighbours_found")
    input_shape = _input_shape(encoder)
    if input_shape is not None:  # Built at once (what BackupAndRestore needs); else on the first batch.
      self.build((None, *input_shape))

  @classmethod
  def from_recipe(cls, recipe: config_lib.Config, num_instances: int, input_shape: tuple[int, int, int], *,
                  policy: str | None = None, compiled: bool = True, steps_per_epoch: int | None = None,
                  steps_per_execution: int | None = None) -> InstanceDiscrimination:
    """The model a recipe trains, as train.py builds it: its backbone (--arch, width, pooling, precision), head,
    objective, bank and seed; compiled with its optimizer (SGD with momentum, the learning-rate schedule over the
    recipe's epochs of num_instances // batch_size steps, a loss-scale wrapper under float16).

    Args:
      recipe: a config.Config, e.g. `tf_instdisc.recipe("fashion_mnist", epochs=12)`.
      num_instances: N, the training images (bank rows).
      input_shape: (H, W, C) of the training crops.
      policy: the backbone's Keras dtype policy; by default the one the recipe's --mixed_precision resolves to.
      compiled: False returns the model built but not compiled.
      steps_per_epoch: of the learning-rate schedule; by default num_instances // the recipe's batch_size.
      steps_per_execution: steps per call of fit's train function; by default the largest divisor of the steps
        per epoch up to the recipe's steps_per_loop on one replica, 1 on several (Keras runs several steps per
        execution on one replica only).

    A recipe's num_negatives at or above num_instances is capped below it (config.fit_to_data, logged), as train.py
    does on a small dataset.

    Raises:
      ValueError: naming the recipe field, for a recipe that does not validate, or a compiled model from a recipe
      whose length is a time budget (train_minutes > 0: pass epochs=N to `tf_instdisc.recipe`).
    """
    _check(isinstance(recipe, config_lib.Config), "recipe",
           f"expected a tf_instdisc.recipe(...) config, got {type(recipe).__name__}")
    cfg, notes = config_lib.fit_to_data(config_lib.validate(recipe, run=False), num_instances=num_instances)
    for note in notes:
      logging.warning("%s", note)
    policy = policy or precision.resolve_policy(cfg.model.mixed_precision)
    encoder = backbones.build_backbone(cfg.model.arch, tuple(input_shape), policy=policy, seed=cfg.train.seed,
                                       sync_batchnorm=cfg.model.sync_batchnorm,
                                       width_multiplier=cfg.model.width_multiplier, pool_grid=cfg.model.pool_grid)
    loss, bank = cfg.loss, cfg.bank
    model = cls(encoder, num_instances, embedding_dim=cfg.model.embedding_dim, objective=loss.objective,
                num_negatives=loss.num_negatives, temperature=loss.temperature, bank_momentum=bank.bank_momentum,
                proximal_lambda=bank.proximal_lambda, negative_sampling=loss.negative_sampling,
                exclude_positive=loss.exclude_positive, normalizer_momentum=loss.normalizer_momentum,
                views=cfg.augment.views, group_clusters=loss.group_clusters, group_weight=loss.group_weight,
                group_temperature=loss.group_temperature, neighbours=loss.neighbours,
                neighbour_weight=loss.neighbour_weight, head_batchnorm=cfg.model.head_batchnorm,
                head_hidden_dim=cfg.model.head_hidden_dim, sync_batchnorm=cfg.model.sync_batchnorm,
                weight_decay=cfg.optim.weight_decay, bank_dtype=bank.bank_dtype, seed=cfg.train.seed,
                name=f"{cfg.model.arch.replace('.', '_')}_instance_discrimination")
    if not model.built:
      model.build((None, *input_shape))
    if not compiled:
      return model
    _check(not cfg.train.train_minutes, "recipe", f"train_minutes={cfg.train.train_minutes:g} sets the length by "
           "time, which only train.py measures; pass epochs=N, e.g. tf_instdisc.recipe(name, epochs=12)")
    if steps_per_epoch is None:
      _check(num_instances >= cfg.train.batch_size, "num_instances",
             f"{num_instances} images make no batch of the recipe's batch_size={cfg.train.batch_size}")
      steps_per_epoch = num_instances // cfg.train.batch_size
    schedule = schedules.build_lr_schedule(cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=cfg.optim.momentum)
    if policy == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    if steps_per_execution is None:
      # Keras runs whole executions: one that passes an epoch's end takes the next epoch's batches into this one
      # (measured: 16 steps in 2 epochs of 4 with 25 per execution), so the count must divide the epoch.
      one_replica = tf.distribute.get_strategy().num_replicas_in_sync == 1
      most = min(cfg.train.steps_per_loop, steps_per_epoch) if one_replica else 1
      steps_per_execution = max(d for d in range(1, most + 1) if steps_per_epoch % d == 0)
    model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)
    optimizer.build(model.trainable_variables)
    return model

  def fit(self, x=None, y=None, *args, steps_per_epoch: int | None = None, **kwargs):
    """keras.Model.fit. A dataset from `tf_instdisc.training_dataset` holds all of a recipe's epochs back to back
    and says how many steps one of them is (its `steps_per_epoch`): fit takes that as its steps_per_epoch unless
    given one, so `fit(dataset, epochs=E)` trains epoch e on the recipe's epoch e, as train.py does."""
    if steps_per_epoch is None:
      steps_per_epoch = getattr(x, "steps_per_epoch", None)
    if isinstance(x, tf.data.Dataset):
      kwargs.setdefault("shuffle", False)  # A dataset is shuffled by its own pipeline (Keras warns otherwise).
    return super().fit(x, y, *args, steps_per_epoch=steps_per_epoch, **kwargs)

  @property
  def objective(self) -> str:
    return self.loss_config.objective

  @property
  def bank(self) -> tf.Variable:
    """The memory bank V [N, D] (non-trainable; a MirroredVariable under a strategy)."""
    return self.memory_bank.bank

  @property
  def normalizer(self) -> tf.Variable:
    """NCE's constant Z (negative until the first NCE step sets it)."""
    return self.memory_bank.normalizer

  @property
  def neighbours_found(self) -> bool:
    """Whether `refresh_neighbours` has run (the neighbour term is off until then)."""
    return self.loss_config.neighbours > 0 and bool(self._neighbours_found.numpy())

  def refresh_neighbours(self) -> None:
    """Finds every bank row's `neighbours` nearest other rows (exact, over the whole bank) and turns the neighbour
    term on. Cross-replica context (outside strategy.run): every replica gets the same table."""
    _check(self.loss_config.neighbours > 0, "neighbours", "the model was built with neighbours=0")
    table = objectives.nearest_rows(self.memory_bank.as_float32(), num_neighbours=self.loss_config.neighbours)
    self._neighbour_ids.assign(table)
    self._neighbours_found.assign(True)

  @property
  def metrics(self) -> list[keras.metrics.Metric]:
    return list(self.trackers.values())

  def build(self, input_shape) -> None:
    if isinstance(input_shape, dict):
      input_shape = input_shape[IMAGE_KEY]
    input_shape = tuple(input_shape)
    if not self.encoder.built:
      self.encoder.build(input_shape)
    feature_shape = self.encoder.compute_output_shape(input_shape)
    _check(len(feature_shape) == 2, "encoder",
           f"must map images to features [B, F]; it gives shape {feature_shape} (use pooling='avg' or a pooling "
           "layer)")
    if self.head_hidden is not None:
      if not self.head_hidden.built:
        self.head_hidden.build(feature_shape)
        self.head_hidden_bn.build((None, self.head_hidden_dim))
      feature_shape = (None, self.head_hidden_dim)
    if not self.projection.built:
      self.projection.build(feature_shape)
    if self.projection_bn is not None and not self.projection_bn.built:
      self.projection_bn.build((None, self.embedding_dim))
    self.built = True

  def call(self, images, training=False):
    """images [B, ...] (or a dict with "image") -> float32 [B, D], unit norm."""
    if isinstance(images, dict):
      images = images[IMAGE_KEY]
    return self._head(tf.cast(self.encoder(images, training=training), tf.float32), training=training)

  def _head(self, features, training=None):
    """Encoder features [B, F] -> unit-norm embeddings [B, D]: (hidden layer,) projection, (BN,) L2 norm."""
    if self.head_hidden is not None:
      features = self.head_hidden_relu(self.head_hidden_bn(self.head_hidden(features), training=training))
    projected = self.projection(features)
    if self.projection_bn is not None:
      projected = self.projection_bn(projected, training=training)
    return self.normalize(projected)

  def compute_output_shape(self, input_shape):
    if isinstance(input_shape, dict):
      input_shape = input_shape[IMAGE_KEY]
    return (input_shape[0], self.embedding_dim)

  def embedding_model(self, input_shape: tuple[int, ...] | None = None) -> keras.Model:
    """A functional model images -> embeddings sharing this model's layers (no bank): for export and evaluation.

    Its layers are [input, encoder, (head_hidden, head_hidden_bn, head_hidden_relu,) projection, (projection_bn,)
    l2_normalize]: everything after the encoder is the head, applied in that order.
    """
    if input_shape is None:
      input_shape = tuple(self.encoder.input_shape[1:])
    inputs = keras.Input(input_shape, name="images")
    return keras.Model(inputs, self._head(self.encoder(inputs)), name=f"{self.encoder.name}_embedding")

  def compile(self, optimizer="sgd", *, jit_compile: bool | str = False, **kwargs) -> None:
    """As keras.Model.compile, without a loss (the method is its loss). XLA is off by default, not Keras' "auto"
    (on for GPUs): the bank update's tf.unique has a data-dependent shape XLA cannot compile, and on our CPUs the
    step measured slower under XLA anyway (docs/design.md)."""
    super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

  def compile_from_config(self, config: dict[str, Any]) -> None:
    """Recompiles a loaded model (keras.models.load_model) with its saved optimizer."""
    config = keras.saving.deserialize_keras_object(config)
    self.compile(**config)
    if self.built:
      self.optimizer.build(self.trainable_variables)  # Its slots exist before the saved values load into them.

  def _unpack(self, data) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Batch -> ([view images], instance ids [B] int64)."""
    if isinstance(data, dict):
      _check(ID_KEY in data and IMAGE_KEY in data, "data", f"a dict batch needs {IMAGE_KEY!r} and {ID_KEY!r}, got "
             f"keys {sorted(data)}")
      views, ids = [data[IMAGE_KEY]] + ([data[SECOND_VIEW_KEY]] if self.views == 2 else []), data[ID_KEY]
    else:
      _check(isinstance(data, (tuple, list)) and len(data) >= 2, "data",
             "batches must be (images, instance_ids) or a dict with 'image' and 'instance_id' (see "
             "tf_instdisc.with_instance_ids)")
      images, ids = data[0], data[1]
      views = list(images) if isinstance(images, (tuple, list)) else [images]
    _check(len(views) == self.views, "views", f"the model has views={self.views}, a batch brought {len(views)}")
    return views, tf.cast(ids, tf.int64)

  def train_step(self, data) -> dict[str, tf.Tensor]:
    """One step on this replica's batch: loss, gradients, optimizer update, then the bank write.

    Returns the running means (since the last reset) of the loss, Z and the mean positive similarity.
    """
    views, ids = self._unpack(data)
    noise_seed = tf.stack([tf.constant(self.seed, tf.int64), tf.convert_to_tensor(self.step)])  # Same everywhere.
    with tf.GradientTape() as tape:
      # Both views go through the network as one batch [V*B, ...]: one pass, batch statistics over both.
      features = tf.split(self(tf.concat(views, axis=0), training=True), len(views))  # each [B, D]
      variables = self.trainable_variables  # After the call: without a strategy, Keras builds on the first one.
      neighbour_ids, neighbour_weight = None, 0.0
      if self.loss_config.neighbours:
        neighbour_ids = tf.gather(distribute.local_variable(self._neighbour_ids), ids)  # [B, M]
        neighbour_weight = tf.where(distribute.local_variable(self._neighbours_found).read_value(),
                                    self.loss_config.neighbour_weight, 0.0)
      per_example, diagnostics = compute_objective(
          features, ids, bank=self.memory_bank, classifier=self.classifier, cfg=self.loss_config,
          proximal_lambda=self.proximal_lambda, noise_seed=noise_seed, neighbour_ids=neighbour_ids,
          neighbour_weight=neighbour_weight)
      # Divided by the global batch: apply_gradients sums the replicas' gradients, giving the global mean.
      loss = tf.nn.compute_average_loss(per_example)
      if self.weight_decay:
        # Coupled L2 as PyTorch SGD's weight_decay, scaled so the replica sum counts it once.
        l2 = 0.5 * self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
        loss += tf.nn.scale_regularization_loss(l2)
      scaled = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(gradients, variables))
    # The bank update comes after the loss has read the old rows; every replica applies the same gathered rows.
    # With two views an id appears twice: the bank averages its two features before the momentum update.
    self.memory_bank.update(distribute.all_gather(tf.concat([ids] * len(features), axis=0)),
                            distribute.all_gather(tf.stop_gradient(tf.concat(features, axis=0))),
                            momentum=self.bank_momentum)
    self.step.assign_add(1)
    # Each replica's mean over its own examples; the trackers (and fit) average replicas: the global mean.
    self.trackers["loss"].update_state(tf.reduce_mean(per_example))
    for name, value in diagnostics.items():
      self.trackers[name].update_state(value)
    return {name: tracker.result() for name, tracker in self.trackers.items()}

  def test_step(self, data):
    del data
    raise NotImplementedError(
        "InstanceDiscrimination has no validation loss (held-out images are not instances of the bank): use "
        "tf_instdisc.callbacks.KnnMonitor for a kNN score on a labelled set instead of validation_data")

  def get_config(self) -> dict[str, Any]:
    cfg = self.loss_config
    return {**super().get_config(), "encoder": keras.saving.serialize_keras_object(self.encoder),
            "num_instances": self.num_instances, "embedding_dim": self.embedding_dim, "objective": cfg.objective,
            "num_negatives": cfg.num_negatives, "temperature": cfg.temperature, "bank_momentum": self.bank_momentum,
            "proximal_lambda": self.proximal_lambda, "negative_sampling": cfg.negative_sampling,
            "exclude_positive": cfg.exclude_positive, "normalizer_momentum": cfg.normalizer_momentum,
            "views": self.views, "group_clusters": cfg.group_clusters, "group_weight": cfg.group_weight,
            "group_temperature": cfg.group_temperature, "neighbours": cfg.neighbours,
            "neighbour_weight": cfg.neighbour_weight, "head_batchnorm": self.head_batchnorm,
            "head_hidden_dim": self.head_hidden_dim,
            "sync_batchnorm": self.sync_batchnorm, "weight_decay": self.weight_decay,
            "bank_dtype": self.memory_bank.storage_dtype.name, "seed": self.seed}

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> InstanceDiscrimination:
    config = dict(config)
    encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
    return cls(encoder, **config)


def _input_shape(encoder: keras.layers.Layer) -> tuple[int | None, ...] | None:
  """The encoder's input shape without the batch axis, when it declares one (a functional model), else None."""
  try:
    shape = encoder.input_shape
  except (AttributeError, ValueError):
    return None
  return tuple(shape[1:]) if isinstance(shape, tuple) and shape and not isinstance(shape[0], tuple) else None


def _check(ok: bool, argument: str, message: str) -> None:
  if not ok:
    raise ValueError(f"InstanceDiscrimination {argument}: {message}")
