"""index: exact search vs float64 NumPy, recall math, settings, ScaNN recall floor, save/load and corrupt dirs."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import index

CLUSTERED_ROWS, CLUSTERED_DIM = 30_000, 64  # Above index.EXACT_BELOW, so choose_settings picks tree_ah.


def _unit(rows):
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _random_unit(num_rows, dim, seed):
  return _unit(np.random.default_rng(seed).normal(size=[num_rows, dim]))


def _clustered(num_rows, num_queries, *, dim, num_clusters=200, noise=0.6, seed=0):
  """A stand-in for learned embeddings: unit centres plus Gaussian noise, renormalised; queries drawn the same way.

  150 rows per cluster: a top 200 reaching into unrelated clusters ranks near-random vectors, the tree's worst
  case (300 clusters of 100 gave recall@200 0.89 with the same settings, recall@10 still 1.0).
  """
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=[num_clusters, dim]))
  rows = centres[rng.integers(0, num_clusters, num_rows + num_queries)]
  points = _unit(rows + noise * rng.normal(size=rows.shape) / np.sqrt(dim))
  return points[:num_rows], points[num_rows:]


def _numpy_top_k(queries, keys, k):
  similarities = queries.astype(np.float64) @ keys.astype(np.float64).T  # [Q, N]
  ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(similarities, ids, axis=1)


def _record_in_manifest(directory, name):
  manifest_path = os.path.join(directory, index.MANIFEST_FILE)
  with open(manifest_path) as f:
    manifest = json.load(f)
  with open(os.path.join(directory, name), "rb") as f:
    data = f.read()
  manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)


class ExactSearchTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters((1, 65536), (10, 7), (50, 64), (300, 1000))
  def test_matches_float64_reference(self, k, chunk_size):
    keys, queries = _random_unit(1000, 16, seed=1), _random_unit(37, 16, seed=2)
    ids, scores = index.exact_search(queries, keys, k, chunk_size=chunk_size)
    true_ids, true_scores = _numpy_top_k(queries, keys, k)
    self.assertEqual(ids.dtype, np.int64)
    self.assertEqual(scores.dtype, np.float32)
    self.assertAllClose(scores, true_scores, atol=1e-5)
    # Ties within float32 rounding may swap ids; the float64 score of every returned id must still be right.
    exact_scores = np.einsum("qd,qkd->qk", queries.astype(np.float64), keys[ids].astype(np.float64))
    self.assertAllClose(exact_scores, true_scores, atol=1e-5)
    self.assertGreater(np.mean(ids == true_ids), 0.99)

  def test_clips_k_to_the_collection(self):
    ids, scores = index.exact_search(_random_unit(3, 8, seed=3), _random_unit(5, 8, seed=4), 10)
    self.assertEqual(ids.shape, (3, 5))
    self.assertAllEqual(np.sort(ids, axis=1), np.tile(np.arange(5), (3, 1)))
    self.assertAllEqual(scores, -np.sort(-scores, axis=1))


class RecallTest(tf.test.TestCase):

  def test_counts_set_overlap_per_query(self):
    found = [[1, 2, 3], [4, 5, 6]]
    true = [[3, 2, 9], [7, 8, 9]]
    self.assertAllClose(index.recall_at_k(found, true), (2 / 3 + 0) / 2)

  def test_wider_found_and_duplicates(self):
    self.assertAllClose(index.recall_at_k([[0, 0, 5, 1]], [[0, 1]]), 1.0)
    self.assertAllClose(index.recall_at_k([[0, 0]], [[0, 1]]), 0.5)

  def test_rejects_mismatched_rows(self):
    with self.assertRaisesRegex(ValueError, "recall_at_k"):
      index.recall_at_k([[1]], [[1], [2]])


class SettingsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters((1, "brute_force"), (index.EXACT_BELOW - 1, "brute_force"), (index.EXACT_BELOW, "tree_ah"),
                            (60_000, "tree_ah"), (1_281_167, "tree_ah"))
  def test_kind_by_collection_size(self, num_rows, kind):
    self.assertEqual(index.choose_settings(num_rows).kind, kind)

  @parameterized.parameters(index.EXACT_BELOW, 60_000, 1_281_167)
  def test_tree_settings_are_consistent(self, num_rows):
    settings = index.choose_settings(num_rows, k=200)
    self.assertBetween(settings.num_leaves, 0.5 * np.sqrt(num_rows), 2 * np.sqrt(num_rows))
    self.assertBetween(settings.num_leaves_to_search, 1, settings.num_leaves)
    self.assertLessEqual(settings.training_sample_size, num_rows)
    self.assertGreaterEqual(settings.reorder, 2 * 200)

  def test_dict_round_trip_and_errors(self):
    settings = index.choose_settings(1_281_167)
    self.assertEqual(index.IndexSettings.from_dict(settings.to_dict()), settings)
    with self.assertRaisesRegex(ValueError, "unknown fields"):
      index.IndexSettings.from_dict({**settings.to_dict(), "leaves": 3})
    with self.assertRaisesRegex(ValueError, "kind"):
      index.IndexSettings(kind="hnsw")

  def test_import_without_scann(self):
    code = ("import sys; sys.modules['scann'] = None; import numpy as np; from tf_instdisc import index; "
            "assert 'tensorflow' not in sys.modules and not index.scann_available(); "
            "print(index.exact_search(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1)[0].ravel()); "
            "index.build_searcher(np.eye(3, dtype=np.float32), index.choose_settings(3))")
    result = subprocess.run([testing.python(), "-c", code], cwd=testing.REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    self.assertIn("[0 1 2]", result.stdout)
    self.assertIn("ImportError", result.stderr)
    self.assertIn("pip install scann==1.4.2", result.stderr)


class SearcherTest(parameterized.TestCase, tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.keys, cls.queries = _clustered(CLUSTERED_ROWS, 500, dim=CLUSTERED_DIM)
    cls.settings = index.choose_settings(CLUSTERED_ROWS, k=200)
    cls.tree = index.build_searcher(cls.keys, cls.settings, k=10)
    cls.tmp = tempfile.mkdtemp()
    cls.saved = os.path.join(cls.tmp, "tree_index")
    index.save_searcher(cls.tree, cls.saved)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_brute_force_equals_exact_search(self):
    keys, queries = _random_unit(2000, 32, seed=5), _random_unit(40, 32, seed=6)
    searcher = index.build_searcher(keys, index.choose_settings(len(keys)))
    ids, scores = index.search(searcher, queries, 20)
    true_ids, true_scores = index.exact_search(queries, keys, 20)
    self.assertEqual((ids.dtype, scores.dtype), (np.int64, np.float32))
    self.assertAllEqual(ids, true_ids)
    self.assertAllClose(scores, true_scores, atol=1e-5)

  def test_k_above_collection_size_clips(self):
    keys, queries = _random_unit(50, 8, seed=7), _random_unit(4, 8, seed=8)
    ids, scores = index.search(index.build_searcher(keys, index.choose_settings(len(keys))), queries, 100)
    self.assertEqual(ids.shape, (4, 50))
    self.assertAllEqual(np.sort(ids, axis=1), np.tile(np.arange(50), (4, 1)))
    self.assertAllEqual(np.isfinite(scores), np.ones_like(scores, bool))

  def test_tree_ah_recall_on_clustered_data(self):
    self.assertEqual(self.settings.kind, "tree_ah")
    true_ids, _ = index.exact_search(self.queries, self.keys, 200)
    for k, floor in ((10, 0.95), (200, 0.93)):  # Measured: 0.9998-1.0 and 0.976-0.979.
      ids, scores = index.search(self.tree, self.queries, k, settings=self.settings)
      self.assertEqual(ids.shape, (len(self.queries), k))
      self.assertGreaterEqual(index.recall_at_k(ids, true_ids[:, :k]), floor, f"recall@{k}")
      self.assertAllEqual(scores, -np.sort(-scores, axis=1))

  def test_short_leaves_are_searched_again(self):
    # One leaf holds ~170 rows: ScaNN alone would pad the 500 results with id 0 and score NaN.
    one_leaf = index.IndexSettings(**{**self.settings.to_dict(), "num_leaves_to_search": 1})
    ids, scores = index.search(self.tree, self.queries[:20], 500, settings=one_leaf)
    self.assertTrue(np.isfinite(scores).all())
    self.assertAllEqual([len(set(row)) for row in ids], [500] * 20)

  def test_save_load_round_trip_from_a_moved_dir(self):
    moved = os.path.join(self.create_tempdir().full_path, "moved")
    shutil.copytree(self.saved, moved)
    loaded = index.load_searcher(moved)
    for k in (10, 200):
      expected = index.search(self.tree, self.queries, k)
      actual = index.search(loaded, self.queries, k)
      self.assertAllEqual(actual[0], expected[0])
      self.assertAllEqual(actual[1], expected[1])

  @parameterized.named_parameters(
      ("missing_dir", "no_dir", None), ("no_manifest", index.MANIFEST_FILE, "delete"),
      ("deleted_file", "dataset.npy", "delete"), ("truncated_file", "hashed_dataset.npy", "truncate"),
      ("empty_file", "serialized_partitioner.pb", "empty"), ("garbage_file", "ah_codebook.pb", "garbage"),
      ("flipped_bytes", "dataset.npy", "flip"), ("garbage_assets", "scann_assets.pbtxt", "garbage"),
      ("stray_docids", "scann_docids.pkl", "create"), ("scann_refuses", "scann_config.pb", "garbage_in_manifest"))
  def test_bad_dir_raises_value_error_naming_it(self, name, corruption):
    directory = os.path.join(self.create_tempdir().full_path, "index")
    if corruption is not None:
      shutil.copytree(self.saved, directory)
    path = os.path.join(directory, name)
    if corruption == "delete":
      os.remove(path)
    elif corruption in ("truncate", "empty"):
      os.truncate(path, os.path.getsize(path) // 2 if corruption == "truncate" else 0)
    elif corruption in ("garbage", "create", "garbage_in_manifest"):
      with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(64 if corruption == "create" else os.path.getsize(path)))
    elif corruption == "flip":  # ScaNN itself loads this without complaint.
      with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 16)
    if corruption == "garbage_in_manifest":  # The manifest agrees, so ScaNN's own error must become the ValueError.
      _record_in_manifest(directory, name)
    with self.assertRaisesRegex(ValueError, re.escape(directory)):
      index.load_searcher(directory)


if __name__ == "__main__":
  tf.test.main()
