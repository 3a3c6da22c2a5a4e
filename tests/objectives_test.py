"""Every loss in objectives.py against a NumPy twin written from the paper's formulas with explicit loops."""

from tests import testing  # noqa: F401  # First: splits the CPU before TensorFlow starts.

# isort: split

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import objectives

NUM_INSTANCES = 1000
NUM_NEGATIVES = 6


def _unit_similarities(shape, seed):
  return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def numpy_nce_loss(pos_similarities, neg_similarities, *, temperature, num_instances, normalizer, neg_mask=None):
  """Paper Eq. 4-6: P = exp(s / tau) / Z, h = P / (P + K / N), J = -log h(pos) - sum_k log(1 - h(neg_k))."""
  batch, num_negatives = neg_similarities.shape
  noise = num_negatives / num_instances  # K * P_n(i) with P_n = 1 / N.
  losses = np.zeros(batch, np.float64)
  for b in range(batch):
    prob = math.exp(float(pos_similarities[b]) / temperature) / normalizer
    losses[b] = -math.log(prob / (prob + noise))
    for k in range(num_negatives):
      if neg_mask is not None and not neg_mask[b, k]:
        continue
      prob = math.exp(float(neg_similarities[b, k]) / temperature) / normalizer
      losses[b] -= math.log(1.0 - prob / (prob + noise))
  return losses


def numpy_softmax_loss(logits, instance_ids, *, temperature):
  """Paper Eq. 2: -log(exp(s_i / tau) / sum_j exp(s_j / tau))."""
  batch, num_instances = logits.shape
  losses = np.zeros(batch, np.float64)
  for b in range(batch):
    denominator = sum(math.exp(float(logits[b, j]) / temperature) for j in range(num_instances))
    losses[b] = -math.log(math.exp(float(logits[b, instance_ids[b]]) / temperature) / denominator)
  return losses


def numpy_proximal_loss(features, bank_rows, *, proximal_lambda):
  batch, dim = features.shape
  losses = np.zeros(batch, np.float64)
  for b in range(batch):
    losses[b] = proximal_lambda * sum((float(features[b, d]) - float(bank_rows[b, d])) ** 2 for d in range(dim))
  return losses


def numpy_normalizer(pos_similarities, neg_similarities, *, temperature, num_instances):
  """The official code's Z = N * mean of exp(s / tau) over every similarity of the batch [pos, negs]."""
  values = []
  for b in range(neg_similarities.shape[0]):
    values.append(math.exp(float(pos_similarities[b]) / temperature))
    values.extend(math.exp(float(s) / temperature) for s in neg_similarities[b])
  return num_instances * sum(values) / len(values)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _nce(pos_similarities, neg_similarities, *, temperature, normalizer, neg_mask=None):
  num_negatives = neg_similarities.shape[-1]
  args = {"temperature": temperature, "num_instances": NUM_INSTANCES, "num_negatives": num_negatives,
          "normalizer": tf.constant(normalizer, tf.float32)}
  return objectives.nce_loss(objectives.nce_logits(tf.convert_to_tensor(pos_similarities), **args),
                             objectives.nce_logits(tf.convert_to_tensor(neg_similarities), **args), neg_mask=neg_mask)


class NceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5), normalizer=(30.0, 2500.0))
  def test_matches_numpy(self, temperature, batch, normalizer):
    pos = _unit_similarities([batch], seed=1)
    neg = _unit_similarities([batch, NUM_NEGATIVES], seed=2)
    loss = _nce(pos, neg, temperature=temperature, normalizer=normalizer)
    expected = numpy_nce_loss(pos, neg, temperature=temperature, num_instances=NUM_INSTANCES, normalizer=normalizer)
    self.assertEqual(loss.shape, (batch,))
    self.assertEqual(loss.dtype, tf.float32)
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)

  @parameterized.product(temperature=(0.07, 0.5), normalizer=(30.0, 2500.0))
  def test_sigmoid_of_logit_is_paper_h(self, temperature, normalizer):
    similarities = _unit_similarities([4, 3], seed=3)
    logits = objectives.nce_logits(tf.constant(similarities), temperature=temperature, num_instances=NUM_INSTANCES,
                                   num_negatives=NUM_NEGATIVES, normalizer=tf.constant(normalizer))
    prob = np.exp(similarities.astype(np.float64) / temperature) / normalizer
    expected_h = prob / (prob + NUM_NEGATIVES / NUM_INSTANCES)
    self.assertAllClose(tf.sigmoid(logits), expected_h, rtol=1e-5, atol=1e-7)

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5))
  def test_gradients_finite_and_match_numpy(self, temperature, batch):
    pos = tf.Variable(_unit_similarities([batch], seed=4))
    neg = tf.Variable(_unit_similarities([batch, NUM_NEGATIVES], seed=5))
    normalizer = 100.0
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(_nce(pos, neg, temperature=temperature, normalizer=normalizer))
    grad_pos, grad_neg = tape.gradient(loss, [pos, neg])
    # d/ds of -log sigmoid(l) is -(1 - sigmoid(l)) / tau; of -log(1 - sigmoid(l)) it is sigmoid(l) / tau.
    offset = math.log(normalizer) - math.log(NUM_INSTANCES) + math.log(NUM_NEGATIVES)
    expected_pos = -(1.0 - _sigmoid(pos.numpy().astype(np.float64) / temperature - offset)) / temperature
    expected_neg = _sigmoid(neg.numpy().astype(np.float64) / temperature - offset) / temperature
    self.assertTrue(np.all(np.isfinite(grad_pos.numpy())))
    self.assertTrue(np.all(np.isfinite(grad_neg.numpy())))
    self.assertAllClose(grad_pos, expected_pos, rtol=1e-4, atol=1e-6)
    self.assertAllClose(grad_neg, expected_neg, rtol=1e-4, atol=1e-6)

  @parameterized.product(temperature=(0.07, 0.5), neg_similarity=(-0.3, 0.8))
  def test_all_negatives_equal(self, temperature, neg_similarity):
    pos = np.array([0.9, 0.2], np.float32)
    neg = np.full([2, NUM_NEGATIVES], neg_similarity, np.float32)
    loss = _nce(pos, neg, temperature=temperature, normalizer=50.0)
    # K identical noise terms: J = -log h(pos) - K log(1 - h(neg)).
    noise = NUM_NEGATIVES / NUM_INSTANCES
    prob_neg = math.exp(neg_similarity / temperature) / 50.0
    prob_pos = np.exp(pos.astype(np.float64) / temperature) / 50.0
    expected = -np.log(prob_pos / (prob_pos + noise)) - NUM_NEGATIVES * math.log(noise / (prob_neg + noise))
    self.assertAllClose(loss, expected, rtol=1e-5)
    self.assertAllClose(loss, numpy_nce_loss(pos, neg, temperature=temperature, num_instances=NUM_INSTANCES,
                                             normalizer=50.0), rtol=1e-5)

  @parameterized.parameters(0.07, 0.5)
  def test_masked_negatives_contribute_nothing(self, temperature):
    pos = _unit_similarities([3], seed=6)
    neg = _unit_similarities([3, NUM_NEGATIVES], seed=7)
    mask = np.ones([3, NUM_NEGATIVES], bool)
    mask[0, 1] = mask[0, 4] = mask[2, 0] = False
    loss = _nce(pos, neg, temperature=temperature, normalizer=40.0, neg_mask=tf.constant(mask))
    expected = numpy_nce_loss(pos, neg, temperature=temperature, num_instances=NUM_INSTANCES, normalizer=40.0,
                              neg_mask=mask)
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)
    # Whatever a masked negative's similarity, neither the loss nor its gradient sees it.
    changed = neg.copy()
    changed[~mask] = 1.0
    changed_var = tf.Variable(changed)
    with tf.GradientTape() as tape:
      changed_loss = _nce(pos, changed_var, temperature=temperature, normalizer=40.0, neg_mask=tf.constant(mask))
      total = tf.reduce_sum(changed_loss)
    self.assertAllClose(changed_loss, loss, rtol=1e-6, atol=0.0)
    grad = tape.gradient(total, changed_var).numpy()
    self.assertAllEqual(grad[~mask], np.zeros(3))
    self.assertAllGreater(grad[mask], 0.0)

  def test_mask_all_true_equals_no_mask(self):
    pos = _unit_similarities([4], seed=8)
    neg = _unit_similarities([4, NUM_NEGATIVES], seed=9)
    masked = _nce(pos, neg, temperature=0.1, normalizer=40.0, neg_mask=tf.ones([4, NUM_NEGATIVES], tf.bool))
    self.assertAllEqual(masked, _nce(pos, neg, temperature=0.1, normalizer=40.0))

  @parameterized.named_parameters(
      # Asymptotically -log sigmoid(l) -> max(0, -l) and -log(1 - sigmoid(l)) -> max(0, l).
      {"testcase_name": "confident_right", "pos_logit": 1e4, "neg_logit": -1e4, "expected": 0.0},
      {"testcase_name": "confident_wrong", "pos_logit": -1e4, "neg_logit": 1e4, "expected": 1e4 + NUM_NEGATIVES * 1e4},
      {"testcase_name": "huge_both", "pos_logit": 1e4, "neg_logit": 1e4, "expected": NUM_NEGATIVES * 1e4},
  )
  def test_extreme_logits_stay_finite(self, pos_logit, neg_logit, expected):
    pos_logits = tf.Variable(tf.fill([2], pos_logit))
    neg_logits = tf.Variable(tf.fill([2, NUM_NEGATIVES], neg_logit))
    with tf.GradientTape() as tape:
      loss = objectives.nce_loss(pos_logits, neg_logits)
      total = tf.reduce_sum(loss)
    grads = tape.gradient(total, [pos_logits, neg_logits])
    self.assertAllClose(loss, [expected, expected], rtol=1e-6)
    for grad in grads:
      self.assertTrue(np.all(np.isfinite(grad.numpy())))

  @parameterized.parameters(1e-3, 1e-2)
  def test_tiny_temperature_from_similarities_stays_finite(self, temperature):
    pos = tf.Variable([1.0, -1.0])
    neg = tf.Variable([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0]])
    with tf.GradientTape() as tape:
      loss = _nce(pos, neg, temperature=temperature, normalizer=1e-30)
      total = tf.reduce_sum(loss)
    grads = tape.gradient(total, [pos, neg])
    self.assertTrue(np.all(np.isfinite(loss.numpy())))
    for grad in grads:
      self.assertTrue(np.all(np.isfinite(grad.numpy())))


class SoftmaxTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5))
  def test_matches_numpy(self, temperature, batch):
    logits = _unit_similarities([batch, 9], seed=10)
    ids = np.random.default_rng(11).integers(0, 9, batch)
    loss = objectives.softmax_instance_loss(tf.constant(logits), tf.constant(ids), temperature=temperature)
    self.assertEqual(loss.shape, (batch,))
    self.assertEqual(loss.dtype, tf.float32)
    self.assertAllClose(loss, numpy_softmax_loss(logits, ids, temperature=temperature), rtol=1e-5, atol=1e-5)

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5))
  def test_gradients_finite_and_match_numpy(self, temperature, batch):
    logits = tf.Variable(_unit_similarities([batch, 9], seed=12))
    ids = np.random.default_rng(13).integers(0, 9, batch)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(objectives.softmax_instance_loss(logits, tf.constant(ids), temperature=temperature))
    grad = tape.gradient(loss, logits).numpy()
    scaled = logits.numpy().astype(np.float64) / temperature
    prob = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    expected = (prob - np.eye(9)[ids]) / temperature
    self.assertTrue(np.all(np.isfinite(grad)))
    self.assertAllClose(grad, expected, rtol=1e-4, atol=1e-5)

  @parameterized.product(temperature=(0.07, 0.5), num_instances=(4, 100))
  def test_all_logits_equal_gives_log_n(self, temperature, num_instances):
    logits = tf.fill([3, num_instances], 0.4)
    loss = objectives.softmax_instance_loss(logits, tf.constant([0, 1, 3]), temperature=temperature)
    self.assertAllClose(loss, [math.log(num_instances)] * 3, rtol=1e-6)

  @parameterized.named_parameters(
      {"testcase_name": "right", "label": 0, "expected": 0.0},
      {"testcase_name": "wrong", "label": 1, "expected": 2e4},
  )
  def test_extreme_logits_stay_finite(self, label, expected):
    # s / tau = +-1e4: a naive exp overflows float32 at 88.
    logits = tf.Variable([[1.0, -1.0, -1.0]])
    with tf.GradientTape() as tape:
      loss = objectives.softmax_instance_loss(logits, tf.constant([label]), temperature=1e-4)
      total = tf.reduce_sum(loss)
    grad = tape.gradient(total, logits)
    self.assertAllClose(loss, [expected], rtol=1e-6)
    self.assertTrue(np.all(np.isfinite(grad.numpy())))


class ProximalTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(proximal_lambda=(0.0, 0.3, 2.0), batch=(1, 5))
  def test_matches_numpy(self, proximal_lambda, batch):
    features = _unit_similarities([batch, 4], seed=14)
    rows = _unit_similarities([batch, 4], seed=15)
    loss = objectives.proximal_loss(tf.constant(features), tf.constant(rows), proximal_lambda=proximal_lambda)
    self.assertEqual(loss.shape, (batch,))
    self.assertAllClose(loss, numpy_proximal_loss(features, rows, proximal_lambda=proximal_lambda), rtol=1e-5,
                        atol=1e-7)

  @parameterized.parameters(0.3, 2.0)
  def test_gradient_reaches_features_only(self, proximal_lambda):
    features = tf.Variable(_unit_similarities([3, 4], seed=16))
    rows = tf.Variable(_unit_similarities([3, 4], seed=17))
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(objectives.proximal_loss(features, rows, proximal_lambda=proximal_lambda))
    grad_features, grad_rows = tape.gradient(loss, [features, rows])
    self.assertAllClose(grad_features, 2.0 * proximal_lambda * (features.numpy() - rows.numpy()), rtol=1e-5)
    self.assertIsNone(grad_rows)


class NormalizerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5))
  def test_matches_numpy(self, temperature, batch):
    pos = _unit_similarities([batch], seed=18)
    neg = _unit_similarities([batch, NUM_NEGATIVES], seed=19)
    value = objectives.estimate_normalizer(tf.constant(pos), tf.constant(neg), temperature=temperature,
                                           num_instances=NUM_INSTANCES)
    self.assertEqual(value.shape, ())
    self.assertAllClose(value, numpy_normalizer(pos, neg, temperature=temperature, num_instances=NUM_INSTANCES),
                        rtol=1e-5)

  @parameterized.parameters(0.07, 0.5)
  def test_all_similarities_equal(self, temperature):
    value = objectives.estimate_normalizer(tf.fill([3], 0.25), tf.fill([3, NUM_NEGATIVES], 0.25),
                                           temperature=temperature, num_instances=NUM_INSTANCES)
    self.assertAllClose(value, NUM_INSTANCES * math.exp(0.25 / temperature), rtol=1e-6)

  def test_has_no_gradient(self):
    pos = tf.Variable(_unit_similarities([2], seed=20))
    neg = tf.Variable(_unit_similarities([2, 3], seed=21))
    with tf.GradientTape() as tape:
      value = objectives.estimate_normalizer(pos, neg, temperature=0.1, num_instances=NUM_INSTANCES)
    self.assertEqual(tape.gradient(value, [pos, neg]), [None, None])


if __name__ == "__main__":
  tf.test.main()


def numpy_two_view_softmax_loss(logits, view_similarities, instance_ids, *, temperature):
  """Ye et al. 2019 with a bank: one softmax over [N bank rows, the other view]; mean of the two positives' -log."""
  batch, num_instances = logits.shape
  losses = np.zeros(batch, np.float64)
  for b in range(batch):
    candidates = [float(logits[b, j]) for j in range(num_instances)] + [float(view_similarities[b])]
    denominator = sum(math.exp(c / temperature) for c in candidates)
    bank_term = -math.log(math.exp(candidates[instance_ids[b]] / temperature) / denominator)
    view_term = -math.log(math.exp(candidates[-1] / temperature) / denominator)
    losses[b] = 0.5 * (bank_term + view_term)
  return losses


def numpy_two_view_nce_loss(pos_similarities, view_similarities, neg_similarities, *, temperature, num_instances,
                            normalizer):
  """NCE with two positives (bank row, other view), h = P / (P + K / N): mean of their -log h, plus the noise."""
  batch, num_negatives = neg_similarities.shape
  noise = num_negatives / num_instances

  def h(similarity):
    prob = math.exp(float(similarity) / temperature) / normalizer
    return prob / (prob + noise)

  losses = np.zeros(batch, np.float64)
  for b in range(batch):
    losses[b] = -0.5 * (math.log(h(pos_similarities[b])) + math.log(h(view_similarities[b])))
    losses[b] -= sum(math.log(1.0 - h(s)) for s in neg_similarities[b])
  return losses


