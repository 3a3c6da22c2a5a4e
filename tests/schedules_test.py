"""Learning-rate schedules at their boundaries against hand-computed tables."""

from tests import testing  # noqa: F401  # First: splits the CPU before TensorFlow starts.

# isort: split

import keras
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import config as config_lib
from tf_instdisc import schedules

# cos(pi / 4) = 0.70710678: 0.05 * (1 + 0.70710678) = 0.085355339, 0.05 * (1 - 0.70710678) = 0.014644661.
_TABLES = {
    # base 0.1, 100 steps, x0.1 at steps 30 and 60.
    "step": ({"kind": "step", "boundaries": (30, 60), "warmup_steps": 0},
             {0: 0.1, 1: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 99: 0.001, 150: 0.001}),
    # Warmup: base * (step + 1) / 10 for step < 10.
    "step_warmup": ({"kind": "step", "boundaries": (30, 60), "warmup_steps": 10},
                    {0: 0.01, 4: 0.05, 8: 0.09, 9: 0.1, 10: 0.1, 29: 0.1, 30: 0.01, 60: 0.001}),
    "step_no_boundaries": ({"kind": "step", "boundaries": (), "warmup_steps": 0}, {0: 0.1, 50: 0.1, 1000: 0.1}),
    # 0.05 * (1 + cos(pi * step / 100)), flat at 0 past the end.
    "cosine": ({"kind": "cosine", "warmup_steps": 0},
               {0: 0.1, 25: 0.085355339, 50: 0.05, 75: 0.014644661, 100: 0.0, 120: 0.0}),
    # Warmup 20 steps, then a half cosine over the remaining 80: midpoint at step 60.
    "cosine_warmup": ({"kind": "cosine", "warmup_steps": 20},
                      {0: 0.005, 9: 0.05, 19: 0.1, 20: 0.1, 40: 0.085355339, 60: 0.05, 80: 0.014644661, 100: 0.0}),
}


def _cases():
  for name, (kwargs, table) in _TABLES.items():
    for step, expected in table.items():
      yield {"testcase_name": f"{name}_step{step}", "kwargs": kwargs, "step": step, "expected": expected}


class WarmupStepCosineTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_cases())
  def test_table(self, kwargs, step, expected):
    schedule = schedules.WarmupStepCosine(0.1, total_steps=100, **kwargs)
    self.assertAllClose(schedule(step), expected, rtol=1e-5, atol=1e-8)

  @parameterized.named_parameters(("step", "step"), ("cosine", "cosine"))
  def test_int64_step_in_tf_function_traces_once(self, kind):
    schedule = schedules.WarmupStepCosine(0.1, total_steps=100, warmup_steps=10, kind=kind, boundaries=(30, 60))
    function = tf.function(schedule)
    values = [float(function(tf.constant(step, tf.int64))) for step in (0, 10, 50)]
    self.assertAllClose(values, [float(schedule(0)), float(schedule(10)), float(schedule(50))])
    self.assertEqual(function.experimental_get_tracing_count(), 1)

  def test_factor(self):
    schedule = schedules.WarmupStepCosine(1.0, total_steps=10, kind="step", boundaries=(2, 4), factor=0.5)
    self.assertAllClose([schedule(s) for s in range(6)], [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])

  def test_config_round_trip(self):
    schedule = schedules.WarmupStepCosine(0.2, total_steps=50, warmup_steps=5, kind="step", boundaries=(20, 40),
                                          factor=0.3)
    rebuilt = schedules.WarmupStepCosine.from_config(schedule.get_config())
    self.assertAllClose([rebuilt(s) for s in (0, 4, 5, 20, 40)], [schedule(s) for s in (0, 4, 5, 20, 40)])

  def test_drives_an_optimizer(self):
    schedule = schedules.WarmupStepCosine(0.1, total_steps=100, kind="step", boundaries=(2,))
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    variable = tf.Variable(1.0)
    values = []
    for _ in range(3):
      values.append(float(optimizer.learning_rate))
      optimizer.apply_gradients([(tf.constant(0.0), variable)])
    self.assertAllClose(values, [0.1, 0.1, 0.01])


class BuildLrScheduleTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      # 10 steps per epoch, 200 epochs, decay at epochs 120 and 160 = steps 1200 and 1600.
      {"testcase_name": "paper_step", "overrides": {},
       "expected": {0: 0.03, 1199: 0.03, 1200: 0.003, 1599: 0.003, 1600: 0.0003, 1999: 0.0003}},
      {"testcase_name": "step_warmup", "overrides": {"warmup_epochs": 5},
       "expected": {0: 0.0006, 24: 0.015, 49: 0.03, 50: 0.03, 1200: 0.003}},
      # Cosine over steps 50..2000: the midpoint is step 1025.
      {"testcase_name": "cosine_warmup", "overrides": {"lr_schedule": "cosine", "warmup_epochs": 5},
       "expected": {0: 0.0006, 49: 0.03, 50: 0.03, 1025: 0.015, 2000: 0.0}},
      {"testcase_name": "cosine", "overrides": {"lr_schedule": "cosine"},
       "expected": {0: 0.03, 1000: 0.015, 2000: 0.0}},
      # A decay epoch past the end is never reached.
      {"testcase_name": "decay_past_end", "overrides": {"lr_decay_epochs": (100, 300)},
       "expected": {999: 0.03, 1000: 0.003, 1999: 0.003}},
  )
  def test_table(self, overrides, expected):
    fields = {"learning_rate": 0.03, "lr_decay_epochs": (120, 160), "lr_decay_factor": 0.1}
    cfg = config_lib.OptimConfig(**{**fields, **overrides})
    schedule = schedules.build_lr_schedule(cfg, steps_per_epoch=10, epochs=200)
    self.assertIsInstance(schedule, schedules.WarmupStepCosine)
    self.assertEqual(schedule.total_steps, 2000)
    steps = sorted(expected)
    self.assertAllClose([schedule(s) for s in steps], [expected[s] for s in steps], rtol=1e-5, atol=1e-9)


