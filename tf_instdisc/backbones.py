"""Keras 3 functional backbones: image [B, H, W, C] float in [0, 255] -> pooled features [B, F].

ResNet-18/50 follow He et al. 2016 (v1.5: stride on the 3x3 conv); `resnet18_cifar` swaps the 7x7/2 stem and
max-pool for one 3x3/1 conv, as the official NPID CIFAR code; `convnet_small` is a fast VGG-style net for CPU runs
on small images. Every builder takes a Keras dtype policy, so mixed precision needs no global state. Their batch
norm is `batchnorm.BatchNormalization`: Keras' layer (same variables, checkpoints, saved form) in one fused op.

`keras.<Name>` is any keras.applications model (keras.ResNet50, keras.MobileNetV3Small, keras.EfficientNetB0, ...),
untrained (weights=None), without its top, global-average-pooled, behind the same fixed input standardisation as
the backbones here (its own built-in preprocessing is switched off or dropped). Keras builds those with the global
dtype policy, unsynchronised BatchNormalization and unseeded initializers, so `build_keras_application` rebuilds
each layer from its config with the requested policy, BN synchronisation and a seed per initializer.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import random
import re
from typing import Any, Callable, Iterator, Sequence

import keras
from keras import layers

from tf_instdisc import batchnorm
from tf_instdisc import config as config_lib

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
  width_multiplier: float = 1.0
  pool_grid: int = 1

  @classmethod
  def create(cls, policy: str, seed: int, sync_batchnorm: bool = False, width_multiplier: float = 1.0,
             pool_grid: int = 1) -> _Build:
    # Seeded initializers: the same --seed builds the same network, with no global random state.
    return cls(policy=policy, seeds=itertools.count(seed * 100_003 + 1), sync_batchnorm=sync_batchnorm,
               width_multiplier=width_multiplier, pool_grid=pool_grid)

  def width(self, channels: int) -> int:
    """A layer's channels at this build's --width_multiplier (at least 1)."""
    return max(1, round(channels * self.width_multiplier))

  def he_normal(self) -> keras.initializers.Initializer:
    return keras.initializers.HeNormal(seed=next(self.seeds))


def _conv(filters: int, kernel: int, stride: int, build: _Build, name: str) -> layers.Layer:
  return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, dtype=build.policy,
                       kernel_initializer=build.he_normal(), name=name)


def _bn(build: _Build, name: str) -> layers.Layer:
  # Keras' BatchNormalization computed by one fused op where that computes the same (tf_instdisc/batchnorm.py).
  return batchnorm.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=1e-5, dtype=build.policy, name=name,
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


def _pool(x, build: _Build):
  """The backbone's output: the last stage's mean over space (pool_grid 1), or over each cell of a G x G grid,
  flattened in (row, column, channel) order (G x G x channels features: where on the image a pattern lies stays
  in them). The grid's cells are adaptive (any input size gives G x G cells), so a backbone saved with its spatial
  size left free still pools to the same G x G; the last layer is named "pool" either way. A fixed input size whose
  last stage is already G x G (convnet_small at 28 x 28, G = 4) has nothing to average: "pool_grid" is then an
  Identity (the same layer names, the same features, no pooling work in the step)."""
  if build.pool_grid == 1:
    return layers.GlobalAveragePooling2D(dtype=build.policy, name="pool")(x)
  grid = (build.pool_grid, build.pool_grid)
  if tuple(x.shape[1:3]) == grid:
    x = layers.Identity(dtype=build.policy, name="pool_grid")(x)
  else:
    x = layers.AdaptiveAveragePooling2D(grid, dtype=build.policy, name="pool_grid")(x)
  return layers.Flatten(dtype=build.policy, name="pool")(x)


def _standardize(inputs, policy):
  return layers.Rescaling(1.0 / _PIXEL_STD, offset=-_PIXEL_MEAN / _PIXEL_STD, dtype=policy, name="standardize")(inputs)


def build_resnet(input_shape: tuple[int, int, int], *, depths: tuple[int, ...], bottleneck: bool, cifar_stem: bool,
                 policy: str = "float32", seed: int = 0, sync_batchnorm: bool = False,
                 width_multiplier: float = 1.0, pool_grid: int = 1, name: str = "resnet") -> keras.Model:
  """A ResNet v1.5 whose output is the global-average-pooled last stage [B, 512] (basic) or [B, 2048].

  Args:
    input_shape: (H, W, C); H and W may be None.
    depths: blocks per stage.
    bottleneck: bottleneck (ResNet-50) or basic (ResNet-18) blocks.
    cifar_stem: a 3x3 stride-1 stem without max-pool instead of 7x7 stride-2 + max-pool.
    policy: a Keras dtype policy name, e.g. "mixed_bfloat16".
    seed: seeds every initializer.
    sync_batchnorm: batch statistics over all replicas (Keras' synchronized BatchNormalization).
    width_multiplier: scales every layer's channels (1: He et al.'s widths).
    pool_grid: G > 1 averages the last stage over a G x G grid and flattens it: G^2 times the features.
    name: the model name.
  """
  build = _Build.create(policy, seed, sync_batchnorm, width_multiplier, pool_grid)
  inputs = keras.Input(input_shape, name="images")
  x = _standardize(inputs, policy)
  if cifar_stem:
    x = _conv_bn(x, build.width(64), 3, 1, build, "stem")
  else:
    x = _conv_bn(x, build.width(64), 7, 2, build, "stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", dtype=policy, name="stem_pool")(x)
  block = _bottleneck_block if bottleneck else _basic_block
  for stage, (depth, width) in enumerate(zip(depths, _WIDTHS)):
    for index in range(depth):
      stride = 2 if (stage > 0 and index == 0) else 1
      x = block(x, build.width(width), stride, build, f"stage{stage + 1}_block{index + 1}")
  outputs = _pool(x, build)
  return keras.Model(inputs, outputs, name=name)


def build_convnet_small(input_shape: tuple[int, int, int], *, policy: str = "float32", seed: int = 0,
                        sync_batchnorm: bool = False, width_multiplier: float = 1.0, pool_grid: int = 1,
                        name: str = "convnet_small") -> keras.Model:
  """A VGG-style net for small images on a CPU: 32 -> pool -> 2x64 -> pool -> 2x128 -> pool -> 256 -> GAP.

  The channels are those times `width_multiplier` (0.5: 16 -> 2x32 -> 2x64 -> 128, about a quarter of the work).
  pool_grid G > 1 averages the last stage (4x4 at 28x28 input) over a G x G grid instead of all of it, flattened.
  """
  build = _Build.create(policy, seed, sync_batchnorm, width_multiplier, pool_grid)
  inputs = keras.Input(input_shape, name="images")
  x = _standardize(inputs, policy)
  x = _conv_bn(x, build.width(32), 3, 1, build, "conv1")
  for stage, (width, repeats) in enumerate(((64, 2), (128, 2), (256, 1)), start=2):
    x = layers.MaxPooling2D(2, padding="same", dtype=policy, name=f"pool{stage}")(x)
    for index in range(repeats):
      x = _conv_bn(x, build.width(width), 3, 1, build, f"conv{stage}_{index + 1}")
  outputs = _pool(x, build)
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


KERAS_PREFIX = "keras."  # --arch=keras.<Name>: keras.applications.<Name>.
_APPLICATION_ARGS = frozenset({"include_top", "weights", "input_shape", "pooling"})
# Fixed preprocessing some applications always build in (EfficientNet B0-B7: Rescaling(1/255) + Normalization).
_PREPROCESSING_LAYERS = (layers.Rescaling, layers.Normalization)
# Keras' NASNet chooses its crops from static shapes: built with a free (None) height or width, it fails when run.
FIXED_SIZE_ONLY = ("keras.NASNetLarge", "keras.NASNetMobile")


@functools.cache
def keras_application_names() -> tuple[str, ...]:
  """Every accepted keras.<Name>: the keras.applications callables taking include_top, weights, input_shape, pooling."""
  names = []
  for name in sorted(dir(keras.applications)):
    constructor = getattr(keras.applications, name)
    if name.startswith("_") or inspect.ismodule(constructor) or not callable(constructor):
      continue
    try:
      parameters = inspect.signature(constructor).parameters
    except (TypeError, ValueError):
      continue
    if _APPLICATION_ARGS <= parameters.keys():
      names.append(KERAS_PREFIX + name)
  return tuple(names)


def arch_names() -> list[str]:
  """Every --arch value: the BUILDERS keys, then keras.<Name> for each keras.applications model."""
  return [*BUILDERS, *keras_application_names()]


def check_arch(arch: str) -> None:
  """Raises ValueError naming --arch and listing every accepted name unless `arch` is one (`arch_names`)."""
  if arch not in BUILDERS and arch not in keras_application_names():
    raise ValueError(f"--arch: unknown architecture {arch!r}, expected one of {', '.join(arch_names())}")


def _seed_initializers(config: dict[str, Any], seeds: Iterator[int]) -> dict[str, Any]:
  """A copy of a layer config with a fresh seed for each unseeded initializer and for an unseeded `seed` argument."""
  config = dict(config)
  for key, value in config.items():
    if key == "seed" and value is None:  # Dropout and other random layers.
      config[key] = next(seeds)
    elif (isinstance(value, dict) and isinstance(value.get("config"), dict) and "seed" in value["config"]
          and value["config"]["seed"] is None):  # A serialized random initializer.
      config[key] = dict(value, config=dict(value["config"], seed=next(seeds)))
  return config


def _snake_case(class_name: str) -> str:
  """Keras' auto-name prefix of a class (keras.src.utils.naming.to_snake_case): "ReLU" -> "re_lu"."""
  name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", class_name))
  return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _input_shape_error(arch: str, input_shape: Sequence[int | None], error: ValueError) -> ValueError:
  match = re.search(r"at least (\d+)x(\d+)", str(error))
  if match:
    return ValueError(f"--arch={arch} needs images of at least {match[1]}x{match[2]} pixels, got input shape "
                      f"{tuple(input_shape)}: raise --image_size (or pick another --arch)")
  return ValueError(f"--arch={arch}: keras.applications refuses input shape {tuple(input_shape)} (--image_size, "
                    f"image channels): {error}")


