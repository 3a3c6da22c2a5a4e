"""FLOPs of one training step per image, counted analytically from an InstanceDiscrimination model's layers.

Convention (`train_step_flops`; bench/train_step_bench.py divides measured GFLOP/s by a measured matmul peak):

- Only multiply-adds of convolutions and matrix products count, 2 FLOPs each (one multiply, one add), as a
  matmul peak counts them. Elementwise work (batch norm, ReLU, pooling, biases, the L2 normalisation, exp and log of
  the loss, the optimizer update, weight decay, the bank write) is not counted: it is memory-bound, a few percent
  of the FLOPs, and no matmul peak describes it.
- Forward, per image: Conv (1D/2D/3D, depthwise): 2 * output positions * kernel size (H_out * W_out * K_h * K_w *
  C_in / groups * C_out for Conv2D); separable: its depthwise and pointwise kernels alike; transposed: 2 * input
  positions * kernel size; Dense: 2 * positions * in * out (positions = 1 on [B, F] features).
- Backward of a layer with weights: the weight gradient costs as much as the forward; the input gradient as much
  again, unless nothing before the layer has trainable weights (the first conv of a backbone: TensorFlow prunes
  the unused gradient of the images), so backward = 2x forward, 1x for the first layer.
- The objective, per image and view: NCE compares the feature [D] with its own bank row and K noise rows,
  2 * D * (K + 1) forward; softmax with all N rows, 2 * D * N; parametric is a Dense(D -> N) classifier,
  2 * D * N. The bank is not trainable, so the backward of NCE and softmax is the features' gradient only, 1x
  forward; the parametric classifier's is 2x (its weights train). Two views add their f . f' (2 * D forward,
  4 * D backward per image); neighbours M rows per view (2 * D * M forward, as much backward).
- Per image = per example of the batch: with two views every example runs the network twice and counts twice.
  Not counted: the group term's k-means (`group_clusters`); layers with trainable weights this module does not know
  are named in `StepFlops.uncounted`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
from keras import layers

CONVENTION = ("multiply-adds of convolutions and matmuls x 2 per image (elementwise ops not counted); backward = "
              "2x forward for layers with weights (1x for the first layer, which needs no input gradient); NCE / "
              "softmax against the non-trainable bank: 2*D*(K+1) / 2*D*N forward, 1x that backward; parametric "
              "2*D*N forward, 2x backward")
_CONVS = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv1D, layers.DepthwiseConv2D)
_TRANSPOSED = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
_SEPARABLE = (layers.SeparableConv1D, layers.SeparableConv2D)
# Layers whose trainable weights only scale and shift (elementwise): known, not counted.
_ELEMENTWISE = (layers.BatchNormalization, layers.LayerNormalization, layers.GroupNormalization,
                layers.UnitNormalization, layers.Normalization, layers.PReLU)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs per image of one training step, by part (see the module docstring for the convention)."""

  backbone_forward: int
  backbone_backward: int
  head_forward: int
  head_backward: int
  objective_forward: int
  objective_backward: int
  uncounted: tuple[str, ...] = ()

  @property
  def forward(self) -> int:
    return self.backbone_forward + self.head_forward + self.objective_forward

  @property
  def backward(self) -> int:
    return self.backbone_backward + self.head_backward + self.objective_backward

  @property
  def total(self) -> int:
    """Forward + backward of the whole step."""
    return self.forward + self.backward

  @property
  def network(self) -> int:
    """Forward + backward of backbone and head only: what an encoder-only step (no bank, no objective) costs."""
    return self.backbone_forward + self.backbone_backward + self.head_forward + self.head_backward

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "uncounted": list(self.uncounted), "forward": self.forward,
            "backward": self.backward, "total": self.total, "network": self.network}


def _positions(shape, data_format: str, name: str) -> int:
  """Product of the spatial dims of a [B, ..., C] (or [B, C, ...]) shape; raises ValueError when one is unknown."""
  spatial = shape[1:-1] if data_format == "channels_last" else shape[2:]
  if any(d is None for d in spatial):
    raise ValueError(f"flops: layer {name!r} has an unknown spatial size {tuple(shape)}: build the model with a "
                     "fixed input shape")
  return math.prod(spatial)


def _size(weight) -> int:
  return math.prod(weight.shape)


