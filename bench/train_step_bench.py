"""Images/s of the real training step, and the share of it spent in the objective head and the memory bank.

  python bench/train_step_bench.py                     # the full matrix (long: run it on a quiet machine)
  python bench/train_step_bench.py --quick             # a CI smoke run (convnet_small, 1,000-row bank)

Each configuration (arch x precision x bank rows x objective) runs the library's own step: train_lib.build_state,
InstanceDiscrimination.train_step in make_train_loop under a one-device strategy, fed synthetic batches (input cost
~0). Beside it, in the same process and interleaved repeat by repeat, runs an encoder-only step: the same
model and SGD with a trivial loss (mean of the embedding) and no bank. The head+bank share is
1 - t(encoder-only) / t(full step). Each step's FLOPs per image (tf_instdisc/flops.py) times its images/s gives its
GFLOP/s, compared with this machine's peak: the GFLOP/s of a large tf.function matmul in float32 and bfloat16,
measured in the same process before and after the steps.
TensorFlow is imported inside the functions that use it, after the flags are checked (as train.py does), so a bad
flag is answered at once. bench/README.md says what is printed and how to read it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tf_instdisc import config as config_lib

PRECISIONS = {"fp32": "off", "bf16": "bfloat16"}  # --precisions name -> ModelConfig.mixed_precision
PEAK_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --precisions name -> the matmul peak that rates it
PEAK_WARMUP_CALLS = 3  # Untimed matmul calls (the first traces) before the timed repeats.
NUM_DISTINCT_BATCHES = 8  # Pre-made batches the input pipeline cycles through.
# Another run's figure, quoted in the task; never measured by this script.
OFFICIAL_PYTORCH = {"images_per_sec": [51.0, 56.0], "arch": "resnet18_cifar", "batch_size": 128,
                    "precision": "fp32", "objective": "nce", "num_negatives": 4096,
                    "source": "quoted in the task for the official PyTorch code on this CPU; not measured here"}


def input_note(shape: tuple[int, int, int]) -> str:
  return (f"synthetic float32 {shape[0]}x{shape[1]}x{shape[2]} batches with random distinct instance ids, "
          f"{NUM_DISTINCT_BATCHES} pre-made batches cycled by tf.data (from_tensor_slices, repeat, prefetch): input "
          "cost ~0, no decoding or augmentation is timed")


# --quick replaces these defaults (flags given on the command line still win).
QUICK_DEFAULTS = {"archs": ["convnet_small"], "bank_sizes": ["1000"], "batch_size": 32, "num_negatives": 256,
                  "steps": 1, "repeats": 2, "warmup_steps": 1, "max_seconds": 10.0, "peak_matmul_size": 512,
                  "peak_seconds": 0.5, "peak_repeats": 2}

flags.DEFINE_bool("quick", False, f"CI smoke run: {QUICK_DEFAULTS} unless given explicitly.")
flags.DEFINE_list("archs", ["resnet18_cifar"], f"Backbones, any of {', '.join(config_lib.ARCHS)}.")
flags.DEFINE_list("bank_sizes", ["50000", "1281167"], "Memory-bank rows (= num_instances) to measure.")
flags.DEFINE_list("objectives", list(config_lib.OBJECTIVES), "Objectives: nce, softmax, parametric.")
flags.DEFINE_list("precisions", list(PRECISIONS), "fp32 (mixed_precision=off) and/or bf16 (bfloat16).")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_float("width_multiplier", 1.0, "Channel-width multiplier of the backbone (0.5: fashion_mnist.flags).")
flags.DEFINE_list("pool_grids", ["1"], "The backbone's --pool_grid values to measure, each a case of its own "
                  "(1: global average pool; fashion_mnist.flags: 4).")
flags.DEFINE_list("image_shape", ["32", "32", "3"], "Height,width,channels of the synthetic images (28,28,1: "
                  "Fashion-MNIST).")
flags.DEFINE_bool("xla_encoder", False, "Compile the encoder-only baseline step with XLA (jit_compile): its ratio to "
                  "the full step, against a run without, says what XLA buys the network's forward and backward. The "
                  "full step itself cannot be compiled (the bank update's tf.unique has a data-dependent shape).")
flags.DEFINE_integer("num_negatives", 4096, "NCE noise samples K.")
flags.DEFINE_enum("negative_sampling", "shared", config_lib.NEGATIVE_SAMPLING,
                  "NCE negatives: shared (one draw per batch, the library default) or per_example.")
flags.DEFINE_integer("steps", 10, "Timed steps per repeat (fewer when --max_seconds would be exceeded).")
flags.DEFINE_float("max_seconds", 30.0, "Time budget of one timed repeat: slow configs time fewer steps.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per configuration; the reported figure is their median.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after the first (tracing) call; they also set the pace.")
flags.DEFINE_integer("peak_matmul_size", 2048, "N of the N x N @ N x N matmul whose GFLOP/s, in float32 and bfloat16, "
                     "is this machine's peak that each step is compared with.")
flags.DEFINE_float("peak_seconds", 4.0, "Timed seconds of the peak matmul per precision (over --peak_repeats).")
flags.DEFINE_integer("peak_repeats", 5, "Timed repeats of the peak matmul per precision; the peak is the best.")
flags.DEFINE_string("output", "bench/results/train_step.json", "JSON results file (written after every config).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured configuration."""

  arch: str
  precision: str
  bank_size: int
  objective: str
  pool_grid: int = 1


