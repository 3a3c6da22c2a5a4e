"""Frozen features of a trained run: the 128-d embedding, the pooled backbone features before the projection head,
and the backbone's intermediate stages (paper Tables 2, 3); optionally the eval view's raw pixels.

Stages are named as the paper names AlexNet's and ResNet's layers: conv1 is the stem, conv2..conv5 the four
residual stages (ResNets), conv2..conv4 the three pooled stages of convnet_small. Each stage's feature map is
average-pooled on a grid chosen so the flattened feature has at most `max_dims` values (about 10k, as the paper
pools AlexNet's layers), then flattened. Shapes: B = batch, D = embedding_dim, F = a stage's pooled size.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import checkpointing
from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import knn
from tf_instdisc import model as model_lib

EMBEDDING = "embedding"
BACKBONE = "backbone"  # The backbone's pooled output, the projection head's input (not L2-normalised here).
PIXELS = "pixels"  # The eval view's pixels, flattened (`extract(..., pixels=True)`; not a layer).
DEFAULT_MAX_DIMS = 10_000


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A train.py model dir restored for evaluation: its config, its model (float32) and where it came from."""

  cfg: config_lib.Config
  model: keras.Model
  input_shape: tuple[int, int, int]
  checkpoint: str
  step: int


def load_run(model_dir: str, *, untrained: bool = False) -> TrainedRun:
  """Builds the run's model from its config.json and restores the latest checkpoint (float32 compute).

  Args:
    model_dir: a train.py --model_dir.
    untrained: keep the seeded initial weights instead of restoring (the "random network" baseline: the same
      architecture and seed, never trained).

  Raises:
    ValueError: naming --model_dir, its config or checkpoint.
  """
  cfg = checkpointing.read_config(model_dir)
  source = data_lib.load_source(dataclasses.replace(cfg.data, max_train_examples=1, max_eval_examples=1,
                                                    validation_examples=0))
  size = data_lib.resolve_image_size(source, cfg.data.image_size)
  input_shape = (size, size, source.image_shape[2])
  # The whole InstanceDiscrimination model (its bank too: the checkpoint's layout), in float32 and without
  # cross-replica batch norm; evaluation and export use its embedding layers only.
  cfg_float32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sync_batchnorm=False))
  num_instances = 1 if untrained else int(checkpointing.read_run_identity(model_dir)["num_instances"])
  model = model_lib.build_model(cfg_float32, num_instances=num_instances, input_shape=input_shape, policy="float32")
  if untrained:
    return TrainedRun(cfg, model.embedding_model(input_shape), input_shape, checkpoint="untrained", step=0)
  checkpoint, step = checkpointing.restore_model(model, model_dir)
  return TrainedRun(cfg, model.embedding_model(input_shape), input_shape, checkpoint=checkpoint, step=step)


def stage_layers(backbone: keras.Model) -> dict[str, str]:
  """Paper stage name -> the backbone layer whose output is that stage's feature map, in network order."""
  names = [layer.name for layer in backbone.layers]
  if "stem_relu" in names:  # ResNets: the stem, then the last block output of each stage.
    stages = {"conv1": "stem_pool" if "stem_pool" in names else "stem_relu"}
    for stage in range(1, 5):
      outs = [n for n in names if re.fullmatch(rf"stage{stage}_block\d+_out", n)]
      if outs:
        stages[f"conv{stage + 1}"] = outs[-1]
    return stages
  stages = {}  # convnet_small: the last ReLU of each conv group convK_*.
  for name in names:
    match = re.fullmatch(r"conv(\d+)(?:_\d+)?_relu", name)
    if match:
      stages[f"conv{match.group(1)}"] = name
  if not stages:
    raise ValueError(f"no known stage layers in backbone {backbone.name}")
  return stages


def layer_names(model: keras.Model) -> list[str]:
  """Every layer `build_extractor` can tap, in network order: the stages, then "embedding"."""
  return [*stage_layers(model_lib.backbone_of(model)), EMBEDDING]


def pool_stride(height: int, width: int, channels: int, max_dims: int) -> int:
  """The smallest pooling stride s with ceil(H/s) * ceil(W/s) * C <= max_dims (s = max(H, W): global pooling)."""
  for stride in range(1, max(height, width) + 1):
    if math.ceil(height / stride) * math.ceil(width / stride) * channels <= max_dims:
      return stride
  return max(height, width)


