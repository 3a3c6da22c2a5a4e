"""Keras 3 functional backbones: image [B, H, W, C] float in [0, 255] -> pooled features [B, F].

ResNet-18/50 follow He et al. 2016 (v1.5: stride on the 3x3 conv); `resnet18_cifar` swaps the 7x7/2 stem and
max-pool for one 3x3/1 conv, as the official NPID CIFAR code; `convnet_small` is a fast VGG-style net for CPU runs
on small images. Every builder takes a Keras dtype policy, so mixed precision needs no global state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Iterator

import keras
from keras import layers

_WIDTHS = (64, 128, 256, 512)
_BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1, the official code's.
# Fixed input standardisation: pixels [0, 255] -> roughly zero mean, unit scale, for every dataset alike.
_PIXEL_MEAN, _PIXEL_STD = 127.5, 64.0


@dataclasses.dataclass
class _Build:
  """What every layer of one build shares: the dtype policy, a stream of initializer seeds, BN synchronisation."""

  policy: str
  seeds: Iterator[int]
  sync_batchnorm: bool = False

  @classmethod
  def create(cls, policy: str, seed: int, sync_batchnorm: bool = False) -> _Build:
    # Seeded initializers: the same --seed builds the same network, with no global random state.
    return cls(policy=policy, seeds=itertools.count(seed * 100_003 + 1), sync_batchnorm=sync_batchnorm)

  def he_normal(self) -> keras.initializers.Initializer:
    return keras.initializers.HeNormal(seed=next(self.seeds))


def _conv(filters: int, kernel: int, stride: int, build: _Build, name: str) -> layers.Layer:
  return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, dtype=build.policy,
                       kernel_initializer=build.he_normal(), name=name)


def _bn(build: _Build, name: str) -> layers.Layer:
  return layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=1e-5, dtype=build.policy, name=name,
                                   synchronized=build.sync_batchnorm)


def _conv_bn(x, filters: int, kernel: int, stride: int, build: _Build, name: str, relu: bool = True):
  x = _conv(filters, kernel, stride, build, f"{name}_conv")(x)
  x = _bn(build, f"{name}_bn")(x)
  return layers.ReLU(dtype=build.policy, name=f"{name}_relu")(x) if relu else x


def _shortcut(x, filters: int, stride: int, build: _Build, name: str):
  if stride == 1 and x.shape[-1] == filters:
    return x
  x = _conv(filters, 1, stride, build, f"{name}_proj_conv")(x)
  return _bn(build, f"{name}_proj_bn")(x)


def _residual_out(y, shortcut, build: _Build, name: str):
  added = layers.Add(dtype=build.policy, name=f"{name}_add")([y, shortcut])
  return layers.ReLU(dtype=build.policy, name=f"{name}_out")(added)


def _basic_block(x, filters: int, stride: int, build: _Build, name: str):
  shortcut = _shortcut(x, filters, stride, build, name)
  y = _conv_bn(x, filters, 3, stride, build, f"{name}_1")
  y = _conv_bn(y, filters, 3, 1, build, f"{name}_2", relu=False)
  return _residual_out(y, shortcut, build, name)


def _bottleneck_block(x, filters: int, stride: int, build: _Build, name: str):
  shortcut = _shortcut(x, 4 * filters, stride, build, name)
  y = _conv_bn(x, filters, 1, 1, build, f"{name}_1")
  y = _conv_bn(y, filters, 3, stride, build, f"{name}_2")
  y = _conv_bn(y, 4 * filters, 1, 1, build, f"{name}_3", relu=False)
  return _residual_out(y, shortcut, build, name)


def _standardize(inputs, policy):
  return layers.Rescaling(1.0 / _PIXEL_STD, offset=-_PIXEL_MEAN / _PIXEL_STD, dtype=policy, name="standardize")(inputs)


def build_resnet(input_shape: tuple[int, int, int], *, depths: tuple[int, ...], bottleneck: bool, cifar_stem: bool,
                 policy: str = "float32", seed: int = 0, sync_batchnorm: bool = False,
                 name: str = "resnet") -> keras.Model:
  """A ResNet v1.5 whose output is the global-average-pooled last stage [B, 512] (basic) or [B, 2048].

  Args:
    input_shape: (H, W, C); H and W may be None.
    depths: blocks per stage.
    bottleneck: bottleneck (ResNet-50) or basic (ResNet-18) blocks.
    cifar_stem: a 3x3 stride-1 stem without max-pool instead of 7x7 stride-2 + max-pool.
    policy: a Keras dtype policy name, e.g. "mixed_bfloat16".
    seed: seeds every initializer.
    sync_batchnorm: batch statistics over all replicas (Keras' synchronized BatchNormalization).
    name: the model name.
  """
  build = _Build.create(policy, seed, sync_batchnorm)
  inputs = keras.Input(input_shape, name="images")
  x = _standardize(inputs, policy)
  if cifar_stem:
    x = _conv_bn(x, 64, 3, 1, build, "stem")
  else:
    x = _conv_bn(x, 64, 7, 2, build, "stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", dtype=policy, name="stem_pool")(x)
  block = _bottleneck_block if bottleneck else _basic_block
  for stage, (depth, width) in enumerate(zip(depths, _WIDTHS)):
    for index in range(depth):
      stride = 2 if (stage > 0 and index == 0) else 1
      x = block(x, width, stride, build, f"stage{stage + 1}_block{index + 1}")
  outputs = layers.GlobalAveragePooling2D(dtype=policy, name="pool")(x)
  return keras.Model(inputs, outputs, name=name)


def build_convnet_small(input_shape: tuple[int, int, int], *, policy: str = "float32", seed: int = 0,
                        sync_batchnorm: bool = False, name: str = "convnet_small") -> keras.Model:
  """A VGG-style net for small images on a CPU: 32 -> pool -> 2x64 -> pool -> 2x128 -> pool -> 256 -> GAP."""
  build = _Build.create(policy, seed, sync_batchnorm)
  inputs = keras.Input(input_shape, name="images")
  x = _standardize(inputs, policy)
  x = _conv_bn(x, 32, 3, 1, build, "conv1")
  for stage, (width, repeats) in enumerate(((64, 2), (128, 2), (256, 1)), start=2):
    x = layers.MaxPooling2D(2, padding="same", dtype=policy, name=f"pool{stage}")(x)
    for index in range(repeats):
      x = _conv_bn(x, width, 3, 1, build, f"conv{stage}_{index + 1}")
  outputs = layers.GlobalAveragePooling2D(dtype=policy, name="pool")(x)
  return keras.Model(inputs, outputs, name=name)


BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "resnet18": functools.partial(build_resnet, depths=(2, 2, 2, 2), bottleneck=False, cifar_stem=False,
                                  name="resnet18"),
    "resnet50": functools.partial(build_resnet, depths=(3, 4, 6, 3), bottleneck=True, cifar_stem=False,
                                  name="resnet50"),
    "resnet18_cifar": functools.partial(build_resnet, depths=(2, 2, 2, 2), bottleneck=False, cifar_stem=True,
                                        name="resnet18_cifar"),
    "convnet_small": build_convnet_small,
}


def build_backbone(arch: str, input_shape: tuple[int, int, int], *, policy: str = "float32", seed: int = 0,
                   sync_batchnorm: bool = False) -> keras.Model:
  """Builds BUILDERS[arch] with seeded initializers; raises ValueError naming --arch for an unknown name.

  sync_batchnorm: batch statistics over all replicas of a tf.distribute strategy (no effect on one device).
  """
  if arch not in BUILDERS:
    raise ValueError(f"--arch: unknown architecture {arch!r}, expected one of {', '.join(BUILDERS)}")
  return BUILDERS[arch](input_shape, policy=policy, seed=seed, sync_batchnorm=sync_batchnorm)
