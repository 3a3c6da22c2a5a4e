"""Images/s of the training step with 1 and 2 replicas on logical CPUs, and the cost of the bank gather per step.

  python bench/replica_bench.py                 # convnet_small 32x32, batch 128, 50,000-row bank, NCE m=4096
  python bench/replica_bench.py --quick         # a CI smoke run (tests/replica_bench_test.py)

One process: the CPU is split into 2 logical devices, then, interleaved repeat by repeat, the library's own step
(train_lib.build_state / the model's train_step / make_train_loop) runs under a one-device strategy and under a
2-replica MirroredStrategy on the same global batch (synthetic batches, distinct ids, so the input costs ~0).
Beside them, under the 2-replica strategy: the bank write alone with the all-gather of (ids, features) that keeps
the replicas identical, and the same write of each replica's own rows without the gather; their difference is the
gather's cost. Logical CPUs share the machine's cores: 2 replicas add no hardware, and a ratio above 1 means two
half-batches running side by side keep the cores busier than one batch does; on GPUs each replica has its own
device. Results: a Markdown table on stdout and JSON in --output.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_ARCH = flags.DEFINE_string("arch", "convnet_small", "Backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Square input side.", lower_bound=8)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch (split over the replicas).", lower_bound=2)
_BANK_ROWS = flags.DEFINE_integer("bank_rows", 50_000, "Memory bank rows.", lower_bound=2)
_OBJECTIVE = flags.DEFINE_enum("objective", "nce", ["nce", "softmax"], "Objective of the step.")
_NEGATIVES = flags.DEFINE_integer("num_negatives", 4096, "NCE noise samples.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed call.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (median reported).", lower_bound=1)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes for a smoke run.")
_OUTPUT = flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "replicas.json"), "JSON results file.")

REPLICAS = (1, 2)


def _config(model_dir: str):
  from tf_instdisc import config as config_lib

  return config_lib.Config(
      data=config_lib.DataConfig(dataset="synthetic", image_size=_IMAGE_SIZE.value),
      augment=config_lib.AugmentConfig(), model=config_lib.ModelConfig(arch=_ARCH.value, embedding_dim=128),
      bank=config_lib.BankConfig(), loss=config_lib.LossConfig(objective=_OBJECTIVE.value,
                                                               num_negatives=_NEGATIVES.value),
      optim=config_lib.OptimConfig(), train=config_lib.TrainConfig(model_dir=model_dir, batch_size=_BATCH.value),
      eval=config_lib.EvalConfig())


def _batches(num_batches: int):
  """Synthetic global batches with distinct ids, cycled forever."""
  import numpy as np
  import tensorflow as tf

  rng = np.random.default_rng(0)
  size, batch = _IMAGE_SIZE.value, _BATCH.value
  images = rng.uniform(0, 255, (num_batches * batch, size, size, 3)).astype(np.float32)
  ids = rng.permutation(_BANK_ROWS.value)[:num_batches * batch].astype(np.int64)
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "instance_id": ids, "label": ids % 10})
  return ds.batch(batch, drop_remainder=True).cache().repeat()


def _time(fn, repeats: int) -> float:
  """Median seconds of fn() over repeats (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure() -> dict:
  import tensorflow as tf

  from tf_instdisc import distribute
  from tf_instdisc import train_lib

  distribute.split_cpu(2)
  strategies = {1: tf.distribute.OneDeviceStrategy("/cpu:0"),
                2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
  cfg = _config("/tmp/unused")
  steps, batch = _STEPS.value, _BATCH.value
  runs = {}
  for replicas, strategy in strategies.items():
    with strategy.scope():
      state = train_lib.build_state(cfg, num_instances=_BANK_ROWS.value,
                                    input_shape=(_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), steps_per_epoch=1000)
    loop = train_lib.make_train_loop(state.model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(_batches(4)))
    runs[replicas] = (state, lambda loop=loop, iterator=iterator: float(loop(iterator, tf.constant(steps))["loss"]))

  two, state = strategies[2], runs[2][0]
  features = tf.math.l2_normalize(tf.random.stateless_normal([batch, 128], seed=[1, 2]), axis=1)
  ids = tf.range(batch, dtype=tf.int64)

  def write_loop(gather: bool):
    @tf.function
    def body():
      def replica_fn():
        half = batch // 2
        offset = tf.cast(distribute.replica_id(), tf.int64) * half
        local_ids, local_features = ids[offset:offset + half], features[offset:offset + half]
        if gather:
          local_ids, local_features = distribute.all_gather(local_ids), distribute.all_gather(local_features)
        state.bank.update(local_ids, local_features, momentum=0.5)
      for _ in tf.range(steps):
        two.run(replica_fn)
    return body

  timed = {name: [] for name in ("step_1", "step_2", "write_gathered", "write_local")}
  writes = {"write_gathered": write_loop(True), "write_local": write_loop(False)}
  for _ in range(_REPEATS.value):  # Interleaved, so drift in the machine's load hits every configuration alike.
    timed["step_1"].append(_time(runs[1][1], 1))
    timed["step_2"].append(_time(runs[2][1], 1))
    for name, fn in writes.items():
      timed[name].append(_time(fn, 1))
  per_step = {name: statistics.median(values) / steps for name, values in timed.items()}
  gather_ms = 1000 * (per_step["write_gathered"] - per_step["write_local"])
  return {
      "images_per_sec": {f"{r}_replicas": batch / per_step[f"step_{r}"] for r in REPLICAS},
      "ratio_2_over_1": per_step["step_1"] / per_step["step_2"],
      "bank_write_ms": {"with_gather": 1000 * per_step["write_gathered"], "local_only": 1000 * per_step["write_local"]},
      "gather_ms_per_step": gather_ms,
      "gather_share_of_2_replica_step": gather_ms / (1000 * per_step["step_2"]),
      "step_ms": {f"{r}_replicas": 1000 * per_step[f"step_{r}"] for r in REPLICAS},
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _QUICK.value:
    for flag, value in (("image_size", 16), ("batch_size", 16), ("bank_rows", 1000), ("num_negatives", 64),
                        ("steps", 2), ("repeats", 1)):
      if not flags.FLAGS[flag].present:
        flags.FLAGS[flag].value = value
  if _BATCH.value % 2:
    raise app.UsageError("--batch_size must be even (it is split over 2 replicas)")
  import tensorflow as tf

  from tf_instdisc import checkpointing

  load_before = os.getloadavg()
  results = measure()
  report = {
      "benchmark": "replicas", "command": " ".join(["python", *sys.argv]),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "tensorflow": tf.__version__,
                  "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
      "settings": {"arch": _ARCH.value, "image_size": _IMAGE_SIZE.value, "batch_size": _BATCH.value,
                   "bank_rows": _BANK_ROWS.value, "objective": _OBJECTIVE.value, "num_negatives": _NEGATIVES.value,
                   "steps": _STEPS.value, "repeats": _REPEATS.value},
      "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  checkpointing.write_json_atomic(_OUTPUT.value, report)
  ips = results["images_per_sec"]
  print("| replicas (logical CPUs) | images/s | step ms |\n|--:|--:|--:|")
  for r in REPLICAS:
    print(f"| {r} | {ips[f'{r}_replicas']:.1f} | {results['step_ms'][f'{r}_replicas']:.1f} |")
  print(f"\n2 replicas / 1: {results['ratio_2_over_1']:.2f}x. Bank write per step: "
        f"{results['bank_write_ms']['with_gather']:.2f} ms with the all-gather, "
        f"{results['bank_write_ms']['local_only']:.2f} ms without; gather "
        f"{results['gather_ms_per_step']:.2f} ms = {100 * results['gather_share_of_2_replica_step']:.1f}% of the "
        f"2-replica step. Logical CPUs share the same cores: no hardware is added.")


if __name__ == "__main__":
  app.run(main)