class NeighbourScheduleTest(parameterized.TestCase):

  @parameterized.parameters(
      (10, 0.5, 1, (5, 6, 7, 8, 9)),
      (10, 0.5, 2, (5, 7, 9)),
      (59, 0.5, 5, (30, 35, 40, 45, 50, 55)),
      (10, 0.0, 4, (0, 4, 8)),
      (1, 0.5, 1, ()),  # ceil(0.5) = 1: past the only epoch.
  )
  def test_search_epochs(self, epochs, start, every, expected):
    self.assertEqual(schedules.neighbour_search_epochs(epochs, start=start, every=every), expected)

  @parameterized.parameters(
      (5, 0, True),    # On the schedule.
      (6, 0, False),   # Between searches.
      (6, 6, True),    # A resume at epoch 6: no neighbours in memory, search now.
      (3, 3, False),   # A resume before the schedule begins: nothing to find yet.
      (5, 5, True),
  )
  def test_due(self, epoch, first_epoch, expected):
    self.assertEqual(schedules.neighbour_search_due(epoch, epochs=10, start=0.5, every=2, first_epoch=first_epoch),
                     expected)


def _simulate(epochs, *, every, epoch_seconds, monitor_seconds, start_seconds=5.0,
              share=schedules.MONITOR_TIME_SHARE):
  """A run on a fake clock: (the 0-based epochs after which the monitor ran, its seconds, the wall seconds)."""
  wall, total, last, ran = start_seconds, 0.0, None, []
  for epoch in range(epochs):
    wall += epoch_seconds
    if schedules.monitor_due(epoch, epochs=epochs, every=every, monitor_seconds=total, last_monitor_seconds=last,
                             wall_seconds=wall, share=share):
      ran.append(epoch)
      wall, total, last = wall + monitor_seconds, total + monitor_seconds, monitor_seconds
  return ran, total, wall


class MonitorScheduleTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("never", dict(epoch=9, every=0, last_monitor_seconds=None), False),  # 0: never, not even the last epoch.
      ("first_due_epoch_measures", dict(epoch=0, last_monitor_seconds=None, monitor_seconds=50.0), True),
      ("last_epoch_always", dict(epoch=9, monitor_seconds=50.0), True),
      ("last_epoch_off_every", dict(epoch=9, every=4, monitor_seconds=50.0), True),
      ("within_the_share", dict(epoch=3, monitor_seconds=4.0, last_monitor_seconds=1.0), True),  # 5 <= 0.05 x 100.
      ("past_the_share", dict(epoch=3, monitor_seconds=4.0, last_monitor_seconds=1.5), False),
      ("not_a_due_epoch", dict(epoch=2, every=2, monitor_seconds=0.0, last_monitor_seconds=None), False),
      ("due_epoch_of_every", dict(epoch=3, every=2, monitor_seconds=0.0, last_monitor_seconds=0.1), True),
  )
  def test_due(self, overrides, expected):
    arguments = dict(epochs=10, every=1, monitor_seconds=0.0, last_monitor_seconds=1.0, wall_seconds=100.0,
                     share=0.05)
    arguments.update(overrides)
    epoch = arguments.pop("epoch")
    self.assertEqual(schedules.monitor_due(epoch, **arguments), expected)

  def test_a_dear_monitor_keeps_within_its_share_of_the_wall_time(self):
    # The user's 4,000-image folder: 2 s epochs, and a monitor of a quarter of an epoch took 20% of the wall time.
    ran, seconds, wall = _simulate(100, every=1, epoch_seconds=2.0, monitor_seconds=0.5)
    self.assertEqual((ran[0], ran[-1]), (0, 99))  # The first measures its cost; the last is always scored.
    self.assertBetween(len(ran), 10, 30)  # Every few epochs all along, not only first and last.
    self.assertLessEqual(seconds / wall, schedules.MONITOR_TIME_SHARE + 0.5 / wall)  # Over only by the last one.
    self.assertGreater(seconds / wall, 0.04)

  def test_a_cheap_monitor_runs_after_every_due_epoch(self):
    # Fashion-MNIST: a monitor of 3.2% of the epochs' time still runs after each, and every --eval_every_epochs.
    self.assertEqual(_simulate(20, every=1, epoch_seconds=60.0, monitor_seconds=2.0)[0], list(range(20)))
    self.assertEqual(_simulate(20, every=3, epoch_seconds=60.0, monitor_seconds=2.0)[0], [2, 5, 8, 11, 14, 17, 19])

  @parameterized.product(epochs=(1, 2, 3, 7, 40), every=(1, 2, 5), epoch_seconds=(0.5, 2.0, 30.0),
                         monitor_seconds=(0.1, 1.0, 10.0))
  def test_its_time_is_bounded_and_the_first_and_last_due_epochs_run(self, epochs, every, epoch_seconds,
                                                                      monitor_seconds):
    ran, seconds, wall = _simulate(epochs, every=every, epoch_seconds=epoch_seconds, monitor_seconds=monitor_seconds)
    due = [e for e in range(epochs) if (e + 1) % every == 0 or e + 1 == epochs]
    self.assertEqual((ran[0], ran[-1]), (due[0], due[-1]))
    self.assertContainsSubset(ran, due)
    # Within the share at every decision; the first (a measurement) and the last can only add one cost each.
    self.assertLessEqual(seconds, max(schedules.MONITOR_TIME_SHARE * wall, monitor_seconds) + monitor_seconds)


if __name__ == "__main__":
  tf.test.main()
