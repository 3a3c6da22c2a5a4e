"""tf.distribute glue: strategy construction and replica collectives that are no-ops on one replica.

Only this module and the train step (train_lib, instance_discrimination) touch the replica context (docs/design.md).
"""

from __future__ import annotations

import json
import os

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


def make_strategy(kind: str, *, tpu: str = "local") -> tf.distribute.Strategy:
  """Returns the strategy named by `kind` (the --strategy flag).

  auto: MirroredStrategy over all GPUs when there are several, else one_device (GPU 0 or the CPU).
  default: TensorFlow's default (no-op) strategy. one_device: the first GPU, else the CPU.
  mirrored: MirroredStrategy over every GPU, or over all logical CPUs when there is no GPU.
  multi_worker: MultiWorkerMirroredStrategy over the cluster in $TF_CONFIG (one process per host, started alike).
  tpu: TPUStrategy over the TPU named by `tpu` (the --tpu flag: "local" on a TPU VM, a Cloud TPU name or a
  grpc:// address). Not run on our machines, which have no TPU.

  Raises:
    ValueError: naming --strategy (or TF_CONFIG, or --tpu) when the kind is unknown, the cluster is not described
      or no TPU answers.
  """
  if kind == "tpu":
    return _tpu_strategy(tpu)
  if kind == "multi_worker":  # First: listing devices would start TensorFlow before collectives are configured.
    _check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()
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


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, tf.errors.OpError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"--strategy=tpu: no TPU at --tpu={tpu!r} ({type(e).__name__}: {first_line})") from e
  return tf.distribute.TPUStrategy(resolver)


def _check_tf_config() -> None:
  text = os.environ.get("TF_CONFIG", "")
  try:
    config = json.loads(text)
    workers = config["cluster"]["worker"]
    task = config["task"]
    if task["type"] not in config["cluster"] or not 0 <= int(task["index"]) < len(config["cluster"][task["type"]]):
      raise ValueError(f"task {task} is not in the cluster")
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError("--strategy=multi_worker: TF_CONFIG must describe the cluster and this task, e.g. "
                     '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
                     f"; got {text!r} ({type(e).__name__}: {e})") from e
  if not workers:
    raise ValueError("--strategy=multi_worker: TF_CONFIG lists no workers")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's files: always, except on the non-chief workers of a multi-worker run
  (the chief is task "chief", or worker 0 when the cluster has no chief)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  if resolver.task_type == "chief":
    return True
  return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def task_name(strategy: tf.distribute.Strategy) -> str:
  """"worker-1" style name of this process in a multi-worker cluster ("local" otherwise)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return "local"
  return f"{resolver.task_type}-{resolver.task_id}"


def num_replicas() -> int:
  return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id() -> tf.Tensor:
  """This replica's index in its sync group, int32 (0 outside a replica context)."""
  ctx = tf.distribute.get_replica_context()
  return tf.constant(0) if ctx is None else tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def all_gather(value: tf.Tensor) -> tf.Tensor:
  """Concatenates `value` [B, ...] over replicas along axis 0, in replica order; identity on one replica.

  Built from an all-reduce: each replica places its rows at its own offset in zeros and the sum assembles the
  whole (exact: every entry sums one value and zeros). ReplicaContext.all_gather fails under
  MultiWorkerMirroredStrategy in TF 2.20 ("destinations can not be empty"); this works under every strategy.
  Integers travel as float64, exact below 2^53. No gradient: call it on values already outside the tape.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return value
  dtype = value.dtype
  wide = tf.cast(value, tf.float64) if dtype.is_integer else value
  rows = tf.shape(wide)[0]
  offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * rows
  paddings = tf.concat([[[offset, (ctx.num_replicas_in_sync - 1) * rows - offset]],
                        tf.zeros([tf.rank(wide) - 1, 2], tf.int32)], axis=0)
  gathered = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.pad(wide, paddings))
  return tf.cast(gathered, dtype) if dtype.is_integer else gathered


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