def _apply_quick_defaults() -> None:
  for name, value in QUICK_DEFAULTS.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


def _parse_cases() -> list[Case]:
  """The measurement matrix from the flags; raises ValueError naming the flag."""
  def check_choices(name: str, choices) -> list[str]:
    values = list(FLAGS[name].value)
    bad = [v for v in values if v not in choices]
    if not values or bad:
      raise ValueError(f"--{name}: got {values}, expected a non-empty list of {', '.join(choices)}")
    return values

  archs = check_choices("archs", config_lib.ARCHS)
  objectives = check_choices("objectives", config_lib.OBJECTIVES)
  precisions = check_choices("precisions", tuple(PRECISIONS))
  def check_integers(name: str) -> list[int]:
    try:
      values = [int(v) for v in FLAGS[name].value]
    except ValueError:
      values = []
    if not values or min(values) < 1:
      raise ValueError(f"--{name}: got {FLAGS[name].value}, expected a non-empty list of integers >= 1")
    return values

  bank_sizes = check_integers("bank_sizes")
  for name in ("steps", "repeats", "warmup_steps", "peak_matmul_size", "peak_repeats"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name}: must be >= 1")
  for name in ("max_seconds", "peak_seconds"):
    if FLAGS[name].value <= 0:
      raise ValueError(f"--{name}: must be > 0")
  grids = check_integers("pool_grids")
  image_shape()
  return [Case(a, p, n, o, g) for a in archs for g in grids for p in precisions for n in bank_sizes
          for o in objectives]


def image_shape() -> tuple[int, int, int]:
  """--image_shape as (H, W, C); raises ValueError naming the flag."""
  try:
    shape = tuple(int(v) for v in FLAGS.image_shape)
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"--image_shape: expected height,width,channels (positive integers), got {FLAGS.image_shape}")
  return shape


def make_config(case: Case) -> config_lib.Config:
  """The library config of one case, validated as train.py would (model_dir is never written)."""
  cfg = config_lib.Config(
      model=config_lib.ModelConfig(arch=case.arch, mixed_precision=PRECISIONS[case.precision],
                                   width_multiplier=FLAGS.width_multiplier, pool_grid=case.pool_grid),
      loss=config_lib.LossConfig(objective=case.objective, num_negatives=FLAGS.num_negatives,
                                 negative_sampling=FLAGS.negative_sampling),
      train=config_lib.TrainConfig(model_dir="unused-by-the-benchmark", batch_size=FLAGS.batch_size))
  config_lib.validate(cfg)
  config_lib.validate_against_data(cfg, num_instances=case.bank_size)
  return cfg


