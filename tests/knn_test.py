"""Weighted kNN: chunked top-k, voting, prediction and accuracy against NumPy brute force; KnnEvaluator.run."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import gc
import os
import tempfile
import weakref
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import knn


def _unit_rows(num_rows, dim, seed):
  rows = np.random.default_rng(seed).normal(size=[num_rows, dim]).astype(np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def numpy_top_k(queries, keys, k):
  similarities = queries.astype(np.float64) @ keys.astype(np.float64).T  # [Q, N]
  ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(similarities, ids, axis=1), ids


def numpy_vote(neighbor_scores, neighbor_labels, *, temperature, num_classes):
  """w_c = sum over neighbours of class c of exp(s_i / tau) (paper Sec. 3.4), with explicit loops."""
  num_queries, k = neighbor_scores.shape
  class_scores = np.zeros([num_queries, num_classes], np.float64)
  for q in range(num_queries):
    for j in range(k):
      class_scores[q, neighbor_labels[q, j]] += np.exp(float(neighbor_scores[q, j]) / temperature)
  return class_scores


def numpy_knn_accuracy(query_features, query_labels, keys, key_labels, *, k, temperature, num_classes):
  """The whole protocol in NumPy: top-k cosine neighbours, weighted vote, then top-1 and top-5 hits."""
  scores, ids = numpy_top_k(query_features, keys, k)
  class_scores = numpy_vote(scores, key_labels[ids], temperature=temperature, num_classes=num_classes)
  ranked = np.argsort(-class_scores, axis=1, kind="stable")[:, :5]
  top1 = np.mean(ranked[:, 0] == query_labels)
  top5 = np.mean([label in row for label, row in zip(query_labels, ranked)])
  return {"knn_top1": top1, "knn_top5": top5}


class TopKTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": "one_chunk", "chunk_size": knn.DEFAULT_CHUNK, "k": 7},
      {"testcase_name": "chunk_divides_n", "chunk_size": 8, "k": 7},
      {"testcase_name": "chunk_not_dividing_n", "chunk_size": 10, "k": 7},
      {"testcase_name": "last_chunk_smaller_than_k", "chunk_size": 9, "k": 7},
      {"testcase_name": "chunk_smaller_than_k", "chunk_size": 3, "k": 7},
      {"testcase_name": "chunk_of_one", "chunk_size": 1, "k": 4},
      {"testcase_name": "k_larger_than_n", "chunk_size": 5, "k": 50},
  )
  def test_matches_brute_force(self, chunk_size, k):
    queries, keys = _unit_rows(6, 8, seed=0), _unit_rows(24, 8, seed=1)
    scores, ids = knn.top_k_neighbors(tf.constant(queries), tf.constant(keys), k=k, chunk_size=chunk_size)
    expected_scores, expected_ids = numpy_top_k(queries, keys, min(k, 24))
    self.assertEqual(ids.dtype, tf.int64)
    self.assertAllEqual(ids, expected_ids)
    self.assertAllClose(scores, expected_scores, atol=1e-6)

  def test_each_query_finds_itself_first(self):
    keys = _unit_rows(30, 8, seed=2)
    scores, ids = knn.top_k_neighbors(tf.constant(keys[[4, 17, 29]]), tf.constant(keys), k=3, chunk_size=7)
    self.assertAllEqual(ids[:, 0], [4, 17, 29])
    self.assertAllClose(scores[:, 0], [1.0, 1.0, 1.0], atol=1e-6)


class VoteTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), num_classes=(3, 10))
  def test_matches_numpy(self, temperature, num_classes):
    rng = np.random.default_rng(3)
    neighbor_scores = rng.uniform(-1.0, 1.0, [5, 6]).astype(np.float32)
    neighbor_labels = rng.integers(0, num_classes, [5, 6])
    class_scores = knn.vote(tf.constant(neighbor_scores), tf.constant(neighbor_labels), temperature=temperature,
                            num_classes=num_classes)
    expected = numpy_vote(neighbor_scores, neighbor_labels, temperature=temperature, num_classes=num_classes)
    self.assertEqual(class_scores.shape, (5, num_classes))
    self.assertAllClose(class_scores, expected, rtol=1e-5)

  def test_many_weak_neighbours_can_outvote_one_strong(self):
    # One neighbour of class 0 at s = 0.9 against three of class 1 at s = 0.85: tau decides.
    scores = tf.constant([[0.9, 0.85, 0.85, 0.85]])
    labels = tf.constant([[0, 1, 1, 1]])
    sharp = knn.vote(scores, labels, temperature=0.01, num_classes=2)
    smooth = knn.vote(scores, labels, temperature=0.5, num_classes=2)
    self.assertEqual(int(tf.argmax(sharp, axis=1)[0]), 0)
    self.assertEqual(int(tf.argmax(smooth, axis=1)[0]), 1)


def _clusters(num_per_class, num_classes, dim, *, noise, seed):
  rng = np.random.default_rng(seed)
  centres = np.eye(num_classes, dim, dtype=np.float32)
  labels = np.repeat(np.arange(num_classes), num_per_class)
  points = centres[labels] + noise * rng.normal(size=[len(labels), dim]).astype(np.float32)
  return points / np.linalg.norm(points, axis=1, keepdims=True), labels.astype(np.int64)


class KnnPredictTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(1, 5, 20)
  def test_toy_clusters(self, k):
    keys, key_labels = _clusters(10, 4, 6, noise=0.1, seed=4)
    queries, query_labels = _clusters(3, 4, 6, noise=0.1, seed=5)
    class_scores = knn.knn_predict(tf.constant(queries), tf.constant(keys), tf.constant(key_labels), k=k,
                                   temperature=0.07, num_classes=4, chunk_size=16)
    self.assertEqual(class_scores.shape, (12, 4))
    self.assertAllEqual(tf.argmax(class_scores, axis=1), query_labels)

  def test_matches_numpy(self):
    keys, queries = _unit_rows(40, 8, seed=6), _unit_rows(9, 8, seed=7)
    key_labels = np.random.default_rng(8).integers(0, 5, 40)
    class_scores = knn.knn_predict(tf.constant(queries), tf.constant(keys), tf.constant(key_labels), k=11,
                                   temperature=0.1, num_classes=5, chunk_size=13)
    scores, ids = numpy_top_k(queries, keys, 11)
    expected = numpy_vote(scores, key_labels[ids], temperature=0.1, num_classes=5)
    self.assertAllClose(class_scores, expected, rtol=1e-5)


class KnnAccuracyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(k=(3, 25), query_batch=(7, 256), temperature=(0.07, 0.5))
  def test_matches_numpy(self, k, query_batch, temperature):
    # Noisy clusters with 8 classes, so that top-1 and top-5 both sit strictly between 0 and 1.
    keys, key_labels = _clusters(8, 8, 8, noise=0.6, seed=9)
    queries, query_labels = _clusters(4, 8, 8, noise=0.6, seed=10)
    result = knn.knn_accuracy(queries, query_labels, tf.constant(keys), key_labels, k=k, temperature=temperature,
                              num_classes=8, query_batch=query_batch)
    expected = numpy_knn_accuracy(queries, query_labels, keys, key_labels, k=k, temperature=temperature,
                                  num_classes=8)
    self.assertEqual(sorted(result), ["knn_top1", "knn_top5"])
    self.assertAllClose([result["knn_top1"], result["knn_top5"]], [expected["knn_top1"], expected["knn_top5"]],
                        atol=1e-9)
    self.assertBetween(expected["knn_top1"], 0.05, 0.95)
    self.assertGreater(expected["knn_top5"], expected["knn_top1"])

  def test_fewer_than_five_classes(self):
    keys, key_labels = _clusters(5, 3, 4, noise=0.05, seed=11)
    queries, query_labels = _clusters(2, 3, 4, noise=0.05, seed=12)
    result = knn.knn_accuracy(queries, query_labels, tf.constant(keys), key_labels, k=4, temperature=0.07,
                              num_classes=3)
    self.assertEqual(result, {"knn_top1": 1.0, "knn_top5": 1.0})


def _angle_model(input_shape):
  """Embeds an image as (cos a, sin a), a = mean brightness / 255 * pi / 2: brightness classes become directions."""
  inputs = keras.Input(input_shape)
  angle = keras.layers.Lambda(lambda x: keras.ops.mean(x, axis=(1, 2, 3))[:, None] / 255.0 * (np.pi / 2))(inputs)
  outputs = keras.layers.Lambda(lambda a: keras.ops.concatenate([keras.ops.cos(a), keras.ops.sin(a)], axis=1))(angle)
  return keras.Model(inputs, outputs)


class KnnEvaluatorTest(tf.test.TestCase):

  def _setup(self, *, train_label_permutation):
    train_images, train_labels = testing.tiny_arrays(64, num_classes=8, seed=0)
    eval_images, eval_labels = testing.tiny_arrays(20, num_classes=8, seed=1)
    model = _angle_model(train_images.shape[1:])
    keys = model(train_images.astype(np.float32)).numpy()
    train_labels = train_labels[train_label_permutation]
    eval_dataset = tf.data.Dataset.from_tensor_slices(
        {data_lib.IMAGE_KEY: eval_images.astype(np.float32), data_lib.LABEL_KEY: eval_labels}).batch(6)
    evaluator = knn.KnnEvaluator(eval_dataset, train_labels, k=5, temperature=0.07, num_classes=8)
    return evaluator, model, keys, (model(eval_images.astype(np.float32)).numpy(), eval_labels, train_labels)

  def test_run_yields_top1_top5_on_separable_data(self):
    evaluator, model, keys, _ = self._setup(train_label_permutation=np.arange(64))
    results = list(evaluator.run(model, tf.constant(keys)))
    self.assertEqual([name for name, _ in results], ["knn_top1", "knn_top5"])
    self.assertEqual(dict(results), {"knn_top1": 1.0, "knn_top5": 1.0})

  def test_run_matches_numpy_with_shuffled_labels(self):
    permutation = np.random.default_rng(13).permutation(64)
    evaluator, model, keys, (features, eval_labels, train_labels) = self._setup(train_label_permutation=permutation)
    results = dict(evaluator.run(model, tf.constant(keys)))
    expected = numpy_knn_accuracy(features, eval_labels, keys, train_labels, k=5, temperature=0.07, num_classes=8)
    self.assertAllClose([results["knn_top1"], results["knn_top5"]], [expected["knn_top1"], expected["knn_top5"]])
    self.assertLess(results["knn_top1"], 1.0)

  def test_run_accepts_a_bank_variable(self):
    # The train loop passes the memory bank itself (a tf.Variable) as keys.
    evaluator, model, keys, _ = self._setup(train_label_permutation=np.arange(64))
    self.assertEqual(dict(evaluator.run(model, tf.Variable(keys, trainable=False))),
                     {"knn_top1": 1.0, "knn_top5": 1.0})


class TracingTest(tf.test.TestCase):
  """The monitor embeds and scores again at every epoch: its tf.functions trace a bounded number of times, not at
  every call (TensorFlow's "triggered tf.function retracing" warnings of every epoch of a folder run)."""

  def test_embedding_traces_at_most_twice_per_model_whatever_the_batches(self):
    images, labels = testing.tiny_arrays(20, num_classes=4, seed=0)
    model = _angle_model(images.shape[1:])
    slices = {data_lib.IMAGE_KEY: images.astype(np.float32), data_lib.LABEL_KEY: labels}
    expected = model(images.astype(np.float32)).numpy()
    for batch_size in (6, 6, 7, 4, 20, 3):  # Last batches of 2, 2, 6, 4 (full), 20 (full) and 2 images.
      features, _ = knn.compute_embeddings(model, tf.data.Dataset.from_tensor_slices(slices).batch(batch_size))
      self.assertAllClose(features, expected, atol=1e-6)
    function = knn.embedding_function(model)
    self.assertIs(knn.embedding_function(model), function)  # One function per model, made once.
    self.assertLessEqual(function.experimental_get_tracing_count(), 2)  # One batch size, then any batch size.
    other = _angle_model(images.shape[1:])
    self.assertIsNot(knn.embedding_function(other), function)

  def test_the_cache_does_not_keep_a_model_alive(self):
    def model(images, training):
      del training
      return images[:, 0, 0, :]

    knn.embedding_function(model)(tf.zeros([2, 3, 3, 1]))
    self.assertIn(model, knn._EMBED_FUNCTIONS)
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    self.assertIsNone(model_ref())  # Its function, traced, held it only weakly.

  def test_knn_accuracy_traces_once_for_any_number_of_queries_keys_and_temperatures(self):
    keys, key_labels = _clusters(8, 8, 8, noise=0.6, seed=9)
    before = knn._top_classes.experimental_get_tracing_count()
    for seed, (num_queries, temperature) in enumerate(((3, 0.07), (8, 0.5), (21, 0.1), (16, 0.07))):
      queries = _unit_rows(num_queries, 8, seed=20 + seed)
      query_labels = np.random.default_rng(seed).integers(0, 8, num_queries)
      result = knn.knn_accuracy(queries, query_labels, tf.constant(keys), key_labels, k=6, temperature=temperature,
                                num_classes=8, query_batch=8)  # New keys each call, as each epoch's bank.
      expected = numpy_knn_accuracy(queries, query_labels, keys, key_labels, k=6, temperature=temperature,
                                    num_classes=8)
      self.assertAllClose([result["knn_top1"], result["knn_top5"]], [expected["knn_top1"], expected["knn_top5"]],
                          atol=1e-9)
    self.assertLessEqual(knn._top_classes.experimental_get_tracing_count() - before, 1)



class UndecodableEvalImageTest(tf.test.TestCase):
  """A folder's eval image that cannot be decoded is named, in whatever pass embeds the split."""

  def setUp(self):
    super().setUp()
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    root = directory.name
    images, _ = testing.tiny_arrays(12, shape=(8, 8, 3), num_classes=2)
    for split, names in (("train", range(6)), ("test", range(6, 12))):
      for i in names:
        path = os.path.join(root, split, f"c{i % 2}", f"{i}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, tf.io.encode_png(images[i]))
    self.bad = os.path.join(root, "test", "c1", "9.png")
    png = open(self.bad, "rb").read()
    with open(self.bad, "wb") as f:  # A valid header, then half the data: only decoding finds it.
      f.write(png[:len(png) // 2])
    self.source = data_lib.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.model = _angle_model((8, 8, 3))
    self.augment = config_lib.AugmentConfig()

  def test_embed_split_names_the_file(self):
    for batch_size in (1, 2, 6):  # The bad file in the first batch or a later one.
      with self.subTest(batch_size=batch_size), self.assertRaises(ValueError) as raised:
        knn.embed_split(self.model, self.source.eval, self.augment, image_size=8, batch_size=batch_size)
      self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {self.bad}")
      self.assertIsInstance(raised.exception.__cause__, tf.errors.InvalidArgumentError)
    features, labels = knn.embed_split(self.model, self.source.train, self.augment, image_size=8, batch_size=4)
    self.assertEqual((features.shape, labels.shape), ((6, 2), (6,)))  # The train split decodes.

  def test_evaluator_with_its_split_names_the_file(self):
    dataset = data_lib.make_eval_dataset(self.source.eval, self.augment, image_size=8, batch_size=4)
    keys = tf.constant(knn.embed_split(self.model, self.source.train, self.augment, image_size=8, batch_size=4)[0])
    evaluator = knn.KnnEvaluator(dataset, data_lib.load_labels(self.source.train), k=3, temperature=0.07,
                                 num_classes=2, split=self.source.eval)
    with self.assertRaisesRegex(ValueError, f"^--data_dir: cannot decode image {self.bad}$"):
      dict(evaluator.run(self.model, keys))
    unnamed = knn.KnnEvaluator(dataset, data_lib.load_labels(self.source.train), k=3, temperature=0.07,
                               num_classes=2)
    with self.assertRaises(tf.errors.InvalidArgumentError):  # Without its split there is no file to name.
      dict(unnamed.run(self.model, keys))

  def test_a_model_error_is_not_blamed_on_a_file(self):
    # An InvalidArgumentError of the model itself (not of the input pipeline) propagates, and no file is searched.
    def failing_model(images, training):
      del training
      with tf.control_dependencies([tf.debugging.assert_less(tf.reduce_max(images), -1.0, message="model")]):
        return tf.identity(images)

    dataset = data_lib.make_eval_dataset(self.source.eval, self.augment, image_size=8, batch_size=2)
    with mock.patch.object(data_lib, "_undecodable_in", side_effect=AssertionError("searched")):
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "model"):
        knn.compute_embeddings(failing_model, dataset, split=self.source.eval)

if __name__ == "__main__":
  tf.test.main()
