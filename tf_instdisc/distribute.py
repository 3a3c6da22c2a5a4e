"""tf.distribute glue: strategy construction and replica collectives that are no-ops on one replica.

Only this module and train_lib touch the replica context (STYLE.md 6.6).
"""

from __future__ import annotations

import tensorflow as tf


def split_cpu(num_devices: int) -> None:
  """Splits the first physical CPU into `num_devices` logical devices, so MirroredStrategy runs N replicas here.

  Must run before TensorFlow initialises its devices; calling it again with the same number is a no-op.

  Raises:
    RuntimeError: if devices were already initialised with a different split.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    raise RuntimeError(f"cannot split the CPU into {num_devices} devices after TensorFlow started: {e}") from e


def make_strategy(kind: str) -> tf.distribute.Strategy:
  """Returns the strategy named by `kind` (the --strategy flag).

  auto: MirroredStrategy over all GPUs when there are several, else one_device (GPU 0 or the CPU).
  default: TensorFlow's default (no-op) strategy. one_device: the first GPU, else the CPU.
  mirrored: MirroredStrategy over every GPU, or over all logical CPUs when there is no GPU.
  """
  gpus = tf.config.list_logical_devices("GPU")
  if kind == "auto":
    kind = "mirrored" if len(gpus) > 1 else "one_device"
  if kind == "default":
    return tf.distribute.get_strategy()
  if kind == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if kind == "mirrored":
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)
  raise ValueError(f"--strategy: unknown strategy {kind!r}")


def num_replicas() -> int:
  return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id() -> tf.Tensor:
  """This replica's index in its sync group, int32 (0 outside a replica context)."""
  ctx = tf.distribute.get_replica_context()
  return tf.constant(0) if ctx is None else tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def all_gather(value: tf.Tensor) -> tf.Tensor:
  """Concatenates `value` over replicas along axis 0, in replica order; identity on one replica.

  all_gather has no gradient: call it on values that are already outside the tape.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return value
  return ctx.all_gather(value, axis=0)


def all_reduce_mean(value: tf.Tensor) -> tf.Tensor:
  """Mean of `value` over replicas; identity on one replica."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return value
  return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, value)


def local_variable(variable: tf.Variable) -> tf.Variable:
  """The copy of a mirrored variable that lives on this replica's device (the variable itself when unmirrored).

  Updating a MirroredVariable with aggregation NONE is refused in a replica context; updating the local copy
  directly is how each replica applies its own (identical) in-place update. TensorFlow has no public accessor for
  the local component, hence the private call, kept in this one place.
  """
  getter = getattr(variable, "_get_on_device_or_primary", None)
  return getter() if getter is not None else variable
