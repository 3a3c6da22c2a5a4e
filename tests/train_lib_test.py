"""Tests of the train step, the multi-step loop and the run loop on tiny in-memory data, and of its faults: refused
starts that change nothing, kills at every moment of an epoch's end, model dirs that cannot be written."""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import time
import unittest
from unittest import mock

from tests import testing

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import checkpointing
from tf_instdisc import data as data_lib
from tf_instdisc import distribute
from tf_instdisc import instance_discrimination
from tf_instdisc import objectives
from tf_instdisc import train_lib


def _build(cfg, source, strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  plan = train_lib.plan_run(cfg, source)
  with strategy.scope():
    state = train_lib.build_state(cfg, num_instances=plan.num_instances, input_shape=plan.input_shape,
                                  steps_per_epoch=plan.steps_per_epoch)
  return state, plan


def _first_batch(cfg, source, plan):
  ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=plan.global_batch_size,
                                   seed=cfg.train.seed, epoch=0)
  return next(iter(ds))


def _compiled_step(cfg):
  """(state, tf.function step, first batch) on the tiny source: what the single-step tests share."""
  source = testing.tiny_source()
  state, plan = _build(cfg, source)
  step = tf.function(state.model.train_step)
  return state, step, _first_batch(cfg, source, plan)


def numpy_two_view(features, other, bank, ids, temperature=0.1):
  """Mean over the batch of one view's two-view softmax loss (tests/objectives_test.py has the per-term twin)."""
  losses = []
  for b in range(len(ids)):
    logits = np.concatenate([bank @ features[b], [features[b] @ other[b]]]) / temperature
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    losses.append(-0.5 * (log_probs[ids[b]] + log_probs[-1]))
  return float(np.mean(losses))