def machine_facts() -> dict[str, Any]:
  import keras
  import numpy as np
  import tensorflow as tf

  cpuinfo = _read("/proc/cpuinfo")
  model_names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
  cpu_flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
  mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                 if line.startswith("MemTotal:")), 0)
  return {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
      "cpu_model": model_names[0] if model_names else platform.processor(),
      # bf16 pays off with avx512_bf16 or amx_bf16; without them it can run slower than fp32.
      "cpu_isa_flags": sorted(f for f in cpu_flags if f.startswith(("avx512", "amx")) or "bf16" in f),
      "memory_gib": round(mem_kb / 2**20, 1),
      "gpus": len(tf.config.list_physical_devices("GPU")), "load_average_at_start": list(os.getloadavg()),
      "python": platform.python_version(), "platform": platform.platform(), "tensorflow": tf.__version__,
      "keras": keras.__version__, "numpy": np.__version__,
  }


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def measure_peak() -> dict[str, Any]:
  """GFLOP/s (2 N^3 / seconds) of an N x N @ N x N tf.linalg.matmul in a tf.function, in float32 and bfloat16.

  Run in this process before the steps, so in the same TensorFlow thread pools (intra-op and inter-op settings
  are recorded): PEAK_WARMUP_CALLS untimed calls, then --peak_repeats repeats of as many calls as fill
  --peak_seconds / --peak_repeats; the peak is the best repeat (the one least disturbed by other processes).
  """
  import tensorflow as tf

  size = FLAGS.peak_matmul_size
  flop = 2 * size**3
  matmul = tf.function(tf.linalg.matmul)
  peak = {"matmul": f"{size}x{size} @ {size}x{size}", "flop_per_call": flop, "repeats": FLAGS.peak_repeats,
          "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
          "gflops": {}, "gflops_median": {}, "gflops_per_repeat": {}, "calls_per_repeat": {}}
  for dtype in PEAK_DTYPES.values():
    rng = tf.random.Generator.from_seed(0)
    a, b = (tf.cast(rng.normal([size, size]), dtype) for _ in range(2))
    for _ in range(PEAK_WARMUP_CALLS):
      start = time.perf_counter()
      float(matmul(a, b)[0, 0])  # Reading an element waits for the product.
    calls = max(1, int(FLAGS.peak_seconds / FLAGS.peak_repeats / (time.perf_counter() - start)))
    rates = []
    for _ in range(FLAGS.peak_repeats):
      start = time.perf_counter()
      for _ in range(calls):
        product = matmul(a, b)
      float(product[0, 0])
      rates.append(flop * calls / (time.perf_counter() - start) / 1e9)
    peak["gflops"][dtype], peak["gflops_median"][dtype] = max(rates), statistics.median(rates)
    peak["gflops_per_repeat"][dtype], peak["calls_per_repeat"][dtype] = rates, calls
  return peak


def make_synthetic_dataset(batch_size: int, num_instances: int, *, seed: int = 0):
  """Endless batches {"image": float32 [B, *--image_shape] in [0, 255], "label", "instance_id": int64 [B]}.

  Ids are distinct within a batch (as in an epoch) and uniform over the bank, so lookups and writes touch rows
  all over it; a few pre-made batches are cycled, so the pipeline costs ~nothing.
  """
  import numpy as np
  import tensorflow as tf

  from tf_instdisc import data as data_lib

  rng = np.random.default_rng(seed)
  shape = (NUM_DISTINCT_BATCHES, batch_size, *image_shape())
  ids = np.stack([rng.choice(num_instances, batch_size, replace=False) for _ in range(NUM_DISTINCT_BATCHES)])
  batches = {data_lib.IMAGE_KEY: rng.uniform(0.0, 255.0, shape).astype(np.float32),
             data_lib.LABEL_KEY: np.zeros(shape[:2], np.int64), data_lib.ID_KEY: ids.astype(np.int64)}
  return tf.data.Dataset.from_tensor_slices(batches).repeat().prefetch(2)


def make_encoder_step(state, cfg: config_lib.Config, *, global_batch_size: int) -> Callable:
  """The baseline: train_lib's step without bank or objective (loss = mean of the embedding), same SGD and L2."""
  import tensorflow as tf

  from tf_instdisc import data as data_lib

  variables = state.model.trainable_variables

  def encoder_step(batch):
    with tf.GradientTape() as tape:
      features = tf.cast(state.model(batch[data_lib.IMAGE_KEY], training=True), tf.float32)  # [B, D]
      loss = tf.nn.compute_average_loss(tf.reduce_mean(features, axis=1), global_batch_size=global_batch_size)
      l2 = 0.5 * cfg.optim.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
      scaled = state.optimizer.scale_loss(loss + tf.nn.scale_regularization_loss(l2))
    state.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
    state.model.trackers["loss"].update_state(loss)

  return encoder_step


