"""train.py's driver: a multi-step tf.function around InstanceDiscrimination.train_step (the method's one step,
also what model.fit runs), and the Python loop of side effects: checkpoints, resume, the kNN monitor, metrics,
summaries, time accounts, SIGTERM and lost workers. Epoch flags become steps here, once, because only here is the
dataset size known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import augment
from tf_instdisc import checkpointing
from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import distribute
from tf_instdisc import knn
from tf_instdisc import memory_bank
from tf_instdisc import instance_discrimination
from tf_instdisc import objectives
from tf_instdisc import precision
from tf_instdisc import results as results_lib
from tf_instdisc import schedules

METRIC_NAMES = instance_discrimination.METRIC_NAMES
METRICS_FILE, FINAL_METRICS_FILE = results_lib.METRICS_FILE, results_lib.FINAL_METRICS_FILE


@dataclasses.dataclass
class TrainState:
  """Everything a run owns; `checkpoint` holds all of it that is state (the model's bank, Z and step among it)."""

  model: instance_discrimination.InstanceDiscrimination
  optimizer: keras.optimizers.Optimizer
  checkpoint: tf.train.Checkpoint

  @property
  def bank(self) -> memory_bank.MemoryBank:
    return self.model.memory_bank

  @property
  def classifier(self) -> keras.layers.Layer | None:
    return self.model.classifier

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    return list(self.model.trainable_variables)


def build_state(cfg: config_lib.Config, *, num_instances: int, input_shape: tuple[int, int, int],
                steps_per_epoch: int) -> TrainState:
  """Builds and compiles the model (bank, Z, step and classifier in it) and its optimizer as a Keras user's
  `InstanceDiscrimination.from_recipe` does; call under strategy.scope()."""
  # The time budget is spent already: epochs_for_budget turned --train_minutes into cfg.train.epochs.
  recipe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, train_minutes=0.0))
  model = instance_discrimination.InstanceDiscrimination.from_recipe(recipe, num_instances, input_shape,
                                                                     steps_per_epoch=steps_per_epoch)
  return TrainState(model=model, optimizer=model.optimizer,
                    checkpoint=checkpointing.make_checkpoint(model=model, optimizer=model.optimizer))


def make_train_loop(model: instance_discrimination.InstanceDiscrimination, strategy: tf.distribute.Strategy,
                    step_fn: Callable | None = None) -> Callable:
  """A tf.function running `num_steps` of the model's own train_step from a (distributed) iterator; returns the
  metrics' means over those steps and over all replicas.

  step_fn replaces the train_step (bench/train_step_bench.py's encoder-only baseline); it must update the
  model's metrics itself.
  """
  step_fn = step_fn or model.train_step

  @tf.function
  def train_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
    for metric in model.metrics:
      metric.reset_state()
    for _ in tf.range(num_steps):
      strategy.run(step_fn, args=(next(iterator),))
    # Cross-replica reads of the metrics sum their replicas' totals and counts: the mean over every replica.
    return {metric.name: metric.result() for metric in model.metrics}

  return train_loop


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """The dataset-dependent numbers of a run, fixed once at start."""

  num_instances: int
  input_shape: tuple[int, int, int]
  steps_per_epoch: int
  global_batch_size: int


