"""Models from a run's config: the InstanceDiscrimination model (build_model), the embedding alone
(build_embedding_model: backbone -> linear -> D -> L2 normalisation, paper Sec. 3) and the precision policy.

Shapes: B = batch, D = embedding_dim, N = num_instances. Input: float pixels [B, H, W, C] in [0, 255]. Output:
float32 [B, D] with unit L2 norm, whatever the compute precision.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_instdisc import backbones
from tf_instdisc import config as config_lib
from tf_instdisc import instance_discrimination

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


def build_model(cfg: config_lib.Config, *, num_instances: int, input_shape: tuple[int, int, int],
                policy: str | None = None) -> instance_discrimination.InstanceDiscrimination:
  """The run's InstanceDiscrimination model from its config: backbone --arch, head, bank, Z; built, not compiled.

  Args:
    cfg: a validated config.
    num_instances: N, the bank's rows.
    input_shape: (H, W, C).
    policy: the backbone's Keras dtype policy; by default the one --mixed_precision resolves to.
  """
  policy = policy or resolve_policy(cfg.model.mixed_precision)
  encoder = backbones.build_backbone(cfg.model.arch, input_shape, policy=policy, seed=cfg.train.seed,
                                     sync_batchnorm=cfg.model.sync_batchnorm,
                                     width_multiplier=cfg.model.width_multiplier, pool_grid=cfg.model.pool_grid)
  loss = cfg.loss
  model = instance_discrimination.InstanceDiscrimination(
      encoder, num_instances, embedding_dim=cfg.model.embedding_dim, objective=loss.objective,
      num_negatives=loss.num_negatives, temperature=loss.temperature, bank_momentum=cfg.bank.bank_momentum,
      proximal_lambda=cfg.bank.proximal_lambda, negative_sampling=loss.negative_sampling,
      exclude_positive=loss.exclude_positive, normalizer_momentum=loss.normalizer_momentum, views=cfg.augment.views,
      group_clusters=loss.group_clusters, group_weight=loss.group_weight, group_temperature=loss.group_temperature,
      neighbours=loss.neighbours, neighbour_weight=loss.neighbour_weight, head_batchnorm=cfg.model.head_batchnorm,
      head_hidden_dim=cfg.model.head_hidden_dim, sync_batchnorm=cfg.model.sync_batchnorm,
      weight_decay=cfg.optim.weight_decay, bank_dtype=cfg.bank.bank_dtype, seed=cfg.train.seed,
      name=f"{cfg.model.arch.replace('.', '_')}_instance_discrimination")
  if not model.built:
    model.build((None, *input_shape))
  return model


def build_embedding_model(arch: str, input_shape: tuple[int, int, int], *, embedding_dim: int,
                          policy: str = "float32", seed: int = 0, head_batchnorm: bool = False,
                          sync_batchnorm: bool = False, width_multiplier: float = 1.0,
                          head_hidden_dim: int = 0, pool_grid: int = 1) -> keras.Model:
  """Builds backbone -> Dense(embedding_dim) -> L2 normalise (InstanceDiscrimination's layers, without a bank).

  Args:
    arch: a --arch name (backbones.build_backbone).
    input_shape: (H, W, C).
    embedding_dim: D.
    policy: the backbone's Keras dtype policy.
    seed: seeds every initializer: the same seed builds the same weights.
    head_batchnorm: batch-normalise the projection before the L2 norm (not in the paper; see ModelConfig).
    sync_batchnorm: every BatchNormalization takes its statistics over all replicas (ModelConfig).
    width_multiplier: scales the backbone's channels (ModelConfig).
    head_hidden_dim: width of the head's hidden layer (0: none; ModelConfig).
    pool_grid: the backbone's pooling grid (ModelConfig).

  Returns:
    A functional keras.Model, images [B, H, W, C] -> float32 [B, D], unit norm; layers [input, backbone,
    (head_hidden, head_hidden_bn, head_hidden_relu,) projection, (projection_bn,) l2_normalize].
  """
  backbone = backbones.build_backbone(arch, input_shape, policy=policy, seed=seed, sync_batchnorm=sync_batchnorm,
                                      width_multiplier=width_multiplier, pool_grid=pool_grid)
  model = instance_discrimination.InstanceDiscrimination(
      backbone, 1, embedding_dim=embedding_dim, head_batchnorm=head_batchnorm, head_hidden_dim=head_hidden_dim,
      sync_batchnorm=sync_batchnorm, seed=seed)
  return model.embedding_model(input_shape)


def backbone_of(model: keras.Model) -> keras.Model:
  """The backbone sub-model of an embedding model built by `build_embedding_model`."""
  return model.layers[1]
