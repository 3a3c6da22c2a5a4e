"""batchnorm.BatchNormalization against keras.layers.BatchNormalization: outputs, gradients and moving statistics
(float32, mixed_bfloat16; training, inference, frozen), the fused op where it applies and Keras' path where it
does not (rank 2, two synchronized replicas), and checkpoints, .weights.h5 and .keras files in both directions."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import backbones
from tf_instdisc import batchnorm

SHAPE = (8, 5, 5, 6)  # [B, H, W, C]: n = 200 values per channel.
MOMENTUM, EPSILON = 0.9, 1e-5
# float32: the same function to rounding. bfloat16 (8 bits of mantissa): outputs and input gradients differ by an
# ulp of bfloat16 where Keras rounds its float32 result and the fused op its own; float32 statistics stay close.
TOLERANCES = {"float32": dict(rtol=1e-5, atol=1e-5), "mixed_bfloat16": dict(rtol=2e-2, atol=2e-2)}


def _images(seed: int, shape=SHAPE) -> np.ndarray:
  return np.random.default_rng(seed).normal(2.0, 3.0, shape).astype(np.float32)


def _pair(policy: str, shape=SHAPE, **kwargs):
  """Keras' layer and ours, built alike, with the same random (non-initial) weights."""
  made = []
  for cls in (keras.layers.BatchNormalization, batchnorm.BatchNormalization):
    layer = cls(momentum=MOMENTUM, epsilon=EPSILON, dtype=policy, **kwargs)
    layer.build(shape)
    made.append(layer)
  rng = np.random.default_rng(0)
  channels = shape[-1]
  weights = [rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
             rng.uniform(0.5, 2.0, channels)]  # gamma, beta, moving_mean, moving_variance.
  for layer in made:
    layer.set_weights([w.astype(np.float32) for w in weights])
  return made


def _forward_backward(layer, images: np.ndarray, training: bool):
  """Outputs (float32) and the gradients of a fixed random projection of them wrt input, gamma and beta."""
  x = tf.constant(images)
  projection = tf.constant(np.random.default_rng(9).normal(size=images.shape).astype(np.float32))

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = tf.cast(layer(x, training=training), tf.float32)
      loss = tf.reduce_sum(y * projection)  # Not the plain sum: its input gradient is 0 in training.
    return y, tape.gradient(loss, [x, layer.gamma, layer.beta])

  y, grads = step()
  return y.numpy(), [g.numpy() for g in grads]


def _op_types(layer, images: np.ndarray, training: bool) -> set[str]:
  graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(
      tf.TensorSpec(images.shape, tf.float32)).graph
  return {op.type for op in graph.get_operations()}


class MatchesKerasTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(policy=("float32", "mixed_bfloat16"), training=(True, False))
  def test_outputs_gradients_and_moving_statistics(self, policy, training):
    theirs, mine = _pair(policy)
    initial_mean = mine.moving_mean.numpy()
    for step in range(3):  # Three updates of the moving statistics (in training), each from the last.
      images = _images(step)
      (y_theirs, grads_theirs), (y_mine, grads_mine) = (_forward_backward(layer, images, training)
                                                        for layer in (theirs, mine))
      self.assertEqual(mine.compute_dtype, theirs.compute_dtype)
      self.assertAllClose(y_mine, y_theirs, **TOLERANCES[policy])
      for name, a, b in zip(("input", "gamma", "beta"), grads_mine, grads_theirs):
        scale = max(1.0, float(np.abs(b).max()))  # gamma's and beta's gradients sum 200 values per channel.
        self.assertAllClose(a / scale, b / scale, **TOLERANCES[policy], msg=f"gradient wrt {name}, step {step}")
      for variable in ("moving_mean", "moving_variance"):
        self.assertAllClose(getattr(mine, variable).numpy(), getattr(theirs, variable).numpy(), rtol=1e-5,
                            atol=1e-6, msg=f"{variable}, step {step}")
    self.assertEqual(training, not np.allclose(mine.moving_mean.numpy(), initial_mean))  # Updated in training only.

  def test_moving_variance_takes_the_biased_batch_variance(self):
    # Keras' convention: the fused op returns the batch variance with Bessel's n / (n - 1); the layer undoes it.
    layer = batchnorm.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
    images = _images(1)
    layer(images, training=True)
    self.assertAllClose(layer.moving_mean.numpy(), (1 - MOMENTUM) * images.mean(axis=(0, 1, 2)), rtol=1e-5)
    self.assertAllClose(layer.moving_variance.numpy(), MOMENTUM + (1 - MOMENTUM) * images.var(axis=(0, 1, 2)),
                        rtol=1e-5)

  def test_training_output_is_the_batch_standardised(self):
    layer = batchnorm.BatchNormalization(epsilon=EPSILON)
    images = _images(2)
    expected = (images - images.mean(axis=(0, 1, 2))) / np.sqrt(images.var(axis=(0, 1, 2)) + EPSILON)
    self.assertAllClose(layer(images, training=True), expected, atol=1e-5)

  @parameterized.parameters("float32", "mixed_bfloat16")
  def test_a_frozen_layer_normalises_with_its_moving_statistics(self, policy):
    theirs, mine = _pair(policy)
    before = mine.moving_variance.numpy()
    for layer in (theirs, mine):
      layer.trainable = False
    self.assertAllClose(mine(_images(3), training=True), theirs(_images(3), training=True), **TOLERANCES[policy])
    self.assertAllEqual(mine.moving_variance.numpy(), before)

  @parameterized.parameters("float32", "mixed_bfloat16")
  def test_one_fused_op_runs_in_the_input_dtype_in_training_and_keras_arithmetic_in_inference(self, policy):
    _, mine = _pair(policy)
    images = _images(0)
    for training, count in ((True, 1), (False, 0)):
      graph = tf.function(lambda x, training=training: mine(x, training=training)).get_concrete_function(
          tf.TensorSpec(SHAPE, tf.float32)).graph
      fused = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
      self.assertLen(fused, count)
      if count:
        self.assertEqual(fused[0].get_attr("T"), mine.compute_dtype)
        self.assertTrue(fused[0].get_attr("is_training"))
    self.assertEqual(mine(images, training=True).dtype, mine.compute_dtype)

  def test_config_and_variables_are_keras(self):
    theirs, mine = _pair("mixed_bfloat16", synchronized=True)
    self.assertEqual(dict(mine.get_config(), name=None), dict(theirs.get_config(), name=None))  # Names are unique.
    self.assertEqual([(v.path, v.shape, v.dtype, v.trainable) for v in mine.weights],
                     [(v.path.replace(theirs.name, mine.name), v.shape, v.dtype, v.trainable) for v in theirs.weights])
    self.assertIsInstance(mine, keras.layers.BatchNormalization)


class KerasPathTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_rank_two_inputs_take_keras_path(self, training):
    # The projection head's [B, F]: FusedBatchNormV3 takes NHWC only.
    theirs, mine = _pair("float32", shape=(16, 6))
    images = _images(4, shape=(16, 6))
    self.assertNotIn("FusedBatchNormV3", _op_types(mine, images, training))
    self.assertAllClose(mine(images, training=training), theirs(images, training=training), atol=1e-6)
    self.assertAllClose(mine.moving_variance.numpy(), theirs.moving_variance.numpy(), atol=1e-7)

  def test_a_mask_takes_keras_path(self):
    theirs, mine = _pair("float32")
    images = _images(5)
    mask = np.random.default_rng(0).uniform(size=SHAPE[:-1]) > 0.3
    self.assertAllClose(mine(images, training=True, mask=mask), theirs(images, training=True, mask=mask), atol=1e-6)
    self.assertAllClose(mine.moving_mean.numpy(), theirs.moving_mean.numpy(), atol=1e-7)

  def test_synchronized_on_one_replica_is_fused(self):
    _, mine = _pair("float32", synchronized=True)
    self.assertIn("FusedBatchNormV3", _op_types(mine, _images(0), True))


class TwoReplicasTest(tf.test.TestCase, parameterized.TestCase):
  """MirroredStrategy over two logical CPUs (tests/testing.py): synchronized statistics span both replicas."""

  def _run(self, layer_class, synchronized: bool, halves):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      layer = layer_class(momentum=MOMENTUM, epsilon=EPSILON, synchronized=synchronized)
      layer.build(SHAPE)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(halves[context.replica_id_in_sync_group]))
    outputs = tf.function(lambda x: strategy.run(lambda v: layer(v, training=True), args=(x,)))(inputs)
    outputs = np.concatenate([v.numpy() for v in strategy.experimental_local_results(outputs)])
    return outputs, layer.moving_mean.numpy(), layer.moving_variance.numpy()

  @parameterized.parameters(True, False)
  def test_matches_keras_on_two_replicas(self, synchronized):
    images = _images(6, shape=(8, 5, 5, 6))
    images[4:] += 3.0  # The halves differ: local and synchronized statistics differ.
    halves = (images[:4], images[4:])
    theirs = self._run(keras.layers.BatchNormalization, synchronized, halves)
    mine = self._run(batchnorm.BatchNormalization, synchronized, halves)
    for a, b in zip(mine, theirs):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)
    if synchronized:  # Replica-count independent: the statistics of the whole batch, as on one replica.
      one = batchnorm.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
      self.assertAllClose(mine[0], one(images, training=True), atol=1e-5)
      self.assertAllClose(mine[2], one.moving_variance.numpy(), rtol=1e-5)


