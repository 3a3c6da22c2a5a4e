"""The evaluation protocols on a small real Fashion-MNIST run (trained once, as smoke.flags: 1,024 images)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

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
from tf_instdisc import model as model_lib  # noqa: E402
from tf_instdisc import results  # noqa: E402
from tf_instdisc import train_lib  # noqa: E402


def _readable_png(path: str) -> tuple[int, ...]:
  import matplotlib.image
  return matplotlib.image.imread(path).shape


def _fashion_mnist(prefix: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images float32 [count, 28, 28, 1] in [0, 255] and labels of the train or t10k files."""
  images = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"))[:count]
  labels = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
  return images[..., None].astype(np.float32), labels.astype(np.int64)


def _unit(rows: np.ndarray) -> np.ndarray:
  rows = np.reshape(rows, [len(rows), -1]).astype(np.float64)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _numpy_knn(keys: np.ndarray, key_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, *, k: int,
               temperature: float, num_classes: int) -> dict[str, float]:
  """Weighted kNN (paper Sec. 3.4) by brute force with explicit loops: each of the k most cosine-similar keys
  votes exp(s / temperature) for its label; ties between classes go to the lower class id."""
  similarities = queries @ keys.T  # [Q, N]
  top1 = top5 = 0
  for query, label in enumerate(query_labels):
    votes = np.zeros(num_classes)
    for key in np.argsort(-similarities[query], kind="stable")[:k]:
      votes[key_labels[key]] += np.exp(similarities[query, key] / temperature)
    ranked = np.argsort(-votes, kind="stable")
    top1 += int(ranked[0] == label)
    top5 += int(label in ranked[:5])
  return {"top1": top1 / len(query_labels), "top5": top5 / len(query_labels)}


