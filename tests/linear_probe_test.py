"""Tests of the linear probes, label subsets and the results table (no trained network needed)."""

from __future__ import annotations

import os

from absl.testing import parameterized

from tests import testing  # noqa: F401  (logical CPUs before TensorFlow starts)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_instdisc import finetune  # noqa: E402
from tf_instdisc import linear_probe  # noqa: E402
from tf_instdisc import results  # noqa: E402


def _blobs(n: int, dims: int, classes: int, *, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(0, 1, (classes, dims))
  labels = rng.integers(0, classes, n)
  return (centres[labels] + rng.normal(0, spread, (n, dims))).astype(np.float32), labels


class LinearProbeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("logistic", "svm")
  def test_separable_classes_are_learned(self, loss):
    train_x, train_y = _blobs(600, 20, 5, spread=0.3, seed=0)
    test_x, test_y = _blobs(300, 20, 5, spread=0.3, seed=1)
    cfg = linear_probe.ProbeConfig(loss=loss, epochs=10, batch_size=64, weight_decays=(0.0, 1e-3))
    result = linear_probe.evaluate(train_x, train_y, test_x, test_y, num_classes=5, cfg=cfg)
    self.assertGreater(result["top1"], 0.97)
    self.assertEqual(result["top5"], 1.0)
    self.assertIn(result["weight_decay"], (0.0, 1e-3))
    self.assertEqual(set(result["val_top1"]), {"0.0", "0.001"})
    self.assertEqual(result["dims"], 20)

  def test_noise_features_score_near_chance(self):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(500, 10)).astype(np.float32), rng.normal(size=(500, 10)).astype(np.float32)
    cfg = linear_probe.ProbeConfig(epochs=5, weight_decays=(1e-3,))
    result = linear_probe.evaluate(train_x, rng.integers(0, 10, 500), test_x, rng.integers(0, 10, 500),
                                   num_classes=10, cfg=cfg)
    self.assertLess(result["top1"], 0.2)

  def test_penalty_is_chosen_on_held_out_data(self):
    # Few examples in many dimensions: a strong penalty must win on the held-out part.
    train_x, train_y = _blobs(80, 400, 4, spread=3.0, seed=0)
    test_x, test_y = _blobs(400, 400, 4, spread=3.0, seed=1)
    cfg = linear_probe.ProbeConfig(epochs=30, batch_size=16, weight_decays=(0.0, 1.0), val_fraction=0.25)
    result = linear_probe.evaluate(train_x, train_y, test_x, test_y, num_classes=4, cfg=cfg)
    self.assertGreaterEqual(result["val_top1"]["1.0"], result["val_top1"]["0.0"])

  def test_accuracy(self):
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    self.assertEqual(linear_probe.accuracy(scores, np.array([0, 1])), {"top1": 0.5, "top5": 1.0})

  @parameterized.parameters(
      (dict(loss="hinge"), "--linear_loss"), (dict(epochs=0), "--linear_epochs"),
      (dict(weight_decays=()), "--linear_weight_decays"), (dict(val_fraction=1.0), "--linear_val_fraction"))
  def test_bad_config_names_the_flag(self, fields, flag):
    with self.assertRaisesRegex(ValueError, flag):
      linear_probe.validate(linear_probe.ProbeConfig(**fields))


class LabelSubsetTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.labels = np.random.default_rng(0).integers(0, 10, 60000)

  def test_same_seed_same_subset_other_seed_other_subset(self):
    first = finetune.label_subset(self.labels, 0.01, seed=0)
    self.assertAllEqual(first, finetune.label_subset(self.labels.copy(), 0.01, seed=0))
    self.assertNotAllEqual(first, finetune.label_subset(self.labels, 0.01, seed=1))

  def test_stratified_sorted_and_nested(self):
    one = finetune.label_subset(self.labels, 0.01, seed=0)
    two = finetune.label_subset(self.labels, 0.02, seed=0)
    self.assertAllEqual(one, np.sort(one))
    self.assertLen(np.unique(one), len(one))
    self.assertAllClose(len(one), 600, atol=10)
    counts = np.bincount(self.labels[one], minlength=10)
    expected = np.round(0.01 * np.bincount(self.labels, minlength=10))
    self.assertAllEqual(counts, expected)
    self.assertEmpty(np.setdiff1d(one, two))  # The 1% subset lies inside the 2% one.

  def test_every_class_keeps_one_example(self):
    labels = np.array([0] * 1000 + [1] * 3)
    subset = finetune.label_subset(labels, 0.01, seed=0)
    self.assertEqual(set(labels[subset]), {0, 1})

  def test_bad_fraction_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--label_fractions"):
      finetune.label_subset(self.labels, 0.0, seed=0)
    with self.assertRaisesRegex(ValueError, "--label_fractions"):
      finetune.label_subset(self.labels, 1.5, seed=0)


class ResultsTableTest(tf.test.TestCase):

  def test_rows_append_under_one_header(self):
    path = os.path.join(self.create_tempdir().full_path, "sub", "results.md")
    paper = results.paper_number("objective", "nce_m4096", "knn")
    self.assertEqual(paper, (80.4, "Table 1, CIFAR-10, ResNet-18"))
    row = results.table_row(run="r", dataset="fashion_mnist", arch="convnet_small", objective="nce m=4096", epochs=3,
                            protocol="knn", setting="k=200", top1=0.81234, top5=0.99, paper=paper, seconds=75)
    results.append_rows(path, [row])
    results.append_rows(path, [dict(row, setting="k=20")])
    with open(path) as f:
      text = f.read()
    self.assertEqual(text.count("| run |"), 1)
    rows = results.read_table(path)
    self.assertEqual([r["setting"] for r in rows], ["k=200", "k=20"])
    self.assertEqual(rows[0]["top-1"], "81.23")
    self.assertEqual(rows[0]["paper top-1"], "80.4")
    self.assertEqual(rows[0]["wall time"], "1m15s")
    self.assertEqual(rows[0]["train time"], "")  # No training run given (an untrained baseline).

  def test_train_time_comes_from_the_runs_metrics(self):
    model_dir = self.create_tempdir().full_path
    with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
      f.write('{"epoch": 1, "seconds": 100.5}\n{"epoch": 2, "seconds": 99.5}\n')
    with open(os.path.join(model_dir, "final_metrics.json"), "w") as f:
      f.write('{"seconds": 20}')
    self.assertEqual(results.train_seconds(model_dir), 220.0)
    self.assertLen(results.read_epochs(model_dir), 2)
    self.assertEqual(results.read_epochs(os.path.join(model_dir, "none")), [])

  def test_no_paper_number_for_settings_the_paper_lacks(self):
    self.assertIsNone(results.paper_number("embedding", "48", "knn"))
    self.assertIsNone(results.paper_number("layers", "convnet_small:conv1", "linear"))


if __name__ == "__main__":
  tf.test.main()
