"""End to end: train.py (smoke.flags) -> export/export.py over the full Fashion-MNIST train split -> the ScaNN index on
learned embeddings -> tf_instdisc.load -> export/search.py with a grid; SIGKILL mid-export; bad flags."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import tempfile
import time

from tests import testing

import matplotlib.image
import numpy as np
import tensorflow as tf
from absl.testing import absltest

import tf_instdisc
from tf_instdisc import artifact
from tf_instdisc import data as data_lib
from tf_instdisc import index as index_lib

TRAIN = os.path.join(testing.REPO_ROOT, "train.py")
EXPORT = os.path.join(testing.REPO_ROOT, "export", "export.py")
SEARCH = os.path.join(testing.REPO_ROOT, "export", "search.py")
SMOKE = os.path.join(testing.REPO_ROOT, "smoke.flags")
FULL_TRAIN_SPLIT = 60000


def _run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([testing.python(), *argv], cwd=testing.REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)


@absltest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class ExportEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.model_dir = os.path.join(cls.tmp, "run")
    result = _run(TRAIN, f"--flagfile={SMOKE}", f"--model_dir={cls.model_dir}", "--final_eval=false")
    assert result.returncode == 0, result.stderr[-3000:]
    # The collection is the whole train split (60k, above index.EXACT_BELOW), so the index is a real tree + AH.
    cls.export_dir = os.path.join(cls.tmp, "export")
    cls.export_result = _run(EXPORT, f"--model_dir={cls.model_dir}", f"--export_dir={cls.export_dir}",
                             "--collection_examples=0", "--knn_k=200")

  @classmethod
  def tearDownClass(cls):
    subprocess.run(["rm", "-rf", cls.tmp], check=False)
    super().tearDownClass()

  def test_export_writes_a_complete_artifact(self):
    self.assertEqual(self.export_result.returncode, 0, self.export_result.stderr[-3000:])
    manifest = artifact.read_manifest(self.export_dir)
    self.assertEqual(manifest["collection"]["size"], FULL_TRAIN_SPLIT)
    self.assertEqual(manifest["index"]["kind"], "tree_ah")
    self.assertGreaterEqual(manifest["index"]["recall_at_10"], 0.95)
    self.assertEqual(manifest["knn"]["k"], 200)

  def test_scann_recall_on_learned_embeddings(self):
    # Held-out queries: Fashion-MNIST test images through the exported network.
    exported = tf_instdisc.load(self.export_dir)
    self.assertEqual(exported.backend, "scann")
    images = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))[:500, ..., None]
    queries = exported.embed(images)
    for k in (10, 200):
      true_rows, _ = index_lib.exact_search(queries, exported.embeddings, k)
      recall = index_lib.recall_at_k(exported.search(queries, k=k).rows, true_rows)
      self.assertGreaterEqual(recall, 0.95, f"recall@{k}")
    labels = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))[:500]
    self.assertGreater(np.mean(exported.classify(queries) == labels), 0.6)  # Smoke-trained: far above 10%.

  def test_search_command_prints_neighbours_and_draws_the_grid(self):
    images = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))[:2, ..., None]
    paths = []
    for i, image in enumerate(images):
      paths.append(os.path.join(self.tmp, f"query{i}.png"))
      tf.io.write_file(paths[-1], tf.io.encode_png(image))
    grid = os.path.join(self.tmp, "grid.png")
    result = _run(SEARCH, f"--export_dir={self.export_dir}", f"--image={paths[0]}",
                  f"--image={paths[1]}", "--k=5", f"--grid={grid}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    lines = result.stdout.splitlines()
    self.assertIn("60000 items, scann search", lines[0])
    neighbour_lines = [line for line in lines if "score" in line]
    self.assertLen(neighbour_lines, 10)
    self.assertRegex(neighbour_lines[0], r"^\s+1  score 0\.\d{4}  id \d+  label \S")
    picture = matplotlib.image.imread(grid)
    self.assertGreater(picture.shape[1], picture.shape[0])  # 2 rows of 6 panels.

  def test_search_command_names_a_bad_flag(self):
    result = _run(SEARCH, f"--export_dir={self.export_dir}", "--image=/no/such.png")
    self.assertEqual(result.returncode, 1)
    self.assertIn("--image: /no/such.png does not exist", result.stderr)
    result = _run(SEARCH, f"--export_dir={self.tmp}/nothing", f"--image={SMOKE}")
    self.assertEqual(result.returncode, 1)
    self.assertIn("does not exist", result.stderr)

  def test_export_refuses_an_existing_dir_and_bad_flags(self):
    result = _run(EXPORT, f"--model_dir={self.model_dir}", f"--export_dir={self.export_dir}")
    self.assertEqual(result.returncode, 1)
    self.assertIn("--export_dir", result.stderr)
    self.assertIn("--overwrite", result.stderr)
    result = _run(EXPORT, f"--model_dir={self.tmp}/none", f"--export_dir={self.tmp}/e2")
    self.assertEqual(result.returncode, 1)
    self.assertIn("--model_dir", result.stderr)
    self.assertFalse(os.path.exists(f"{self.tmp}/e2"))

  def test_sigkill_mid_export_leaves_no_artifact_and_the_next_export_succeeds(self):
    export_dir = os.path.join(self.tmp, "killed")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([testing.python(), EXPORT, f"--model_dir={self.model_dir}",
                                f"--export_dir={export_dir}"], cwd=testing.REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(f"{export_dir}.partial-*/saved_model/*/variables") and time.time() < deadline:
      time.sleep(0.05)  # Kill once the SavedModel is being written, before the manifest.
    process.send_signal(signal.SIGKILL)
    process.wait()
    self.assertFalse(os.path.exists(export_dir))
    with self.assertRaisesRegex(ValueError, "does not exist"):
      tf_instdisc.load(export_dir)
    result = _run(EXPORT, f"--model_dir={self.model_dir}", f"--export_dir={export_dir}", "--index=none")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertEqual(glob.glob(f"{export_dir}.*"), [])  # The killed export's staging dir was removed.
    self.assertEqual(tf_instdisc.load(export_dir).manifest["collection"]["size"], 1024)


if __name__ == "__main__":
  absltest.main()