def build_keras_application(arch: str, input_shape: tuple[int, int, int], *, policy: str = "float32", seed: int = 0,
                            sync_batchnorm: bool = False) -> keras.Model:
  """keras.applications.<Name> for arch="keras.<Name>": untrained, no top, average-pooled, [0, 255] pixels in.

  The application is first built as Keras builds it (a template, global dtype policy, unseeded initializers, own
  BatchNormalization), then cloned layer by layer from its config (`keras.models.clone_model`) with `policy`, BN
  `synchronized=sync_batchnorm` and seeded initializers, behind `_standardize`; the template's weights are dropped.
  The application's own preprocessing is switched off (include_preprocessing=False) where its constructor allows;
  a leading run of Rescaling / Normalization layers it always builds is replaced by identities, so the fixed
  standardisation here is the only one, as for every other backbone.

  Seeding: the clone gives every unseeded initializer (and the `seed` of random layers such as Dropout) the next
  seed of the same per-build stream the other backbones use, so the same seed builds the same weights whatever the
  global random state, and none is left changed (the template's unseeded initializers draw their seeds from
  Python's `random`, whose state is restored afterwards).

  Args:
    arch: "keras.<Name>", one of `keras_application_names()`.
    input_shape: (H, W, C); H and W may be None.
    policy: a Keras dtype policy name, e.g. "mixed_bfloat16".
    seed: seeds every initializer.
    sync_batchnorm: batch statistics over all replicas (Keras' synchronized BatchNormalization).

  Raises:
    ValueError: naming --arch (and --image_size) when Keras refuses the input shape, e.g. below its minimum size,
      or a free height or width for NASNet.
  """
  check_arch(arch)
  if arch in FIXED_SIZE_ONLY and None in tuple(input_shape)[:2]:
    raise ValueError(f"--arch={arch} needs a fixed image size, got input shape {tuple(input_shape)}: Keras' NASNet "
                     "picks its crops from static shapes and fails when run on a free (None) height or width")
  constructor = getattr(keras.applications, arch[len(KERAS_PREFIX):])
  kwargs = dict(include_top=False, weights=None, input_shape=tuple(input_shape), pooling="avg")
  if "include_preprocessing" in inspect.signature(constructor).parameters:
    kwargs["include_preprocessing"] = False
  random_state = random.getstate()
  try:
    template = constructor(**kwargs)
  except ValueError as e:
    raise _input_shape_error(arch, input_shape, e) from e
  finally:
    random.setstate(random_state)

  preprocessing = set()
  for layer in template.layers[1:]:  # layers[0] is the InputLayer; the rest are in graph order.
    if not isinstance(layer, _PREPROCESSING_LAYERS):
      break
    preprocessing.add(id(layer))
  build = _Build.create(policy, seed, sync_batchnorm)
  auto_names = collections.Counter()

  def stable_name(layer: keras.Operation) -> str:
    # Layers Keras named itself ("add_17") carry a process-wide counter: renumber them within this build, so every
    # build of an arch has the same layer names (weights copied by name, layers tapped by name).
    prefix = _snake_case(type(layer).__name__)
    if not re.fullmatch(rf"{re.escape(prefix)}(_\d+)?", layer.name):
      return layer.name
    index = auto_names[prefix]
    auto_names[prefix] += 1
    return f"{prefix}_{index}" if index else prefix

  def clone_layer(layer: keras.Operation) -> keras.Operation:
    if id(layer) in preprocessing:
      return layers.Identity(dtype=policy, name=stable_name(layer))
    config = _seed_initializers(layer.get_config(), build.seeds)
    config["name"] = stable_name(layer)
    if isinstance(layer, layers.Layer):  # Not the graph's bare ops (x + y is keras.ops.Add): they take no dtype.
      config["dtype"] = policy
    if isinstance(layer, layers.BatchNormalization):
      config["synchronized"] = sync_batchnorm
    return layer.__class__.from_config(config)

  inputs = keras.Input(input_shape, name="images")
  standardized = _standardize(inputs, policy)

  def call_layer(layer: keras.Operation, *args, **kwargs):
    # The template's first layers read the images: they read the standardised images instead.
    args, kwargs = keras.tree.map_structure(lambda value: standardized if value is inputs else value, (args, kwargs))
    return layer(*args, **kwargs)

  clone = keras.models.clone_model(template, input_tensors=inputs, clone_function=clone_layer,
                                   call_function=call_layer, recursive=True)
  return keras.Model(inputs, clone.output, name=arch.replace(".", "_"))


