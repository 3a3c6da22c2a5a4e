"""Learning-rate schedules in steps: the paper's step decay and a cosine option, both with optional linear warmup.

train_lib converts the epoch-based flags to steps once (it alone knows the dataset size) and builds these.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tf_instdisc import config as config_lib


class WarmupStepCosine(keras.optimizers.schedules.LearningRateSchedule):
  """lr(step): linear warmup to base_lr, then x factor at each boundary (step) or a half cosine to 0 (cosine)."""

  def __init__(self, base_lr: float, *, total_steps: int, warmup_steps: int = 0, kind: str = "step",
               boundaries: tuple[int, ...] = (), factor: float = 0.1):
    self.base_lr, self.total_steps, self.warmup_steps = base_lr, total_steps, warmup_steps
    self.kind, self.boundaries, self.factor = kind, tuple(boundaries), factor

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    if self.kind == "cosine":
      span = max(self.total_steps - self.warmup_steps, 1)
      progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
      lr = 0.5 * self.base_lr * (1.0 + tf.cos(math.pi * progress))
    else:
      passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] + [tf.constant(0.0)])
      lr = self.base_lr * tf.pow(self.factor, passed)
    if self.warmup_steps:
      lr = tf.where(step < self.warmup_steps, self.base_lr * (step + 1.0) / self.warmup_steps, lr)
    return lr

  def get_config(self):
    return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "kind": self.kind, "boundaries": self.boundaries, "factor": self.factor}


def build_lr_schedule(cfg: config_lib.OptimConfig, *, steps_per_epoch: int, epochs: int) -> WarmupStepCosine:
  """The schedule of --lr_schedule with the epoch flags turned into steps (decay epochs past the end are unused)."""
  return WarmupStepCosine(
      cfg.learning_rate, total_steps=steps_per_epoch * epochs, warmup_steps=steps_per_epoch * cfg.warmup_epochs,
      kind=cfg.lr_schedule, boundaries=tuple(steps_per_epoch * e for e in cfg.lr_decay_epochs),
      factor=cfg.lr_decay_factor)


def neighbour_search_epochs(epochs: int, *, start: float, every: int) -> tuple[int, ...]:
  """The 0-based epochs before which the bank's nearest rows are found again (--neighbours): from epoch
  ceil(start * epochs) on, every `every` epochs. Empty when that first epoch is past the end."""
  first = math.ceil(start * epochs)
  return tuple(range(first, epochs, every))


def neighbour_search_due(epoch: int, *, epochs: int, start: float, every: int, first_epoch: int) -> bool:
  """Whether to search before `epoch`: on the schedule, or at `first_epoch` (the first this process trains: a
  resume has no neighbours in memory) once the schedule has begun."""
  scheduled = neighbour_search_epochs(epochs, start=start, every=every)
  return epoch in scheduled or (epoch == first_epoch and bool(scheduled) and epoch > scheduled[0])


# The most of a run's wall time (so far) that the kNN monitor after an epoch may take. Run after every epoch it took
# 21-26% of the wall time on a 4,000-image folder (2 s epochs, fashion_mnist.flags) and 3.2% on Fashion-MNIST: a
# monitor within the share still runs after every epoch, a dearer one after every few.
MONITOR_TIME_SHARE = 0.05


def monitor_due(epoch: int, *, epochs: int, every: int, monitor_seconds: float, last_monitor_seconds: float | None,
                wall_seconds: float, share: float) -> bool:
  """Whether the kNN monitor runs after `epoch` (0-based) of `epochs`, keeping its time within `share` of the wall.

  `every` (--eval_every_epochs) is the most often it may run: after every every-th epoch (0: never). Of those epochs
  it runs after the first (last_monitor_seconds None: its cost not yet measured) and after the last always; after
  the others only while its time stays within the share: monitor_seconds (its time so far) + last_monitor_seconds
  (its last cost, taken as the next one's) <= share x wall_seconds (the run's wall time so far).
  """
  if not every:
    return False
  if epoch + 1 == epochs:
    return True
  if (epoch + 1) % every:
    return False
  return last_monitor_seconds is None or monitor_seconds + last_monitor_seconds <= share * wall_seconds