def plan_run(cfg: config_lib.Config, source: data_lib.DataSource) -> RunPlan:
  """Checks cfg against the data and fixes the run's sizes; raises ValueError naming the flag."""
  num_instances = source.train.num_examples
  config_lib.validate_against_data(cfg, num_instances=num_instances)
  size = data_lib.resolve_image_size(source, cfg.data.image_size)
  smallest = augment.BLUR_WINDOW // 2
  if cfg.augment.blur_prob and size < smallest:
    raise ValueError(f"--blur_prob: the {augment.BLUR_WINDOW}x{augment.BLUR_WINDOW} blur needs images of at least "
                     f"{smallest}x{smallest} px, this run's are {size}x{size} (--image_size)")
  return RunPlan(num_instances=num_instances, input_shape=(size, size, source.image_shape[2]),
                 steps_per_epoch=num_instances // cfg.train.batch_size, global_batch_size=cfg.train.batch_size)


def distribute_dataset(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> tf.data.Dataset:
  """The dataset as the strategy's replicas take it; a single replica reads the dataset itself.

  A distributed dataset's iterator stalled 2-50 s when destroyed at every epoch's end on our 2-core machines
  (gdb: the main thread in ~RootDataset::Iterator, waiting on a tf.data Model::OptimizeLoop thread of the
  strategy's wrapper pipeline, even with autotune off in the dataset's options): a third of a Fashion-MNIST epoch.
  One replica needs no splitting, so it skips the wrapper.
  """
  if strategy.num_replicas_in_sync == 1:
    return dataset
  # Every worker builds the same global batches; each keeps its replicas' share of every batch.
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return strategy.experimental_distribute_dataset(dataset.with_options(options))


# --train_minutes' measurement: after one untimed step that traces, CALIBRATION_WARMUP_STEPS untimed steps, then
# timed rounds of CALIBRATION_STEPS, as many as the first one's time says fill CALIBRATION_SECONDS. 20 timed steps
# were too few: on fashion_mnist.flags (2026-12-04, AMD EPYC with AVX512-BF16) they read 2,408 and 2,573 img/s
# in two repeats minutes apart, 200 steps read 2,328 and 2,458, and the run averaged 2,330 (it trained 23.4
# minutes on a 20-minute budget; earlier runs 3-11% over).
CALIBRATION_WARMUP_STEPS = 10
CALIBRATION_STEPS = 20
CALIBRATION_SECONDS = 15.0


def measure_step_seconds(cfg: config_lib.Config, strategy: tf.distribute.Strategy, source: data_lib.DataSource,
                         plan: RunPlan, *, steps: int = CALIBRATION_STEPS,
                         warmup_steps: int = CALIBRATION_WARMUP_STEPS,
                         min_seconds: float = CALIBRATION_SECONDS) -> tuple[float, int]:
  """Seconds per training step on this machine: the real step and input pipeline, on a throwaway model.

  The model is built from cfg as a run builds it (so the same network, bank, objective and precision), trained for
  one untimed step (tracing), `warmup_steps` untimed ones, then rounds of `steps` timed ones on epoch 0's batches,
  as many as the first round's time says fill `min_seconds` (at least one), then dropped: the run itself starts
  from its own freshly built state, untouched by the measurement.

  Returns:
    (seconds per step, the number of timed steps).
  """
  with strategy.scope():
    state = build_state(cfg, num_instances=plan.num_instances, input_shape=plan.input_shape,
                        steps_per_epoch=plan.steps_per_epoch)
  loop = make_train_loop(state.model, strategy)
  dataset = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=plan.global_batch_size,
                                        seed=cfg.train.seed, epoch=0).repeat()
  iterator = iter(distribute_dataset(strategy, dataset))
  float(loop(iterator, tf.constant(1))["loss"])
  if warmup_steps:
    float(loop(iterator, tf.constant(warmup_steps))["loss"])
  start = time.time()
  float(loop(iterator, tf.constant(steps))["loss"])
  first = time.time() - start
  # How many more rounds comes from the first one's time, agreed by all workers: a clock per worker could stop
  # them after different numbers of steps, and every step is a collective (a worker would wait for the others).
  more = _agreed(strategy, max(0, math.ceil(min_seconds / max(first, 1e-9)) - 1), tf.reduce_max)
  start = time.time()
  if more:
    float(loop(iterator, tf.constant(more * steps))["loss"])
  timed = (1 + more) * steps
  return (first + time.time() - start) / timed, timed


def measure_neighbour_seconds(cfg: config_lib.Config, plan: RunPlan) -> float:
  """Seconds of one --neighbours search over a bank of this run's shape (random unit rows: the cost does not depend
  on the values); 0 when the option is off."""
  if not cfg.loss.neighbours:
    return 0.0
  rows = memory_bank.random_unit_rows(plan.num_instances, cfg.model.embedding_dim, seed=cfg.train.seed)
  start = time.time()
  objectives.nearest_rows(rows, num_neighbours=cfg.loss.neighbours).numpy()
  return time.time() - start


def epochs_that_fit(seconds: float, *, epoch_seconds: float, search_seconds: float,
                    loss: config_lib.LossConfig) -> int:
  """The most epochs (at least 1) whose steps and --neighbours searches take at most `seconds`."""
  epochs = max(1, math.floor(seconds / epoch_seconds))
  while epochs > 1 and epochs * epoch_seconds + search_seconds * len(schedules.neighbour_search_epochs(
      epochs, start=loss.neighbour_start, every=loss.neighbour_every_epochs)) > seconds:
    epochs -= 1
  return epochs


def _agreed(strategy: tf.distribute.Strategy, value: int, reduce: Callable = tf.reduce_min) -> int:
  """`reduce` (by default the smallest) of every worker's `value` (each worker measured its own), so all of them
  take the same decision: the same epochs, the same timed steps."""
  if strategy.num_replicas_in_sync == 1:
    return value
  gathered = strategy.gather(strategy.run(lambda: tf.constant([value], tf.int64)), axis=0)
  return int(reduce(gathered))



def epochs_for_budget(cfg: config_lib.Config, strategy: tf.distribute.Strategy, source: data_lib.DataSource,
                      plan: RunPlan) -> config_lib.Config:
  """cfg with train.epochs set by --train_minutes (cfg itself when it is 0).

  A model dir with a checkpoint keeps the epochs its run's start chose (config.json): a resume never re-measures,
  so its schedule is the one its first steps ran with. A fresh start measures (`measure_step_seconds`) and trains
  floor(train_minutes * 60 / (seconds per step * steps per epoch)) epochs, at least 1 (fewer with --neighbours:
  its searches are timed too and share the budget).

  Raises:
    ValueError: naming --train_minutes when a resume asks for another budget than its run's, or the budget fits no
      more epochs than --warmup_epochs.
  """
  minutes = cfg.train.train_minutes
  if not minutes:
    return cfg
  model_dir = cfg.train.model_dir
  if tf.train.latest_checkpoint(os.path.join(model_dir, checkpointing.CHECKPOINT_SUBDIR)):
    recorded = checkpointing.read_config(model_dir).train
    if recorded.train_minutes != minutes:
      kind = (f"its epochs fixed at {recorded.epochs} by --train_minutes={recorded.train_minutes:g}"
              if recorded.train_minutes else f"--epochs={recorded.epochs} and no --train_minutes")
      raise ValueError(f"--train_minutes: --model_dir={model_dir} holds a run with {kind}; this start has "
                       f"--train_minutes={minutes:g}. Resume with --train_minutes={recorded.train_minutes:g}, or pass "
                       "--train_minutes=0 --epochs=N to set the epochs yourself.")
    epochs = recorded.epochs
    logging.info("--train_minutes=%g: %d epochs, as this run's start measured", minutes, epochs)
  else:
    seconds, timed_steps = measure_step_seconds(cfg, strategy, source, plan)
    search = measure_neighbour_seconds(cfg, plan)
    epochs = _agreed(strategy, epochs_that_fit(minutes * 60, epoch_seconds=seconds * plan.steps_per_epoch,
                                               search_seconds=search, loss=cfg.loss))
    logging.info("--train_minutes=%g: the training step takes %.3f s here (%.0f img/s, %d timed steps), an epoch "
                 "%s%s: %d epochs", minutes, seconds, plan.global_batch_size / seconds, timed_steps,
                 results_lib.format_seconds(seconds * plan.steps_per_epoch),
                 f", a --neighbours search {results_lib.format_seconds(search)}" if search else "", epochs)
  if cfg.optim.warmup_epochs >= epochs:
    raise ValueError(f"--train_minutes: {minutes:g} minutes fit {epochs} epoch(s) on this machine, not more than "
                     f"--warmup_epochs={cfg.optim.warmup_epochs}; give more minutes or fewer warm-up epochs")
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


TIME_PARTS = ("train", "neighbours", "monitor", "checkpoint", "final_eval")


class _Clock:
  """Where a run's wall time goes: seconds in training steps, --neighbours searches, the kNN monitor, checkpoints and
  the final evaluation, and the rest ("other": start-up, building datasets, logging). Totals carry over a resume
  from the last record.
  """

  def __init__(self, started_at: float):
    self.started_at = started_at
    self.totals = dict.fromkeys(TIME_PARTS, 0.0)
    self.previous_wall = 0.0  # Wall seconds of earlier processes of this run (a resume).
    self.last_seconds = 0.0  # Of the last `measure`.

  def carry_over(self, record: dict[str, Any] | None) -> None:
    """Adds the cumulative times of the last kept metrics record (a resumed run continues its accounts)."""
    timing = (record or {}).get("time") or {}
    for part in TIME_PARTS:
      self.totals[part] += timing.get(f"{part}_seconds", 0.0)
    self.previous_wall = timing.get("wall_seconds", 0.0)

  @contextlib.contextmanager
  def measure(self, part: str) -> Iterator[None]:
    start = time.time()
    try:
      yield
    finally:
      self.last_seconds = time.time() - start
      self.totals[part] += self.last_seconds

  def summary(self) -> dict[str, float]:
    """{part_seconds..., other_seconds, wall_seconds}: the parts and other add up to the wall time."""
    wall = self.previous_wall + time.time() - self.started_at
    parts = {f"{part}_seconds": round(seconds, 3) for part, seconds in self.totals.items()}
    return {**parts, "other_seconds": round(wall - sum(self.totals.values()), 3), "wall_seconds": round(wall, 3)}

  def describe(self) -> str:
    summary, fmt = self.summary(), results_lib.format_seconds
    wall = max(summary["wall_seconds"], 1e-9)
    shares = ", ".join(f"{part.replace('_', ' ')} {fmt(summary[f'{part}_seconds'])} "
                       f"({100 * summary[f'{part}_seconds'] / wall:.1f}%)" for part in (*TIME_PARTS, "other")
                       if part != "neighbours" or summary["neighbours_seconds"])  # Only a --neighbours run has it.
    return f"wall {fmt(wall)}: {shares}"


def check_model_dir(model_dir: str) -> None:
  """Refuses a --model_dir that exists and is not a directory (before any work, so the refusal comes at once).

  Raises:
    ValueError: naming --model_dir and the path.
  """
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ValueError(f"--model_dir: {model_dir} exists and is not a directory; pass a directory (new or a run's)")


def _reason(error: BaseException) -> str:
  """The short reason of an OS or TensorFlow error: 'No space left on device', 'Permission denied', ..."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  if isinstance(error, tf.errors.OpError):
    return error.message.strip().splitlines()[0] if error.message.strip() else type(error).__name__
  return str(error) or type(error).__name__


@contextlib.contextmanager
def _writing(path: str, verb: str = "write") -> Iterator[None]:
  """Turns an OS (or TensorFlow file) error of a model-dir write into one OSError naming --model_dir and the path."""
  try:
    yield
  except (OSError, tf.errors.OpError) as e:
    raise OSError(f"--model_dir: cannot {verb} {path} ({_reason(e)})") from e


class _Run:
  """The Python side of one run: owns the model dir's files, summaries and console output.

  A start is refused (ValueError naming the flag or file) or accepted; only an accepted start changes the model dir:
  everything that can refuse it (config, data, the resume check, the checkpoint restore) runs first, then `_accept`
  writes flags.txt, config.json and run.json, trims metrics.jsonl and opens the TensorBoard writer.

  In a multi-worker run every worker trains, evaluates and saves (saving is a collective step), but only the chief
  writes into the model dir: the other workers save their checkpoints to a scratch dir they delete at once, and
  write no metrics, summaries or JSON. All workers restore from the chief's checkpoints (a shared filesystem).
  """

  def __init__(self, cfg: config_lib.Config, strategy: tf.distribute.Strategy,
               source: data_lib.DataSource | None = None, *, started_at: float | None = None,
               flags_text: str | None = None):
    self.cfg, self.strategy = cfg, strategy
    self.clock = _Clock(started_at or time.time())
    self.model_dir = cfg.train.model_dir
    self.chief = distribute.is_chief(strategy)
    check_model_dir(self.model_dir)
    self.source = source or data_lib.load_source(cfg.data)
    # What the recipe asks beyond this data and can be fitted to it (--num_negatives on a small folder): the run,
    # its config.json and a resume all use the fitted config.
    cfg, notes = config_lib.fit_to_data(cfg, num_instances=self.source.train.num_examples)
    self.cfg = cfg
    for note in notes:
      logging.warning("%s", note)
    self.plan = plan_run(cfg, self.source)
    self.identity = checkpointing.run_identity(
        dataset=cfg.data.dataset, num_instances=self.plan.num_instances, arch=cfg.model.arch,
        embedding_dim=cfg.model.embedding_dim, objective=cfg.loss.objective, image_shape=self.plan.input_shape,
        bank_dtype=cfg.bank.bank_dtype)
    checkpointing.check_resume(self.model_dir, self.identity)
    self.cfg = cfg = epochs_for_budget(cfg, strategy, self.source, self.plan)
    with strategy.scope():
      self.state = build_state(cfg, num_instances=self.plan.num_instances, input_shape=self.plan.input_shape,
                               steps_per_epoch=self.plan.steps_per_epoch)
    self.manager = checkpointing.make_manager(self.state.checkpoint, self.model_dir,
                                              max_to_keep=cfg.train.keep_checkpoints)
    restored = checkpointing.restore_or_initialize(self.manager)
    self.step = int(self.state.model.step.numpy())
    logging.info("%s at step %d (%s); %s, %d replica(s), --mixed_precision=%s: %s", "resumed" if restored else
                 "starting", self.step, restored or "no checkpoint", type(strategy).__name__,
                 strategy.num_replicas_in_sync, cfg.model.mixed_precision,
                 precision.resolve_policy(cfg.model.mixed_precision))
    if restored is None and cfg.bank.bank_init == "features":
      self._initialize_bank_from_features()
    self.evaluator = self._build_evaluator()
    self.monitor = self._build_evaluator(cfg.eval.monitor_examples)
    self.train_loop = make_train_loop(self.state.model, strategy)
    self.stop_signal: int | None = None
    kept_metrics = self._kept_metrics(self.step // self.plan.steps_per_epoch) if self.chief else []
    self.scratch_dir, self.writer = None, tf.summary.create_noop_writer()
    self._accept(flags_text, kept_metrics)

  def _accept(self, flags_text: str | None, kept_metrics: list[str]) -> None:
    """The first writes of an accepted start. The chief writes flags.txt (when given the flags: train.py does),
    config.json and run.json, each whole and describing this start, keeps the metrics.jsonl lines of the completed
    epochs, removes the temporary files of checkpoint writes that a kill cut short, drops the TensorBoard events of
    the steps it trains again, and opens the TensorBoard writer; other workers only pick their scratch dir.

    Raises:
      OSError: `--model_dir: cannot write PATH (reason)`, PATH the file or directory that failed.
    """
    if not self.chief:
      self.scratch_dir = os.path.join(self.model_dir, f".scratch-{distribute.task_name(self.strategy)}")
      return
    with _writing(self.model_dir, "create"):
      os.makedirs(self.model_dir, exist_ok=True)
    if flags_text is not None:
      path = os.path.join(self.model_dir, checkpointing.FLAGS_FILE)
      with _writing(path):
        checkpointing.write_text_atomic(path, flags_text)
    path = os.path.join(self.model_dir, checkpointing.CONFIG_FILE)
    with _writing(path):
      checkpointing.write_json_atomic(path, config_lib.to_dict(self.cfg))
    path = os.path.join(self.model_dir, checkpointing.RUN_FILE)
    with _writing(path):
      checkpointing.save_run_identity(self.model_dir, self.identity)
    path = os.path.join(self.model_dir, METRICS_FILE)
    if os.path.exists(path):
      with _writing(path):
        checkpointing.write_text_atomic(path, "".join(kept_metrics))
      if kept_metrics:
        self.clock.carry_over(json.loads(kept_metrics[-1]))
    for temp in tf.io.gfile.glob(os.path.join(self.manager.directory, "ckpt-*_temp")):
      # A checkpoint write that a kill cut short (TensorFlow writes under this name, then renames): dead data.
      shutil.rmtree(temp, ignore_errors=True)
    path = os.path.join(self.model_dir, "train")
    with _writing(path):
      if dropped := checkpointing.trim_events(path, self.step):
        logging.info("dropped %d TensorBoard events after step %d (this run trains those steps again)", dropped,
                     self.step)
      self.writer = tf.summary.create_file_writer(path)

  def _clean_train_features(self) -> np.ndarray:
    """float32 [N, D]: the train split, un-augmented, through the current network."""
    return knn.embed_split(self.state.model, self.source.train, self.cfg.augment,
                           image_size=self.plan.input_shape[0], batch_size=self.cfg.eval.eval_batch_size)[0]

  def _initialize_bank_from_features(self) -> None:
    start = time.time()
    self.state.bank.initialize_from(self._clean_train_features())
    logging.info("memory bank initialised from the untrained network's features (%s)",
                 results_lib.format_seconds(time.time() - start))

  def _kept_metrics(self, completed_epochs: int) -> list[str]:
    """The metrics.jsonl lines to keep on this start: those of the epochs the restored checkpoint completed. Lines of
    later epochs go (they will be trained, and logged, again), and so does a last line that a kill cut short.

    Every epoch's line is written before the checkpoint that completes it (`train`), so each completed epoch has its
    line. `_accept` writes the kept lines back; the last one's time accounts carry over into this process's clock.

    Raises:
      ValueError: naming metrics.jsonl and the line, when a line before the last is not a JSON record.
    """
    path = os.path.join(self.model_dir, METRICS_FILE)
    if not os.path.exists(path):
      return []
    try:
      with open(path) as f:
        lines = [line for line in f if line.strip()]
    except OSError as e:
      raise OSError(f"--model_dir: cannot read {path} ({_reason(e)})") from e
    kept = []
    for number, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if number == len(lines):  # A kill in the middle of the last append.
          break
        raise ValueError(f"{path} line {number} is not a JSON record ({e}); move the file away or use a new "
                         "--model_dir") from e
      if record["epoch"] <= completed_epochs:
        kept.append(line if line.endswith("\n") else line + "\n")
    return kept

  def _build_evaluator(self, max_examples: int = 0) -> knn.KnnEvaluator | None:
    """kNN of the eval split (its first max_examples images when > 0: the monitor's fixed subset)."""
    if self.source.eval is None or self.source.num_classes == 0:
      if not max_examples:
        logging.info("no labelled eval split: kNN evaluation is off")
      return None
    eval_split = data_lib.take_first(self.source.eval, max_examples)
    eval_ds = data_lib.make_eval_dataset(eval_split, self.cfg.augment, image_size=self.plan.input_shape[0],
                                         batch_size=self.cfg.eval.eval_batch_size)
    return knn.KnnEvaluator(eval_ds, data_lib.load_labels(self.source.train), k=self.cfg.eval.knn_k,
                            temperature=self.cfg.eval.knn_temperature, num_classes=self.source.num_classes,
                            split=eval_split)  # The split names an undecodable eval image.

  def _train_epoch(self, epoch: int) -> dict[str, float]:
    spe, end = self.plan.steps_per_epoch, (epoch + 1) * self.plan.steps_per_epoch
    dataset = data_lib.make_train_dataset(
        self.source, self.cfg.data, self.cfg.augment, batch_size=self.plan.global_batch_size,
        seed=self.cfg.train.seed, epoch=epoch, skip_batches=self.step - epoch * spe)
    iterator = iter(distribute_dataset(self.strategy, dataset))
    sums, count, start = dict.fromkeys(METRIC_NAMES, 0.0), 0, time.time()
    while self.step < end:
      num_steps = min(self.cfg.train.steps_per_loop, end - self.step)
      outputs = {k: float(v) for k, v in self._run_loop(iterator, num_steps).items()}
      if not math.isfinite(outputs["loss"]):
        raise FloatingPointError(
            f"loss is {outputs['loss']} in steps {self.step + 1}..{self.step + num_steps} (epoch {epoch + 1}); "
            f"stopping. The last good checkpoint is kept: {self.manager.latest_checkpoint}")
      self.step += num_steps
      count += num_steps
      if self.stop_signal is not None:  # Set by the SIGTERM handler: save where we are and stop.
        path = self._save()
        raise TrainingStopped(f"stopped by signal {self.stop_signal} at step {self.step} (epoch {epoch + 1}, "
                              f"step {self.step - epoch * spe}/{spe}); checkpoint {path} saved. Run the same "
                              "command to resume.")
      sums = {k: sums[k] + outputs[k] * num_steps for k in METRIC_NAMES}
      rate = count * self.plan.global_batch_size / (time.time() - start)
      logging.info("epoch %d/%d step %d/%d loss %.4f lr %.4g %.0f img/s epoch ETA %s", epoch + 1,
                   self.cfg.train.epochs, self.step - epoch * spe, spe, outputs["loss"], self._lr(),
                   rate, results_lib.format_seconds((end - self.step) * self.plan.global_batch_size / rate))
    seconds = time.time() - start
    means = {k: v / max(count, 1) for k, v in sums.items()}
    return {**means, "seconds": seconds, "images_per_sec": count * self.plan.global_batch_size / max(seconds, 1e-9)}

  def _run_loop(self, iterator, num_steps: int) -> dict[str, tf.Tensor]:
    try:
      return self.train_loop(iterator, tf.constant(num_steps))
    except data_lib.DECODE_ERRORS as e:  # A file that cannot be read or decoded is named; else e is re-raised.
      data_lib.name_undecodable(self.source.train, e)

  def _save(self) -> str:
    """Saves a checkpoint of the current step. TensorFlow writes it under a temporary name and only then updates
    the `checkpoint` index, so a failed write (disk full, permissions) leaves the previous checkpoint as latest.

    Raises:
      OSError: naming the checkpoint that failed and the previous one, which is intact.
    """
    try:
      if self.scratch_dir is None:
        return self.manager.save(checkpoint_number=self.step)
      # A non-chief worker takes part in the save but keeps nothing: the chief's copy is the checkpoint.
      scratch = checkpointing.make_manager(self.state.checkpoint, self.scratch_dir, max_to_keep=1)
      scratch.save(checkpoint_number=self.step)
      shutil.rmtree(self.scratch_dir, ignore_errors=True)
      return os.path.join(self.manager.directory, f"ckpt-{self.step}")
    except (tf.errors.OpError, OSError) as e:
      shutil.rmtree(os.path.join(self.manager.directory, f"ckpt-{self.step}_temp"), ignore_errors=True)
      raise OSError(f"cannot write the checkpoint of step {self.step} in {self.manager.directory} "
                    f"({type(e).__name__}: {e}); the previous checkpoint {self.manager.latest_checkpoint} is "
                    "intact and a rerun resumes from it") from e

  def _lr(self) -> float:
    return float(self.state.optimizer.learning_rate)

  def _evaluate(self, keys: tf.Tensor, evaluator: knn.KnnEvaluator | None = None) -> dict[str, float]:
    evaluator = evaluator or self.evaluator
    if evaluator is None:
      return {}
    return dict(evaluator.run(self.state.model, keys))

  def _record(self, epoch: int, values: dict[str, Any]) -> None:
    record = {"epoch": epoch + 1, "step": self.step, "lr": self._lr(), "knn_top1": None, "knn_top5": None, **values,
              "time": self.clock.summary()}
    if self.chief:
      path = os.path.join(self.model_dir, METRICS_FILE)
      with _writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    with self.writer.as_default(step=self.step):
      for name in ("loss", "lr", "normalizer", "positive_similarity", "images_per_sec", "knn_top1", "knn_top5"):
        if record.get(name) is not None:
          tf.summary.scalar(f"{'eval' if name.startswith('knn') else 'train'}/{name}", record[name])
    knn_text = "" if record["knn_top1"] is None else (
        f" bank kNN top-1 {100 * record['knn_top1']:.2f}% top-5 {100 * record['knn_top5']:.2f}%")
    logging.info("epoch %d done: loss %.4f%s, %.0f img/s, %s; %s", epoch + 1, record["loss"], knn_text,
                 record["images_per_sec"], results_lib.format_seconds(record["seconds"]), self.clock.describe())

  def train(self) -> None:
    cfg, spe = self.cfg, self.plan.steps_per_epoch
    first_epoch = self.step // spe
    last_monitor_seconds = None  # The kNN monitor's last cost in this process; None until it has run.
    for epoch in range(first_epoch, cfg.train.epochs):
      if cfg.loss.neighbours and schedules.neighbour_search_due(
          epoch, epochs=cfg.train.epochs, start=cfg.loss.neighbour_start, every=cfg.loss.neighbour_every_epochs,
          first_epoch=first_epoch):
        with self.clock.measure("neighbours"):
          self.state.model.refresh_neighbours()
        logging.info("epoch %d: found each bank row's %d nearest rows (%s)", epoch + 1, cfg.loss.neighbours,
                     results_lib.format_seconds(self.clock.last_seconds))
      with self.clock.measure("train"):
        values = self._train_epoch(epoch)
      last = epoch + 1 == cfg.train.epochs
      if self.monitor is not None and self._monitor_due(epoch, last_monitor_seconds):
        with self.clock.measure("monitor"):
          values.update(self._evaluate(self.state.bank.as_float32(), self.monitor))
        if last_monitor_seconds is None and not last:
          logging.info("the bank kNN monitor took %s; it runs again after an epoch (at most every %d) while its time "
                       "stays within %g%% of the wall time, and after the last epoch",
                       results_lib.format_seconds(self.clock.last_seconds), cfg.eval.eval_every_epochs,
                       100 * schedules.MONITOR_TIME_SHARE)
        last_monitor_seconds = self.clock.last_seconds
      # The record goes first: a kill after the checkpoint has it on disk already; a kill before the checkpoint
      # leaves a line of an epoch the resume trains again, and `_kept_metrics` drops it.
      self._record(epoch, values)
      self.writer.flush()
      if (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or last:
        with self.clock.measure("checkpoint"):
          self._save()

  def _monitor_due(self, epoch: int, last_monitor_seconds: float | None) -> bool:
    """Whether the bank kNN monitor runs after `epoch`: at most every --eval_every_epochs, within
    schedules.MONITOR_TIME_SHARE of the wall time (an epoch without it records no kNN). The workers of a
    multi-worker run agree (any due: all run), so that they evaluate after the same epochs whatever their clocks."""
    due = schedules.monitor_due(
        epoch, epochs=self.cfg.train.epochs, every=self.cfg.eval.eval_every_epochs,
        monitor_seconds=self.clock.totals["monitor"], last_monitor_seconds=last_monitor_seconds,
        wall_seconds=self.clock.summary()["wall_seconds"], share=schedules.MONITOR_TIME_SHARE)
    if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
      due = bool(_agreed(self.strategy, int(due), tf.reduce_max))
    return due

  def final_evaluation(self) -> dict[str, Any]:
    """kNN of the eval split against clean recomputed train features (the real number, docs/design.md)."""
    if self.evaluator is None or not self.cfg.eval.final_eval:
      logging.info("time: %s", self.clock.describe())
      return {}
    start = time.time()
    with self.clock.measure("final_eval"):
      results = self._evaluate(tf.constant(self._clean_train_features()))
    results = {"epoch": self.step // self.plan.steps_per_epoch, "step": self.step, "knn_k": self.cfg.eval.knn_k,
               "knn_temperature": self.cfg.eval.knn_temperature, "keys": "clean_train_features", **results,
               "seconds": time.time() - start, "time": self.clock.summary()}
    logging.info("time: %s", self.clock.describe())
    if self.chief:
      checkpointing.write_json_atomic(os.path.join(self.model_dir, FINAL_METRICS_FILE), results)
    logging.info("final kNN (k=%d) against clean train features: top-1 %.2f%% top-5 %.2f%%", self.cfg.eval.knn_k,
                 100 * results["knn_top1"], 100 * results["knn_top5"])
    return results


class TrainingStopped(Exception):
  """Training stopped on SIGTERM (preemption, `kill`, a scheduler) after saving a checkpoint of the current step."""


class WorkerLost(Exception):
  """A multi-worker run lost a peer: its collectives were aborted. Restart every worker to resume.

  TensorFlow's coordination service aborts the survivors' collectives when a peer dies (a reset connection: at
  once) or hangs (missed heartbeats: about 10 s on our machines), so no worker waits forever.
  """


@contextlib.contextmanager
def _stop_on_sigterm(current: _Run) -> Iterator[None]:
  """While training, SIGTERM asks the loop to save and stop after its current steps_per_loop chunk."""
  if threading.current_thread() is not threading.main_thread():  # Only the main thread may install handlers.
    yield
    return

  def request_stop(signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint after the current steps, then stopping", signum)
    current.stop_signal = signum

  previous = signal.signal(signal.SIGTERM, request_stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _peer_loss_raises_worker_lost(current: _Run) -> Iterator[None]:
  """In a multi-worker run, turns the aborted collectives of a lost peer into WorkerLost (a clear exit)."""
  try:
    yield
  except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as e:
    if not isinstance(current.strategy, tf.distribute.MultiWorkerMirroredStrategy):
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise WorkerLost(f"a peer worker was lost at step {current.step} ({type(e).__name__}: {message}). Restart "
                     "every worker with the same command: they resume from the chief's checkpoint "
                     f"{current.manager.latest_checkpoint}") from e


def run(cfg: config_lib.Config, strategy: tf.distribute.Strategy,
        source: data_lib.DataSource | None = None, *, flags_text: str | None = None) -> dict[str, Any]:
  """Trains (resuming from cfg.train.model_dir when it holds a checkpoint), then runs the final kNN evaluation.

  Args:
    cfg: a validated config.
    strategy: from distribute.make_strategy.
    source: the data; by default `data.load_source(cfg.data)` (tests and notebooks pass in-memory arrays).
    flags_text: the command's flags (train.py passes FLAGS.flags_into_string()), written to the model dir's
      flags.txt once the start is accepted; None leaves flags.txt as it is.

  Returns:
    The final evaluation results ({} when there is no labelled eval split or final_eval is off).

  Raises:
    ValueError: bad configuration or data, naming the flag or file (a refused start leaves the model dir as it
    was); OSError naming the path when the model dir cannot be written; FloatingPointError on a non-finite loss;
    TrainingStopped on SIGTERM, after saving a checkpoint of the step it stopped at; WorkerLost when a peer of a
    multi-worker run died.
  """
  started_at = time.time()
  config_lib.validate(cfg)
  current = _Run(cfg, strategy, source, started_at=started_at, flags_text=flags_text)
  with _peer_loss_raises_worker_lost(current), _stop_on_sigterm(current):
    current.train()
    return current.final_evaluation()
