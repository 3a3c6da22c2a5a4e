"""Batch normalization in one fused TensorFlow op: a drop-in keras.layers.BatchNormalization for the backbones.

Keras 3's BatchNormalization casts a mixed-precision layer's input to float32 and normalises it in some ten
element-wise ops per layer (moments, rsqrt, scale, shift, casts) and as many in the backward pass: on a CPU this
was a third of the Fashion-MNIST recipe's step. `BatchNormalization` here computes the same function with
TensorFlow's FusedBatchNormV3 (one op forward, one back; oneDNN on a CPU and cuDNN on a GPU run it in the input's
bfloat16 / float16, with float32 statistics, scale and offset):

  training (`training=True` and the layer trainable): is_training=True, normalised with the batch's mean and
  biased variance; the moving statistics are updated as Keras updates them,
      moving = moving * momentum + batch * (1 - momentum),
  with the biased batch variance. The fused op returns the Bessel-corrected batch variance s^2 = var * n / (n - 1)
  (n = batch x height x width), on CPU, GPU and XLA alike; the layer takes var = s^2 * (n - 1) / n back from it.
  inference: Keras' own arithmetic. A fused inference op orders its float operations otherwise and differed from
  Keras by ~3e-6 relative on a trained backbone's stage outputs: then the exported backbone.keras (stock Keras) would
  not give exactly the features the run computed. Inference is not the training step's cost.

Where the fused op cannot compute what Keras computes, the layer is Keras' own (`super().call`): inputs of a rank
other than 4 or normalised on another axis than the last (NHWC only), a mask, batch renormalisation, float64, a
backend other than TensorFlow, and `synchronized=True` in training with more than one replica in sync (the fused
op sees one replica's batch; Keras all-reduces the statistics over every replica). With one replica the
synchronized statistics are the local ones and the fused op runs.

The class keeps Keras' name and variables (gamma, beta, moving_mean, moving_variance: names, shapes, dtypes), so
tf.train checkpoints and .weights.h5 files (keyed by snake-cased class name) of either layer load into the other.
It serializes as keras.layers.BatchNormalization: a saved .keras file loads with stock Keras (any backend), with
Keras' layer in place of this one, computing the same function.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src import api_export

# The dtypes FusedBatchNormV3 takes for its input (T); its statistics, scale and offset (U) are float32.
_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)


class BatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization computed by one FusedBatchNormV3 op where that computes the same (module doc).

  Same constructor, variables, config and saved form as Keras' layer; only `call` differs.
  """

  def _fused(self, inputs, training: bool, mask) -> bool:
    """Whether the fused op computes what Keras' call would for these arguments (in training only: see the module
    doc)."""
    if (not training or keras.backend.backend() != "tensorflow" or mask is not None or self.renorm
        or inputs.shape.rank != 4 or self.axis not in (-1, 3) or inputs.dtype not in _FUSED_DTYPES):
      return False
    if self.synchronized:
      context = tf.distribute.get_replica_context()  # None in a cross-replica context: Keras' statistics are local.
      return context is None or context.num_replicas_in_sync == 1
    return True

  def call(self, inputs, training=None, mask=None):
    training = bool(training and self.trainable)  # Keras' rule: a frozen layer normalises with its moving statistics.
    inputs = tf.convert_to_tensor(inputs)
    if not self._fused(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
    offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
    moving_mean = tf.cast(self.moving_mean, tf.float32)
    moving_variance = tf.cast(self.moving_variance, tf.float32)
    empty = tf.constant([], tf.float32)  # exponential_avg_factor=1: the op returns the batch's own statistics.
    outputs, mean, corrected, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
    variance = corrected * ((count - 1.0) / tf.maximum(count, 1.0))  # Bessel's correction undone: biased.
    self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)


def _serialize_as_keras_layer() -> None:
  """Saves (.keras, get_config of a model) name keras.layers.BatchNormalization, so the file loads with stock Keras.

  Keras writes a class under its public name when the class is in keras.src.api_export's object -> name table
  (only that direction: loading the name still gives Keras' own class). No public Keras API does this.
  """
  api_export.REGISTERED_OBJS_TO_NAMES[BatchNormalization] = "keras.layers.BatchNormalization"


_serialize_as_keras_layer()
