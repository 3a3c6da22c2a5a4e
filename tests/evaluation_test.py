"""The evaluation protocols on a small real Fashion-MNIST run (trained once, as smoke.flags: 1,024 images)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests import testing

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from tf_instdisc import config as config_lib  # noqa: E402
from tf_instdisc import data as data_lib  # noqa: E402
from tf_instdisc import distribute  # noqa: E402
from tf_instdisc import evaluation  # noqa: E402
from tf_instdisc import features  # noqa: E402
from tf_instdisc import finetune  # noqa: E402
from tf_instdisc import linear_probe  # noqa: E402
from tf_instdisc import results  # noqa: E402
from tf_instdisc import train_lib  # noqa: E402


def _readable_png(path: str) -> tuple[int, ...]:
  import matplotlib.image
  return matplotlib.image.imread(path).shape


@unittest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class EvaluationTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.model_dir = os.path.join(cls.root, "run")
    # smoke.flags' recipe.
    cls.cfg = testing.tiny_config(
        cls.model_dir, dataset="fashion_mnist", max_train_examples=1024, max_eval_examples=512, embedding_dim=128,
        head_batchnorm=True, objective="softmax", temperature=0.2, crop_scale_min=0.6, color_jitter=0.2,
        grayscale_prob=0.0, batch_size=64, epochs=10, learning_rate=0.03, lr_schedule="cosine", steps_per_loop=8,
        knn_k=20, eval_batch_size=512, strategy="one_device")
    cls.final = train_lib.run(cls.cfg, distribute.make_strategy("one_device"))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def _options(self, name: str, **fields) -> evaluation.EvalOptions:
    return evaluation.EvalOptions(output_dir=os.path.join(self.root, name),
                                  results_table=os.path.join(self.root, name, "results.md"), **fields)

  def test_knn_reproduces_the_trainers_final_evaluation_and_plots(self):
    options = self._options("knn", knn_k=(20, 200), knn_temperature=0.07, tsne_points=300)
    out = evaluation.evaluate(self.model_dir, options)["knn"]
    self.assertAllClose(out["scores"]["k=20"]["top1"], self.final["knn_top1"], atol=1e-6)
    self.assertAllClose(out["scores"]["k=20"]["top5"], self.final["knn_top5"], atol=1e-6)
    self.assertEqual((out["keys"], out["queries"]), (1024, 512))
    with open(os.path.join(self.root, "knn", "knn.json")) as f:
      self.assertEqual(json.load(f)["scores"], out["scores"])
    rows = results.read_table(os.path.join(self.root, "knn", "results.md"))
    self.assertEqual([r["setting"] for r in rows], ["k=20, t=0.07", "k=200, t=0.07"])
    self.assertEqual(rows[0]["top-1"], f"{100 * self.final['knn_top1']:.2f}")
    self.assertEqual((rows[0]["dataset"], rows[0]["arch"], rows[0]["epochs"]), ("fashion_mnist", "convnet_small", "10"))
    for name in ("tsne.png", "curves.png"):
      height, width = _readable_png(os.path.join(self.root, "knn", name))[:2]
      self.assertGreater(min(height, width), 100)

  def test_linear_probe_on_the_trained_encoder_beats_the_untrained_one(self):
    # The protocol end to end, for both networks (untrained: the same seed and architecture, never trained).
    common = dict(protocols=("linear",), layers=("embedding",), max_train_examples=2000, max_eval_examples=2000,
                  probe=linear_probe.ProbeConfig(epochs=10, weight_decays=(1e-3,)), plots=False)
    for name, untrained in (("probe_trained", False), ("probe_untrained", True)):
      out = evaluation.evaluate(self.model_dir, self._options(name, untrained=untrained, **common))["linear"]
      self.assertEqual(out["untrained"], untrained)
      self.assertEqual(out["scores"]["embedding"]["train_examples"], 2000)
      self.assertGreater(out["scores"]["embedding"]["top1"], 0.5)  # Far above chance either way on this data.
    # The comparison: random conv features are strong on Fashion-MNIST, so the gap of a short run shows in the
    # few-label regime (10 labels per class), averaged over three seeded label subsets.
    accuracy = {}
    for untrained in (False, True):
      run = features.load_run(self.model_dir, untrained=untrained)
      extractor = features.build_extractor(run.model, ["embedding"])
      source = data_lib.load_source(config_lib.DataConfig(dataset="fashion_mnist", max_train_examples=2000,
                                                          max_eval_examples=2000))
      (train, train_labels), (test, test_labels) = (
          features.extract(extractor, split, self.cfg.augment, image_size=28, batch_size=512)
          for split in (source.train, source.eval))
      scores = []
      for seed in range(3):
        subset = finetune.label_subset(train_labels, 0.05, seed=seed)
        scores.append(linear_probe.evaluate(
            train["embedding"][subset], train_labels[subset], test["embedding"], test_labels, num_classes=10,
            cfg=linear_probe.ProbeConfig(epochs=60, weight_decays=(0.0, 1e-3, 1e-2)))["top1"])
      accuracy[untrained] = np.mean(scores)
    self.assertGreater(accuracy[False], accuracy[True] + 0.01)

  def test_every_layer_is_probed_within_the_dimension_budget(self):
    options = self._options("layers", protocols=("linear",), max_layer_dims=2000, max_train_examples=300,
                            max_eval_examples=300, probe=linear_probe.ProbeConfig(epochs=3, weight_decays=(1e-4,)))
    scores = evaluation.evaluate(self.model_dir, options)["linear"]["scores"]
    self.assertEqual(list(scores), ["conv1", "conv2", "conv3", "conv4", "embedding"])
    for layer, score in scores.items():
      self.assertLessEqual(score["dims"], 2000, layer)
      self.assertGreater(score["top1"], 0.2, layer)
    self.assertEqual(scores["embedding"]["dims"], 128)
    self.assertLen(results.read_table(os.path.join(self.root, "layers", "results.md")), 5)
    self.assertGreater(_readable_png(os.path.join(self.root, "layers", "linear_layers.png"))[0], 100)

  def test_semi_supervised_pretrained_beats_scratch_at_one_percent(self):
    options = self._options("semi", protocols=("semi_supervised",), label_fractions=(1.0,), max_train_examples=0,
                            max_eval_examples=2000, finetune=finetune.FinetuneConfig(epochs=10))
    out = evaluation.evaluate(self.model_dir, options)["semi_supervised"]["scores"]["1%"]
    self.assertEqual(out["labelled_examples"], 600)  # 1% of all 60,000 labels, not of the 1,024 trained on.
    self.assertGreater(out["pretrained"]["top1"], out["scratch"]["top1"])
    # The same subset as any other method with this seed gets.
    labels = data_lib.load_labels(data_lib.load_source(config_lib.DataConfig(dataset="fashion_mnist")).train)
    self.assertEqual(out["subset_digest"], evaluation._digest(finetune.label_subset(labels, 0.01, seed=0)))
    self.assertGreater(_readable_png(os.path.join(self.root, "semi", "semi_supervised.png"))[0], 100)

  def test_transfer_to_a_folder_dataset_of_another_size_and_colour(self):
    # Fashion-MNIST test images as 36x36 RGB PNGs, classes 0-3: another size, other channels, other images.
    target = os.path.join(self.root, "target")
    images = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    labels = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    for split, (start, count) in {"train": (0, 40), "test": (5000, 15)}.items():
      for label in range(4):
        os.makedirs(os.path.join(target, split, f"class{label}"))
        for i in np.flatnonzero(labels[start:] == label)[:count]:
          rgb = np.repeat(images[start + i][..., None], 3, axis=-1)
          Image.fromarray(rgb).resize((36, 36)).save(os.path.join(target, split, f"class{label}", f"{i}.png"))
    options = self._options("transfer", protocols=("transfer",), transfer_dataset="folder",
                            transfer_data_dir=target, knn_k=(10,),
                            probe=linear_probe.ProbeConfig(epochs=20, weight_decays=(1e-3,)))
    out = evaluation.evaluate(self.model_dir, options)["transfer"]
    self.assertEqual(set(out["linear"]), {"conv4", "embedding"})
    self.assertGreater(out["knn"]["k=10"]["top1"], 0.5)  # 4 classes: chance is 0.25.
    self.assertGreater(out["linear"]["embedding"]["top1"], 0.5)
    rows = results.read_table(os.path.join(self.root, "transfer", "results.md"))
    self.assertIn("-> folder, kNN k=10", [r["setting"] for r in rows])

  def test_features_pool_every_stage_under_the_budget(self):
    run = features.load_run(self.model_dir)
    self.assertEqual(features.layer_names(run.model), ["conv1", "conv2", "conv3", "conv4", "embedding"])
    extractor = features.build_extractor(run.model, ["conv1", "embedding"], max_dims=1000)
    out = extractor(tf.zeros([2, 28, 28, 1]))
    self.assertEqual(out["conv1"].shape, [2, 32 * 5 * 5])  # 28x28x32 pooled by stride 6 -> 5x5x32 = 800.
    self.assertAllClose(out["embedding"], run.model(tf.zeros([2, 28, 28, 1])), atol=1e-6)
    self.assertEqual(features.pool_stride(7, 7, 128, 10_000), 1)
    self.assertEqual(features.pool_stride(56, 56, 256, 10_000), 10)  # ResNet-50's conv2 at 224: 6x6x256.

  def test_bad_requests_name_the_flag(self):
    cases = [(dict(protocols=("svm",)), "--protocol"), (dict(protocols=("linear",), layers=("conv9",)), "--layers"),
             (dict(protocols=("transfer",)), "--transfer_dataset"), (dict(knn_k=(0,)), "--knn_k"),
             (dict(label_fractions=(0.0,)), "--label_fractions")]
    for fields, flag in cases:
      with self.subTest(flag=flag), self.assertRaisesRegex(ValueError, flag):
        evaluation.evaluate(self.model_dir, self._options("bad", **fields))
    with self.assertRaisesRegex(ValueError, "--model_dir"):
      evaluation.evaluate(os.path.join(self.root, "nothing"), self._options("bad"))

  def _evaluate_py(self, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", f"--model_dir={self.model_dir}", *flags],
                          cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=600)

  def test_command_line_names_a_bad_flag_value(self):
    for flags, named in ((["--protocol=knn", "--knn_k=ten"], "--knn_k"),
                         (["--protocol=transfer"], "--transfer_dataset"),
                         (["--linear_weight_decays=a"], "--linear_weight_decays"),
                         (["--label_fractions=0"], "--label_fractions")):
      with self.subTest(named=named):
        result = self._evaluate_py(*flags)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertIn(named, result.stderr)

  def test_command_line_flags_reach_the_protocols(self):
    out = os.path.join(self.root, "cli")
    result = self._evaluate_py(
        "--protocol=knn,linear,semi_supervised", "--knn_k=5,7", "--knn_temperature=0.1", "--layers=conv4,embedding",
        "--max_layer_dims=500", "--linear_loss=svm", "--linear_epochs=2", "--linear_batch_size=64",
        "--linear_learning_rate=0.02", "--linear_weight_decays=1e-3", "--linear_val_fraction=0.2",
        "--label_fractions=5", "--finetune_epochs=1", "--finetune_batch_size=16", "--finetune_learning_rate=0.02",
        "--finetune_momentum=0.8", "--finetune_weight_decay=1e-4", "--seed=3", "--max_train_examples=400",
        "--max_eval_examples=200", "--batch_size=100", f"--output_dir={out}",
        f"--results_table={os.path.join(out, 'table.md')}", "--run_name=cli", "--noplots", "--tsne_points=0",
        "--untrained")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("semi_supervised: 5% pretrained", result.stdout)
    loaded = {p: json.load(open(os.path.join(out, f"{p}.json"))) for p in ("knn", "linear", "semi_supervised")}
    self.assertEqual(set(loaded["knn"]["scores"]), {"k=5", "k=7"})
    self.assertEqual((loaded["knn"]["temperature"], loaded["knn"]["keys"], loaded["knn"]["queries"]), (0.1, 400, 200))
    self.assertTrue(loaded["knn"]["untrained"])
    linear = loaded["linear"]["scores"]
    self.assertEqual((loaded["linear"]["loss"], set(linear)), ("svm", {"conv4", "embedding"}))
    self.assertLessEqual(linear["conv4"]["dims"], 500)
    self.assertEqual((linear["conv4"]["weight_decay"], linear["conv4"]["train_examples"]), (1e-3, 400))
    self.assertEqual(loaded["semi_supervised"]["recipe"], dict(epochs=1, batch_size=16, learning_rate=0.02,
                                                                momentum=0.8, weight_decay=1e-4, seed=3))
    self.assertAllClose(loaded["semi_supervised"]["scores"]["5%"]["labelled_examples"], 20, atol=5)  # 5% of 400.
    rows = results.read_table(os.path.join(out, "table.md"))
    self.assertEqual({(r["run"], r["epochs"]) for r in rows}, {("cli", "0")})
    self.assertFalse([name for name in os.listdir(out) if name.endswith(".png")])  # --noplots.

if __name__ == "__main__":
  tf.test.main()