class Runner:
  """A train loop (train_lib.make_train_loop) on its own iterator; times whole calls of it."""

  def __init__(self, state, step_fn: Callable | None, strategy, dataset):
    from tf_instdisc import train_lib

    self.state = state  # Owns the variables the loop updates.
    self.loop = train_lib.make_train_loop(state.model, strategy, step_fn)
    self.iterator = iter(strategy.experimental_distribute_dataset(dataset))
    self.steps_per_repeat = 0

  def run(self, num_steps: int) -> tuple[float, float]:
    """Runs num_steps steps in one call; returns (seconds per step, mean loss). Reading the loss waits for them."""
    import tensorflow as tf

    start = time.perf_counter()
    loss = float(self.loop(self.iterator, tf.constant(num_steps))["loss"])
    return (time.perf_counter() - start) / num_steps, loss

  def warm_up(self) -> float:
    """Traces (first call), runs --warmup_steps, and picks steps_per_repeat from their pace; returns seconds."""
    start = time.perf_counter()
    self.run(1)
    seconds_per_step, _ = self.run(FLAGS.warmup_steps)
    self.steps_per_repeat = max(1, min(FLAGS.steps, int(FLAGS.max_seconds / seconds_per_step)))
    return time.perf_counter() - start


def build_runner(cfg: config_lib.Config, strategy, *, num_instances: int, encoder_only: bool) -> Runner:
  """Builds the state under strategy.scope() as train_lib does; the encoder-only state gets a token bank."""
  from tf_instdisc import train_lib

  batch_size = cfg.train.batch_size
  with strategy.scope():
    state = train_lib.build_state(cfg, num_instances=num_instances, input_shape=image_shape(),
                                  steps_per_epoch=max(num_instances // batch_size, 1))
  step_fn = make_encoder_step(state, cfg, global_batch_size=batch_size) if encoder_only else None  # None: the model's.
  if step_fn is not None and FLAGS.xla_encoder:
    import tensorflow as tf

    step_fn = tf.function(step_fn, jit_compile=True)
  return Runner(state, step_fn, strategy, make_synthetic_dataset(batch_size, num_instances))


def measure(full: Runner, encoder: Runner) -> dict[str, Any]:
  """Alternates encoder-only and full repeats (order flipped each repeat), so machine noise hits both alike."""
  encoder.run(1)  # Untimed: the baseline sat idle while the full step was built and warmed up.
  full_times, encoder_times, losses = [], [], []
  for repeat in range(FLAGS.repeats):
    order = (encoder, full) if repeat % 2 == 0 else (full, encoder)
    for runner in order:
      seconds_per_step, loss = runner.run(runner.steps_per_repeat)
      (encoder_times if runner is encoder else full_times).append(seconds_per_step)
      if runner is full:
        losses.append(loss)
  full_median, encoder_median = statistics.median(full_times), statistics.median(encoder_times)
  batch = FLAGS.batch_size
  return {
      "images_per_sec": batch / full_median,
      "images_per_sec_min_max": [batch / max(full_times), batch / min(full_times)],
      "encoder_images_per_sec": batch / encoder_median,
      "head_bank_share": 1.0 - encoder_median / full_median,
      "step_seconds": full_times, "encoder_step_seconds": encoder_times,
      "steps_per_repeat": full.steps_per_repeat, "encoder_steps_per_repeat": encoder.steps_per_repeat,
      "repeats": FLAGS.repeats, "loss": losses[-1], "loss_finite": all(math.isfinite(v) for v in losses),
  }


def run_case(case: Case, strategy, encoder: Runner) -> dict[str, Any]:
  import gc

  from tf_instdisc import flops as flops_lib

  start = time.perf_counter()
  full = build_runner(make_config(case), strategy, num_instances=case.bank_size, encoder_only=False)
  build_seconds = time.perf_counter() - start
  count = flops_lib.train_step_flops(full.state.model)
  warmup_seconds = full.warm_up()
  result = {"build_seconds": build_seconds, "warmup_seconds": warmup_seconds, **measure(full, encoder)}
  # FLOPs per image (tf_instdisc/flops.py's convention) x images/s; write_json divides by the peak.
  result["flops_per_image"] = count.as_dict()
  result["gflops"] = count.total * result["images_per_sec"] / 1e9
  # The encoder-only step runs backbone and head forward and backward: the count's network part.
  result["encoder_gflops"] = count.network * result["encoder_images_per_sec"] / 1e9
  result["rss_gib"] = _rss_gib()
  # Not keras.backend.clear_session(): it clears TF's kernel cache, which would slow the encoder's next repeats.
  del full
  gc.collect()
  return result


def _rss_gib() -> float:
  rss_kb = next((int(line.split()[1]) for line in _read("/proc/self/status").splitlines()
                 if line.startswith("VmRSS:")), 0)
  return round(rss_kb / 2**20, 2)


def official_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Our fp32 NCE img/s over the quoted official figure, for rows of the quoted configuration only."""
  ref = OFFICIAL_PYTORCH
  low, high = ref["images_per_sec"]
  rows = [r for r in results if "images_per_sec" in r and r["arch"] == ref["arch"]
          and r["precision"] == ref["precision"] and r["objective"] == ref["objective"]
          and r["batch_size"] == ref["batch_size"]]
  return [{"bank_size": r["bank_size"], "images_per_sec": r["images_per_sec"],
           "ratio_to_quoted": [r["images_per_sec"] / high, r["images_per_sec"] / low]} for r in rows]


def markdown(report: dict[str, Any]) -> str:
  lines = [("| arch | precision | objective | bank rows | full step img/s (min-max) | encoder-only img/s | "
            "head+bank share | steps x repeats | MFLOP/img | GFLOP/s | peak fraction |"),
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for r in report["results"]:
    grid = r.get("pool_grid", 1)
    arch = r["arch"] if grid == 1 else f"{r['arch']}, pool grid {grid}"
    head = f"| {arch} | {r['precision']} | {r['objective']} | {r['bank_size']:,} |"
    if "error" in r:
      lines.append(f"{head} error: {r['error'][:80]} | | | | | | |")
      continue
    low, high = r["images_per_sec_min_max"]
    lines.append(f"{head} {r['images_per_sec']:.1f} ({low:.1f}-{high:.1f}) | {r['encoder_images_per_sec']:.1f} | "
                 f"{100 * r['head_bank_share']:.1f}% | {r['steps_per_repeat']} x {r['repeats']} | "
                 f"{r['flops_per_image']['total'] / 1e6:.1f} | {r['gflops']:.1f} | {100 * r['peak_fraction']:.1f}% |")
  before, after = report["peak"]["before_steps"], report["peak"].get("after_steps")
  for precision, dtype in PEAK_DTYPES.items():
    lines.append(f"| peak: matmul {before['matmul']} | {precision} | | | | | | {before['calls_per_repeat'][dtype]} x "
                 f"{before['repeats']} | | {report['peak_gflops'][dtype]:.1f} | 100% |")
  measured = "; ".join(
      f"{when} the steps, best (median) of {peak['repeats']} repeats: " + ", ".join(
          f"{dtype} {peak['gflops'][dtype]:.1f} ({peak['gflops_median'][dtype]:.1f})" for dtype in peak["gflops"])
      for when, peak in (("before", before), ("after", after)) if peak)
  settings, machine = report["settings"], report["machine"]
  lines += [
      "",
      (f"Batch {settings['batch_size']}, NCE K={settings['num_negatives']} ({settings['negative_sampling']} "
       f"negatives), strategy {settings['strategy']}; medians over repeats; encoder-only and full repeats "
       "interleaved."),
      f"Input: {report['input']}.",
      ("head+bank share = 1 - t(encoder-only step) / t(full step): objective (logits, loss, parametric "
       "classifier and its update) plus bank reads and write."),
      (f"GFLOP/s = FLOPs per image x full-step img/s; peak fraction = GFLOP/s / the matmul peak at the row's "
       f"precision (fp32: float32, bf16: bfloat16), the best GFLOP/s of a tf.function matmul {before['matmul']} "
       f"measured in this process ({measured} GFLOP/s)."),
      f"FLOPs per image (MFLOP/img): {report['flops_convention']} (tf_instdisc/flops.py).",
      (f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), TF {machine['tensorflow']}, "
       f"load average {machine['load_average_at_start'][0]:.2f} at start, "
       f"{report['load_average_at_end'][0]:.2f} at end; {machine['date']}."),
  ]
  low, high = OFFICIAL_PYTORCH["images_per_sec"]
  lines.append(f"Official PyTorch code: {low:.0f}-{high:.0f} img/s (QUOTED from another run, not measured here; "
               f"{OFFICIAL_PYTORCH['arch']}, batch {OFFICIAL_PYTORCH['batch_size']}, fp32, NCE).")
  for ratio in report["official_pytorch_reference"]["ratios"]:
    lines.append(f"  ours fp32 NCE, bank {ratio['bank_size']:,}: {ratio['images_per_sec']:.1f} img/s = "
                 f"{ratio['ratio_to_quoted'][0]:.2f}-{ratio['ratio_to_quoted'][1]:.2f}x the quoted figure.")
  if not report["official_pytorch_reference"]["ratios"]:
    lines.append("  (no row matches that configuration: no ratio.)")
  return "\n".join(lines)


def write_json(path: str, report: dict[str, Any]) -> dict[str, Any]:
  """Atomically, so a long run stopped midway leaves the configs measured so far."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  report = {**report, "load_average_at_end": list(os.getloadavg())}
  for row in report["results"]:
    if "gflops" in row:  # Against the matmul peak at the row's precision (the best measured so far).
      peak = report["peak_gflops"][PEAK_DTYPES[row["precision"]]]
      row["peak_fraction"], row["encoder_peak_fraction"] = row["gflops"] / peak, row["encoder_gflops"] / peak
  report["official_pytorch_reference"] = {**OFFICIAL_PYTORCH, "ratios": official_ratios(report["results"])}
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  return report


def run_all(cases: list[Case], report: dict[str, Any]) -> int:
  """Measures every case (grouped by arch, pool grid and precision, which share one encoder-only baseline)."""
  from absl import logging

  from tf_instdisc import distribute

  strategy = distribute.make_strategy("one_device")
  errors, encoders = 0, {}
  for case in cases:
    key = (case.arch, case.precision, case.pool_grid)
    if key not in encoders:
      encoders.clear()  # The previous group's baseline is done with.
      # The encoder-only state needs a bank to build; a softmax config gives it a token one and no classifier.
      encoder_case = dataclasses.replace(case, objective="softmax", bank_size=FLAGS.batch_size)
      encoders[key] = build_runner(make_config(encoder_case), strategy, num_instances=encoder_case.bank_size,
                                   encoder_only=True)
      encoders[key].warm_up()
    row = {**dataclasses.asdict(case), "batch_size": FLAGS.batch_size, "num_negatives": FLAGS.num_negatives}
    logging.info("measuring %s", case)
    try:
      row.update(run_case(case, strategy, encoders[key]))
      logging.info("%s: %.1f img/s, encoder-only %.1f img/s, head+bank share %.1f%%, %.1f GFLOP/s = %.1f%% of "
                   "peak", case, row["images_per_sec"], row["encoder_images_per_sec"], 100 * row["head_bank_share"],
                   row["gflops"], 100 * row["gflops"] / report["peak_gflops"][PEAK_DTYPES[case.precision]])
    except Exception as e:  # noqa: BLE001 - one failed config (e.g. out of memory) must not lose the others.
      errors += 1
      row["error"] = f"{type(e).__name__}: {e}"
      logging.error("%s failed: %s", case, row["error"])
    report["results"].append(row)
    write_json(FLAGS.output, report)
  return errors


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.quick:
    _apply_quick_defaults()
  try:
    cases = _parse_cases()
    for case in cases:
      make_config(case)
  except ValueError as e:
    print(f"train_step_bench.py: {e}", file=sys.stderr)
    return 2
  settings = {name: FLAGS[name].value for name in
              ("quick", "archs", "objectives", "precisions", "batch_size", "width_multiplier", "pool_grids",
               "image_shape", "num_negatives", "negative_sampling", "xla_encoder", "steps", "max_seconds", "repeats",
               "warmup_steps", "peak_matmul_size", "peak_seconds", "peak_repeats")}
  settings.update(bank_sizes=sorted({case.bank_size for case in cases}), strategy="one_device")
  report = {"benchmark": "train_step", "machine": machine_facts(), "settings": settings,
            "input": input_note(image_shape()), "results": []}
  from absl import logging

  from tf_instdisc import flops as flops_lib

  # The peak is measured before and after the steps; the best of both rates every row (write_json).
  report["peak"] = {"before_steps": measure_peak()}
  report["peak_gflops"] = dict(report["peak"]["before_steps"]["gflops"])
  report["flops_convention"] = flops_lib.CONVENTION
  logging.info("matmul %s peak: %s GFLOP/s", report["peak"]["before_steps"]["matmul"],
               ", ".join(f"{k} {v:.1f}" for k, v in report["peak_gflops"].items()))
  errors = run_all(cases, report)
  report["peak"]["after_steps"] = measure_peak()
  report["peak_gflops"] = {dtype: max(measured["gflops"][dtype] for measured in report["peak"].values())
                           for dtype in PEAK_DTYPES.values()}
  print(markdown(write_json(FLAGS.output, report)))
  print(f"\nResults: {FLAGS.output}")
  return 1 if errors else 0


if __name__ == "__main__":
  app.run(main)
