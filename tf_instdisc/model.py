"""Models from a run's config: the InstanceDiscrimination model (build_model), the embedding alone
(build_embedding_model: backbone -> linear -> D -> L2 normalisation, paper Sec. 3).

Shapes: B = batch, D = embedding_dim, N = num_instances. Input: float pixels [B, H, W, C] in [0, 255]. Output:
float32 [B, D] with unit L2 norm, whatever the compute precision.
"""

from __future__ import annotations

import keras

from tf_instdisc import backbones
from tf_instdisc import config as config_lib
from tf_instdisc import instance_discrimination

EMBEDDING_KEY = "embedding"
def build_model(cfg: config_lib.Config, *, num_instances: int, input_shape: tuple[int, int, int],
                policy: str | None = None) -> instance_discrimination.InstanceDiscrimination:
  """The run's InstanceDiscrimination model from its config (`InstanceDiscrimination.from_recipe`), built, not
  compiled."""
  return instance_discrimination.InstanceDiscrimination.from_recipe(cfg, num_instances, input_shape, policy=policy,
                                                                     compiled=False)


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
