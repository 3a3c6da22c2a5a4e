"""bench/retrieval_bench.py smoke test: --quick on every collection writes the JSON report (with the tuned ScaNN
rows); bad flags fail fast.

A smoke test, not a measurement: tiny sizes, one pass, numbers meaningless. The export is a stand-in made here (a
random linear embedding as serving_default, random unit embeddings.npy, a few random IDX query images).
"""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import json
import os
import subprocess

import numpy as np
import tensorflow as tf

SCRIPT = os.path.join("bench", "retrieval_bench.py")
METHODS = ("tf_exact", "numpy_exact", "scann", "scann_tuned")
# A hang guard, not the budget: --quick takes ~15 s on a quiet 2-core machine.
TIMEOUT_SECONDS = 300


def run_bench(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  return subprocess.run([testing.python(), SCRIPT, *args], cwd=testing.REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_SECONDS, check=False)


def write_stand_in_export(export_dir: str, *, num_rows: int = 3000, dim: int = 128) -> None:
  """E/index/embeddings.npy and E/saved_model/1/ with serving_default: images [B, 28, 28, 1] -> embeddings."""
  rng = np.random.default_rng(0)
  rows = rng.normal(size=[num_rows, dim]).astype(np.float32)
  os.makedirs(os.path.join(export_dir, "index"))
  np.save(os.path.join(export_dir, "index", "embeddings.npy"), rows / np.linalg.norm(rows, axis=1, keepdims=True))
  module = tf.Module()
  module.projection = tf.Variable(rng.normal(size=[28 * 28, dim]).astype(np.float32))

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="images")])
  def serve(images):
    flat = tf.reshape(images / 255.0, [-1, 28 * 28])
    return {"embeddings": tf.math.l2_normalize(flat @ module.projection, axis=1)}

  tf.saved_model.save(module, os.path.join(export_dir, "saved_model", "1"), signatures={"serving_default": serve})


def write_idx_images(path: str, num_images: int = 64) -> None:
  images = np.random.default_rng(1).integers(0, 256, [num_images, 28, 28], dtype=np.uint8)
  with open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape) + images.tobytes())


class RetrievalBenchTest(tf.test.TestCase):

  def test_quick_writes_every_collection(self):
    tmp = self.get_temp_dir()
    export_dir, images, output = (os.path.join(tmp, name) for name in ("export", "t10k.idx", "retrieval.json"))
    write_stand_in_export(export_dir)
    write_idx_images(images)
    result = run_bench("--quick", f"--export_dir={export_dir}", f"--fashion_images={images}",
                       "--collections=fashion_mnist,synthetic,uniform", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as f:
      report = json.load(f)
    self.assertEqual(report["benchmark"], "retrieval")
    self.assertIn("retrieval_bench.py --quick", report["command"])
    for key in ("cpu_count", "tensorflow", "scann", "date", "load_average_at_start"):
      self.assertIn(key, report["machine"])
    self.assertIn("load_average_at_end", report)
    self.assertTrue(report["settings"]["quick"])
    groups = {group["collection"]: group for group in report["results"]}
    self.assertCountEqual(groups, ["fashion_mnist", "synthetic", "uniform"])
    self.assertEqual((groups["fashion_mnist"]["num_rows"], groups["fashion_mnist"]["num_queries"]), (3000, 64))
    self.assertEqual(groups["synthetic"]["num_rows"], 30_000)
    self.assertIn("SYNTHETIC stand-in", groups["synthetic"]["description"])
    for group in groups.values():
      self.assertCountEqual([row["method"] for row in group["methods"]], METHODS)
      for row in group["methods"]:
        for k in (10, 200):
          self.assertGreater(row[f"k{k}"]["queries_per_sec"], 0)
          self.assertBetween(row[f"k{k}"]["recall"], 0.0, 1.0)
      self.assertAllClose([row["k10"]["recall"] for row in group["methods"][:2]], [1.0, 1.0], atol=1e-3)
      for key in ("build_seconds", "index_bytes", "load_seconds", "settings"):
        self.assertIn(key, group["scann"])
      tuned = group["scann_tuned"]
      tuning = tuned["tuning"]
      self.assertEqual(tuning["recall_target"], 0.95)
      self.assertEqual(tuning["tried"][0]["num_leaves_to_search"], group["scann"]["settings"]["num_leaves_to_search"])
      if tuning["fell_back"]:
        self.assertEqual(tuned["settings"]["kind"], "brute_force")
      else:
        self.assertGreaterEqual(tuning["recall_at_10"], 0.95)
      self.assertEqual(tuned["tune_queries"], 200)
      self.assertIn("other_processes_cores", group)
    self.assertEqual(groups["fashion_mnist"]["scann"]["settings"]["kind"], "brute_force")  # 3,000 < EXACT_BELOW.
    self.assertEqual(groups["synthetic"]["scann"]["settings"]["kind"], "tree_ah")
    # 64 query images, all measured: the tuning queries are collection rows. The others draw their own.
    self.assertIn("collection rows", groups["fashion_mnist"]["scann_tuned"]["tune_queries_from"])
    self.assertIn("separate queries", groups["uniform"]["scann_tuned"]["tune_queries_from"])
    # Uniform vectors: the heuristic misses recall@10 0.95 (0.41 measured at 30k x 128); the tuned setting has it.
    uniform = {row["method"]: row["k10"]["recall"] for row in groups["uniform"]["methods"]}
    self.assertLess(uniform["scann"], 0.95)
    self.assertGreater(uniform["scann_tuned"], 0.9)  # Measured on other queries than it was tuned on.
    self.assertIn("uniform scann_tuned: recall@10 target 0.95", result.stdout)
    latency = groups["fashion_mnist"]["embed_latency"]["batches"]
    self.assertEqual([b["batch_size"] for b in latency], [1, 8])
    self.assertGreater(min(b["median_ms_per_batch"] for b in latency), 0)
    self.assertIn("| collection | method | q/s k=10 |", result.stdout)

  def test_without_export_the_fashion_collection_is_skipped(self):
    output = os.path.join(self.get_temp_dir(), "skipped.json")
    result = run_bench("--quick", "--collections=fashion_mnist", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as f:
      self.assertIn("no --export_dir", json.load(f)["results"][0]["skipped"])
    self.assertIn("skipped: no --export_dir", result.stdout)

  def test_bad_flag_fails_before_measuring(self):
    output = os.path.join(self.get_temp_dir(), "bad.json")
    for flag in ("--scann_overrides=leaves=3", "--recall_target=0", "--tune_seconds=-1"):
      result = run_bench("--quick", flag, f"--output={output}")
      self.assertEqual(result.returncode, 2, flag)
      self.assertIn(flag.split("=")[0], result.stderr)
      self.assertFalse(os.path.exists(output))


if __name__ == "__main__":
  tf.test.main()
