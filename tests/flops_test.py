"""tf_instdisc.flops: the Fashion-MNIST recipe's training step and ResNet-18 (CIFAR stem) against hand counts;
the first-layer rule, the objectives, two views, unknown layers."""

from tests import testing  # noqa: F401  # First: splits the CPU before TensorFlow starts.

# isort: split

import keras
import tensorflow as tf
from keras import layers

import tf_instdisc
from tf_instdisc import backbones
from tf_instdisc import flops


def _conv_macs(height: int, width: int, kernel: int, c_in: int, c_out: int) -> int:
  """Multiply-adds per image of a 'same' convolution with output height x width."""
  return height * width * kernel * kernel * c_in * c_out


class FlopsTest(tf.test.TestCase):

  def test_fashion_mnist_recipe_step_matches_the_hand_count(self):
    # convnet_small at width 0.5 on 28x28x1 (backbones.build_convnet_small): conv1 3x3 1->16 at 28x28, pool to
    # 14x14, 3x3 16->32 and 32->32, pool to 7x7, 3x3 32->64 and 64->64, pool ('same') to 4x4, 3x3 64->128;
    # pool grid 4 keeps the 4x4x128 map: 2,048 features; projection Dense(2048 -> 128); NCE with K = 4,096.
    model = tf_instdisc.InstanceDiscrimination.from_recipe(tf_instdisc.recipe("fashion_mnist", epochs=1), 60000,
                                                           (28, 28, 1), compiled=False)
    first = _conv_macs(28, 28, 3, 1, 16)  # 112,896
    rest = (_conv_macs(14, 14, 3, 16, 32) + _conv_macs(14, 14, 3, 32, 32) + _conv_macs(7, 7, 3, 32, 64)
            + _conv_macs(7, 7, 3, 64, 64) + _conv_macs(4, 4, 3, 64, 128))
    self.assertEqual(first + rest, 6_711_552)  # The 6.7 M multiply-adds of the backbone's forward.
    projection, dim, negatives = 2048 * 128, 128, 4096
    count = flops.train_step_flops(model)
    self.assertEqual(count.backbone_forward, 2 * (first + rest))
    self.assertEqual(count.backbone_backward, 2 * first + 4 * rest)  # No input gradient for conv1.
    self.assertEqual((count.head_forward, count.head_backward), (2 * projection, 4 * projection))
    self.assertEqual(count.objective_forward, 2 * dim * (negatives + 1))
    self.assertEqual(count.objective_backward, count.objective_forward)  # The bank does not train.
    self.assertEqual(count.total, 43_714_048)  # ~43.7 MFLOP per image, forward and backward.
    self.assertEqual(count.network, count.total - 2 * count.objective_forward)
    self.assertEqual(count.uncounted, ())
    as_dict = count.as_dict()
    self.assertEqual((as_dict["total"], as_dict["uncounted"]), (43_714_048, []))

  def test_resnet18_cifar_forward_is_the_known_count(self):
    backbone = backbones.build_backbone("resnet18_cifar", (32, 32, 3))
    stage1 = 4 * _conv_macs(32, 32, 3, 64, 64)
    later = 0
    for size, c_in, c_out in ((16, 64, 128), (8, 128, 256), (4, 256, 512)):
      later += _conv_macs(size, size, 3, c_in, c_out) + 3 * _conv_macs(size, size, 3, c_out, c_out)
      later += _conv_macs(size, size, 1, c_in, c_out)  # The strided 1x1 projection of the shortcut.
    stem = _conv_macs(32, 32, 3, 3, 64)
    forward, backward, uncounted = flops.network_flops(backbone)
    self.assertEqual(forward, 2 * (stem + stage1 + later))
    self.assertEqual(forward, 1_110_835_200)  # 0.56 G multiply-adds, the usual figure for CIFAR ResNet-18.
    self.assertEqual(backward, 2 * forward - 2 * stem)
    self.assertEqual(uncounted, [])

  def test_input_gradient_only_after_a_trainable_layer(self):
    inputs = keras.Input((8, 8, 2))
    frozen = layers.Conv2D(4, 3, padding="same", use_bias=False, trainable=False)
    x = frozen(inputs)  # Frozen: its forward counts, no gradient at all.
    x = layers.Conv2D(4, 3, padding="same", use_bias=False)(x)  # Weight gradient only.
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)  # Weights and input.
    x = layers.Dense(5, use_bias=False)(x)  # On [B, 8, 8, 4]: 64 positions.
    forward, backward, _ = flops.network_flops(keras.Model(inputs, x))
    frozen_f, conv_f, depthwise_f, dense_f = 2 * 64 * 72, 2 * 64 * 144, 2 * 64 * 36, 2 * 64 * 20
    self.assertEqual(forward, frozen_f + conv_f + depthwise_f + dense_f)
    self.assertEqual(backward, conv_f + 2 * depthwise_f + 2 * dense_f)

  def test_objectives_and_two_views(self):
    encoder = keras.Sequential([keras.Input((4, 4, 1)), layers.Flatten(), layers.Dense(8, use_bias=False)])
    network_forward = 2 * 16 * 8
    head = 2 * 8 * 6
    for objective, forward, backward in (("nce", 2 * 6 * 11, 2 * 6 * 11), ("softmax", 2 * 6 * 50, 2 * 6 * 50),
                                         ("parametric", 2 * 6 * 50, 4 * 6 * 50)):
      with self.subTest(objective):
        model = tf_instdisc.InstanceDiscrimination(encoder, 50, embedding_dim=6, objective=objective,
                                                   num_negatives=10)
        count = flops.train_step_flops(model)
        self.assertEqual((count.objective_forward, count.objective_backward), (forward, backward))
        # The encoder's only layer reads the images: its backward is the weight gradient alone.
        self.assertEqual((count.backbone_forward, count.backbone_backward), (network_forward, network_forward))
        self.assertEqual((count.head_forward, count.head_backward), (head, 2 * head))
    two = flops.train_step_flops(tf_instdisc.InstanceDiscrimination(encoder, 50, embedding_dim=6, num_negatives=10,
                                                                    views=2))
    self.assertEqual(two.backbone_forward, 2 * network_forward)
    self.assertEqual((two.objective_forward, two.objective_backward), (2 * 2 * 6 * 11 + 12, 2 * 2 * 6 * 11 + 24))

  def test_unknown_weighted_layers_are_named_and_free_size_refused(self):
    inputs = keras.Input((4, 4, 3))
    x = layers.EinsumDense("bhwc,cd->bhwd", output_shape=(4, 4, 5), name="einsum")(inputs)
    forward, _, uncounted = flops.network_flops(keras.Model(inputs, layers.BatchNormalization()(x)))
    self.assertEqual((forward, uncounted), (0, ["einsum"]))
    free = backbones.build_backbone("convnet_small", (None, None, 1), width_multiplier=0.5)
    with self.assertRaisesRegex(ValueError, "unknown spatial size"):
      flops.network_flops(free)


if __name__ == "__main__":
  tf.test.main()
