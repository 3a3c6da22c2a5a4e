"""The memory bank V [N, D] of every instance's last feature and the NCE normaliser Z (paper Sec. 3.1-3.2).

Shapes: B = rows per call, N = num_instances, D = embedding_dim, K = num_negatives. The bank is stored in float32
(default), or in bfloat16 / float16 to halve its memory (1.28M x 128: 656 MB -> 328 MB); reads return float32 and
updates are computed in float32, then rounded once on the write. Z is float32. Create the bank inside
`strategy.scope()`: every replica then holds a copy, and the train step keeps them identical by applying the same
all-gathered update on each (docs/design.md).

The bank is a Keras layer, so a keras.Model that owns it (InstanceDiscrimination) saves it in `.keras` files and
in tf.train checkpoints alike; `bank` and `normalizer` are the underlying tf.Variables (mirrored under a strategy).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_instdisc import distribute

UNSET_NORMALIZER = -1.0


def random_unit_rows(num_rows: int, dim: int, *, seed: int) -> tf.Tensor:
  """[num_rows, dim] float32 rows drawn from a seeded normal and L2-normalised: one draw, same on every host."""
  rows = tf.random.stateless_normal([num_rows, dim], seed=[seed, 0x5EED], dtype=tf.float32)
  return tf.math.l2_normalize(rows, axis=1)


class MemoryBank(keras.layers.Layer):
  """Owns the bank variable and the normaliser Z; both are saved through this layer."""

  def __init__(self, num_instances: int, embedding_dim: int, *, seed: int = 0, dtype: str = "float32",
               name: str = "memory_bank", **kwargs):
    super().__init__(name=name, dtype="float32", **kwargs)
    self.num_instances = num_instances
    self.embedding_dim = embedding_dim
    self.seed = seed
    self.storage_dtype = tf.as_dtype(dtype)
    # aggregation NONE + ON_WRITE: every replica owns a copy and updates it itself, in place (docs/design.md).
    self.rows = keras.Variable(
        tf.cast(random_unit_rows(num_instances, embedding_dim, seed=seed), self.storage_dtype), trainable=False,
        name="bank", autocast=False, synchronization="on_write", aggregation="none")
    # Every replica computes the same Z (it is all-reduced first), so the first replica's write is the value.
    self.z = keras.Variable(UNSET_NORMALIZER, trainable=False, name="normalizer", dtype="float32", autocast=False,
                            aggregation="only_first_replica")
    self.built = True

  @property
  def bank(self) -> tf.Variable:
    """The bank [N, D]: the tf.Variable (a MirroredVariable under a strategy)."""
    return self.rows.value

  @property
  def normalizer(self) -> tf.Variable:
    """Z, float32 scalar; UNSET_NORMALIZER until the first NCE step sets it."""
    return self.z.value

  def get_config(self) -> dict:
    return {**super().get_config(), "num_instances": self.num_instances, "embedding_dim": self.embedding_dim,
            "seed": self.seed, "storage_dtype": self.storage_dtype.name}

  @classmethod
  def from_config(cls, config: dict) -> MemoryBank:
    config = dict(config)
    config.pop("dtype", None)
    storage = config.pop("storage_dtype", "float32")
    return cls(dtype=storage, **config)

  def initialize_from(self, features: tf.Tensor) -> None:
    """Overwrites every row (on every replica) with features [N, D] float32, unit norm; cross-replica context."""
    rows = tf.math.l2_normalize(tf.convert_to_tensor(features, tf.float32), axis=1)
    self.bank.assign(tf.cast(rows, self.storage_dtype))

  def lookup(self, ids: tf.Tensor) -> tf.Tensor:
    """Rows of the bank: ids int [...] in [0, N) -> float32 [..., D]."""
    return tf.cast(tf.gather(distribute.local_variable(self.bank), ids), tf.float32)

  def similarities(self, features: tf.Tensor) -> tf.Tensor:
    """features [B, D] float32 against every row: float32 [B, N] (the exact softmax's logits before 1/tau).

    A reduced-precision bank is multiplied in its own dtype (no float32 copy of the whole bank), so the
    similarities carry its rounding (bfloat16: about 3 significant digits).
    """
    bank = distribute.local_variable(self.bank)
    return tf.cast(tf.matmul(tf.cast(features, self.storage_dtype), bank, transpose_b=True), tf.float32)

  def as_float32(self) -> tf.Tensor:
    """The whole bank [N, D] as float32 (a copy when stored in reduced precision), e.g. as kNN keys."""
    return tf.cast(tf.convert_to_tensor(self.bank), tf.float32)

  def update(self, ids: tf.Tensor, features: tf.Tensor, *, momentum: float) -> None:
    """Writes normalise(m v_i + (1 - m) f_i) into row i, in place, for every i in ids.

    Ids may repeat (a global batch that spans an epoch boundary): repeated ids average their features first, so
    the result does not depend on scatter order.

    Args:
      ids: [B] int, in [0, N); already gathered across replicas.
      features: [B, D] float32, unit norm; gathered in the same order as ids.
      momentum: m in [0, 1).
    """
    unique_ids, position = tf.unique(tf.cast(ids, tf.int64))
    mean_features = tf.math.unsorted_segment_mean(features, position, tf.size(unique_ids))  # [U, D]
    local_bank = distribute.local_variable(self.bank)
    old_rows = tf.cast(tf.gather(local_bank, unique_ids), tf.float32)
    new_rows = tf.math.l2_normalize(momentum * old_rows + (1.0 - momentum) * mean_features, axis=1)
    # In place: a functional scatter + assign would copy the whole bank every step (177 ms at 1.28M rows).
    local_bank.scatter_update(tf.IndexedSlices(tf.cast(new_rows, self.storage_dtype), unique_ids))

  def normalizer_is_set(self) -> tf.Tensor:
    return self.normalizer > 0.0

  def maybe_set_normalizer(self, estimate: tf.Tensor, *, momentum: float) -> tf.Tensor:
    """Sets Z from `estimate` on the first call; later calls are a no-op unless momentum > 0.

    With momentum > 0, Z <- momentum * Z + (1 - momentum) * estimate on every later call (a moving average,
    a known improvement over the paper's fixed Z).

    Returns:
      The scalar Z to use for this step.
    """
    current = self.normalizer.read_value()
    if momentum > 0.0:
      value = tf.where(current > 0.0, momentum * current + (1.0 - momentum) * estimate, estimate)
    else:
      value = tf.where(current > 0.0, current, estimate)
    self.normalizer.assign(value)
    return value

  def sample_negatives(self, shape: tf.Tensor | list[int], *, seed: tf.Tensor) -> tf.Tensor:
    """Uniform noise ids (P_n = 1/N), drawn with replacement, statelessly.

    Args:
      shape: the shape of the draw, e.g. [K] (shared) or [B, K] (per example).
      seed: [2] int32/int64, e.g. derived from (seed, step, replica_id), so runs repeat exactly.

    Returns:
      int64 ids in [0, N) of the given shape.
    """
    return tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=self.num_instances, dtype=tf.int64)
