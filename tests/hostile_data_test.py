"""Hostile input end to end: a trained folder run whose files go bad afterwards is named, in every command.

One tiny folder run (16 train, 4 test images of 10x12) is trained once; each test then breaks one file (restored
after it) and checks that evaluate.py (in process and as a command), the transfer and semi-supervised protocols and
the export name that file, with the flag that gave the data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from tests import testing

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_instdisc import artifact  # noqa: E402
from tf_instdisc import distribute  # noqa: E402
from tf_instdisc import evaluation  # noqa: E402
from tf_instdisc import finetune  # noqa: E402
from tf_instdisc import train_lib  # noqa: E402


class HostileFolderRunTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.data_dir = os.path.join(cls.root, "data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
      for label, name in enumerate(("ants", "bees")):
        os.makedirs(os.path.join(cls.data_dir, split, name))
        for i in range(count):
          image = np.clip(rng.normal(60 + 120 * label, 30, (10, 12, 3)), 0, 255).astype(np.uint8)
          tf.io.write_file(os.path.join(cls.data_dir, split, name, f"{i}.png"), tf.io.encode_png(image))
    cls.model_dir = os.path.join(cls.root, "run")
    cfg = testing.tiny_config(cls.model_dir, dataset="folder", data_dir=cls.data_dir, image_size=8, epochs=1,
                              eval_every_epochs=0, num_negatives=8, batch_size=8, knn_k=3)
    train_lib.run(cfg, distribute.make_strategy("one_device"))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def _corrupt(self, relative: str) -> str:
    """Truncates the PNG at data_dir/relative to half (its header stays valid) until the test ends."""
    path = os.path.join(self.data_dir, relative)
    with open(path, "rb") as f:
      original = f.read()

    def restore():
      with open(path, "wb") as f:
        f.write(original)

    self.addCleanup(restore)
    with open(path, "wb") as f:
      f.write(original[:len(original) // 2])
    return path

  def _options(self, name: str, **fields) -> evaluation.EvalOptions:
    out = os.path.join(self.root, name)
    return evaluation.EvalOptions(output_dir=out, results_table=os.path.join(out, "results.md"), plots=False,
                                  tsne_points=0, knn_k=(3,), knn_features=("embedding",), **fields)

  def test_train_py_names_a_corrupt_eval_image_and_a_missing_train_image(self):
    cfg = testing.tiny_config(os.path.join(self.root, "train_eval"), dataset="folder", data_dir=self.data_dir,
                              image_size=8, epochs=1, num_negatives=8, batch_size=8, knn_k=3)
    bad = self._corrupt("test/ants/0.png")
    with self.assertRaises(ValueError) as raised:  # The bank monitor after the epoch reads the eval split.
      train_lib.run(cfg, distribute.make_strategy("one_device"))
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")
    bad = self._corrupt("train/bees/2.png")
    with self.assertRaises(ValueError) as raised:
      train_lib.run(testing.replace(cfg, model_dir=os.path.join(self.root, "train_train")),
                    distribute.make_strategy("one_device"))
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")  # Training meets it first.

  def test_knn_protocol_names_a_corrupt_eval_image(self):
    bad = self._corrupt("test/bees/1.png")
    with self.assertRaises(ValueError) as raised:
      evaluation.evaluate(self.model_dir, self._options("knn"))
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")

  def test_linear_protocol_names_a_corrupt_train_image(self):
    bad = self._corrupt("train/ants/3.png")
    with self.assertRaises(ValueError) as raised:
      evaluation.evaluate(self.model_dir, self._options("linear", protocols=("linear",), layers=("embedding",)))
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")

  def test_evaluate_py_prints_one_line_and_fails(self):
    bad = self._corrupt("test/bees/1.png")
    result = subprocess.run(
        [sys.executable, "evaluate.py", f"--model_dir={self.model_dir}", "--protocol=knn", "--knn_k=3",
         "--knn_features=embedding", "--noplots", "--tsne_points=0", f"--output_dir={os.path.join(self.root, 'cli')}"],
        cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=600)
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertIn(f"evaluate.py: --data_dir: cannot decode image {bad}", result.stderr.splitlines())
    self.assertNotIn("Traceback", result.stderr)
    self.assertEqual(result.stdout, "")

  def test_transfer_target_names_its_flag(self):
    bad = self._corrupt("test/ants/0.png")
    options = self._options("transfer", protocols=("transfer",), transfer_dataset="folder",
                            transfer_data_dir=self.data_dir, layers=("embedding",))
    with self.assertRaises(ValueError) as raised:
      evaluation.evaluate(self.model_dir, options)
    self.assertEqual(str(raised.exception), f"--transfer_data_dir: cannot decode image {bad}")
    missing = os.path.join(self.root, "no_such_target")
    options = self._options("transfer", protocols=("transfer",), transfer_dataset="folder", transfer_data_dir=missing)
    with self.assertRaises(ValueError) as raised:
      evaluation.evaluate(self.model_dir, options)
    self.assertEqual(str(raised.exception), f"--transfer_data_dir: {missing} does not exist")

  def test_semi_supervised_names_a_corrupt_eval_image(self):
    bad = self._corrupt("test/bees/0.png")
    options = self._options("semi", protocols=("semi_supervised",), label_fractions=(50.0,),
                            finetune=finetune.FinetuneConfig(epochs=1, batch_size=4))
    with self.assertRaises(ValueError) as raised:
      evaluation.evaluate(self.model_dir, options)
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")

  def test_export_names_a_corrupt_train_image(self):
    bad = self._corrupt("train/bees/5.png")
    with self.assertRaises(ValueError) as raised:
      artifact.write_export(self.model_dir, os.path.join(self.root, "export"), index="none", backbone=False)
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")
    self.assertFalse(os.path.exists(os.path.join(self.root, "export")))


if __name__ == "__main__":
  tf.test.main()
