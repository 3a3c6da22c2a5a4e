"""The embedding model: unit-norm float32 embeddings of the requested size under every policy; the parametric
classifier; --mixed_precision resolution."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import config as config_lib
from tf_instdisc import model as model_lib
from tf_instdisc import precision

INPUT_SHAPE = (16, 16, 1)


def _images(batch, shape=INPUT_SHAPE, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, (batch, *shape)).astype(np.float32)


class EmbeddingModelTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(policy=("float32", "mixed_bfloat16", "mixed_float16"), embedding_dim=(16, 128))
  def test_unit_norm_float32_embeddings(self, policy, embedding_dim):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=embedding_dim, policy=policy)
    embeddings = model(_images(4), training=False)
    self.assertEqual(embeddings.shape, (4, embedding_dim))
    self.assertEqual(embeddings.dtype, tf.float32)
    self.assertAllClose(tf.norm(embeddings, axis=1), np.ones(4), atol=1e-5)
    self.assertEqual(model.output.shape, (None, embedding_dim))

  @parameterized.named_parameters(
      {"testcase_name": "float32", "policy": "float32", "backbone_dtype": tf.float32},
      {"testcase_name": "mixed_bfloat16", "policy": "mixed_bfloat16", "backbone_dtype": tf.bfloat16},
  )
  def test_policy_reaches_backbone_but_not_head(self, policy, backbone_dtype):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, policy=policy)
    backbone = model_lib.backbone_of(model)
    self.assertEqual(backbone.name, "convnet_small")
    self.assertEqual(backbone(_images(2)).dtype, backbone_dtype)
    self.assertEqual(model.get_layer("projection").compute_dtype, "float32")
    self.assertEqual(model.get_layer("l2_normalize").compute_dtype, "float32")
    self.assertEqual({w.dtype for w in model.weights}, {"float32"})  # Mixed precision keeps float32 variables.

  @parameterized.parameters("float32", "mixed_bfloat16")
  def test_gradients_reach_every_trainable_weight(self, policy):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, policy=policy)
    with tf.GradientTape() as tape:
      embeddings = model(_images(4), training=True)
      loss = tf.reduce_sum(embeddings * tf.constant(np.eye(4, 8, dtype=np.float32)))
    grads = tape.gradient(loss, model.trainable_weights)
    self.assertNotIn(None, grads)
    for grad in grads:
      self.assertTrue(np.all(np.isfinite(grad.numpy())))

  def test_rgb_non_square_input(self):
    model = model_lib.build_embedding_model("convnet_small", (12, 20, 3), embedding_dim=10)
    embeddings = model(_images(3, shape=(12, 20, 3)))
    self.assertEqual(embeddings.shape, (3, 10))
    self.assertAllClose(tf.norm(embeddings, axis=1), np.ones(3), atol=1e-5)

  def test_different_images_different_embeddings(self):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8)
    embeddings = model(_images(3), training=False).numpy()
    self.assertNotAllClose(embeddings[0], embeddings[1])

  def test_same_seed_same_weights(self):
    first = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, seed=3)
    second = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, seed=3)
    other = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, seed=4)
    for a, b in zip(first.get_weights(), second.get_weights()):
      self.assertAllEqual(a, b)
    kernels = [w for w in first.trainable_weights if "kernel" in w.path]
    other_kernels = [w for w in other.trainable_weights if "kernel" in w.path]
    self.assertLen(kernels, 7)  # 6 convolutions and the projection.
    self.assertLen(other_kernels, 7)
    for a, b in zip(kernels, other_kernels):
      self.assertNotAllClose(a, b)

  def test_head_batchnorm(self):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, head_batchnorm=True)
    self.assertEqual(model.get_layer("projection_bn").compute_dtype, "float32")
    embeddings = model(_images(4), training=True)
    self.assertEqual(embeddings.dtype, tf.float32)
    self.assertAllClose(tf.norm(embeddings, axis=1), np.ones(4), atol=1e-5)

  def test_head_hidden_layer_is_dense_bn_relu_before_the_projection_as_numpy(self):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8, head_batchnorm=True,
                                            head_hidden_dim=12)
    self.assertEqual([layer.name for layer in model.layers[2:]],
                     ["head_hidden", "head_hidden_bn", "head_hidden_relu", "projection", "projection_bn",
                      "l2_normalize"])
    hidden_bn, projection_bn = model.get_layer("head_hidden_bn"), model.get_layer("projection_bn")
    rng = np.random.default_rng(0)
    for bn in (hidden_bn, projection_bn):  # Moving statistics away from 0 / 1, so the test sees them used.
      bn.set_weights([rng.uniform(0.5, 2.0, w.shape).astype("float32") if i in (0, 3) else
                      rng.normal(size=w.shape).astype("float32") for i, w in enumerate(bn.get_weights())])
    images = _images(4)
    features = model_lib.backbone_of(model)(images).numpy()

    def batchnorm(x, bn):
      gamma, beta, mean, variance = bn.get_weights()
      return gamma * (x - mean) / np.sqrt(variance + bn.epsilon) + beta

    hidden = np.maximum(batchnorm(features @ model.get_layer("head_hidden").get_weights()[0], hidden_bn), 0.0)
    kernel, bias = model.get_layer("projection").get_weights()
    projected = batchnorm(hidden @ kernel + bias, projection_bn)
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    self.assertEqual(model.get_layer("head_hidden").get_weights()[0].shape, (features.shape[1], 12))
    self.assertAllClose(model(images, training=False), expected, atol=1e-5)

  def test_no_head_hidden_layer_by_default(self):
    model = model_lib.build_embedding_model("convnet_small", INPUT_SHAPE, embedding_dim=8)
    self.assertEqual([layer.name for layer in model.layers[2:]], ["projection", "l2_normalize"])

  @parameterized.parameters("convnet_small", "resnet18_cifar")
  def test_sync_batchnorm_reaches_every_batchnorm(self, arch):
    def bn_layers(model):
      return [layer for layer in model_lib.backbone_of(model).layers + model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]

    synced = model_lib.build_embedding_model(arch, (16, 16, 3), embedding_dim=8, head_batchnorm=True,
                                             head_hidden_dim=8, sync_batchnorm=True)
    local = model_lib.build_embedding_model(arch, (16, 16, 3), embedding_dim=8, head_batchnorm=True,
                                            head_hidden_dim=8)
    self.assertGreater(len(bn_layers(synced)), 3)
    self.assertTrue(all(layer.synchronized for layer in bn_layers(synced)))
    self.assertFalse(any(layer.synchronized for layer in bn_layers(local)))

  def test_unknown_arch_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--arch"):
      model_lib.build_embedding_model("vgg16", INPUT_SHAPE, embedding_dim=8)


class WidthMultiplierTest(tf.test.TestCase):

  def test_build_model_takes_the_configs_width(self):
    cfg = config_lib.Config(model=config_lib.ModelConfig(arch="convnet_small", width_multiplier=0.5,
                                                         embedding_dim=8))
    model = model_lib.build_model(cfg, num_instances=4, input_shape=(28, 28, 1))
    self.assertEqual(model.encoder.output.shape[-1], 128)  # Half of convnet_small's 256 pooled channels.


class PoolGridTest(tf.test.TestCase):

  def test_build_model_takes_the_configs_grid(self):
    cfg = config_lib.Config(model=config_lib.ModelConfig(arch="convnet_small", width_multiplier=0.5, pool_grid=2,
                                                         embedding_dim=8))
    model = model_lib.build_model(cfg, num_instances=4, input_shape=(28, 28, 1))
    self.assertEqual(model.encoder.output.shape[-1], 4 * 128)  # 2x2 cells of the half width's 128 channels.
    embedding = model_lib.build_embedding_model("convnet_small", (28, 28, 1), embedding_dim=8, pool_grid=3)
    self.assertEqual(model_lib.backbone_of(embedding).output.shape[-1], 9 * 256)


class InstanceClassifierTest(tf.test.TestCase):

  def test_shape_and_weights(self):
    model = model_lib.build_model(testing.tiny_config(objective="parametric", embedding_dim=16), num_instances=500,
                                  input_shape=(8, 8, 1))
    classifier = model.classifier
    self.assertTrue(classifier.built)
    self.assertFalse(classifier.use_bias)
    self.assertLen(classifier.trainable_weights, 1)
    self.assertEqual(tuple(classifier.kernel.shape), (16, 500))
    logits = classifier(tf.math.l2_normalize(tf.constant(_images(3, shape=(16,))), axis=1))
    self.assertEqual(logits.shape, (3, 500))
    self.assertEqual(logits.dtype, tf.float32)
    # One w_i per instance, initialised small (stddev 0.01).
    self.assertBetween(float(np.std(classifier.kernel.numpy())), 0.009, 0.011)


class ResolvePolicyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": "off", "value": "off", "expected": "float32"},
      {"testcase_name": "bfloat16", "value": "bfloat16", "expected": "mixed_bfloat16"},
      {"testcase_name": "float16", "value": "float16", "expected": "mixed_float16"},
  )
  def test_explicit(self, value, expected):
    self.assertEqual(precision.resolve_policy(value), expected)

  @parameterized.named_parameters(
      {"testcase_name": "gpu", "devices": {"GPU": ["gpu:0"], "TPU": []}, "cpu_bf16": True,
       "expected": "mixed_float16"},
      {"testcase_name": "tpu", "devices": {"GPU": [], "TPU": ["tpu:0"]}, "cpu_bf16": False,
       "expected": "mixed_bfloat16"},
      {"testcase_name": "cpu_with_bf16_units", "devices": {"GPU": [], "TPU": []}, "cpu_bf16": True,
       "expected": "mixed_bfloat16"},
      {"testcase_name": "cpu_without_bf16_units", "devices": {"GPU": [], "TPU": []}, "cpu_bf16": False,
       "expected": "float32"},
  )
  def test_auto(self, devices, cpu_bf16, expected):
    with mock.patch.object(tf.config, "list_logical_devices", side_effect=lambda kind: devices[kind]), \
        mock.patch.object(precision, "_cpu_has_bfloat16", return_value=cpu_bf16):
      self.assertEqual(precision.resolve_policy("auto"), expected)

  @parameterized.named_parameters(
      ("zen4_avx512_bf16", "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
      ("sapphire_rapids_amx", "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8", True),
      ("avx512_without_bf16", "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni", False),
      ("avx2_only", "flags\t\t: fpu sse4_2 avx avx2 fma", False),
  )
  def test_cpu_bf16_units_from_cpuinfo_flags(self, cpuinfo, expected):
    with mock.patch("builtins.open", mock.mock_open(read_data=f"processor\t: 0\n{cpuinfo}\n")):
      self.assertEqual(precision._cpu_has_bfloat16(), expected)

  def test_cpu_without_cpuinfo_has_no_bf16_units(self):
    with mock.patch("builtins.open", side_effect=OSError("no /proc")):
      self.assertFalse(precision._cpu_has_bfloat16())

  def test_every_flag_value_resolves(self):
    for value in config_lib.MIXED_PRECISION:
      self.assertIn(precision.resolve_policy(value), ("float32", "mixed_bfloat16", "mixed_float16"))

  def test_unknown_value_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--mixed_precision.*'fp8'"):
      precision.resolve_policy("fp8")


if __name__ == "__main__":
  tf.test.main()