def _backbone(layer_class, seed: int, policy: str = "float32") -> keras.Model:
  with mock.patch.object(batchnorm, "BatchNormalization", layer_class):
    return backbones.build_backbone("convnet_small", (16, 16, 1), seed=seed, width_multiplier=0.25, policy=policy)


def _batchnorms(model: keras.Model) -> list[keras.layers.Layer]:
  return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


class SavedFormsTest(tf.test.TestCase, parameterized.TestCase):
  """Backbones built with either layer read each other's checkpoints, .weights.h5 and .keras files."""

  def _trained(self, layer_class) -> keras.Model:
    model = _backbone(layer_class, seed=1)
    model(_images(7, shape=(4, 16, 16, 1)) * 40 + 128, training=True)  # Moving statistics away from 0 and 1.
    return model

  def _assert_same(self, a: keras.Model, b: keras.Model):
    for x, y in zip(a.weights, b.weights, strict=True):
      self.assertAllEqual(x.numpy(), y.numpy(), msg=x.path)
    images = _images(8, shape=(3, 16, 16, 1)) * 40 + 128
    self.assertAllClose(a(images, training=False), b(images, training=False), atol=1e-5)

  @parameterized.named_parameters(("keras_to_fused", keras.layers.BatchNormalization, batchnorm.BatchNormalization),
                                  ("fused_to_keras", batchnorm.BatchNormalization, keras.layers.BatchNormalization))
  def test_checkpoint_restores_across_layers(self, source_class, target_class):
    source = self._trained(source_class)
    target = _backbone(target_class, seed=2)
    self.assertIsInstance(_batchnorms(target)[0], target_class)
    path = tf.train.Checkpoint(model=source).save(os.path.join(self.create_tempdir().full_path, "ckpt"))
    tf.train.Checkpoint(model=target).restore(path).assert_consumed()
    self._assert_same(source, target)

  @parameterized.named_parameters(("keras_to_fused", keras.layers.BatchNormalization, batchnorm.BatchNormalization),
                                  ("fused_to_keras", batchnorm.BatchNormalization, keras.layers.BatchNormalization))
  def test_weights_file_loads_across_layers(self, source_class, target_class):
    # .weights.h5 keys layers by snake-cased class name: ours is also "batch_normalization".
    source = self._trained(source_class)
    target = _backbone(target_class, seed=2)
    path = os.path.join(self.create_tempdir().full_path, "backbone.weights.h5")
    source.save_weights(path)
    target.load_weights(path)
    self._assert_same(source, target)

  def test_keras_file_names_keras_layer_and_loads_with_it(self):
    source = self._trained(batchnorm.BatchNormalization)
    config = keras.saving.serialize_keras_object(_batchnorms(source)[0])
    self.assertEqual((config["module"], config["class_name"]), ("keras.layers", "BatchNormalization"))
    path = os.path.join(self.create_tempdir().full_path, "backbone.keras")
    source.save(path)
    loaded = keras.saving.load_model(path)
    self.assertNotEmpty(_batchnorms(loaded))
    self.assertEqual({type(layer) for layer in _batchnorms(loaded)}, {keras.layers.BatchNormalization})
    self._assert_same(source, loaded)

  def test_older_keras_file_loads_unchanged(self):
    source = self._trained(keras.layers.BatchNormalization)
    path = os.path.join(self.create_tempdir().full_path, "backbone.keras")
    source.save(path)
    self._assert_same(source, keras.saving.load_model(path))

  @parameterized.parameters("float32", "mixed_bfloat16")
  def test_backbone_trains_alike_with_either_layer(self, policy):
    theirs, mine = _backbone(keras.layers.BatchNormalization, 3, policy), _backbone(batchnorm.BatchNormalization, 3,
                                                                                    policy)
    images = _images(9, shape=(4, 16, 16, 1)) * 40 + 128
    for model in (theirs, mine):
      model(images, training=True)
    self.assertAllClose(mine(images, training=True), theirs(images, training=True), **TOLERANCES[policy])
    for a, b in zip(mine.non_trainable_weights, theirs.non_trainable_weights, strict=True):
      self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4, msg=a.path)


if __name__ == "__main__":
  tf.test.main()
