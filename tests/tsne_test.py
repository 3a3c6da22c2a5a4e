"""tsne: separated clusters stay separated, seeds, KL descent, the gradient, perplexity calibration, bad input."""

from __future__ import annotations

import numpy as np
from absl.testing import absltest

from tf_instdisc import tsne

NUM_CLUSTERS, PER_CLUSTER, DIM = 4, 75, 50


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Well-separated Gaussian clusters: centres ~30 apart, within-cluster distances ~10; (features, labels)."""
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.normal(size=[NUM_CLUSTERS, DIM])
  labels = np.repeat(np.arange(NUM_CLUSTERS), PER_CLUSTER)
  return centres[labels] + rng.normal(size=[len(labels), DIM]), labels


def _neighbour_agreement(points: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
  """Fraction of each point's k nearest map neighbours (itself excluded) that share its label."""
  distances = np.sum((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2, axis=-1)
  np.fill_diagonal(distances, np.inf)
  neighbours = np.argsort(distances, axis=1)[:, :k]
  return float(np.mean(labels[neighbours] == labels[:, None]))


def _dense_gradient(p: np.ndarray, points: np.ndarray, exaggeration: float) -> np.ndarray:
  """The paper's gradient written out with [N, N, 2] arrays: 4 sum_j (e p_ij - q_ij)(1 + d_ij^2)^-1 (y_i - y_j)."""
  differences = points[:, None, :] - points[None, :, :]
  similarity = 1.0 / (1.0 + np.sum(differences ** 2, axis=-1))
  np.fill_diagonal(similarity, 0.0)
  q = similarity / similarity.sum()
  return 4.0 * np.einsum("ij,ijk->ik", (exaggeration * p - q) * similarity, differences)


class TsneTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.features, cls.labels = _clusters()
    cls.map = tsne.tsne(cls.features, seed=0)

  def test_separated_clusters_stay_separated_in_the_map(self):
    self.assertEqual(self.map.shape, (NUM_CLUSTERS * PER_CLUSTER, 2))
    self.assertEqual(self.map.dtype, np.float32)
    self.assertTrue(np.all(np.isfinite(self.map)))
    self.assertGreater(_neighbour_agreement(self.map, self.labels), 0.95)
    self.assertGreater(float(np.std(self.map)), 1.0)  # Spread out from the 1e-4 start, not collapsed.

  def test_neighbour_agreement_is_low_for_a_map_that_ignores_the_clusters(self):
    shuffled = np.random.default_rng(1).permutation(self.labels)
    self.assertLess(_neighbour_agreement(self.map, shuffled), 0.5)

  def test_same_seed_same_map_other_seed_other_map(self):
    np.testing.assert_array_equal(tsne.tsne(self.features, seed=0), self.map)
    other = tsne.tsne(self.features, seed=1)
    self.assertGreater(float(np.max(np.abs(other - self.map))), 1.0)
    self.assertGreater(_neighbour_agreement(other, self.labels), 0.95)

  def test_kl_divergence_decreases_over_the_iterations(self):
    p = tsne.joint_probabilities(self.features)
    start = np.random.default_rng(0).normal(0.0, tsne.INIT_STD, size=[len(self.features), 2])
    kls = [tsne.kl_divergence(p, start)]
    kls += [tsne.kl_divergence(p, tsne.tsne(self.features, seed=0, iterations=steps)) for steps in (300, 500)]
    kls.append(tsne.kl_divergence(p, self.map))  # 750 iterations, the same trajectory.
    for earlier, later in zip(kls, kls[1:]):
      self.assertLess(later, earlier, kls)
    self.assertLess(kls[-1], 0.5 * kls[0], kls)

  def test_kl_divergence_is_zero_when_q_equals_p(self):
    points = np.random.default_rng(0).normal(size=[12, 2])
    distances = np.sum((points[:, None] - points[None]) ** 2, axis=-1)
    similarity = 1.0 / (1.0 + distances)
    np.fill_diagonal(similarity, 0.0)
    p = similarity / similarity.sum()
    self.assertAlmostEqual(tsne.kl_divergence(p, points), 0.0, places=10)
    self.assertGreater(tsne.kl_divergence(p, 3.0 * points), 0.01)

  def test_gradient_matches_the_dense_formula_across_row_blocks(self):
    rng = np.random.default_rng(0)
    features = rng.normal(size=[700, 5])  # 700 rows > 131072 / 700 = 187 rows per block: four blocks.
    p = tsne.joint_probabilities(features, perplexity=20)
    points = rng.normal(size=[700, 2])
    for exaggeration in (1.0, tsne.EXAGGERATION):
      expected = _dense_gradient(p, points, exaggeration)
      np.testing.assert_allclose(tsne._Gradient(p)(points, exaggeration), expected, rtol=1e-9,
                                 atol=1e-12 * np.abs(expected).max())

  def test_gradient_matches_finite_differences_of_the_kl_divergence(self):
    rng = np.random.default_rng(0)
    p = tsne.joint_probabilities(rng.normal(size=[15, 3]), perplexity=4)
    points = rng.normal(size=[15, 2])
    gradient = tsne._Gradient(p)(points, 1.0)
    step = 1e-6
    for i, d in [(0, 0), (3, 1), (7, 0), (14, 1)]:
      plus, minus = points.copy(), points.copy()
      plus[i, d] += step
      minus[i, d] -= step
      numeric = (tsne.kl_divergence(p, plus) - tsne.kl_divergence(p, minus)) / (2 * step)
      self.assertAlmostEqual(gradient[i, d], numeric, delta=1e-6 + 1e-4 * abs(numeric))

  def test_conditional_probabilities_match_the_perplexity(self):
    points = np.random.default_rng(0).normal(size=[200, 10]) * np.geomspace(0.01, 100, 200)[:, None]
    distances = np.sum((points[:, None] - points[None]) ** 2, axis=-1)
    for perplexity in (5.0, 30.0):
      conditional = tsne.conditional_probabilities(distances, perplexity)
      np.testing.assert_allclose(conditional.sum(axis=1), 1.0, rtol=1e-12)
      np.testing.assert_array_equal(np.diag(conditional), 0.0)
      logs = np.log(np.where(conditional > 0, conditional, 1.0))
      entropy = -np.sum(conditional * logs, axis=1)
      np.testing.assert_allclose(np.exp(entropy), perplexity, rtol=1e-4)

  def test_joint_probabilities_are_symmetric_and_sum_to_one(self):
    p = tsne.joint_probabilities(self.features)
    np.testing.assert_allclose(p, p.T, rtol=1e-12)
    self.assertAlmostEqual(float(p.sum()), 1.0, places=12)
    np.testing.assert_array_equal(np.diag(p), 0.0)
    self.assertTrue(np.all(p[~np.eye(len(p), dtype=bool)] > 0))

  def test_pca_keeps_the_distances_of_low_rank_data(self):
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=[60, 8])
    rotation, _ = np.linalg.qr(rng.normal(size=[200, 8]))  # [200, 8] orthonormal columns.
    features = low_rank @ rotation.T + 5.0  # Rank 8 in 200 dimensions, off-centre.
    np.testing.assert_allclose(tsne.joint_probabilities(features, perplexity=10, pca_dims=8),
                               tsne.joint_probabilities(features, perplexity=10, pca_dims=0), rtol=1e-6, atol=1e-14)
    self.assertGreater(np.abs(tsne.joint_probabilities(features, perplexity=10, pca_dims=2)
                              - tsne.joint_probabilities(features, perplexity=10, pca_dims=0)).max(), 1e-4)

  def test_auto_learning_rate_is_n_over_48_at_least_50(self):
    features = self.features[::3]  # 100 points: max(100 / 48, 50) = 50.
    np.testing.assert_array_equal(tsne.tsne(features, iterations=300),
                                  tsne.tsne(features, iterations=300, learning_rate=50.0))
    self.assertFalse(np.array_equal(tsne.tsne(features, iterations=300),
                                    tsne.tsne(features, iterations=300, learning_rate=200.0)))

  def test_perplexity_above_what_the_data_allows_is_clipped(self):
    features, labels = self.features[::15], self.labels[::15]  # 20 points, 5 per cluster: at most (20 - 1) / 3.
    self.assertAlmostEqual(tsne.effective_perplexity(30.0, 20), 19 / 3)
    np.testing.assert_array_equal(tsne.joint_probabilities(features, perplexity=30.0),
                                  tsne.joint_probabilities(features, perplexity=19 / 3))
    points = tsne.tsne(features, perplexity=30.0, iterations=400)
    self.assertTrue(np.all(np.isfinite(points)))
    self.assertGreater(_neighbour_agreement(points, labels, k=4), 0.95)

  def test_four_points_are_enough(self):
    points = tsne.tsne(np.random.default_rng(0).normal(size=[4, 3]), iterations=300)
    self.assertEqual(points.shape, (4, 2))
    self.assertTrue(np.all(np.isfinite(points)))

  def test_bad_input_raises_naming_the_problem(self):
    features = self.features[:10].copy()
    with self.assertRaisesRegex(ValueError, "at least 4 points, got 3"):
      tsne.tsne(features[:3])
    features[4, 7] = np.nan
    with self.assertRaisesRegex(ValueError, r"non-finite.*first row 4"):
      tsne.tsne(features)
    features[4, 7] = np.inf
    with self.assertRaisesRegex(ValueError, "non-finite"):
      tsne.tsne(features)
    with self.assertRaisesRegex(ValueError, r"2-D array \[N, D\], got shape \(10,\)"):
      tsne.tsne(self.features[:10, 0])
    for kwargs, message in [({"perplexity": 0.0}, "perplexity"), ({"iterations": 0}, "iterations"),
                            ({"learning_rate": "fast"}, "learning_rate"), ({"learning_rate": -1.0}, "learning_rate"),
                            ({"pca_dims": -1}, "pca_dims")]:
      with self.subTest(**kwargs), self.assertRaisesRegex(ValueError, message):
        tsne.tsne(self.features[:10], **kwargs)
    with self.assertRaisesRegex(ValueError, "4 points"):
      tsne.kl_divergence(np.zeros([3, 3]), np.zeros([4, 2]))


if __name__ == "__main__":
  absltest.main()
