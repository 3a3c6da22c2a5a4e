"""The embedding model (paper Sec. 3): backbone -> linear -> D -> L2 normalisation, and the parametric baseline.

Shapes: B = batch, D = embedding_dim, N = num_instances. Input: float pixels [B, H, W, C] in [0, 255]. Output:
float32 [B, D] with unit L2 norm, whatever the compute precision.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from tf_instdisc import backbones

EMBEDDING_KEY = "embedding"
_POLICIES = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def _cpu_has_bfloat16() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_policy(mixed_precision: str) -> str:
  """The Keras dtype policy for --mixed_precision.

  auto: float16 on a GPU; bfloat16 on a TPU or a CPU with bfloat16 units (AVX512-BF16 or AMX); else float32,
  because emulated bfloat16 was 3-4x slower than float32 on a CPU without them (measured on our machines).
  """
  if mixed_precision == "auto":
    if tf.config.list_logical_devices("GPU"):
      return "mixed_float16"
    has_bf16 = tf.config.list_logical_devices("TPU") or _cpu_has_bfloat16()
    return "mixed_bfloat16" if has_bf16 else "float32"
  if mixed_precision not in _POLICIES:
    raise ValueError(f"--mixed_precision: got {mixed_precision!r}, expected off, auto, bfloat16 or float16")
  return _POLICIES[mixed_precision]


def build_embedding_model(arch: str, input_shape: tuple[int, int, int], *, embedding_dim: int,
                          policy: str = "float32", seed: int = 0, head_batchnorm: bool = False,
                          sync_batchnorm: bool = False) -> keras.Model:
  """Builds backbone -> Dense(embedding_dim) -> L2 normalise; the head and its output are float32.

  Args:
    arch: a key of backbones.BUILDERS.
    input_shape: (H, W, C).
    embedding_dim: D.
    policy: the backbone's Keras dtype policy.
    seed: seeds every initializer: the same seed builds the same weights.
    head_batchnorm: batch-normalise the projection before the L2 norm (not in the paper; see ModelConfig).
    sync_batchnorm: every BatchNormalization takes its statistics over all replicas (ModelConfig).

  Returns:
    A functional keras.Model, images [B, H, W, C] -> float32 [B, D], unit norm.
  """
  backbone = backbones.build_backbone(arch, input_shape, policy=policy, seed=seed, sync_batchnorm=sync_batchnorm)
  inputs = keras.Input(input_shape, name="images")
  pooled = backbone(inputs)
  # float32 head: the dot products with the bank and the temperature-scaled logits need the full mantissa.
  projected = layers.Dense(embedding_dim, dtype="float32", name="projection",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(pooled)
  if head_batchnorm:
    projected = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="float32", name="projection_bn",
                                          synchronized=sync_batchnorm)(projected)
  embeddings = layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalize")(projected)
  return keras.Model(inputs, embeddings, name=f"{arch}_embedding")


def backbone_of(model: keras.Model) -> keras.Model:
  """The backbone sub-model of an embedding model built by `build_embedding_model`."""
  return model.layers[1]


def build_instance_classifier(num_instances: int, embedding_dim: int, *, seed: int = 0) -> layers.Dense:
  """The parametric baseline's classifier: one trainable weight vector w_i per instance (paper Eq. 1).

  Returns:
    A built Dense layer without bias mapping features [B, D] -> logits [B, N].
  """
  classifier = layers.Dense(num_instances, use_bias=False, dtype="float32", name="instance_classifier",
                            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed))
  classifier.build((None, embedding_dim))
  return classifier