def numpy_spherical_kmeans(features, start, iterations):
  """Lloyd's iterations on the unit sphere from the given start rows; an emptied group keeps its centroid."""
  centroids = features[start].astype(np.float64)
  for _ in range(iterations):
    assignments = np.argmax(features @ centroids.T, axis=1)
    for c in range(len(centroids)):
      members = features[assignments == c]
      if len(members):
        total = members.sum(axis=0)
        centroids[c] = total / np.linalg.norm(total)
  return centroids, np.argmax(features @ centroids.T, axis=1)


def numpy_group_loss(features, centroids, assignments, *, temperature):
  losses = np.zeros(len(features), np.float64)
  for b in range(len(features)):
    scores = [float(features[b] @ c) / temperature for c in centroids]
    losses[b] = -scores[assignments[b]] + math.log(sum(math.exp(s) for s in scores))
  return losses


def _unit_rows(shape, seed):
  rows = np.random.default_rng(seed).normal(size=shape)
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class TwoViewTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), batch=(1, 5))
  def test_softmax_matches_numpy(self, temperature, batch):
    logits = _unit_similarities([batch, 40], seed=11)
    view = _unit_similarities([batch], seed=12)
    ids = np.random.default_rng(13).integers(0, 40, batch)
    loss = objectives.softmax_instance_loss(tf.constant(logits), tf.constant(ids), temperature=temperature,
                                            view_similarity=tf.constant(view))
    expected = numpy_two_view_softmax_loss(logits, view, ids, temperature=temperature)
    self.assertEqual(loss.shape, (batch,))
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)

  @parameterized.product(temperature=(0.07, 0.5), normalizer=(30.0, 2500.0))
  def test_nce_matches_numpy(self, temperature, normalizer):
    pos, view = _unit_similarities([4], seed=14), _unit_similarities([4], seed=15)
    neg = _unit_similarities([4, NUM_NEGATIVES], seed=16)
    args = {"temperature": temperature, "num_instances": NUM_INSTANCES, "num_negatives": NUM_NEGATIVES,
            "normalizer": tf.constant(normalizer)}
    loss = objectives.nce_loss(objectives.nce_logits(tf.constant(pos), **args),
                               objectives.nce_logits(tf.constant(neg), **args),
                               view_logits=objectives.nce_logits(tf.constant(view), **args))
    expected = numpy_two_view_nce_loss(pos, view, neg, temperature=temperature, num_instances=NUM_INSTANCES,
                                       normalizer=normalizer)
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)

  def test_view_similarity_carries_gradient(self):
    view = tf.Variable(_unit_similarities([3], seed=17))
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(objectives.softmax_instance_loss(
          tf.constant(_unit_similarities([3, 10], seed=18)), tf.constant([0, 4, 9]), temperature=0.1,
          view_similarity=view))
    self.assertTrue(np.all(tape.gradient(loss, view).numpy() < 0))  # A higher view similarity lowers the loss.


class GroupTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(num_clusters=(1, 4, 12), iterations=(0, 1, 5))
  def test_kmeans_matches_numpy(self, num_clusters, iterations):
    features = _unit_rows([24, 8], seed=num_clusters)
    seed = tf.constant([3, 9], tf.int64)
    centroids, assignments = objectives.spherical_kmeans(tf.constant(features), num_clusters=num_clusters,
                                                         iterations=iterations, seed=seed)
    start = tf.random.experimental.stateless_shuffle(tf.range(24), seed=seed)[:num_clusters].numpy()
    self.assertLen(set(start.tolist()), num_clusters)  # Distinct start rows.
    expected_centroids, expected_assignments = numpy_spherical_kmeans(features, start, iterations)
    self.assertAllClose(centroids, expected_centroids, atol=1e-5)
    self.assertAllEqual(assignments, expected_assignments)

  def test_kmeans_iterations_never_lower_the_cohesion(self):
    # Lloyd's rounds on the sphere only raise sum_i cos(f_i, centroid of its group).
    features = _unit_rows([40, 6], seed=5)
    cohesion = []
    for iterations in range(5):
      centroids, assignments = objectives.spherical_kmeans(tf.constant(features), num_clusters=4,
                                                           iterations=iterations, seed=tf.constant([1, 1], tf.int64))
      cohesion.append(float(np.sum(features * centroids.numpy()[assignments.numpy()])))
    self.assertEqual(cohesion, sorted(cohesion))
    self.assertGreater(cohesion[-1], cohesion[0])

  @parameterized.product(temperature=(0.1, 0.5), batch=(1, 6))
  def test_group_loss_matches_numpy(self, temperature, batch):
    features, centroids = _unit_rows([batch, 8], seed=21), _unit_rows([5, 8], seed=22)
    assignments = np.random.default_rng(23).integers(0, 5, batch)
    loss = objectives.group_loss(tf.constant(features), tf.constant(centroids), tf.constant(assignments),
                                 temperature=temperature)
    self.assertAllClose(loss, numpy_group_loss(features, centroids, assignments, temperature=temperature),
                        rtol=1e-5, atol=1e-5)

  def test_group_loss_has_no_gradient_into_centroids(self):
    centroids = tf.Variable(_unit_rows([4, 8], seed=24))
    features = tf.Variable(_unit_rows([3, 8], seed=25))
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(objectives.group_loss(features, centroids, tf.constant([0, 1, 3]), temperature=0.2))
    grad_features, grad_centroids = tape.gradient(loss, [features, centroids])
    self.assertIsNone(grad_centroids)
    self.assertTrue(np.all(np.isfinite(grad_features.numpy())))