def _model_features(model, images: np.ndarray) -> np.ndarray:
  return np.concatenate([model(images[i:i + 256], training=False).numpy() for i in range(0, len(images), 256)])


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
    options = self._options("knn", knn_k=(20, 200), knn_temperature=0.07, knn_features=("embedding",),
                            tsne_points=300)
    out = evaluation.evaluate(self.model_dir, options)["knn"]
    self.assertAllClose(out["scores"]["k=20"]["top1"], self.final["knn_top1"], atol=1e-6)
    self.assertAllClose(out["scores"]["k=20"]["top5"], self.final["knn_top5"], atol=1e-6)
    self.assertEqual((out["keys"], out["queries"]), (1024, 512))
    self.assertEqual((out["features"], out["skipped"]), ({"embedding": out["scores"]}, {}))  # --knn_features.
    with open(os.path.join(self.root, "knn", "knn.json")) as f:
      self.assertEqual(json.load(f)["scores"], out["scores"])
    rows = results.read_table(os.path.join(self.root, "knn", "results.md"))
    self.assertEqual([r["setting"] for r in rows],
                     ["embedding (128-d), k=20, t=0.07", "embedding (128-d), k=200, t=0.07"])
    self.assertEqual(rows[0]["top-1"], f"{100 * self.final['knn_top1']:.2f}")
    self.assertEqual((rows[0]["dataset"], rows[0]["arch"], rows[0]["epochs"]), ("fashion_mnist", "convnet_small", "10"))
    for name in ("tsne.png", "curves.png"):
      height, width = _readable_png(os.path.join(self.root, "knn", name))[:2]
      self.assertGreater(min(height, width), 100)

  def test_the_untrained_baseline_does_not_overwrite_the_trained_runs_results(self):
    model_dir = os.path.join(self.root, "default_dirs")
    shutil.copytree(self.model_dir, model_dir)
    for untrained in (False, True):
      evaluation.evaluate(model_dir, evaluation.EvalOptions(knn_k=(20,), knn_features=("embedding",), plots=False,
                                                            untrained=untrained))
    for name, untrained in (("eval", False), ("eval_untrained", True)):
      with open(os.path.join(model_dir, name, "knn.json")) as f:
        self.assertEqual(json.load(f)["untrained"], untrained, msg=name)
      self.assertLen(results.read_table(os.path.join(model_dir, name, "results.md")), 1)

  def test_knn_rows_of_embedding_backbone_and_pixels_match_numpy(self):
    # The run's own 1,024 train images as keys, its 512 eval images as queries, read here straight from the files.
    ks, temperature = (10, 20, 50, 200), 0.07
    train_images, train_labels = _fashion_mnist("train", 1024)
    test_images, test_labels = _fashion_mnist("t10k", 512)
    pixels = (_unit(train_images), _unit(test_images))  # The same for both networks.
    dims = {"embedding": 128, "backbone": 256, "pixels": 784}  # convnet_small pools 256 channels.
    outs = {}
    for untrained in (False, True):
      name = f"rows_untrained_{untrained}"
      options = self._options(name, knn_k=ks, knn_temperature=temperature, plots=False, untrained=untrained)
      out = outs[untrained] = evaluation.evaluate(self.model_dir, options)["knn"]
      model = features.load_run(self.model_dir, untrained=untrained).model
      backbone = model_lib.backbone_of(model)
      inputs = {"embedding": (_unit(_model_features(model, train_images)), _unit(_model_features(model, test_images))),
                "backbone": (_unit(_model_features(backbone, train_images)),
                             _unit(_model_features(backbone, test_images))),
                "pixels": pixels}
      expected = {kind: {f"k={k}": _numpy_knn(keys, train_labels, queries, test_labels, k=k, temperature=temperature,
                                              num_classes=10) for k in ks}
                  for kind, (keys, queries) in inputs.items()}
      with self.subTest(untrained=untrained):
        self.assertEqual(list(out["features"]), ["embedding", "backbone", "pixels"])
        for kind, by_k in expected.items():
          for setting, score in by_k.items():
            self.assertAllClose(out["features"][kind][setting]["top1"], score["top1"], atol=1e-6, msg=(kind, setting))
            self.assertAllClose(out["features"][kind][setting]["top5"], score["top5"], atol=1e-6, msg=(kind, setting))
        self.assertEqual(out["feature_dims"], dims)
        self.assertEqual((out["scores"], out["skipped"], out["untrained"]),
                         (out["features"]["embedding"], {}, untrained))
        with open(os.path.join(self.root, name, "knn.json")) as f:
          self.assertEqual(json.load(f)["features"], out["features"])
        rows = results.read_table(os.path.join(self.root, name, "results.md"))
        self.assertEqual([(r["setting"], r["top-1"], r["top-5"]) for r in rows],
                         [(f"{kind} ({dims[kind]}-d), k={k}, t=0.07", f"{100 * expected[kind][f'k={k}']['top1']:.2f}",
                           f"{100 * expected[kind][f'k={k}']['top5']:.2f}") for k in ks for kind in dims])
        self.assertEqual({r["paper top-1"] for r in rows}, {""})  # No paper number for convnet_small.
    self.assertAllClose(outs[False]["scores"]["k=20"]["top1"], self.final["knn_top1"], atol=1e-6)
    self.assertEqual(outs[True]["features"]["pixels"], outs[False]["features"]["pixels"])  # No network in pixels.

  def test_pixel_rows_are_skipped_above_the_budget(self):
    budget = evaluation.MAX_PIXEL_VALUES
    self.assertTrue(evaluation.pixels_fit(60_000 + 10_000, 32 * 32 * 3))  # CIFAR-10.
    self.assertTrue(evaluation.pixels_fit(60_000 + 10_000, 28 * 28))  # Fashion-MNIST.
    self.assertFalse(evaluation.pixels_fit(1_281_167 + 50_000, 224 * 224 * 3))  # ImageNet.
    self.assertTrue(evaluation.pixels_fit(budget // 1000, 1000))
    self.assertFalse(evaluation.pixels_fit(budget // 1000 + 1, 1000))
    # 1,024 + 512 images of 784 pixels is one value above a budget of 1,204,223.
    options = self._options("skip", knn_k=(20,), knn_features=("embedding", "pixels"), plots=False)
    with mock.patch.object(evaluation, "MAX_PIXEL_VALUES", 1536 * 784 - 1), self.assertLogs("absl", "WARNING") as logs:
      out = evaluation.evaluate(self.model_dir, options)["knn"]
    note = "1,536 images x 784 pixel values = 1,204,224 > 1,204,223 (evaluation.MAX_PIXEL_VALUES)"
    self.assertEqual(out["skipped"], {"pixels": note})
    self.assertIn(f"kNN on pixels skipped: {note}", logs.output[0])
    self.assertEqual(list(out["features"]), ["embedding"])  # And no backbone row: not in --knn_features.
    self.assertAllClose(out["scores"]["k=20"]["top1"], self.final["knn_top1"], atol=1e-6)
    rows = results.read_table(os.path.join(self.root, "skip", "results.md"))
    self.assertEqual([r["setting"] for r in rows], ["embedding (128-d), k=20, t=0.07"])
    self.assertIn(f"pixels: skipped, {note}", evaluation.summary(out))

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
    extractor = features.build_extractor(run.model, ["conv1", "embedding", "backbone"], max_dims=1000)
    images = tf.random.stateless_uniform([2, 28, 28, 1], seed=(0, 1), maxval=255.0)
    out = extractor(images)
    self.assertEqual(out["conv1"].shape, [2, 32 * 5 * 5])  # 28x28x32 pooled by stride 6 -> 5x5x32 = 800.
    self.assertAllClose(out["embedding"], run.model(images), atol=1e-6)
    self.assertAllClose(out["backbone"], model_lib.backbone_of(run.model)(images), atol=1e-6)
    self.assertEqual(features.pool_stride(7, 7, 128, 10_000), 1)
    self.assertEqual(features.pool_stride(56, 56, 256, 10_000), 10)  # ResNet-50's conv2 at 224: 6x6x256.

  def test_bad_requests_name_the_flag(self):
    cases = [(dict(protocols=("svm",)), "--protocol"), (dict(protocols=("linear",), layers=("conv9",)), "--layers"),
             (dict(protocols=("transfer",)), "--transfer_dataset"), (dict(knn_k=(0,)), "--knn_k"),
             (dict(label_fractions=(0.0,)), "--label_fractions"), (dict(knn_features=("pixels",)), "--knn_features"),
             (dict(knn_features=("embedding", "raw")), "--knn_features")]
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
    knn = loaded["knn"]
    self.assertEqual(set(knn["features"]), {"embedding", "backbone", "pixels"})
    printed = [" ".join(line.split()) for line in result.stdout.splitlines()]
    for k in ("k=5", "k=7"):  # The printed table: a line per k and row, the JSON's numbers.
      for kind, dims in knn["feature_dims"].items():
        scores = knn["features"][kind][k]
        self.assertIn(f"{k} {kind} ({dims}-d) {100 * scores['top1']:.2f} / {100 * scores['top5']:.2f}", printed)
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