def build_extractor(model: keras.Model, layers: list[str], *, max_dims: int = DEFAULT_MAX_DIMS) -> keras.Model:
  """A model images [B, H, W, C] -> {layer: float32 [B, F]} for the named layers (`layer_names`, or "backbone").

  Stages are average-pooled (stride from `pool_stride`) and flattened; "backbone" is the backbone's pooled output
  (the projection head's input); "embedding" is the model's output. The layers are the trained model's own (shared
  weights), run in inference mode.

  Raises:
    ValueError: naming --layers when a layer is unknown.
  """
  backbone = model_lib.backbone_of(model)
  stages = stage_layers(backbone)
  unknown = [name for name in layers if name not in stages and name not in (EMBEDDING, BACKBONE)]
  if unknown:
    raise ValueError(f"--layers: unknown {', '.join(unknown)}; this model has {', '.join(layer_names(model))} "
                     f"and {BACKBONE} (the pooled backbone output)")
  stage_names = [name for name in layers if name in stages]
  taps = [backbone.get_layer(stages[name]).output for name in stage_names]
  tapped = keras.Model(backbone.inputs, [*taps, backbone.outputs[0]], name="stage_taps")
  inputs = keras.Input(model.input_shape[1:], name="images")
  *maps, pooled = tapped(inputs)
  features = {BACKBONE: pooled}
  for name, feature_map in zip(stage_names, maps):
    height, width, channels = feature_map.shape[1:]
    stride = pool_stride(height, width, channels, max_dims)
    x = keras.layers.AveragePooling2D(stride, strides=stride, padding="same", name=f"{name}_pool")(feature_map)
    features[name] = keras.layers.Flatten(name=f"{name}_flat")(x)
  if EMBEDDING in layers:
    x = pooled
    for layer in model.layers[2:]:  # The head after the backbone: (hidden layer,) projection (+ BN), L2 norm.
      x = layer(x)
    features[EMBEDDING] = x
  return keras.Model(inputs, {name: features[name] for name in layers}, name="feature_extractor")


def adapt_images(images: tf.Tensor, input_shape: tuple[int, int, int]) -> tf.Tensor:
  """Resizes images [B, h, w, c] to the model's (H, W) and converts grayscale <-> RGB (transfer to a dataset of
  another size or colour); the identity when they already match."""
  height, width, channels = input_shape
  if tuple(images.shape[1:3]) != (height, width):
    images = tf.image.resize(images, (height, width), antialias=True)
  if images.shape[-1] != channels:
    images = tf.image.rgb_to_grayscale(images) if channels == 1 else tf.image.grayscale_to_rgb(images)
  return images


def extract(extractor: keras.Model, split: data_lib.Split, augment_cfg: config_lib.AugmentConfig, *,
            image_size: int, batch_size: int, pixels: bool = False, log_every_seconds: float = 30.0
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features {layer: float32 [M, F]} and labels int64 [M] of a split's clean views, in order, with progress.

  image_size is the eval view's side (the split's images); they are adapted to the extractor's input. With
  `pixels`, the same pass also returns "pixels": the eval views as they come, flattened, float32 [M, S * S * C]
  in [0, 255] (M x S*S*C values in memory: the caller decides whether that fits).
  """
  input_shape = tuple(extractor.input_shape[1:])
  dataset = data_lib.make_eval_dataset(split, augment_cfg, image_size=image_size, batch_size=batch_size)
  spec = tf.TensorSpec([None, *dataset.element_spec[data_lib.IMAGE_KEY].shape[1:]], tf.float32)
  run = tf.function(lambda images: extractor(adapt_images(images, input_shape), training=False),
                    input_signature=[spec])  # One trace for every batch, the short last one too.
  outputs: dict[str, list[np.ndarray]] = {}
  labels = []
  tracker = knn.Progress(split.num_examples, log_every_seconds, what="images (features)")
  for batch in dataset:
    images = batch[data_lib.IMAGE_KEY]
    for name, value in run(images).items():
      outputs.setdefault(name, []).append(value.numpy())
    if pixels:
      outputs.setdefault(PIXELS, []).append(np.reshape(images.numpy(), [len(images), -1]))
    labels.append(batch[data_lib.LABEL_KEY].numpy())
    tracker.update(len(labels[-1]))
  logging.info("extracted %s features of %d images", ", ".join(outputs), split.num_examples)
  return {name: np.concatenate(values) for name, values in outputs.items()}, np.concatenate(labels)