def layer_forward_flops(layer: keras.layers.Layer) -> int | None:
  """Forward FLOPs per image of one called layer of a functional model; 0 for layers counted as free (no weights
  or elementwise ones), None for a layer with weights this module does not know."""
  if isinstance(layer, _SEPARABLE):
    out = _positions(layer.output.shape, layer.data_format, layer.name)
    return 2 * out * (_size(layer.depthwise_kernel) + _size(layer.pointwise_kernel))
  if isinstance(layer, _CONVS):
    return 2 * _positions(layer.output.shape, layer.data_format, layer.name) * _size(layer.kernel)
  if isinstance(layer, _TRANSPOSED):
    return 2 * _positions(layer.input.shape, layer.data_format, layer.name) * _size(layer.kernel)
  if isinstance(layer, layers.Dense):
    return 2 * _positions(layer.input.shape, "channels_last", layer.name) * _size(layer.kernel)
  if not layer.weights or isinstance(layer, _ELEMENTWISE):
    return 0
  return None


def network_flops(model: keras.Model, *, inputs_need_gradient: bool = False) -> tuple[int, int, list[str]]:
  """(forward, backward, uncounted layer names) per image of a functional model (nested models included).

  Layers are visited in model.layers order (topological for functional models); each is counted at one call.
  A layer needs its input gradient when a tensor it reads depends on trainable weights (or on the model's inputs
  when inputs_need_gradient).
  """
  no_gradient = set() if inputs_need_gradient else {id(t) for t in keras.tree.flatten(model.inputs)}
  forward = backward = 0
  uncounted = []
  for layer in model.layers:
    if isinstance(layer, layers.InputLayer):
      continue
    needs_input_gradient = any(id(t) not in no_gradient for t in keras.tree.flatten(layer.input))
    if isinstance(layer, keras.Model):
      sub_forward, sub_backward, sub_uncounted = network_flops(layer, inputs_need_gradient=needs_input_gradient)
      forward, backward = forward + sub_forward, backward + sub_backward
      uncounted += [f"{layer.name}/{name}" for name in sub_uncounted]
    else:
      flops = layer_forward_flops(layer)
      if flops is None:
        uncounted.append(layer.name)
      else:  # Gradients: of its weights if they train, of its input if anything before it trains.
        forward += flops
        backward += flops * (bool(layer.trainable_weights) + needs_input_gradient)
    if not needs_input_gradient and not layer.trainable_weights:
      no_gradient.update(id(t) for t in keras.tree.flatten(layer.output))
  return forward, backward, uncounted


def _dense_flops(layer: keras.layers.Layer | None) -> int:
  return 0 if layer is None else 2 * _size(layer.kernel)


def train_step_flops(model) -> StepFlops:
  """FLOPs per image of InstanceDiscrimination.train_step for `model` (built, with a functional encoder built
  at a fixed input shape): its backbone, head (hidden layer, projection) and objective; the convention is the
  module docstring's.

  Raises:
    ValueError: when a layer's spatial size is unknown (an encoder built with a free height or width).
  """
  views = model.views
  encoder_forward, encoder_backward, uncounted = network_flops(model.encoder)
  # The head's input gradient is needed whenever the encoder trains.
  head_factor = 2 if model.encoder.trainable_weights else 1
  head = _dense_flops(model.head_hidden) + _dense_flops(model.projection)
  cfg, dim = model.loss_config, model.embedding_dim
  if cfg.objective == "nce":
    objective_forward = 2 * dim * (cfg.num_negatives + 1) + 2 * dim * cfg.neighbours
    objective_backward = objective_forward
  elif cfg.objective == "softmax":
    objective_forward = objective_backward = 2 * dim * model.num_instances
  else:
    objective_forward, objective_backward = 2 * dim * model.num_instances, 4 * dim * model.num_instances
  objective_forward, objective_backward = views * objective_forward, views * objective_backward
  if views == 2:  # f . f' per example, both factors need their gradient.
    objective_forward, objective_backward = objective_forward + 2 * dim, objective_backward + 4 * dim
  if cfg.group_clusters:
    uncounted.append("group term (k-means)")
  return StepFlops(backbone_forward=views * encoder_forward, backbone_backward=views * encoder_backward,
                   head_forward=views * head, head_backward=views * head * head_factor,
                   objective_forward=objective_forward, objective_backward=objective_backward,
                   uncounted=tuple(uncounted))