def numpy_nearest_rows(bank, num_neighbours):
  """Each row's most similar other rows by an explicit loop over all pairs, nearest first."""
  rows = []
  for i in range(len(bank)):
    scores = [(float(np.dot(bank[i], bank[j])), j) for j in range(len(bank)) if j != i]
    rows.append([j for _, j in sorted(scores, key=lambda pair: -pair[0])[:num_neighbours]])
  return np.array(rows)


class NeighbourTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(temperature=(0.07, 0.5), normalizer=(30.0, 2500.0), neighbours=(1, 3))
  def test_nce_neighbour_loss_is_the_mean_positive_term_of_numpy(self, temperature, normalizer, neighbours):
    similarities = _unit_similarities([4, neighbours], seed=31)
    args = {"temperature": temperature, "num_instances": NUM_INSTANCES, "num_negatives": NUM_NEGATIVES,
            "normalizer": tf.constant(normalizer)}
    loss = objectives.nce_neighbour_loss(objectives.nce_logits(tf.constant(similarities), **args))
    noise = NUM_NEGATIVES / NUM_INSTANCES
    expected = np.zeros(4)
    for b in range(4):
      for j in range(neighbours):
        prob = math.exp(float(similarities[b, j]) / temperature) / normalizer
        expected[b] -= math.log(prob / (prob + noise)) / neighbours
    self.assertEqual(loss.shape, (4,))
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)

  @parameterized.product(temperature=(0.07, 0.5), neighbours=(1, 4))
  def test_softmax_neighbour_loss_is_the_mean_cross_entropy_of_numpy(self, temperature, neighbours):
    logits = _unit_similarities([3, 30], seed=32)
    neighbour_ids = np.random.default_rng(33).integers(0, 30, [3, neighbours])
    loss = objectives.softmax_neighbour_loss(tf.constant(logits), tf.constant(neighbour_ids),
                                             temperature=temperature)
    expected = np.mean([numpy_softmax_loss(logits, neighbour_ids[:, j], temperature=temperature)
                        for j in range(neighbours)], axis=0)
    self.assertAllClose(loss, expected, rtol=1e-5, atol=1e-5)

  @parameterized.parameters((1, 64), (3, 7), (5, 1000))
  def test_nearest_rows_match_numpy_in_any_chunks(self, neighbours, chunk):
    bank = _unit_rows([50, 8], seed=34)
    table = objectives.nearest_rows(tf.constant(bank), num_neighbours=neighbours, chunk=chunk)
    self.assertEqual(table.dtype, tf.int64)
    self.assertAllEqual(table, numpy_nearest_rows(bank, neighbours))

  def test_a_duplicate_row_is_the_nearest_and_a_row_never_its_own(self):
    bank = _unit_rows([20, 8], seed=35)
    bank[7] = bank[3]
    table = objectives.nearest_rows(tf.constant(bank), num_neighbours=2, chunk=6).numpy()
    self.assertEqual(table[3, 0], 7)
    self.assertEqual(table[7, 0], 3)
    self.assertFalse(np.any(table == np.arange(20)[:, None]))
