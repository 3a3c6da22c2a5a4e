"""Backbones: output shapes for every BUILDERS key, parameter counts against torchvision, fused batch norm, the grid
pool (skipped where the map is already the grid), dtype policies, errors;
keras.applications models (--arch=keras.<Name>): shapes, policy, synchronized BN, seeding, names, refusals."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import random

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import backbones
from tf_instdisc import batchnorm
from tf_instdisc import config as config_lib

INPUT_SHAPE = (32, 32, 3)
# Pooled feature width per architecture.
FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "resnet18_cifar": 512, "convnet_small": 256}
# Trainable parameters without any head. torchvision: resnet18 11,689,512 - fc 513,000 = 11,176,512; resnet50
# 25,557,032 - fc 2,049,000 = 23,508,032; the CIFAR stem swaps the 7x7x3x64 conv (9,408) for 3x3x3x64 (1,728).
TRAINABLE_PARAMS = {"resnet18": 11_176_512, "resnet50": 23_508_032, "resnet18_cifar": 11_168_832,
                    "convnet_small": 573_600}
# Keras also counts BatchNorm's moving mean and variance (2 per channel), which torchvision keeps as buffers.
BATCHNORM_STATS = {"resnet18": 9_600, "resnet50": 53_120, "resnet18_cifar": 9_600, "convnet_small": 1_344}


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


class BackbonesTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Building resnet50 takes seconds: build every architecture once for the whole class.
    cls.models = {arch: backbones.build_backbone(arch, INPUT_SHAPE) for arch in backbones.BUILDERS}

  def test_tables_cover_every_builder_and_arch_flag(self):
    self.assertCountEqual(FEATURE_DIMS, backbones.BUILDERS)
    self.assertCountEqual(config_lib.ARCHS, backbones.BUILDERS)

  @parameterized.named_parameters((arch, arch) for arch in FEATURE_DIMS)
  def test_output_shape(self, arch):
    images = np.random.default_rng(0).uniform(0, 255, (2, *INPUT_SHAPE)).astype(np.float32)
    features = self.models[arch](images, training=False)
    self.assertEqual(features.shape, (2, FEATURE_DIMS[arch]))
    self.assertEqual(features.dtype, tf.float32)
    self.assertTrue(np.all(np.isfinite(features.numpy())))

  @parameterized.named_parameters((arch, arch) for arch in TRAINABLE_PARAMS)
  def test_parameter_counts(self, arch):
    model = self.models[arch]
    self.assertEqual(_count(model.trainable_weights), TRAINABLE_PARAMS[arch])
    self.assertEqual(_count(model.non_trainable_weights), BATCHNORM_STATS[arch])
    self.assertEqual(model.count_params(), TRAINABLE_PARAMS[arch] + BATCHNORM_STATS[arch])

  def test_resnet18_layout(self):
    # v1.5: the stride sits on the 3x3 conv; projection shortcuts only where the shape changes.
    model = self.models["resnet18"]
    self.assertEqual(model.get_layer("stage2_block1_1_conv").strides, (2, 2))
    self.assertEqual(model.get_layer("stem_conv").kernel_size, (7, 7))
    projections = sorted(layer.name for layer in model.layers if layer.name.endswith("_proj_conv"))
    self.assertEqual(projections, [f"stage{s}_block1_proj_conv" for s in (2, 3, 4)])

  def test_cifar_stem_keeps_resolution(self):
    model = self.models["resnet18_cifar"]
    self.assertEqual(model.get_layer("stem_conv").strides, (1, 1))
    self.assertEqual(model.get_layer("stem_relu").output.shape, (None, 32, 32, 64))
    self.assertNotIn("stem_pool", [layer.name for layer in model.layers])

  def test_inputs_are_pixels_in_0_255(self):
    # The model standardises [0, 255] itself: constant mid-grey input maps to ~0 after the first layer.
    layer = self.models["convnet_small"].get_layer("standardize")
    self.assertAllClose(layer(np.full([1, 2, 2, 3], 127.5, np.float32)), np.zeros([1, 2, 2, 3]), atol=1e-6)
    self.assertAllClose(layer(np.full([1, 2, 2, 3], 255.0, np.float32)), np.full([1, 2, 2, 3], 127.5 / 64.0))

  @parameterized.named_parameters((arch, arch) for arch in FEATURE_DIMS)
  def test_every_batchnorm_is_the_fused_layer(self, arch):
    norms = [layer for layer in self.models[arch].layers if isinstance(layer, keras.layers.BatchNormalization)]
    self.assertNotEmpty(norms)
    self.assertEqual({type(layer) for layer in norms}, {batchnorm.BatchNormalization})
    self.assertTrue(all(layer.name.endswith("_bn") for layer in norms))  # The names of Keras' layer before it.
    synced = backbones.build_backbone("convnet_small", INPUT_SHAPE, sync_batchnorm=True)
    self.assertTrue(all(layer.synchronized for layer in synced.layers if hasattr(layer, "synchronized")))

  def test_unknown_arch_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--arch.*'resnet34'"):
      backbones.build_backbone("resnet34", INPUT_SHAPE)


class WidthMultiplierTest(tf.test.TestCase, parameterized.TestCase):

  def test_convnet_small_at_half_width(self):
    model = backbones.build_backbone("convnet_small", INPUT_SHAPE, width_multiplier=0.5)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    self.assertEqual([layer.filters for layer in convs], [16, 32, 32, 64, 64, 128])
    # 3x3 kernels, no biases (batch norm follows): 3*16 + 16*32 + 32*32 + 32*64 + 64*64 + 64*128 inputs x outputs,
    # times 9, plus BN's gamma and beta per channel.
    kernels = 9 * (3 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 128)
    self.assertEqual(_count(model.trainable_weights), kernels + 2 * (16 + 32 + 32 + 64 + 64 + 128))
    self.assertEqual(model(np.zeros((2, *INPUT_SHAPE), np.float32)).shape, (2, 128))

  @parameterized.parameters(("resnet18_cifar", 0.5, 256), ("resnet50", 0.25, 512), ("convnet_small", 2.0, 512))
  def test_feature_width_scales(self, arch, multiplier, features):
    model = backbones.build_backbone(arch, INPUT_SHAPE, width_multiplier=multiplier)
    self.assertEqual(model.output.shape[-1], features)

  def test_one_is_the_unscaled_net(self):
    self.assertEqual(backbones.build_backbone("convnet_small", INPUT_SHAPE, width_multiplier=1.0).count_params(),
                     TRAINABLE_PARAMS["convnet_small"] + BATCHNORM_STATS["convnet_small"])

  def test_refusals_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--width_multiplier: must be > 0, got 0"):
      backbones.build_backbone("convnet_small", INPUT_SHAPE, width_multiplier=0.0)
    with self.assertRaisesRegex(ValueError, "--width_multiplier: .*--arch=keras.MobileNetV3Small .*only 1, got 0.5"):
      backbones.build_backbone("keras.MobileNetV3Small", INPUT_SHAPE, width_multiplier=0.5)
    model_cfg = config_lib.ModelConfig(arch="keras.MobileNetV3Small", width_multiplier=0.5)
    with self.assertRaisesRegex(ValueError, "--width_multiplier: .*--arch=keras.MobileNetV3Small .*only 1, got 0.5"):
      config_lib.validate(config_lib.Config(model=model_cfg))
    with self.assertRaisesRegex(ValueError, "--width_multiplier: must be > 0, got -1"):
      config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(width_multiplier=-1.0)))


class PoolGridTest(tf.test.TestCase, parameterized.TestCase):

  def test_grid_features_are_the_cell_means_of_the_last_stage(self):
    model = backbones.build_backbone("convnet_small", INPUT_SHAPE, seed=1, width_multiplier=0.5, pool_grid=2)
    images = np.random.default_rng(0).uniform(0, 255, (3, *INPUT_SHAPE)).astype(np.float32)
    last = keras.Model(model.inputs, model.get_layer("conv4_1_relu").output)(images).numpy()
    self.assertEqual(last.shape, (3, 4, 4, 128))  # 28 -> 14 -> 7 -> 4: the last stage's map.
    cells = last.reshape(3, 2, 2, 2, 2, 128).mean(axis=(2, 4))  # [B, row, column, C]: each 2x2 cell's mean.
    self.assertAllClose(model(images).numpy(), cells.reshape(3, 4 * 128), atol=1e-5)
    self.assertEqual(model.layers[-1].name, "pool")

  def test_grid_one_is_the_global_pool_with_the_same_weights(self):
    pooled = backbones.build_backbone("convnet_small", INPUT_SHAPE, seed=2, pool_grid=1)
    grid = backbones.build_backbone("convnet_small", INPUT_SHAPE, seed=2, pool_grid=4)
    # The grid adds no weights and takes no initializer seeds: the same seed builds the same convolutions.
    self.assertEqual(pooled.count_params(), grid.count_params())
    for a, b in zip(pooled.weights, grid.weights):
      self.assertAllEqual(a.numpy(), b.numpy())
    images = np.random.default_rng(1).uniform(0, 255, (2, *INPUT_SHAPE)).astype(np.float32)
    cells = grid(images).numpy().reshape(2, 16, 256)  # 4x4 cells of the 4x4 map: the map itself.
    self.assertAllClose(cells.mean(axis=1), pooled(images).numpy(), atol=1e-5)

  @parameterized.parameters(("convnet_small", 3, 9 * 256), ("resnet18_cifar", 2, 4 * 512))
  def test_features_scale_with_the_cells(self, arch, grid, features):
    model = backbones.build_backbone(arch, INPUT_SHAPE, pool_grid=grid)
    self.assertEqual(model.output.shape[-1], features)
    self.assertEqual(model(np.zeros((1, *INPUT_SHAPE), np.float32)).shape, (1, features))

  def test_a_free_input_size_pools_to_the_same_grid(self):
    model = backbones.build_backbone("convnet_small", (None, None, 1), pool_grid=2, width_multiplier=0.5)
    for side in (28, 40):
      self.assertEqual(model(np.zeros((1, side, side, 1), np.float32)).shape, (1, 4 * 128))

  def test_a_map_already_on_the_grid_is_not_pooled(self):
    # convnet_small's last stage at 28 x 28 is 4 x 4: --pool_grid=4 is the map itself, flattened. The fixed size
    # skips the pooling (an Identity named "pool_grid"); a free size keeps the adaptive pool (any map -> 4 x 4).
    fixed = backbones.build_backbone("convnet_small", (28, 28, 1), seed=5, width_multiplier=0.5, pool_grid=4)
    free = backbones.build_backbone("convnet_small", (None, None, 1), seed=5, width_multiplier=0.5, pool_grid=4)
    self.assertIsInstance(fixed.get_layer("pool_grid"), keras.layers.Identity)
    self.assertIsInstance(free.get_layer("pool_grid"), keras.layers.AdaptiveAveragePooling2D)
    self.assertEqual([layer.name for layer in fixed.layers], [layer.name for layer in free.layers])
    self.assertEqual(fixed.layers[-1].name, "pool")
    for a, b in zip(fixed.weights, free.weights, strict=True):
      self.assertAllEqual(a.numpy(), b.numpy())
    images = np.random.default_rng(3).uniform(0, 255, (3, 28, 28, 1)).astype(np.float32)
    last = keras.Model(fixed.inputs, fixed.get_layer("conv4_1_relu").output)(images).numpy()
    self.assertEqual(last.shape, (3, 4, 4, 128))
    self.assertAllClose(fixed(images).numpy(), last.reshape(3, -1), atol=1e-6)
    self.assertAllClose(fixed(images).numpy(), free(images).numpy(), atol=1e-5)
    self.assertEqual(free(np.zeros((1, 40, 40, 1), np.float32)).shape, (1, 16 * 128))  # A 5 x 5 map, pooled.
    coarser = backbones.build_backbone("convnet_small", (28, 28, 1), width_multiplier=0.5, pool_grid=2)
    self.assertIsInstance(coarser.get_layer("pool_grid"), keras.layers.AdaptiveAveragePooling2D)

  def test_refusals_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--pool_grid: must be >= 1 .*got 0"):
      backbones.build_backbone("convnet_small", INPUT_SHAPE, pool_grid=0)
    with self.assertRaisesRegex(ValueError, "--pool_grid: .*--arch=keras.MobileNetV3Small .*only 1, got 2"):
      backbones.build_backbone("keras.MobileNetV3Small", INPUT_SHAPE, pool_grid=2)
    with self.assertRaisesRegex(ValueError, "--pool_grid: .*--arch=keras.MobileNetV3Small .*only 1, got 2"):
      config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(arch="keras.MobileNetV3Small",
                                                                         pool_grid=2)))
    with self.assertRaisesRegex(ValueError, "--pool_grid: must be >= 1"):
      config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(pool_grid=-1)))


class SmallInputsAndPolicyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": "gray_square", "input_shape": (16, 16, 1), "images_shape": (3, 16, 16, 1)},
      {"testcase_name": "rgb_non_square", "input_shape": (24, 16, 3), "images_shape": (3, 24, 16, 3)},
      {"testcase_name": "dynamic_size", "input_shape": (None, None, 1), "images_shape": (3, 20, 12, 1)},
  )
  def test_convnet_small_input_shapes(self, input_shape, images_shape):
    model = backbones.build_backbone("convnet_small", input_shape)
    self.assertEqual(model(np.zeros(images_shape, np.float32)).shape, (3, 256))

  @parameterized.named_parameters(
      {"testcase_name": "float32", "policy": "float32", "compute_dtype": tf.float32},
      {"testcase_name": "mixed_bfloat16", "policy": "mixed_bfloat16", "compute_dtype": tf.bfloat16},
  )
  def test_policy(self, policy, compute_dtype):
    model = backbones.build_backbone("convnet_small", (16, 16, 1), policy=policy)
    self.assertEqual(model(np.zeros([2, 16, 16, 1], np.float32)).dtype, compute_dtype)
    self.assertEqual({w.dtype for w in model.weights}, {"float32"})
    self.assertEqual(model.get_layer("conv1_conv").dtype_policy.name, policy)


# --------------------------------------------------------------------------------------------- keras.applications
APP = "keras.MobileNetV3Small"  # The cheapest application to build (0.9M parameters).
APP_FEATURES = {"keras.MobileNetV3Small": 576, "keras.ResNet50": 2048}


def _images(shape, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, (batch, *shape)).astype(np.float32)


def _leaf_layers(model):
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from _leaf_layers(layer)
    else:
      yield layer


def _random_weights(model):
  """The weights drawn from a random initializer (not all one value, as zero biases or BN's ones)."""
  return [w for w in model.get_weights() if np.unique(w).size > 1]


class KerasApplicationsTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.app = backbones.build_backbone(APP, INPUT_SHAPE, seed=0)

  def test_names_match_installed_keras(self):
    names = backbones.keras_application_names()
    self.assertContainsSubset(["keras.ResNet50", "keras.MobileNetV3Small", "keras.EfficientNetB0",
                               "keras.DenseNet121"], names)
    self.assertNotIn("keras.resnet", names)  # A module of keras.applications, not a model.
    # config validates --arch before TensorFlow loads, from its own copy of the list.
    self.assertEqual(config_lib.KERAS_ARCHS, names)
    self.assertEqual(backbones.arch_names(), [*backbones.BUILDERS, *names])

  @parameterized.named_parameters((arch, arch) for arch in APP_FEATURES)
  def test_output_shape(self, arch):
    model = self.app if arch == APP else backbones.build_backbone(arch, INPUT_SHAPE)
    features = model(_images(INPUT_SHAPE), training=False)
    self.assertEqual(features.shape, (2, APP_FEATURES[arch]))
    self.assertEqual(features.dtype, tf.float32)
    self.assertTrue(np.all(np.isfinite(features.numpy())))
    # One flat functional model: pixels in [0, 255] -> the fixed standardisation -> the application.
    self.assertEqual([layer.name for layer in model.layers[:2]], ["images", "standardize"])
    self.assertFalse(any(isinstance(layer, keras.Model) for layer in model.layers))

  def test_standardisation_is_the_only_preprocessing(self):
    # EfficientNet B0-B7 always build Rescaling(1/255) + Normalization: they become identities.
    model = backbones.build_backbone("keras.EfficientNetB0", INPUT_SHAPE)
    preprocessing = [layer.name for layer in model.layers
                     if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))]
    self.assertEqual(preprocessing, ["standardize"])
    self.assertIsInstance(model.get_layer("rescaling"), keras.layers.Identity)
    self.assertEqual(model(_images(INPUT_SHAPE), training=False).shape, (2, 1280))

  def test_policy_without_global_state(self):
    global_policy, random_state = keras.config.dtype_policy().name, random.getstate()
    model = backbones.build_backbone(APP, INPUT_SHAPE, policy="mixed_bfloat16")
    self.assertEqual(keras.config.dtype_policy().name, global_policy)
    self.assertEqual(random.getstate(), random_state)
    convs = [layer for layer in _leaf_layers(model) if isinstance(layer, keras.layers.Conv2D)]
    self.assertGreater(len(convs), 10)
    self.assertEqual({layer.compute_dtype for layer in convs}, {"bfloat16"})
    policies = {layer.dtype_policy.name for layer in _leaf_layers(model)
                if isinstance(layer, keras.layers.Layer) and not isinstance(layer, keras.layers.InputLayer)}
    self.assertEqual(policies, {"mixed_bfloat16"})
    self.assertEqual({w.dtype for w in model.weights}, {"float32"})
    self.assertEqual(model(_images(INPUT_SHAPE), training=False).dtype, tf.bfloat16)

  def test_sync_batchnorm_reaches_every_batchnorm(self):
    def batchnorms(model):
      return [layer for layer in _leaf_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]

    synced = backbones.build_backbone(APP, INPUT_SHAPE, sync_batchnorm=True)
    self.assertGreater(len(batchnorms(synced)), 10)
    self.assertTrue(all(layer.synchronized for layer in batchnorms(synced)))
    self.assertFalse(any(layer.synchronized for layer in batchnorms(self.app)))

  def test_seed_decides_the_weights(self):
    same = backbones.build_backbone(APP, INPUT_SHAPE, seed=0)
    other = backbones.build_backbone(APP, INPUT_SHAPE, seed=1)
    for expected, actual in zip(self.app.get_weights(), same.get_weights(), strict=True):
      self.assertAllEqual(expected, actual)
    drawn = _random_weights(self.app)
    self.assertGreater(len(drawn), 40)  # Every conv kernel, at least.
    for expected, actual in zip(drawn, _random_weights(other), strict=True):
      self.assertNotAllClose(expected, actual)

  def test_every_build_has_the_same_layer_names(self):
    # Keras numbers the layers it names itself process-wide ("add_17"); the builder renumbers them per build, so
    # weights copy by name into a rebuild, here one with a free spatial size (as artifact.write_backbone does).
    portable = backbones.build_backbone(APP, (None, None, 3), seed=1)
    self.assertEqual([layer.name for layer in portable.layers], [layer.name for layer in self.app.layers])
    for layer in portable.layers:
      layer.set_weights(self.app.get_layer(layer.name).get_weights())
    images = _images(INPUT_SHAPE)
    self.assertAllClose(portable(images, training=False), self.app(images, training=False))
    self.assertEqual(portable(_images((48, 40, 3)), training=False).shape, (2, 576))

  def test_one_channel_input(self):
    model = backbones.build_backbone(APP, (32, 32, 1))
    self.assertEqual(model(_images((32, 32, 1)), training=False).shape, (2, 576))
    self.assertEqual(model.get_layer("conv").kernel.shape, (3, 3, 1, 16))

  @parameterized.named_parameters(
      ("unknown_model", "keras.ResNet34"),
      ("module_not_model", "keras.resnet"),
      ("no_prefix", "MobileNetV3Small"),
  )
  def test_unknown_name_lists_the_accepted_ones(self, arch):
    listing = rf"--arch: unknown architecture '{arch}', expected one of resnet18, .*keras\.MobileNetV3Small, "
    with self.assertRaisesRegex(ValueError, listing):
      backbones.build_backbone(arch, INPUT_SHAPE)
    with self.assertRaisesRegex(ValueError, r"--arch: got .*, expected one of resnet18, .*keras\.ResNet50, "):
      config_lib.validate(testing.tiny_config(arch=arch))

  def test_config_accepts_keras_names(self):
    cfg = testing.tiny_config(arch="keras.ResNet50")
    self.assertIs(config_lib.validate(cfg), cfg)

  @parameterized.named_parameters(
      ("below_32", APP, (16, 16, 3), "32x32"),
      ("non_square", APP, (64, 24, 3), "32x32"),
      ("below_75", "keras.InceptionV3", (32, 32, 3), "75x75"),
  )
  def test_too_small_input_names_the_flags(self, arch, input_shape, smallest):
    message = rf"--arch={arch} needs images of at least {smallest} pixels, got input shape .*--image_size"
    with self.assertRaisesRegex(ValueError, message):
      backbones.build_backbone(arch, input_shape)

  def test_nasnet_refuses_a_free_size(self):
    with self.assertRaisesRegex(ValueError, r"--arch=keras\.NASNetMobile needs a fixed image size"):
      backbones.build_backbone("keras.NASNetMobile", (None, None, 3))


if __name__ == "__main__":
  tf.test.main()