def _read_metrics(model_dir):
  with open(os.path.join(model_dir, train_lib.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


class TrainStepTest(tf.test.TestCase, parameterized.TestCase):

  def test_loss_reads_the_bank_before_the_step_writes_it(self):
    cfg = testing.tiny_config(objective="softmax", temperature=0.1, bank_momentum=0.5)
    source = testing.tiny_source()
    state, plan = _build(cfg, source)
    batch = _first_batch(cfg, source, plan)
    ids = batch[data_lib.ID_KEY]
    old_bank = state.bank.bank.numpy()
    features = state.model(batch[data_lib.IMAGE_KEY], training=True).numpy()
    step = tf.function(state.model.train_step)
    loss = float(step(batch)["loss"])
    new_bank = state.bank.bank.numpy()

    def softmax_loss(bank):
      return float(tf.reduce_mean(objectives.softmax_instance_loss(features @ bank.T, ids, temperature=0.1)))

    expected_rows = 0.5 * old_bank[ids.numpy()] + 0.5 * features
    expected_rows /= np.linalg.norm(expected_rows, axis=1, keepdims=True)
    self.assertAllClose(new_bank[ids.numpy()], expected_rows, atol=1e-5)
    untouched = np.setdiff1d(np.arange(plan.num_instances), ids.numpy())
    self.assertAllEqual(new_bank[untouched], old_bank[untouched])
    self.assertAllClose(loss, softmax_loss(old_bank), atol=1e-5)
    self.assertGreater(abs(loss - softmax_loss(new_bank)), 1e-3)

  def test_two_views_pair_each_id_with_both_features_and_its_bank_row(self):
    cfg = testing.tiny_config(objective="softmax", temperature=0.1, bank_momentum=0.5, views=2)
    source = testing.tiny_source()
    state, plan = _build(cfg, source)
    batch = _first_batch(cfg, source, plan)
    ids = batch[data_lib.ID_KEY].numpy()
    self.assertNotAllClose(batch[data_lib.IMAGE_KEY], batch[data_lib.SECOND_VIEW_KEY])  # Two augmentations.
    old_bank = state.bank.bank.numpy()
    both = state.model(tf.concat([batch[data_lib.IMAGE_KEY], batch[data_lib.SECOND_VIEW_KEY]], 0), training=True)
    first, second = np.split(both.numpy(), 2)
    step = tf.function(state.model.train_step)
    loss = float(step(batch)["loss"])
    # Each view: softmax over [bank, other view] with the bank row and the other view as positives (NumPy twin).
    expected_loss = np.mean([
        0.5 * (numpy_two_view(first, second, old_bank, ids) + numpy_two_view(second, first, old_bank, ids))])
    self.assertAllClose(loss, expected_loss, atol=1e-4)
    # The bank row of id i moves towards the mean of its two views' features.
    expected_rows = 0.5 * old_bank[ids] + 0.5 * (first + second) / 2
    expected_rows /= np.linalg.norm(expected_rows, axis=1, keepdims=True)
    self.assertAllClose(state.bank.bank.numpy()[ids], expected_rows, atol=1e-5)

  def test_group_term_adds_to_the_two_view_loss(self):
    base = testing.tiny_config(objective="softmax", temperature=0.1, views=2)
    losses = {}
    for weight in (0.0, 1.0):
      cfg = testing.replace(base, group_clusters=4, group_weight=weight)
      _, step, batch = _compiled_step(cfg)
      losses[weight] = float(step(batch)["loss"])
    _, step, batch = _compiled_step(base)
    self.assertAllClose(losses[0.0], float(step(batch)["loss"]), atol=1e-6)  # Weight 0 is the plain two views.
    self.assertGreater(losses[1.0], losses[0.0])  # A cross-entropy over 4 groups adds a positive term.

  def test_one_view_group_term_targets_the_groups_of_the_bank_rows(self):
    cfg = testing.tiny_config(objective="softmax", temperature=0.1, group_clusters=4, group_weight=1.0)
    source = testing.tiny_source()
    state, plan = _build(cfg, source)
    batch = _first_batch(cfg, source, plan)
    ids = batch[data_lib.ID_KEY].numpy()
    bank = state.bank.bank.numpy()
    features = state.model(batch[data_lib.IMAGE_KEY], training=True).numpy()
    seed = tf.random.experimental.stateless_fold_in(tf.constant([cfg.train.seed, 0], tf.int64), 1)
    centroids, assignments = objectives.spherical_kmeans(tf.constant(bank[ids]), num_clusters=4,
                                                         iterations=instance_discrimination.GROUP_ITERATIONS, seed=seed)
    group = objectives.group_loss(tf.constant(features), centroids, assignments, temperature=0.2)
    instance = objectives.softmax_instance_loss(tf.constant(features @ bank.T), tf.constant(ids), temperature=0.1)
    step = tf.function(state.model.train_step)
    self.assertAllClose(float(step(batch)["loss"]), float(tf.reduce_mean(instance + group)), atol=1e-5)

  def test_nce_normalizer_fixed_from_first_batch(self):
    state, step, batch = _compiled_step(
        testing.tiny_config(objective="nce", num_negatives=16, normalizer_momentum=0.0))
    self.assertLess(float(state.bank.normalizer), 0.0)
    first = float(step(batch)["normalizer"])
    self.assertGreater(first, 0.0)
    self.assertEqual(float(state.bank.normalizer), first)
    for _ in range(3):
      reported = float(step(batch)["normalizer"])
      self.assertEqual(float(state.bank.normalizer), first)  # Z itself never moves.
      # The metric is the running mean of the steps' Z: n equal float32 values summed and divided by n can round
      # one ulp away (3 * Z / 3), so it is equal up to that.
      self.assertAllClose(reported, first, rtol=1e-6, atol=0.0)

  def test_nce_normalizer_moving_average_changes(self):
    _, step, batch = _compiled_step(testing.tiny_config(objective="nce", num_negatives=16, normalizer_momentum=0.5))
    values = [float(step(batch)["normalizer"]) for _ in range(4)]
    self.assertGreater(len(set(values)), 1)

  def test_negatives_repeat_for_the_same_seed_and_step(self):
    cfg = testing.tiny_config(objective="nce", num_negatives=8)
    losses = []
    for _ in range(2):
      _, step, batch = _compiled_step(cfg)
      losses.append(float(step(batch)["loss"]))
    self.assertEqual(losses[0], losses[1])

  @parameterized.named_parameters(
      ("nce_shared", dict(objective="nce", negative_sampling="shared")),
      ("nce_per_example", dict(objective="nce", negative_sampling="per_example")),
      ("nce_exclude_positive", dict(objective="nce", exclude_positive=True)),
      ("nce_moving_z", dict(objective="nce", normalizer_momentum=0.9)),
      ("softmax", dict(objective="softmax")),
      ("parametric", dict(objective="parametric")),
      ("proximal", dict(objective="softmax", proximal_lambda=0.1, bank_momentum=0.0)),
      ("bfloat16", dict(mixed_precision="bfloat16")),
      ("bank_bfloat16_nce", dict(bank_dtype="bfloat16")),
      ("bank_float16_softmax", dict(bank_dtype="float16", objective="softmax")),
      ("float16", dict(mixed_precision="float16")),
      ("cosine_warmup", dict(lr_schedule="cosine", warmup_epochs=1)),
      ("two_views_softmax", dict(objective="softmax", views=2)),
      ("two_views_nce", dict(objective="nce", views=2)),
      ("two_views_parametric", dict(objective="parametric", views=2)),
      ("two_views_group", dict(objective="softmax", views=2, group_clusters=4)),
      ("two_views_group_nce_proximal", dict(objective="nce", views=2, group_clusters=3, proximal_lambda=0.1)),
      ("one_view_group", dict(objective="softmax", group_clusters=4)),
      ("neighbours_nce", dict(objective="nce", neighbours=3)),
      ("neighbours_two_views_softmax", dict(objective="softmax", views=2, neighbours=2)),
      ("blur_erasing", dict(blur_prob=0.5, erasing_prob=0.5)),
  )
  def test_every_mode_trains_with_finite_loss(self, overrides):
    cfg = testing.tiny_config(**overrides)
    source = testing.tiny_source()
    state, plan = _build(cfg, source)
    loop = train_lib.make_train_loop(state.model, tf.distribute.get_strategy())
    ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=16, seed=0, epoch=0)
    before = [v.numpy() for v in state.model.trainable_variables]
    outputs = loop(iter(ds), tf.constant(3))
    self.assertTrue(np.isfinite(float(outputs["loss"])))
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, state.model.trainable_variables)]
    self.assertTrue(any(changed))
    norms = np.linalg.norm(state.bank.as_float32().numpy(), axis=1)
    self.assertAllClose(norms, np.ones_like(norms), atol=1e-5 if cfg.bank.bank_dtype == "float32" else 1e-2)

  def test_train_loop_traces_once(self):
    cfg = testing.tiny_config()
    source = testing.tiny_source()
    state, plan = _build(cfg, source)
    loop = train_lib.make_train_loop(state.model, tf.distribute.get_strategy())
    for epoch in range(3):
      ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=16, seed=0, epoch=epoch)
      loop(iter(ds), tf.constant(1 + epoch))
    self.assertEqual(loop.experimental_get_tracing_count(), 1)

  def test_two_replicas_keep_identical_banks(self):
    strategy = testing.two_replica_strategy()
    cfg = testing.tiny_config(objective="nce", num_negatives=8)
    source = testing.tiny_source()
    state, plan = _build(cfg, source, strategy)
    loop = train_lib.make_train_loop(state.model, strategy)
    ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=16, seed=0, epoch=0)
    initial = state.bank.bank.values[0].numpy()
    outputs = loop(iter(strategy.experimental_distribute_dataset(ds)), tf.constant(4))
    self.assertTrue(np.isfinite(float(outputs["loss"])))
    copies = [v.numpy() for v in state.bank.bank.values]
    self.assertLen(copies, 2)
    self.assertAllEqual(copies[0], copies[1])
    self.assertFalse(np.array_equal(copies[0], initial))
    self.assertEqual(float(state.bank.normalizer.values[0]), float(state.bank.normalizer.values[1]))


def _train_steps(cfg, source, strategy, num_steps):
  """Trains num_steps steps one call at a time under `strategy`; returns (state, [loss of each step])."""
  state, plan = _build(cfg, source, strategy)
  loop = train_lib.make_train_loop(state.model, strategy)
  ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=plan.global_batch_size, seed=0, epoch=0)
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  return state, [float(loop(iterator, tf.constant(1))["loss"]) for _ in range(num_steps)]


def _values(variable):
  """Every replica's copy of a (possibly mirrored) variable."""
  return [v.numpy() for v in getattr(variable, "values", [variable])]


