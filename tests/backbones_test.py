"""Backbones: output shapes for every BUILDERS key, parameter counts against torchvision, dtype policies, errors."""

from tests import testing  # noqa: F401  # First: splits the CPU before TensorFlow starts.

# isort: split

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import backbones
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

  def test_unknown_arch_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--arch.*'resnet34'"):
      backbones.build_backbone("resnet34", INPUT_SHAPE)


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


if __name__ == "__main__":
  tf.test.main()
