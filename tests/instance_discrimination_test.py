"""Tests of InstanceDiscrimination as a Keras model: any encoder, fit with Keras callbacks, one device and two
replicas, the .keras round trip, the callbacks, export from Python, and train.py's loop driving the same step."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from unittest import mock

from tests import testing

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_instdisc
from tf_instdisc import artifact
from tf_instdisc import backbones
from tf_instdisc import callbacks
from tf_instdisc import checkpointing
from tf_instdisc import data as data_lib
from tf_instdisc import instance_discrimination as id_lib
from tf_instdisc import objectives
from tf_instdisc import train_lib

N, SIZE, BATCH = 32, 32, 8


def _images(n=N, size=SIZE, channels=3, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype(np.float32)


def _dataset(images, batch=BATCH, seed=0, shuffle=True):
  ds = id_lib.with_instance_ids(tf.data.Dataset.from_tensor_slices(images))
  return (ds.shuffle(len(images), seed=seed) if shuffle else ds).batch(batch, drop_remainder=True)


def _sequential():
  return keras.Sequential([keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                                               kernel_initializer=keras.initializers.HeNormal(seed=1)),
                           keras.layers.GlobalAveragePooling2D()])


def _encoder(kind):
  if kind == "sequential":
    return _sequential()
  if kind == "mobilenet_v3_small":
    return keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3),
                                               pooling="avg", include_preprocessing=False)
  if kind == "resnet50":
    return keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg")
  pool_grid = 2 if kind == "convnet_small_pool_grid" else 1  # --pool_grid: the last stage's 2x2 cells, flattened.
  return backbones.build_backbone("convnet_small", (SIZE, SIZE, 3), seed=0, sync_batchnorm=True, pool_grid=pool_grid)


def _model(encoder=None, **kwargs):
  kwargs = {"embedding_dim": 16, "objective": "nce", "num_negatives": 16, "temperature": 0.1, **kwargs}
  model = id_lib.InstanceDiscrimination(encoder or _sequential(), N, **kwargs)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
  return model


class FitTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("sequential", "mobilenet_v3_small", "resnet50", "convnet_small", "convnet_small_pool_grid")
  def test_fit_with_any_encoder(self, kind):
    model = _model(_encoder(kind))
    history = model.fit(_dataset(_images()), epochs=2, verbose=0)
    self.assertLen(history.history["loss"], 2)
    self.assertTrue(np.all(np.isfinite(history.history["loss"])))
    self.assertEqual(int(model.step.numpy()), 2 * N // BATCH)
    self.assertGreater(float(model.normalizer.numpy()), 0.0)  # NCE's Z set by the first batch.
    embeddings = model.predict(_images(4, seed=3), verbose=0)
    self.assertEqual(embeddings.shape, (4, 16))
    self.assertEqual(embeddings.dtype, np.float32)
    self.assertAllClose(np.linalg.norm(embeddings, axis=1), np.ones(4), atol=1e-5)
    bank_before = id_lib.InstanceDiscrimination(_sequential(), N, embedding_dim=16).bank.numpy()
    self.assertNotAllClose(model.bank.numpy(), bank_before)  # Every row written in two epochs.
    self.assertAllClose(np.linalg.norm(model.bank.numpy(), axis=1), np.ones(N), atol=1e-5)

  def test_softmax_two_views_and_dict_batches(self):
    images = _images()
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "image_view2": images[:, ::-1],
                                             "instance_id": np.arange(N)}).batch(BATCH)
    model = _model(objective="softmax", views=2, group_clusters=2)
    history = model.fit(ds, epochs=1, verbose=0)
    self.assertTrue(np.isfinite(history.history["loss"][0]))
    with self.assertRaisesRegex(ValueError, "views=2, a batch brought 1"):
      model.fit(_dataset(images), epochs=1, verbose=0)

  def test_two_replicas_keep_bit_identical_banks_and_report_the_global_loss(self):
    # Unshuffled: under a strategy Keras draws one batch to build the model before the epoch, so a shuffled
    # dataset's first epoch is its second permutation there.
    images = _images()
    one = _model(_encoder("convnet_small"), objective="softmax", temperature=0.2)
    one_history = one.fit(_dataset(images, shuffle=False), epochs=1, verbose=0)
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      two = _model(_encoder("convnet_small"), objective="softmax", temperature=0.2)
    two_history = two.fit(_dataset(images, shuffle=False), epochs=1, verbose=0)
    copies = [v.numpy() for v in two.bank.values]
    self.assertLen(copies, 2)
    self.assertAllEqual(copies[0], copies[1])
    self.assertAllClose(copies[0], one.bank.numpy(), atol=1e-4, rtol=0)
    # fit's loss is the mean over the whole global batch: the same as on one device.
    self.assertAllClose(two_history.history["loss"], one_history.history["loss"], rtol=1e-4)
    self.assertEqual(int(two.step.numpy()), N // BATCH)

  @parameterized.parameters("sequential", "mobilenet_v3_small", "resnet50")
  def test_any_encoder_fits_under_two_replicas_with_bit_identical_banks(self, kind):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      model = _model(_encoder(kind))
    initial = model.bank.numpy()
    history = model.fit(_dataset(_images()), epochs=1, verbose=0)
    self.assertTrue(np.isfinite(history.history["loss"][0]))
    copies = [v.numpy() for v in model.bank.values]
    self.assertLen(copies, 2)
    self.assertAllEqual(copies[0], copies[1])
    self.assertNotAllClose(copies[0], initial)

  def test_keras_callbacks_in_one_fit(self):
    root = self.create_tempdir().full_path
    images = _images()
    labels = np.arange(N) % 4
    eval_ds = tf.data.Dataset.from_tensor_slices((images[:16], labels[:16])).batch(8)
    model = _model(_encoder("convnet_small"))
    model.fit(_dataset(images), epochs=2, verbose=0, callbacks=[
        callbacks.KnnMonitor(eval_ds, train_labels=labels, k=5),
        callbacks.Throughput(batch_size=BATCH),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(os.path.join(root, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(root, "epoch{epoch}.keras")),
        keras.callbacks.TensorBoard(os.path.join(root, "tb")),
        keras.callbacks.CSVLogger(os.path.join(root, "log.csv")),
    ])
    with open(os.path.join(root, "log.csv")) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 2)
    for row in rows:
      self.assertBetween(float(row["knn_top1"]), 0.0, 1.0)
      self.assertGreater(float(row["images_per_sec"]), 0.0)
      self.assertTrue(np.isfinite(float(row["loss"])))
    restored = keras.models.load_model(os.path.join(root, "epoch2.keras"))
    self.assertAllEqual(restored.bank.numpy(), model.bank.numpy())
    self.assertNotEmpty(tf.io.gfile.glob(os.path.join(root, "tb", "train", "events*")))

  def test_backup_and_restore_resumes_after_an_interrupted_fit(self):
    backup = os.path.join(self.create_tempdir().full_path, "backup")
    images = _images()

    class StopAtEpoch(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
          raise RuntimeError("interrupted")

    interrupted = _model(_encoder("convnet_small"))  # Built at construction, as BackupAndRestore needs.
    with self.assertRaisesRegex(RuntimeError, "interrupted"):
      interrupted.fit(_dataset(images), epochs=3, verbose=0,
                      callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False), StopAtEpoch()])
    resumed = _model(_encoder("convnet_small"))
    history = resumed.fit(_dataset(images), epochs=3, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(backup)])
    self.assertLen(history.history["loss"], 1)  # Epoch 3 only: epochs 1-2 were restored (with the bank, step).
    self.assertEqual(int(resumed.step.numpy()), 3 * N // BATCH)

  def test_terminate_on_nan_stops_fit(self):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(1e30))
    history = model.fit(_dataset(_images()), epochs=5, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    self.assertLess(len(history.history["loss"]), 5)

  def test_validation_data_is_refused_with_the_kNN_monitor_named(self):
    model = _model()
    with self.assertRaisesRegex(NotImplementedError, "KnnMonitor"):
      model.fit(_dataset(_images()), epochs=1, verbose=0, validation_data=_dataset(_images(seed=2)))


class SaveLoadTest(tf.test.TestCase):

  def _trained_and_reloaded(self, **kwargs) -> tuple[id_lib.InstanceDiscrimination, id_lib.InstanceDiscrimination]:
    """A model trained one epoch, and its copy saved to and loaded from a .keras file."""
    model = _model(_encoder("convnet_small"), **kwargs)
    model.fit(_dataset(_images()), epochs=1, verbose=0)
    path = os.path.join(self.create_tempdir().full_path, "run.keras")
    model.save(path)
    return model, keras.models.load_model(path)

  def test_keras_file_round_trip_keeps_weights_bank_z_and_step(self):
    model, loaded = self._trained_and_reloaded(head_batchnorm=True, proximal_lambda=0.1)
    self.assertIsInstance(loaded, id_lib.InstanceDiscrimination)
    self.assertAllEqual(loaded.bank.numpy(), model.bank.numpy())
    self.assertEqual(float(loaded.normalizer.numpy()), float(model.normalizer.numpy()))
    self.assertEqual(int(loaded.step.numpy()), int(model.step.numpy()))
    images = _images(4, seed=5)
    self.assertAllClose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    config = loaded.get_config()
    for key, value in dict(objective="nce", num_negatives=16, temperature=0.1, head_batchnorm=True,
                           proximal_lambda=0.1, num_instances=N, embedding_dim=16).items():
      self.assertEqual(config[key], value, key)
    # Training continues from the loaded optimizer state and step.
    loaded.fit(_dataset(_images()), epochs=1, verbose=0)
    self.assertEqual(int(loaded.step.numpy()), 2 * N // BATCH)

  def test_keras_file_round_trip_keeps_the_hidden_head_layer(self):
    model, loaded = self._trained_and_reloaded(head_batchnorm=True, head_hidden_dim=24)
    self.assertEqual(loaded.get_config()["head_hidden_dim"], 24)
    self.assertEqual(loaded.head_hidden.kernel.shape, (model.encoder.output_shape[-1], 24))
    images = _images(4, seed=5)
    self.assertAllClose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    self.assertAllClose(loaded.embedding_model()(images), model(images), atol=1e-6)

  def test_bad_arguments_are_named(self):
    for kwargs, message in [({"objective": "triplet"}, "objective"), ({"views": 3}, "views"),
                            ({"head_hidden_dim": -1}, "head_hidden_dim"),
                            ({"temperature": 0.0}, "temperature"), ({"bank_momentum": 1.0}, "bank_momentum"),
                            ({"negative_sampling": "hard"}, "negative_sampling")]:
      with self.assertRaisesRegex(ValueError, f"InstanceDiscrimination {message}"):
        id_lib.InstanceDiscrimination(_sequential(), N, **kwargs)
    with self.assertRaisesRegex(ValueError, "InstanceDiscrimination encoder"):
      id_lib.InstanceDiscrimination("resnet", N)
    unpooled = keras.Sequential([keras.layers.Conv2D(4, 3)])
    with self.assertRaisesRegex(ValueError, "features \\[B, F\\]"):
      id_lib.InstanceDiscrimination(unpooled, N).build((None, SIZE, SIZE, 3))


class NeighbourTest(tf.test.TestCase, parameterized.TestCase):
  """--neighbours: the bank's nearest rows as further positives, off until refresh_neighbours has found them."""

  @parameterized.parameters("nce", "softmax")
  def test_the_term_is_off_until_the_search_then_adds_its_weight_times_the_numpy_term(self, objective):
    weight, temperature = 0.7, 0.1
    plain, with_neighbours = (_model(objective=objective, neighbours=m, neighbour_weight=weight) for m in (0, 2))
    batch = next(iter(_dataset(_images(), shuffle=False)))
    ids = batch[1].numpy()
    # Before a search: the loss of the plain model, exactly.
    self.assertAllEqual(float(tf.function(with_neighbours.train_step)(batch)["loss"]),
                        float(tf.function(plain.train_step)(batch)["loss"]))
    self.assertFalse(with_neighbours.neighbours_found)
    for model in (plain, with_neighbours):
      model.trackers["loss"].reset_state()
    with_neighbours.refresh_neighbours()
    self.assertTrue(with_neighbours.neighbours_found)
    bank = with_neighbours.bank.numpy()
    table = with_neighbours._neighbour_ids.numpy()
    self.assertAllEqual(table, objectives.nearest_rows(tf.constant(bank), num_neighbours=2))
    features = with_neighbours(batch[0], training=True).numpy()  # The encoder has no batch norm: the step's.
    loss_plain = float(tf.function(plain.train_step)(batch)["loss"])
    loss = float(tf.function(with_neighbours.train_step)(batch)["loss"])
    similarities = np.einsum("bd,bmd->bm", features, bank[table[ids]]).astype(np.float64)
    if objective == "nce":  # -log h(neighbour), h = P / (P + K / N), P = exp(s / tau) / Z.
      prob = np.exp(similarities / temperature) / float(with_neighbours.normalizer.numpy())
      term = -np.log(prob / (prob + 16 / N))
    else:  # -log of the softmax over all N bank rows.
      all_logits = features.astype(np.float64) @ bank.T.astype(np.float64) / temperature
      log_z = np.log(np.sum(np.exp(all_logits), axis=1, keepdims=True))
      term = log_z - similarities / temperature
    self.assertAllClose(loss - loss_plain, weight * np.mean(term), rtol=1e-4, atol=1e-4)

  def test_the_table_stays_out_of_checkpoints_and_keras_files(self):
    model = _model(neighbours=3)
    model.refresh_neighbours()
    root = self.create_tempdir().full_path
    path = tf.train.Checkpoint(model=model).save(os.path.join(root, "ckpt"))
    self.assertFalse([name for name, _ in tf.train.list_variables(path) if "neighbour" in name])
    model.save(os.path.join(root, "model.keras"))
    loaded = keras.models.load_model(os.path.join(root, "model.keras"))
    self.assertEqual(loaded.get_config()["neighbours"], 3)
    self.assertFalse(loaded.neighbours_found)  # Found again from the bank, not stored.

  def test_fit_with_the_callback_searches_on_its_schedule(self):
    model = _model(neighbours=2)
    epochs = []
    original = model.refresh_neighbours
    with mock.patch.object(model, "refresh_neighbours",
                           side_effect=lambda: (epochs.append(int(model.step.numpy()) // (N // BATCH)), original())):
      history = model.fit(_dataset(_images()), epochs=4, verbose=0,
                          callbacks=[tf_instdisc.NeighbourSearch(start=0.5, every_epochs=1)])
    self.assertEqual(epochs, [2, 3])  # Before the third and the fourth epoch.
    self.assertTrue(model.neighbours_found)
    self.assertTrue(np.all(np.isfinite(history.history["loss"])))
    with self.assertRaisesRegex(ValueError, "NeighbourSearch: the model was built without neighbours"):
      _model().fit(_dataset(_images()), epochs=1, verbose=0, callbacks=[callbacks.NeighbourSearch()])
    with self.assertRaisesRegex(ValueError, "NeighbourSearch: start must be in"):
      callbacks.NeighbourSearch(start=1.0)

  def test_two_replicas_share_one_table(self):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      model = _model(neighbours=2)
    history = model.fit(_dataset(_images()), epochs=2, verbose=0,
                        callbacks=[callbacks.NeighbourSearch(start=0.0, every_epochs=1)])
    self.assertTrue(np.all(np.isfinite(history.history["loss"])))
    model.refresh_neighbours()  # From the bank as it is now (the last epoch moved the bank after its search).
    tables = [v.numpy() for v in model._neighbour_ids.values]
    self.assertLen(tables, 2)
    self.assertAllEqual(tables[0], tables[1])
    self.assertAllEqual(tables[0], objectives.nearest_rows(tf.constant(model.bank.values[0].numpy()),
                                                           num_neighbours=2))

  def test_bad_arguments_are_named(self):
    for kwargs in ({"neighbours": -1}, {"neighbours": N}, {"neighbours": 2, "objective": "parametric"},
                   {"neighbour_weight": -1.0}):
      with self.assertRaisesRegex(ValueError, "InstanceDiscrimination neighbour"):
        id_lib.InstanceDiscrimination(_sequential(), N, **kwargs)
    with self.assertRaisesRegex(ValueError, "InstanceDiscrimination neighbours: the model was built with"):
      _model().refresh_neighbours()


class StepCounterTest(tf.test.TestCase):

  def test_a_float16_skipped_step_still_counts(self):
    # A loss scale of 2^60 overflows float16 gradients: LossScaleOptimizer skips the update and does not count
    # it; the model's own counter does, so the noise seed, the bank and the resume position follow the batches.
    encoder = backbones.build_backbone("convnet_small", (SIZE, SIZE, 3), policy="mixed_float16", seed=0)
    model = id_lib.InstanceDiscrimination(encoder, N, embedding_dim=16, num_negatives=16)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0 ** 60,
                                                    dynamic_growth_steps=1000)
    model.compile(optimizer=optimizer)
    batch = next(iter(_dataset(_images())))
    bank_before = model.bank.numpy()
    step = tf.function(model.train_step)
    step(batch)
    self.assertEqual(int(optimizer.iterations.numpy()), 0)  # Skipped: not counted by the optimizer.
    self.assertEqual(int(model.step.numpy()), 1)  # Counted by the model.
    self.assertLess(float(optimizer.scale_loss(tf.constant(1.0))), 2.0 ** 60)  # The scale was lowered.
    self.assertNotAllClose(model.bank.numpy()[batch[1].numpy()], bank_before[batch[1].numpy()])
    # The next step draws its noise from step 1, not step 0 again: a different loss on the same batch.
    second = float(step(batch)["loss"])
    self.assertTrue(np.isfinite(second))
    self.assertEqual(int(model.step.numpy()), 2)


class DriversTest(tf.test.TestCase):

  def test_train_py_loop_and_fit_give_the_same_weights_and_bank(self):
    cfg = testing.tiny_config(objective="nce", num_negatives=8, head_batchnorm=True)
    source = testing.tiny_source()
    plan = train_lib.plan_run(cfg, source)
    ds = data_lib.make_train_dataset(source, cfg.data, cfg.augment, batch_size=plan.global_batch_size,
                                     seed=cfg.train.seed, epoch=0)
    batches = list(ds.take(3))
    looped = train_lib.build_state(cfg, num_instances=plan.num_instances, input_shape=plan.input_shape,
                                   steps_per_epoch=plan.steps_per_epoch)
    loop = train_lib.make_train_loop(looped.model, tf.distribute.get_strategy())
    loop_metrics = loop(iter(ds.take(3)), tf.constant(3))
    fitted = train_lib.build_state(cfg, num_instances=plan.num_instances, input_shape=plan.input_shape,
                                   steps_per_epoch=plan.steps_per_epoch)
    fixed = tf.data.Dataset.from_tensor_slices({k: tf.stack([b[k] for b in batches]) for k in batches[0]})
    history = fitted.model.fit(fixed, epochs=1, verbose=0, shuffle=False)
    for mine, theirs in zip(fitted.model.weights, looped.model.weights, strict=True):
      self.assertAllClose(mine.numpy(), theirs.numpy(), atol=1e-6, rtol=1e-6, msg=mine.path)
    self.assertAllClose(fitted.model.bank.numpy(), looped.model.bank.numpy(), atol=1e-6)
    self.assertEqual(int(fitted.model.step.numpy()), 3)
    self.assertAllClose(history.history["loss"][0], float(loop_metrics["loss"]), rtol=1e-5)


  def test_library_fit_path_trains_as_train_lib_run(self):
    """The public path (recipe -> from_recipe -> training_dataset -> fit) and train.py's whole run (train_lib.run:
    its own loop, per-epoch pipelines, checkpoints, monitor) end with the same weights and bank."""
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, objective="nce", num_negatives=8, head_batchnorm=True, epochs=2,
                              final_eval=False, steps_per_loop=3)
    source = testing.tiny_source()
    train_lib.run(cfg, tf.distribute.get_strategy(), source)
    images, _ = testing.tiny_arrays()
    recipe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model_dir=""))
    model = tf_instdisc.InstanceDiscrimination.from_recipe(recipe, len(images), images.shape[1:])
    self.assertEqual(model.steps_per_execution, 2)  # 3 would run an epoch's end into the next epoch's batches.
    steps_at_epoch_end = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: steps_at_epoch_end.append(int(model.step)))
    history = model.fit(tf_instdisc.training_dataset(images, recipe), epochs=recipe.train.epochs, verbose=0,
                        callbacks=[record])
    self.assertLen(history.history["loss"], 2)
    self.assertEqual(steps_at_epoch_end, [4, 8])
    self.assertEqual(int(model.step.numpy()), 2 * (64 // 16))
    restored = tf_instdisc.InstanceDiscrimination.from_recipe(recipe, len(images), images.shape[1:],
                                                              compiled=False)
    checkpointing.restore_model(restored, model_dir)
    for mine, theirs in zip(model.weights, restored.weights, strict=True):
      self.assertAllClose(mine.numpy(), theirs.numpy(), atol=1e-5, rtol=1e-5, msg=mine.path)
    self.assertAllClose(model.bank.numpy(), restored.bank.numpy(), atol=1e-5)

  def test_from_recipe_compiles_the_recipes_optimizer_and_refuses_a_time_budget(self):
    recipe = tf_instdisc.recipe("smoke", epochs=4, batch_size=16, arch="convnet_small", embedding_dim=16)
    model = tf_instdisc.InstanceDiscrimination.from_recipe(recipe, 64, (8, 8, 1))
    self.assertIsInstance(model.optimizer, keras.optimizers.SGD)
    self.assertAllClose(float(model.optimizer.momentum), recipe.optim.momentum)
    # The largest divisor of the 4 steps per epoch up to steps_per_loop=8: an execution never crosses an epoch.
    self.assertEqual(model.steps_per_execution, 4)
    # The cosine schedule over 4 epochs of 64 // 16 steps ends at 0.
    self.assertAllClose(float(model.optimizer._learning_rate(4 * 4)), 0.0, atol=1e-7)  # The schedule itself.
    self.assertEqual(model.objective, "softmax")
    with self.assertRaisesRegex(ValueError, "train_minutes=45 .*epochs=N"):
      tf_instdisc.InstanceDiscrimination.from_recipe(tf_instdisc.recipe("fashion_mnist"), 64, (28, 28, 1))
    with self.assertRaisesRegex(ValueError, "recipe: expected a tf_instdisc.recipe"):
      tf_instdisc.InstanceDiscrimination.from_recipe({"epochs": 2}, 64, (8, 8, 1))

  def test_from_recipe_caps_the_negatives_below_a_small_dataset(self):
    recipe = tf_instdisc.recipe("fashion_mnist", epochs=2, batch_size=16, width_multiplier=0.25)
    model = tf_instdisc.InstanceDiscrimination.from_recipe(recipe, 100, (28, 28, 1))
    self.assertEqual(model.loss_config.num_negatives, 64)

  def test_train_py_trains_a_keras_application_end_to_end(self):
    model_dir = self.create_tempdir().full_path
    cfg = testing.tiny_config(model_dir, arch="keras.MobileNetV3Small", image_size=32, epochs=1, num_negatives=8)
    results = train_lib.run(cfg, tf.distribute.get_strategy(), testing.tiny_source(shape=(8, 8, 3)))
    self.assertBetween(results["knn_top1"], 0.0, 1.0)
    self.assertTrue(os.path.exists(os.path.join(model_dir, "final_metrics.json")))
    # export/export.py's artifact, backbone/ included (no stage taps: an application names its stages its own way).
    source = testing.tiny_source(shape=(8, 8, 3))
    with mock.patch.object(data_lib, "load_source", return_value=source):
      export_dir = artifact.write_export(model_dir, os.path.join(model_dir, "export"), index="none")
    loaded = tf_instdisc.load(export_dir)
    self.assertEqual(loaded.embed(testing.tiny_arrays(2, shape=(8, 8, 3))[0]).shape, (2, 16))
    with open(os.path.join(export_dir, "backbone", "backbone.json")) as f:
      self.assertEqual(json.load(f)["stages"], [])
    backbone = keras.saving.load_model(os.path.join(export_dir, "backbone", "backbone.keras"))
    self.assertEqual(backbone.output.shape[-1], 576)


class WithInstanceIdsTest(tf.test.TestCase):

  def test_a_batched_dataset_is_refused_with_how_to_unbatch(self):
    batched = tf.data.Dataset.from_tensor_slices(_images(8, size=4)).batch(4)
    with self.assertRaisesRegex(ValueError, "batched .*unbatch.*batch_size=None, shuffle=False"):
      id_lib.with_instance_ids(batched)
    with self.assertRaisesRegex(ValueError, "batched"):
      id_lib.with_instance_ids(tf.data.Dataset.from_tensor_slices((_images(8, size=4), np.arange(8))).batch(2))
    self.assertLen(list(id_lib.with_instance_ids(batched.unbatch())), 8)

  def test_ids_follow_the_order_before_any_shuffle(self):
    images = _images(6, size=4)
    pairs = list(id_lib.with_instance_ids(tf.data.Dataset.from_tensor_slices(images)))
    self.assertEqual([int(i) for _, i in pairs], list(range(6)))
    self.assertAllEqual(pairs[3][0], images[3])
    labelled = list(id_lib.with_instance_ids(tf.data.Dataset.from_tensor_slices((images, np.arange(6) % 2))))
    self.assertAllEqual(labelled[5][0], images[5])
    self.assertEqual(int(labelled[5][1]), 5)  # The label is dropped, the id added.
    dicts = list(id_lib.with_instance_ids(tf.data.Dataset.from_tensor_slices({"image": images})))
    self.assertEqual(int(dicts[2]["instance_id"]), 2)
    self.assertEqual(dicts[2]["instance_id"].dtype, tf.int64)


class KnnMonitorTest(tf.test.TestCase):

  def test_bank_and_clean_feature_keys_match_numpy(self):
    model = _model()
    model.fit(_dataset(_images()), epochs=1, verbose=0)
    labels = np.arange(N) % 4
    queries = _images(12, seed=7)
    query_labels = np.arange(12) % 4
    eval_ds = tf.data.Dataset.from_tensor_slices((queries, query_labels)).batch(5)
    train_ds = tf.data.Dataset.from_tensor_slices((_images(), labels)).batch(10)

    def numpy_top1(keys):
      q = model.predict(queries, verbose=0)
      sims = q @ keys.T
      top = np.argsort(-sims, axis=1)[:, :5]
      votes = np.zeros((12, 4))
      for row in range(12):
        for j in top[row]:
          votes[row, labels[j]] += np.exp(sims[row, j] / 0.1)
      return float(np.mean(np.argmax(votes, axis=1) == query_labels))

    monitor = callbacks.KnnMonitor(eval_ds, train_labels=labels, k=5, temperature=0.1)
    monitor.set_model(model)
    self.assertAllClose(monitor.evaluate()["knn_top1"], numpy_top1(model.bank.numpy()))
    clean = callbacks.KnnMonitor(eval_ds, train_data=train_ds, k=5, temperature=0.1)
    clean.set_model(model)
    self.assertAllClose(clean.evaluate()["knn_top1"], numpy_top1(model.predict(_images(), verbose=0)))
    with self.assertRaisesRegex(ValueError, "train_labels .* or train_data"):
      callbacks.KnnMonitor(eval_ds)
    wrong = callbacks.KnnMonitor(eval_ds, train_labels=labels[:10])
    wrong.set_model(model)
    with self.assertRaisesRegex(ValueError, "10 labels, the bank 32 rows"):
      wrong.evaluate()

  def _monitored_epochs(self, epochs: int, *, epoch_seconds: float, evaluate_seconds: float, **kwargs):
    """The epochs (0-based) after which a KnnMonitor scored, its seconds and the wall seconds, on a fake clock."""
    monitor = callbacks.KnnMonitor(tf.data.Dataset.range(1), train_labels=np.zeros(N, np.int64), **kwargs)
    clock = [100.0]

    def evaluate():
      clock[0] += evaluate_seconds
      return {"knn_top1": 0.5, "knn_top5": 0.9}

    monitored = []
    with mock.patch.object(callbacks, "time") as fake_time, mock.patch.object(monitor, "evaluate", evaluate):
      fake_time.time.side_effect = lambda: clock[0]
      monitor.set_params({"epochs": epochs, "verbose": 0, "steps": 1})
      monitor.on_train_begin()
      for epoch in range(epochs):
        clock[0] += epoch_seconds
        logs = {"loss": 1.0}
        monitor.on_epoch_end(epoch, logs)
        if "knn_top1" in logs:
          monitored.append(epoch)
    return monitored, sum(evaluate_seconds for _ in monitored), clock[0] - 100.0

  def test_the_monitor_keeps_within_its_time_share_of_the_fit(self):
    # 2 s epochs and a 0.5 s evaluation: after every epoch it took 20% of the fit.
    monitored, seconds, wall = self._monitored_epochs(40, epoch_seconds=2.0, evaluate_seconds=0.5)
    self.assertEqual((monitored[0], monitored[-1]), (0, 39))  # The first measures its cost; the last is scored.
    self.assertBetween(len(monitored), 4, 20)
    self.assertLessEqual(seconds, callbacks.schedules.MONITOR_TIME_SHARE * wall + 0.5)
    # A cheap one (3% of an epoch) runs after every epoch, as every_epochs asks.
    self.assertEqual(self._monitored_epochs(10, epoch_seconds=30.0, evaluate_seconds=1.0)[0], list(range(10)))
    # time_share=None: after every every_epochs-th epoch, whatever it costs (the old behaviour).
    self.assertEqual(self._monitored_epochs(9, epoch_seconds=2.0, evaluate_seconds=5.0, time_share=None)[0],
                     list(range(9)))
    self.assertEqual(self._monitored_epochs(9, epoch_seconds=2.0, evaluate_seconds=5.0, time_share=None,
                                            every_epochs=4)[0], [3, 7])
    with self.assertRaisesRegex(ValueError, "time_share must be >= 0"):
      callbacks.KnnMonitor(tf.data.Dataset.range(1), train_labels=np.zeros(N), time_share=-0.1)


class ExportFromPythonTest(tf.test.TestCase):

  def test_export_of_a_fitted_model_serves_and_searches(self):
    model = _model()
    images = _images()
    labels = np.arange(N) % 4
    model.fit(_dataset(images), epochs=1, verbose=0)
    export_dir = os.path.join(self.create_tempdir().full_path, "export")
    tf_instdisc.export_model(model, images, export_dir, labels=labels, knn_k=5, index="none")
    loaded = tf_instdisc.load(export_dir)
    self.assertEqual(loaded.manifest["dataset"], "custom")
    self.assertEqual(loaded.manifest["saved_model"]["version"], int(model.step.numpy()))
    self.assertAllClose(loaded.embed(images[:3]), model.predict(images[:3], verbose=0), atol=1e-5)
    neighbours = loaded.search(images[:3], k=1)
    self.assertAllEqual(neighbours.ids[:, 0], [0, 1, 2])  # Each image finds itself.
    served = tf.saved_model.load(os.path.join(export_dir, "saved_model", str(int(model.step.numpy()))))
    outputs = served.signatures["knn"](images=tf.constant(images[:4]))
    self.assertAllEqual(outputs["neighbor_ids"][:, 0], [0, 1, 2, 3])
    with self.assertRaisesRegex(ValueError, "export_dir: .* already exists"):
      tf_instdisc.export_model(model, images, export_dir, index="none")
    with self.assertRaisesRegex(ValueError, "images: expected square"):
      tf_instdisc.export_model(model, images[:, :, :16], export_dir + "2", index="none")


if __name__ == "__main__":
  tf.test.main()