class ReplicaEquivalenceTest(tf.test.TestCase, parameterized.TestCase):
  """Two replicas on the same global batch train exactly as one device (docs/design.md: sync BN, global draws)."""

  @parameterized.named_parameters(
      ("nce_shared", dict(objective="nce", negative_sampling="shared", num_negatives=8)),
      ("nce_per_example", dict(objective="nce", negative_sampling="per_example", num_negatives=8)),
      ("softmax_head_bn", dict(objective="softmax", head_batchnorm=True)),
      ("nce_mlp_head", dict(objective="nce", num_negatives=8, head_batchnorm=True, head_hidden_dim=8)),
      ("proximal", dict(objective="softmax", proximal_lambda=0.1)),
      ("two_views_nce", dict(objective="nce", num_negatives=8, views=2)),
      ("two_views_group", dict(objective="softmax", views=2, group_clusters=4)),
      ("one_view_group", dict(objective="softmax", group_clusters=4)),
  )
  def test_two_replicas_match_one_device(self, overrides):
    # Float rounding differs (convolutions over 8 vs 16 images, sums of halves): ~1e-7 per step. What can amplify
    # it is max pooling: the tiny images clip at 0 and 255, so a pooling window often holds exact ties, and a 1e-7
    # difference decides which input gets the gradient. On our AMD EPYC machines that flips a route by step 4 at lr
    # 0.01 (a 1e-2 jump in the loss, not a drift): tau 0.2, lr 0.002 and 3 steps keep the runs on the same routes,
    # or a flipped route within lr x gradient ~ 1e-5 of a weight, hence 1e-4 on the weights and the bank.
    cfg = testing.tiny_config(temperature=0.2, learning_rate=0.002, **overrides)
    source = testing.tiny_source()
    one, one_losses = _train_steps(cfg, source, tf.distribute.OneDeviceStrategy("/cpu:0"), 3)
    two, two_losses = _train_steps(cfg, source, testing.two_replica_strategy(), 3)
    self.assertAllClose(two_losses, one_losses, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(two.model.weights, one.model.weights, strict=True):
      for copy in _values(mine):
        self.assertAllClose(copy, theirs.numpy(), atol=1e-4, rtol=1e-5, msg=mine.path)  # rtol: Z is ~1e2.
    bank_copies = _values(two.bank.bank)
    self.assertAllEqual(bank_copies[0], bank_copies[1])  # Bit-identical replicas.
    self.assertAllClose(bank_copies[0], one.bank.bank.numpy(), atol=1e-4, rtol=0)
    self.assertAllClose(_values(two.bank.normalizer)[0], float(one.bank.normalizer), rtol=1e-5)

  def test_checkpoints_move_between_replica_counts(self):
    cfg = testing.tiny_config(objective="nce", num_negatives=8)
    source = testing.tiny_source()
    two, _ = _train_steps(cfg, source, testing.two_replica_strategy(), 2)
    two_dir = self.create_tempdir().full_path
    checkpointing.make_manager(two.checkpoint, two_dir, max_to_keep=1).save(checkpoint_number=2)

    one, _ = _build(cfg, source, tf.distribute.OneDeviceStrategy("/cpu:0"))  # 2 replicas -> 1.
    checkpointing.restore_or_initialize(checkpointing.make_manager(one.checkpoint, two_dir, max_to_keep=1))
    self.assertAllEqual(one.bank.bank.numpy(), _values(two.bank.bank)[0])
    self.assertEqual(float(one.bank.normalizer), _values(two.bank.normalizer)[0])
    self.assertEqual(int(one.model.step), 2)
    for mine, theirs in zip(one.model.weights, two.model.weights, strict=True):
      self.assertAllEqual(mine.numpy(), _values(theirs)[0])

    one.bank.bank.assign(tf.math.l2_normalize(one.bank.bank + 0.5, axis=1))  # 1 -> 2 replicas: a changed bank.
    one_dir = self.create_tempdir().full_path
    checkpointing.make_manager(one.checkpoint, one_dir, max_to_keep=1).save(checkpoint_number=3)
    back, _ = _build(cfg, source, testing.two_replica_strategy())
    checkpointing.restore_or_initialize(checkpointing.make_manager(back.checkpoint, one_dir, max_to_keep=1))
    for copy in _values(back.bank.bank):
      self.assertAllEqual(copy, one.bank.bank.numpy())
    for mine, theirs in zip(back.model.weights, one.model.weights, strict=True):
      for copy in _values(mine):
        self.assertAllEqual(copy, theirs.numpy())

  def test_per_replica_batchnorm_differs(self):
    # The control: without synchronised statistics the replicas normalise their halves separately.
    cfg = testing.tiny_config(objective="softmax", sync_batchnorm=False)
    source = testing.tiny_source()
    _, one_losses = _train_steps(cfg, source, tf.distribute.OneDeviceStrategy("/cpu:0"), 1)
    _, two_losses = _train_steps(cfg, source, testing.two_replica_strategy(), 1)
    self.assertGreater(abs(one_losses[0] - two_losses[0]), 1e-4)


class RunTest(tf.test.TestCase):

  def test_run_writes_metrics_and_final_evaluation(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, objective="softmax", epochs=3, temperature=0.1)
    results = train_lib.run(cfg, distribute.make_strategy("one_device"), source=testing.tiny_source())
    records = _read_metrics(model_dir)
    self.assertEqual([r["epoch"] for r in records], [1, 2, 3])
    for record in records:
      for key in ("epoch", "loss", "images_per_sec", "seconds", "lr"):
        self.assertIsNotNone(record[key], key)
    for record in (records[0], records[-1]):  # The monitor after the first and the last epoch; between, by time.
      self.assertBetween(record["knn_top1"], 0.0, 1.0)
      self.assertBetween(record["knn_top5"], record["knn_top1"], 1.0)
    self.assertLess(records[-1]["loss"], records[0]["loss"])
    for name in (checkpointing.CONFIG_FILE, "run.json", train_lib.FINAL_METRICS_FILE):
      self.assertTrue(os.path.exists(os.path.join(model_dir, name)), name)
    self.assertBetween(results["knn_top1"], 0.0, 1.0)
    self.assertGreaterEqual(results["knn_top5"], results["knn_top1"])
    self.assertNotEmpty(tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")))

  def test_time_accounts_add_up_to_the_wall_time(self):
    model_dir = self.create_tempdir().full_path
    # --neighbours so that every part has time in it: the search runs before the third epoch.
    cfg = testing.tiny_config(model_dir, objective="softmax", epochs=3, neighbours=2, neighbour_start=0.5)
    start = time.time()
    results = train_lib.run(cfg, distribute.make_strategy("one_device"), source=testing.tiny_source())
    measured = time.time() - start
    timing = results["time"]
    parts = [timing[f"{part}_seconds"] for part in (*train_lib.TIME_PARTS, "other")]
    self.assertAllClose(sum(parts), timing["wall_seconds"], atol=0.01)
    self.assertTrue(all(value >= 0 for value in parts), timing)
    self.assertBetween(timing["wall_seconds"], 0.95 * measured, measured)
    for part in train_lib.TIME_PARTS:
      self.assertGreater(timing[f"{part}_seconds"], 0.0, part)
    with open(os.path.join(model_dir, train_lib.FINAL_METRICS_FILE)) as f:
      self.assertEqual(json.load(f)["time"], timing)
    walls = [r["time"]["wall_seconds"] for r in _read_metrics(model_dir)]
    self.assertEqual(walls, sorted(walls))
    self.assertLess(walls[-1], timing["wall_seconds"])

  def test_the_console_line_names_the_neighbour_searches_only_when_there_were_some(self):
    clock = train_lib._Clock(time.time())
    clock.totals["train"] = 60.0
    self.assertRegex(clock.describe(), r"^wall \S+: train 1m00s \(\S+%\), monitor ")
    self.assertNotIn("neighbours", clock.describe())
    clock.totals["neighbours"] = 30.0
    self.assertIn("neighbours 0m30s", clock.describe())

  def test_time_accounts_carry_over_a_resume(self):
    model_dir = self.create_tempdir().full_path
    strategy, source = distribute.make_strategy("one_device"), testing.tiny_source()
    train_lib.run(testing.tiny_config(model_dir, epochs=1, final_eval=False), strategy, source=source)
    first = _read_metrics(model_dir)[-1]["time"]
    start = time.time()
    train_lib.run(testing.tiny_config(model_dir, epochs=2, final_eval=False), strategy, source=source)
    second = _read_metrics(model_dir)[-1]["time"]
    self.assertGreater(second["train_seconds"], first["train_seconds"])
    self.assertBetween(second["wall_seconds"] - first["wall_seconds"], 0.0, time.time() - start)

  def test_neighbour_searches_follow_the_schedule_and_a_resume_searches_again(self):
    model_dir = self.create_tempdir().full_path
    strategy, source = distribute.make_strategy("one_device"), testing.tiny_source()
    epochs = []
    original = instance_discrimination.InstanceDiscrimination.refresh_neighbours

    def search(model):
      epochs.append(int(model.step.numpy()) // 4)  # 4 steps per epoch: the epoch about to train, 0-based.
      original(model)

    overrides = dict(neighbours=2, neighbour_start=0.5, neighbour_every_epochs=5, final_eval=False)
    with mock.patch.object(instance_discrimination.InstanceDiscrimination, "refresh_neighbours", search):
      train_lib.run(testing.tiny_config(model_dir, epochs=3, **overrides), strategy, source=source)
      self.assertEqual(epochs, [2])  # ceil(0.5 x 3) = 2.
      # Resumed for a 4th epoch: the table is not in the checkpoint, so the first epoch of the resume searches.
      train_lib.run(testing.tiny_config(model_dir, epochs=4, **overrides), strategy, source=source)
    self.assertEqual(epochs, [2, 3])
    timing = _read_metrics(model_dir)[-1]["time"]
    self.assertGreater(timing["neighbours_seconds"], 0.0)

  def test_the_monitor_runs_within_its_time_share_and_after_the_first_and_last_epochs(self):
    strategy, source = distribute.make_strategy("one_device"), testing.tiny_source()
    monitored = {}
    # No share: only the first epoch (its cost is measured) and the last; any share: every epoch.
    for share in (0.0, float("inf")):
      model_dir = self.create_tempdir().full_path
      with mock.patch.object(train_lib.schedules, "MONITOR_TIME_SHARE", share):
        train_lib.run(testing.tiny_config(model_dir, epochs=4, final_eval=False), strategy, source=source)
      records = _read_metrics(model_dir)
      monitored[share] = [r["knn_top1"] is not None for r in records]
      self.assertEqual([r["knn_top5"] is not None for r in records], monitored[share])
      self.assertGreater(records[-1]["time"]["monitor_seconds"], 0.0)
    self.assertEqual(monitored, {0.0: [True, False, False, True], float("inf"): [True, True, True, True]})
    # A resume measures the cost again: the first epoch it trains is monitored.
    with mock.patch.object(train_lib.schedules, "MONITOR_TIME_SHARE", 0.0):
      train_lib.run(testing.tiny_config(model_dir, epochs=7, final_eval=False), strategy, source=source)
    self.assertEqual([r["knn_top1"] is not None for r in _read_metrics(model_dir)],
                     [True, True, True, True, True, False, True])  # Epoch 5: the resume's first; 7: the last.

  def test_monitor_scores_a_fixed_subset_and_the_final_evaluation_all(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, epochs=1, monitor_examples=8)
    current = train_lib._Run(cfg, distribute.make_strategy("one_device"), testing.tiny_source())
    count = lambda evaluator: sum(len(b[data_lib.LABEL_KEY]) for b in evaluator.eval_dataset)  # noqa: E731
    self.assertEqual(count(current.monitor), 8)
    self.assertEqual(count(current.evaluator), 32)

  def test_one_replica_reads_the_dataset_itself_and_two_get_the_strategy_wrapper(self):
    dataset = tf.data.Dataset.range(4)
    self.assertIs(train_lib.distribute_dataset(distribute.make_strategy("one_device"), dataset), dataset)
    self.assertIsInstance(train_lib.distribute_dataset(testing.two_replica_strategy(), dataset.batch(2)),
                          tf.distribute.DistributedDataset)

  def test_validation_slice_is_the_eval_split_and_leaves_the_keys(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, epochs=1, validation_examples=16)
    source = data_lib.hold_out_validation(testing.tiny_source(), 16)
    current = train_lib._Run(cfg, distribute.make_strategy("one_device"), source)
    self.assertEqual(current.plan.num_instances, 48)
    self.assertLen(current.evaluator.train_labels, 48)
    self.assertEqual(sum(len(b[data_lib.LABEL_KEY]) for b in current.evaluator.eval_dataset), 16)

  def test_tfds_cifar10_and_imagenet_paths_train_end_to_end(self):
    import tensorflow_datasets as tfds

    for dataset, extra in (("cifar10", {}), ("imagenet2012", {"image_size": 24, "eval_crop_fraction": 0.875})):
      with self.subTest(dataset), tfds.testing.mock_data(num_examples=32):
        model_dir = self.create_tempdir().full_path
        cfg = testing.tiny_config(model_dir, dataset=dataset, max_train_examples=0, max_eval_examples=0, epochs=1,
                                  **extra)
        results = train_lib.run(cfg, distribute.make_strategy("one_device"))
        self.assertBetween(results["knn_top1"], 0.0, 1.0)
        with open(os.path.join(model_dir, "run.json")) as f:
          self.assertEqual(json.load(f)["num_instances"], 32)

  def test_checkpoint_and_eval_schedules(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, epochs=3, checkpoint_every_epochs=2, keep_checkpoints=1,
                              eval_every_epochs=2, final_eval=False)
    results = train_lib.run(cfg, distribute.make_strategy("one_device"), source=testing.tiny_source())
    self.assertEqual(results, {})
    self.assertFalse(os.path.exists(os.path.join(model_dir, train_lib.FINAL_METRICS_FILE)))
    records = _read_metrics(model_dir)
    self.assertEqual([r["knn_top1"] is None for r in records], [True, False, False])  # Epoch 2, and the last.
    checkpoints = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints")).all_model_checkpoint_paths
    self.assertEqual([os.path.basename(p) for p in checkpoints], ["ckpt-12"])  # 3 epochs x 4 steps; 1 kept.

  def test_bank_init_features_starts_from_the_clean_features(self):
    cfg = testing.tiny_config(self.create_tempdir().full_path, bank_init="features")
    current = train_lib._Run(cfg, tf.distribute.get_strategy(), testing.tiny_source())
    expected = current._clean_train_features()
    self.assertAllClose(current.state.bank.bank, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                        atol=1e-6)
    random_start = train_lib._Run(testing.replace(cfg, model_dir=self.create_tempdir().full_path, bank_init="random"),
                                  tf.distribute.get_strategy(), testing.tiny_source())
    self.assertNotAllClose(random_start.state.bank.bank, current.state.bank.bank)

  def test_resume_continues_exactly(self):
    source = testing.tiny_source()
    straight_dir, split_dir = self.create_tempdir().full_path, self.create_tempdir().full_path
    strategy = distribute.make_strategy("one_device")
    train_lib.run(testing.tiny_config(straight_dir, epochs=3, final_eval=False), strategy, source=source)
    train_lib.run(testing.tiny_config(split_dir, epochs=1, final_eval=False), strategy, source=source)
    train_lib.run(testing.tiny_config(split_dir, epochs=3, final_eval=False), strategy, source=source)
    straight, split = _read_metrics(straight_dir), _read_metrics(split_dir)
    self.assertEqual([r["epoch"] for r in split], [1, 2, 3])
    self.assertAllClose([r["loss"] for r in straight], [r["loss"] for r in split], rtol=1e-5)

    def bank_of(model_dir):
      reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
      return reader.get_tensor(checkpointing.BANK_KEY), reader.get_tensor(
          checkpointing.STEP_KEY)

    (bank_a, step_a), (bank_b, step_b) = bank_of(straight_dir), bank_of(split_dir)
    self.assertEqual(step_a, step_b)
    self.assertAllClose(bank_a, bank_b, atol=1e-5)

  def test_nan_loss_stops_and_keeps_last_good_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    source = testing.tiny_source()
    strategy = distribute.make_strategy("one_device")
    train_lib.run(testing.tiny_config(model_dir, epochs=1, final_eval=False), strategy, source=source)
    good = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    with self.assertRaisesRegex(FloatingPointError, r"steps \d+\.\.\d+ .*last good checkpoint is kept"):
      train_lib.run(testing.tiny_config(model_dir, epochs=3, learning_rate=1e30, final_eval=False), strategy,
                    source=source)
    self.assertEqual(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")), good)

  def test_failed_checkpoint_write_keeps_the_previous_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, epochs=2, final_eval=False)  # Checkpoints at steps 4 and 8.
    # A directory where step 8's data file must go: the write fails in the filesystem, as on a full disk.
    os.makedirs(os.path.join(model_dir, "checkpoints", "ckpt-8.data-00000-of-00001"))
    with self.assertRaisesRegex(OSError, r"cannot write the checkpoint of step 8 .* previous checkpoint .*ckpt-4 is "
                                r"intact"):
      train_lib.run(cfg, tf.distribute.get_strategy(), testing.tiny_source())
    checkpoints = os.path.join(model_dir, "checkpoints")
    self.assertEndsWith(tf.train.latest_checkpoint(checkpoints), "ckpt-4")
    self.assertFalse(os.path.exists(os.path.join(checkpoints, "ckpt-8_temp")))
    state, _ = _build(cfg, testing.tiny_source())
    restored = checkpointing.restore_or_initialize(checkpointing.make_manager(state.checkpoint, model_dir,
                                                                              max_to_keep=1))
    self.assertEndsWith(restored, "ckpt-4")
    self.assertEqual(int(state.model.step), 4)

  def test_resume_refuses_a_different_run(self):
    model_dir = self.create_tempdir().full_path
    strategy = distribute.make_strategy("one_device")
    train_lib.run(testing.tiny_config(model_dir, epochs=1, final_eval=False), strategy, source=testing.tiny_source())
    cases = [
        ("max_train_examples", testing.tiny_config(model_dir, epochs=2), testing.tiny_source(n=48)),
        ("arch", testing.tiny_config(model_dir, epochs=2, arch="resnet18_cifar"), testing.tiny_source()),
        ("embedding_dim", testing.tiny_config(model_dir, epochs=2, embedding_dim=8), testing.tiny_source()),
    ]
    for flag, cfg, source in cases:
      with self.subTest(flag):
        with self.assertRaisesRegex(ValueError, f"--{flag}"):
          train_lib.run(cfg, strategy, source=source)
    self.assertLen(_read_metrics(model_dir), 1)


class TrainMinutesTest(tf.test.TestCase):
  """--train_minutes: a fresh start measures its step and fixes the epochs; a resume keeps them."""

  def setUp(self):
    super().setUp()
    self.strategy, self.source = distribute.make_strategy("one_device"), testing.tiny_source()

  def _config(self, model_dir, **overrides):
    return testing.tiny_config(model_dir, **{"train_minutes": 0.2, "lr_schedule": "cosine", "final_eval": False,
                                             **overrides})

  def test_epochs_are_the_minutes_over_the_measured_epoch_and_a_run_equals_one_given_those_epochs(self):
    timed, given = self.create_tempdir().full_path, self.create_tempdir().full_path
    # 4 steps per epoch (64 images, batch 16) at 0.5 s: 12 s of training fit 6 epochs.
    with mock.patch.object(train_lib, "measure_step_seconds", return_value=(0.5, 20)) as measure:
      train_lib.run(self._config(timed, epochs=99), self.strategy, self.source)
    measure.assert_called_once()
    with open(os.path.join(timed, checkpointing.CONFIG_FILE)) as f:
      recorded = json.load(f)["train"]
    self.assertEqual((recorded["epochs"], recorded["train_minutes"]), (6, 0.2))
    self.assertEqual([r["epoch"] for r in _read_metrics(timed)], [1, 2, 3, 4, 5, 6])
    # The measurement's throwaway model leaves no trace: the same as a run told --epochs=6.
    train_lib.run(testing.tiny_config(given, epochs=6, lr_schedule="cosine", final_eval=False), self.strategy,
                  self.source)
    expected, actual = testing.checkpoint_values(given), testing.checkpoint_values(timed)
    self.assertEqual(sorted(actual), sorted(expected))
    for name, value in expected.items():
      np.testing.assert_array_equal(actual[name], value, err_msg=name)

  def test_a_resume_keeps_the_epochs_and_another_budget_is_refused_changing_nothing(self):
    model_dir = self.create_tempdir().full_path
    with mock.patch.object(train_lib, "measure_step_seconds", return_value=(0.5, 20)):
      train_lib.run(self._config(model_dir), self.strategy, self.source)
    with mock.patch.object(train_lib, "measure_step_seconds", side_effect=AssertionError("measured again")):
      train_lib.run(self._config(model_dir), self.strategy, self.source)  # Complete: nothing to train, no measure.
      self.assertLen(_read_metrics(model_dir), 6)
      before = testing.digest(model_dir)
      with self.assertRaises(ValueError) as raised:
        train_lib.run(self._config(model_dir, train_minutes=0.5), self.strategy, self.source)
    self.assertEqual(str(raised.exception), f"--train_minutes: --model_dir={model_dir} holds a run with its epochs "
                     "fixed at 6 by --train_minutes=0.2; this start has --train_minutes=0.5. Resume with "
                     "--train_minutes=0.2, or pass --train_minutes=0 --epochs=N to set the epochs yourself.")
    self.assertEqual(testing.digest(model_dir), before)

  def test_a_run_of_given_epochs_is_not_resumed_under_a_budget(self):
    model_dir = self.create_tempdir().full_path
    train_lib.run(testing.tiny_config(model_dir, epochs=1, lr_schedule="cosine", final_eval=False), self.strategy,
                  self.source)
    before = testing.digest(model_dir)
    with self.assertRaisesRegex(ValueError, "holds a run with --epochs=1 and no --train_minutes; this start has "
                                "--train_minutes=0.2. Resume with --train_minutes=0, or pass"):
      train_lib.run(self._config(model_dir), self.strategy, self.source)
    self.assertEqual(testing.digest(model_dir), before)

  def test_the_neighbour_searches_share_the_budget(self):
    loss = testing.tiny_config(neighbours=2, neighbour_start=0.5, neighbour_every_epochs=1).loss
    # 10 epochs of 10 s fill 100 s; with a 5 s search before each epoch of the second half: 9 epochs take
    # 90 + 4 x 5 = 110 s, 8 epochs 80 + 4 x 5 = 100 s.
    self.assertEqual(train_lib.epochs_that_fit(100.0, epoch_seconds=10.0, search_seconds=5.0, loss=loss), 8)
    self.assertEqual(train_lib.epochs_that_fit(100.0, epoch_seconds=10.0, search_seconds=0.0, loss=loss), 10)
    self.assertEqual(train_lib.epochs_that_fit(5.0, epoch_seconds=10.0, search_seconds=5.0, loss=loss), 1)
    model_dir = self.create_tempdir().full_path
    # 4 steps per epoch at 0.5 s: 2 s an epoch, 12 s of budget; 4 epochs and 2 s searches before the last two.
    with mock.patch.object(train_lib, "measure_step_seconds", return_value=(0.5, 20)), \
         mock.patch.object(train_lib, "measure_neighbour_seconds", return_value=2.0) as search:
      train_lib.run(self._config(model_dir, epochs=99, neighbours=2, neighbour_every_epochs=1), self.strategy,
                    self.source)
    search.assert_called_once()
    self.assertEqual(len(_read_metrics(model_dir)), 4)

  def test_the_neighbour_search_is_timed_on_a_bank_of_the_runs_shape(self):
    cfg = testing.tiny_config(neighbours=2)
    plan = train_lib.plan_run(cfg, self.source)
    with mock.patch.object(train_lib.objectives, "nearest_rows", wraps=train_lib.objectives.nearest_rows) as search:
      self.assertGreater(train_lib.measure_neighbour_seconds(cfg, plan), 0.0)
    self.assertEqual(search.call_args.args[0].shape, (64, 16))
    self.assertEqual(train_lib.measure_neighbour_seconds(testing.tiny_config(), plan), 0.0)

  def test_a_budget_within_the_warmup_is_refused(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "new")
    with mock.patch.object(train_lib, "measure_step_seconds", return_value=(10.0, 20)):  # 0.2 min: 1 epoch.
      with self.assertRaises(ValueError) as raised:
        train_lib.run(self._config(model_dir, warmup_epochs=1), self.strategy, self.source)
    self.assertEqual(str(raised.exception), "--train_minutes: 0.2 minutes fit 1 epoch(s) on this machine, not more "
                     "than --warmup_epochs=1; give more minutes or fewer warm-up epochs")
    self.assertFalse(os.path.exists(model_dir))

  def test_two_replicas_measure_and_agree_on_the_epochs(self):
    strategy = testing.two_replica_strategy()
    cfg = self._config("/tmp/unused")
    plan = train_lib.plan_run(cfg, self.source)
    seconds, timed = train_lib.measure_step_seconds(cfg, strategy, self.source, plan, steps=2, warmup_steps=1,
                                                    min_seconds=0.0)
    self.assertBetween(seconds, 1e-5, 30.0)
    self.assertEqual(timed, 2)
    self.assertEqual(train_lib._agreed(strategy, 7), 7)

  def test_the_measurement_times_real_steps_in_rounds_until_its_seconds_have_passed(self):
    cfg = self._config("/tmp/unused")
    plan = train_lib.plan_run(cfg, self.source)
    seconds, timed = train_lib.measure_step_seconds(cfg, self.strategy, self.source, plan, steps=3, min_seconds=0.0)
    self.assertBetween(seconds, 1e-5, 30.0)
    self.assertEqual(timed, 3)  # One round when no time is asked for.
    seconds, timed = train_lib.measure_step_seconds(cfg, self.strategy, self.source, plan, steps=3, min_seconds=1.0)
    self.assertEqual(timed % 3, 0)
    self.assertGreater(timed, 3)  # A round is far shorter than a second: more rounds were timed ...
    self.assertGreater(seconds * timed, 0.5)  # ... about a second's worth (planned from the first round's time).


class RefusedStartTest(tf.test.TestCase):
  """Everything that can refuse a start runs before the first write: a refused start leaves the model dir as it was."""

  def setUp(self):
    super().setUp()
    self.strategy, self.source = distribute.make_strategy("one_device"), testing.tiny_source()

  def test_refused_starts_change_no_file_of_the_model_dir(self):
    model_dir = self.create_tempdir().full_path
    train_lib.run(testing.tiny_config(model_dir, epochs=1, final_eval=False), self.strategy, self.source,
                  flags_text="--epochs=1\n")
    before = testing.digest(model_dir)
    self.assertIn("flags.txt", before)
    self.assertNotEmpty([name for name in before if name.startswith("train/events.out.tfevents")])
    cases = [
        ("dataset", testing.tiny_config(model_dir, epochs=2, dataset="no_such_dataset_xyz"), None,
         "--dataset: unknown dataset 'no_such_dataset_xyz' ("),
        ("objective", testing.tiny_config(model_dir, epochs=2, objective="softmax"), self.source,
         f"--objective: --model_dir={model_dir} holds a run with objective='nce', this run has 'softmax'. Resume with "
         "the same settings or use a new --model_dir."),
        ("max_train_examples", testing.tiny_config(model_dir, epochs=2), testing.tiny_source(n=48),
         f"--max_train_examples: --model_dir={model_dir} holds a run with num_instances=64, this run has 48. Resume "
         "with the same settings or use a new --model_dir."),
    ]
    for flag, cfg, source, message in cases:
      with self.subTest(flag):
        with self.assertRaises(ValueError) as raised:
          train_lib.run(cfg, self.strategy, source, flags_text=f"--{flag}=changed\n")
        self.assertStartsWith(str(raised.exception), message)
        self.assertEqual(testing.digest(model_dir), before)

  def test_blur_on_images_smaller_than_its_padding_is_refused_naming_the_smallest_size(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "new")
    with self.assertRaises(ValueError) as raised:
      train_lib.run(testing.tiny_config(model_dir, image_size=1, blur_prob=0.5), self.strategy, self.source)
    self.assertEqual(str(raised.exception), "--blur_prob: the 5x5 blur needs images of at least 2x2 px, this run's "
                     "are 1x1 (--image_size)")
    self.assertFalse(os.path.exists(model_dir))
    # The smallest size it names trains.
    train_lib.run(testing.tiny_config(model_dir, image_size=2, blur_prob=1.0, epochs=1, final_eval=False),
                  self.strategy, self.source)
    self.assertTrue(os.path.exists(os.path.join(model_dir, "metrics.jsonl")))

  def test_a_refused_first_start_creates_no_model_dir(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "new")
    with self.assertRaisesRegex(ValueError, "^--batch_size"):
      train_lib.run(testing.tiny_config(model_dir, batch_size=128), self.strategy, self.source, flags_text="x\n")
    self.assertFalse(os.path.exists(model_dir))

  def test_more_negatives_than_instances_are_capped_and_the_run_records_the_cap(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, objective="nce", num_negatives=4096, epochs=1, final_eval=False)
    with self.assertLogs("absl", "WARNING") as logs:
      train_lib.run(cfg, self.strategy, testing.tiny_source(n=300))
    self.assertIn("--num_negatives: 4096 capped to 256, below the 300 training instances", "\n".join(logs.output))
    with open(os.path.join(model_dir, checkpointing.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)["loss"]["num_negatives"], 256)
    self.assertLen(_read_metrics(model_dir), 1)
    self.assertTrue(np.isfinite(_read_metrics(model_dir)[0]["loss"]))
    # A resume with the same flags caps them the same way and continues.
    train_lib.run(testing.replace(cfg, epochs=2), self.strategy, testing.tiny_source(n=300))
    self.assertEqual([r["epoch"] for r in _read_metrics(model_dir)], [1, 2])

  def test_flags_txt_holds_the_flags_of_the_last_accepted_start_once(self):
    model_dir = self.create_tempdir().full_path
    for epochs in (1, 2):
      train_lib.run(testing.tiny_config(model_dir, epochs=epochs, final_eval=False), self.strategy, self.source,
                    flags_text=f"--model_dir={model_dir}\n--epochs={epochs}\n")
    with open(os.path.join(model_dir, checkpointing.FLAGS_FILE)) as f:
      self.assertEqual(f.read(), f"--model_dir={model_dir}\n--epochs=2\n")
    with open(os.path.join(model_dir, checkpointing.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)["train"]["epochs"], 2)
    self.assertEmpty([name for name in testing.digest(model_dir) if name.endswith(".tmp")])
    # A caller without flags (a notebook) leaves flags.txt alone.
    train_lib.run(testing.tiny_config(model_dir, epochs=2, final_eval=False), self.strategy, self.source)
    with open(os.path.join(model_dir, checkpointing.FLAGS_FILE)) as f:
      self.assertEqual(f.read(), f"--model_dir={model_dir}\n--epochs=2\n")


class _Killed(BaseException):
  """What the patched functions raise to end a start as a SIGKILL would: no handler of the run catches it."""


class KillTest(tf.test.TestCase):
  """A start killed at each moment of an epoch's end; every restart resumes. The records and the final state are
  those of a run never killed."""

  @contextlib.contextmanager
  def _killed_at(self, kind: str, epoch: int):
    """Patches _Run so that the start ends at moment `kind` of epoch `epoch` (1-based), as a kill there would."""
    record, save = train_lib._Run._record, train_lib._Run._save

    def patched_record(run, index, values):
      record(run, index, values)
      if index + 1 != epoch:
        return
      if kind == "torn_record":  # Killed in the middle of the append: half a line, no newline.
        path = os.path.join(run.model_dir, train_lib.METRICS_FILE)
        with open(path) as f:
          lines = f.readlines()
        with open(path, "w") as f:
          f.writelines(lines[:-1] + [lines[-1][:len(lines[-1]) // 2]])
        raise _Killed(kind)
      if kind == "after_record":  # Between the record and the checkpoint.
        raise _Killed(kind)

    def patched_save(run):
      if run.step // run.plan.steps_per_epoch != epoch:
        return save(run)
      if kind == "in_save":  # Killed while TensorFlow writes the checkpoint under its temporary name.
        for step in (run.step, run.step - 1):  # This one, and a mid-epoch one (SIGTERM's) never written again.
          temp = os.path.join(run.manager.directory, f"ckpt-{step}_temp")
          os.makedirs(temp, exist_ok=True)
          with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
            f.write(b"half a checkpoint")
        raise _Killed(kind)
      path = save(run)
      if kind == "after_save":  # The old gap: checkpoint written, the epoch's record not yet.
        raise _Killed(kind)
      return path

    with mock.patch.object(train_lib._Run, "_record", patched_record), \
         mock.patch.object(train_lib._Run, "_save", patched_save):
      yield

  def test_kills_at_every_moment_of_an_epoch_end_lose_no_record_and_change_no_result(self):
    strategy, source = distribute.make_strategy("one_device"), testing.tiny_source()
    cfg = lambda model_dir: testing.tiny_config(model_dir, epochs=2, final_eval=False)  # noqa: E731
    straight = self.create_tempdir().full_path
    train_lib.run(cfg(straight), strategy, source)
    killed = self.create_tempdir().full_path
    moments = [(kind, epoch) for epoch in (1, 2) for kind in ("torn_record", "after_record", "in_save", "after_save")]
    for kind, epoch in moments:
      with self.subTest(f"{kind} of epoch {epoch}"), self._killed_at(kind, epoch):
        with self.assertRaisesRegex(_Killed, kind):
          train_lib.run(cfg(killed), strategy, source)
      if kind == "torn_record":  # Readers of the killed run (results.read_epochs, train_lib's) skip the half line.
        self.assertEqual([r["epoch"] for r in train_lib.results_lib.read_epochs(killed)], list(range(1, epoch)))
    train_lib.run(cfg(killed), strategy, source)
    self.assertEqual([r["epoch"] for r in _read_metrics(killed)], [1, 2])
    with open(os.path.join(straight, train_lib.METRICS_FILE)) as f, \
         open(os.path.join(killed, train_lib.METRICS_FILE)) as g:
      straight_records, killed_records = [json.loads(line) for line in f], [json.loads(line) for line in g]
    for name in ("step", "loss", "lr", "knn_top1", "knn_top5", "normalizer", "positive_similarity"):
      self.assertEqual([r[name] for r in killed_records], [r[name] for r in straight_records], name)
    for part in ("wall", "train"):  # The time accounts carry over every resume.
      seconds = [r["time"][f"{part}_seconds"] for r in killed_records]
      self.assertEqual(seconds, sorted(seconds), part)
    expected = testing.checkpoint_values(straight)
    actual = testing.checkpoint_values(killed)
    self.assertEqual(sorted(actual), sorted(expected))
    for name, value in expected.items():
      self.assertAllEqual(actual[name], value, msg=name)
    self.assertEqual(sorted(os.listdir(os.path.join(killed, "checkpoints"))),
                     sorted(os.listdir(os.path.join(straight, "checkpoints"))))  # No temporary checkpoint left.


class OSErrorTest(tf.test.TestCase):
  """A model dir that cannot be made or written ends in one error naming the path, not a traceback."""

  def setUp(self):
    super().setUp()
    self.strategy, self.source = distribute.make_strategy("one_device"), testing.tiny_source()

  def test_model_dir_that_is_a_regular_file(self):
    path = self.create_tempfile(content="mine").full_path
    with self.assertRaises(ValueError) as raised:
      train_lib.run(testing.tiny_config(path), self.strategy, self.source)
    self.assertEqual(str(raised.exception),
                     f"--model_dir: {path} exists and is not a directory; pass a directory (new or a run's)")
    with open(path) as f:
      self.assertEqual(f.read(), "mine")

  @unittest.skipIf(os.geteuid() == 0, "root writes into read-only directories")
  def test_read_only_model_dir(self):
    model_dir = self.create_tempdir().full_path
    os.chmod(model_dir, 0o500)
    self.addCleanup(os.chmod, model_dir, 0o700)
    with self.assertRaises(OSError) as raised:
      train_lib.run(testing.tiny_config(model_dir), self.strategy, self.source, flags_text="x\n")
    self.assertEqual(str(raised.exception), f"--model_dir: cannot write {model_dir}/flags.txt (Permission denied)")
    self.assertEmpty(os.listdir(model_dir))

  def test_full_disk_when_creating_the_model_dir(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "new")
    makedirs = os.makedirs

    def full_disk(path, *args, **kwargs):
      if os.path.abspath(path).startswith(model_dir):
        raise OSError(errno.ENOSPC, "No space left on device", path)
      return makedirs(path, *args, **kwargs)

    with mock.patch.object(os, "makedirs", full_disk), self.assertRaises(OSError) as raised:
      train_lib.run(testing.tiny_config(model_dir), self.strategy, self.source)
    self.assertEqual(str(raised.exception), f"--model_dir: cannot create {model_dir} (No space left on device)")

  def _full_disk_under(self, path: str):
    """Patches open() so that writing any file under path fails as on a full disk; reads pass."""
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
      if isinstance(file, str) and os.path.abspath(file).startswith(path) and set(mode) & set("wax+"):
        raise OSError(errno.ENOSPC, "No space left on device", file)
      return real_open(file, mode, *args, **kwargs)

    return mock.patch.object(builtins, "open", full_disk)

  def test_full_disk_at_the_first_write(self):
    model_dir = self.create_tempdir().full_path
    with self._full_disk_under(model_dir), self.assertRaises(OSError) as raised:
      train_lib.run(testing.tiny_config(model_dir), self.strategy, self.source, flags_text="x\n")
    self.assertEqual(str(raised.exception),
                     f"--model_dir: cannot write {model_dir}/flags.txt (No space left on device)")
    self.assertEmpty(os.listdir(model_dir))

  def test_full_disk_while_training_names_the_metrics_file(self):
    model_dir = self.create_tempdir().full_path
    metrics = os.path.join(model_dir, train_lib.METRICS_FILE)
    with self._full_disk_under(metrics), self.assertRaises(OSError) as raised:
      train_lib.run(testing.tiny_config(model_dir, epochs=1), self.strategy, self.source)
    self.assertEqual(str(raised.exception), f"--model_dir: cannot write {metrics} (No space left on device)")


if __name__ == "__main__":
  tf.test.main()