def build_backbone(arch: str, input_shape: tuple[int, int, int], *, policy: str = "float32", seed: int = 0,
                   sync_batchnorm: bool = False, width_multiplier: float = 1.0, pool_grid: int = 1) -> keras.Model:
  """Builds BUILDERS[arch], or a keras.applications model for arch="keras.<Name>", with seeded initializers.

  Args:
    arch: a BUILDERS key or "keras.<Name>" (`arch_names()` lists them all).
    input_shape: (H, W, C); H and W may be None.
    policy: a Keras dtype policy name, e.g. "mixed_bfloat16".
    seed: seeds every initializer: the same seed builds the same weights.
    sync_batchnorm: batch statistics over all replicas of a tf.distribute strategy (no effect on one device).
    width_multiplier: scales the channels of every layer of our own archs (BUILDERS); keras.<Name> models have
      their own widths and take only 1.
    pool_grid: 1 pools our own archs' last stage globally (the paper); G > 1 over a G x G grid, flattened (their
      pooling is ours to choose; keras.<Name> models pool globally and take only 1).

  Raises:
    ValueError: naming --arch for an unknown name (listing the accepted ones), or an input shape too small for a
      keras.applications model; naming --width_multiplier for a keras.<Name> arch with a multiplier other than 1,
      or --pool_grid for a grid < 1 or a keras.<Name> arch with a grid other than 1.
  """
  check_arch(arch)
  config_lib.check_width_multiplier(arch, width_multiplier)
  config_lib.check_pool_grid(arch, pool_grid)
  if arch.startswith(KERAS_PREFIX):
    return build_keras_application(arch, input_shape, policy=policy, seed=seed, sync_batchnorm=sync_batchnorm)
  return BUILDERS[arch](input_shape, policy=policy, seed=seed, sync_batchnorm=sync_batchnorm,
                        width_multiplier=width_multiplier, pool_grid=pool_grid)

