"""Exact t-SNE (van der Maaten & Hinton, JMLR 2008) in NumPy: 2-D maps of embeddings, as in the paper's figures.

Shapes: N = points, D = feature dimension. P is a dense [N, N] float64 matrix (building it takes a few more) and
every gradient step visits all N^2 pairs, so memory and time per iteration are O(N^2): meant for N up to about
5,000 (each [N, N] buffer is 200 MB at 5,000, and 750 iterations take minutes); callers subsample larger sets.
Imports only NumPy.

Steps: optional PCA to pca_dims; Gaussian conditional affinities p_{j|i} whose per-point precision is found by
bisection to match the perplexity; symmetric joint P = (p_{j|i} + p_{i|j}) / 2N; Student-t (one degree of freedom)
similarities Q in the map; gradient descent on KL(P || Q) with early exaggeration, momentum and adaptive gains.
"""

from __future__ import annotations

import numpy as np

EXAGGERATION = 12.0  # P is multiplied by this during the first EXAGGERATION_ITERATIONS iterations.
EXAGGERATION_ITERATIONS = 250
MOMENTUM_EARLY, MOMENTUM_LATE = 0.5, 0.8  # Before / after the exaggeration phase ends.
MIN_GAIN = 0.01
INIT_STD = 1e-4
MIN_POINTS = 4
_PROBABILITY_FLOOR = 1e-12  # Keeps log(P / Q) finite.
_ENTROPY_TOLERANCE = 1e-5  # Nats; the bisection stops when every point's entropy is this close to log(perplexity).
_MAX_BISECTION_STEPS = 200
_MAX_PRECISION = 1e250  # Tied nearest neighbours can ask for beta -> inf; 0 * inf would be NaN.
_BLOCK_ELEMENTS = 1 << 17  # Size of a [rows, N] gradient block: 1 MB of float64, so each block stays in cache.


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
  """features as float64 [N, D]; ValueError naming the problem for a wrong rank, too few points or NaN/inf."""
  array = np.asarray(features)
  if array.ndim != 2:
    raise ValueError(f"{name}: features must be a 2-D array [N, D], got shape {array.shape}")
  if array.shape[0] < MIN_POINTS:
    raise ValueError(f"{name}: need at least {MIN_POINTS} points, got {array.shape[0]}")
  if array.shape[1] < 1:
    raise ValueError(f"{name}: features have no dimensions (shape {array.shape})")
  if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
    raise ValueError(f"{name}: features must be real numbers, got dtype {array.dtype}")
  array = array.astype(np.float64)
  bad_rows = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
  if bad_rows.size:
    raise ValueError(f"{name}: features contain non-finite values (NaN or inf) in {bad_rows.size} row(s), "
                     f"first row {bad_rows[0]}")
  return array


def effective_perplexity(perplexity: float, num_points: int) -> float:
  """perplexity clipped to (num_points - 1) / 3: each point needs about 3 x perplexity neighbours to spread over."""
  if not perplexity > 0:
    raise ValueError(f"perplexity must be positive, got {perplexity}")
  return min(float(perplexity), (num_points - 1) / 3)


def _pca(features: np.ndarray, dims: int) -> np.ndarray:
  """Centred features projected on their top `dims` principal directions (SVD); unchanged if D <= dims or dims = 0."""
  if dims <= 0 or features.shape[1] <= dims:
    return features
  centred = features - features.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:dims].T


def _squared_distances(points: np.ndarray) -> np.ndarray:
  """[N, N] squared Euclidean distances, clipped at 0 (rounding), with an exact zero diagonal."""
  norms = np.einsum("nd,nd->n", points, points)
  distances = points @ points.T
  distances *= -2.0
  distances += norms[:, None]
  distances += norms[None, :]
  np.maximum(distances, 0.0, out=distances)
  np.fill_diagonal(distances, 0.0)
  return distances


def conditional_probabilities(sq_distances: np.ndarray, perplexity: float) -> np.ndarray:
  """Row-stochastic p_{j|i} = exp(-beta_i d_ij) / sum_k exp(-beta_i d_ik), p_{i|i} = 0, each row's perplexity matched.

  All rows are bisected at once on their precision beta_i (doubling or halving until the target is bracketed) until
  every row's Shannon entropy is within 1e-5 nats of log(perplexity).

  Args:
    sq_distances: [N, N] squared distances (the diagonal is ignored).
    perplexity: target 2^H (H in bits) = e^H (H in nats) per row; at most N - 1.

  Returns:
    [N, N] float64, each row summing to 1.
  """
  num_points = sq_distances.shape[0]
  # Shifting each row by its smallest off-diagonal distance leaves p_{j|i} unchanged and keeps one term at exp(0) = 1.
  shifted = sq_distances.astype(np.float64, copy=True)
  np.fill_diagonal(shifted, np.inf)
  shifted -= shifted.min(axis=1, keepdims=True)
  np.fill_diagonal(shifted, 0.0)
  spread = shifted.sum(axis=1) / (num_points - 1)
  beta = 1.0 / np.where(spread > 0, spread, 1.0)  # A start on each row's own distance scale.
  low, high = np.zeros(num_points), np.full(num_points, np.inf)
  target = np.log(perplexity)
  for _ in range(_MAX_BISECTION_STEPS):
    weights = np.exp(-shifted * beta[:, None])
    np.fill_diagonal(weights, 0.0)
    total = weights.sum(axis=1)
    entropy = np.log(total) + beta * np.einsum("ij,ij->i", shifted, weights) / total
    excess = entropy - target
    if np.all(np.abs(excess) < _ENTROPY_TOLERANCE):
      break
    too_flat = excess > 0  # Entropy too high: sharpen (raise beta).
    low = np.where(too_flat, beta, low)
    high = np.where(too_flat, high, beta)
    beta = np.minimum(np.where(np.isinf(high), beta * 2.0, (low + high) / 2.0), _MAX_PRECISION)
  return weights / total[:, None]


def joint_probabilities(features: np.ndarray, *, perplexity: float = 30.0, pca_dims: int = 50) -> np.ndarray:
  """The symmetric input affinities P of t-SNE: [N, N] float64, zero diagonal, summing to 1.

  Args:
    features: [N, D] real, finite, N >= 4.
    perplexity: clipped to (N - 1) / 3 (see effective_perplexity).
    pca_dims: PCA to this many dimensions first when D is larger; 0 for none.
  """
  features = _check_features(features, "joint_probabilities")
  if pca_dims < 0:
    raise ValueError(f"pca_dims must be >= 0, got {pca_dims}")
  num_points = features.shape[0]
  perplexity = effective_perplexity(perplexity, num_points)
  distances = _squared_distances(_pca(features, pca_dims))
  if not np.all(np.isfinite(distances)):
    raise ValueError("joint_probabilities: features too large: squared distances overflow float64 (rescale them)")
  conditional = conditional_probabilities(distances, perplexity)
  joint = conditional + conditional.T
  joint /= 2.0 * num_points
  np.maximum(joint, _PROBABILITY_FLOOR, out=joint)
  np.fill_diagonal(joint, 0.0)
  joint /= joint.sum()
  return joint


def kl_divergence(p: np.ndarray, points: np.ndarray) -> float:
  """KL(P || Q) in nats, for joint P [N, N] (as from joint_probabilities) and a map [N, 2] defining Student-t Q."""
  points = np.asarray(points, np.float64)
  if p.shape != (points.shape[0], points.shape[0]):
    raise ValueError(f"kl_divergence: P has shape {p.shape} but the map has {points.shape[0]} points")
  similarity = _squared_distances(points)
  similarity += 1.0
  np.reciprocal(similarity, out=similarity)
  np.fill_diagonal(similarity, 0.0)
  q = np.maximum(similarity / similarity.sum(), _PROBABILITY_FLOOR)
  mask = p > 0
  return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class _Gradient:
  """dKL(e P || Q)/dy_i = 4 sum_j (e p_ij - q_ij) s_ij (y_i - y_j), s_ij = (1 + |y_i - y_j|^2)^-1, q_ij = s_ij / Z.

  Split as 4 [e sum_j p_ij s_ij (y_i - y_j) - (1 / Z) sum_j s_ij^2 (y_i - y_j)], both sums and Z = sum_{i != j} s_ij
  are accumulated in one pass over blocks of rows that stay in cache, so an iteration allocates no [N, N] array and
  reads P once. 1 + |y_i - y_j|^2 is one [rows, 4] x [4, N] product, [y_i, |y_i|^2, 1] . [-2 y_j, 1, 1 + |y_j|^2];
  each sum_j w_ij (y_i - y_j) is (sum_j w_ij) y_i - sum_j w_ij y_j, one [rows, N] x [N, 3] product with [y, 1]. The
  j = i terms cancel there, so only Z needs the diagonal (s_ii = 1) taken out.
  """

  def __init__(self, p: np.ndarray):
    self.p = p
    num_points = p.shape[0]
    self.block = max(1, min(num_points, _BLOCK_ELEMENTS // num_points))
    self.similarity = np.empty((self.block, num_points))
    self.scratch = np.empty((self.block, num_points))
    self.rows = np.ones((num_points, 4))  # [y_i, |y_i|^2, 1]
    self.columns = np.ones((4, num_points))  # [-2 y_j, 1, 1 + |y_j|^2]
    self.extended = np.ones((num_points, 3))  # [y, 1]
    self.attraction = np.empty((num_points, 3))
    self.repulsion = np.empty((num_points, 3))

  def __call__(self, points: np.ndarray, exaggeration: float) -> np.ndarray:
    num_points = points.shape[0]
    norms = np.einsum("nd,nd->n", points, points)
    self.rows[:, :2], self.rows[:, 2] = points, norms
    self.columns[:2], self.columns[3] = -2.0 * points.T, 1.0 + norms
    self.extended[:, :2] = points
    total = 0.0
    for start in range(0, num_points, self.block):
      stop = min(start + self.block, num_points)
      similarity, scratch = self.similarity[:stop - start], self.scratch[:stop - start]
      np.matmul(self.rows[start:stop], self.columns, out=similarity)  # 1 + |y_i - y_j|^2
      np.reciprocal(similarity, out=similarity)
      total += float(similarity.sum())
      np.multiply(self.p[start:stop], similarity, out=scratch)
      np.matmul(scratch, self.extended, out=self.attraction[start:stop])
      np.square(similarity, out=scratch)
      np.matmul(scratch, self.extended, out=self.repulsion[start:stop])
    total -= num_points  # The diagonal s_ii = 1.
    attraction = self.attraction[:, 2:] * points - self.attraction[:, :2]
    repulsion = self.repulsion[:, 2:] * points - self.repulsion[:, :2]
    return 4.0 * (exaggeration * attraction - repulsion / total)


def tsne(features: np.ndarray, *, perplexity: float = 30.0, iterations: int = 750, seed: int = 0,
         pca_dims: int = 50, learning_rate: float | str = "auto") -> np.ndarray:
  """A 2-D t-SNE map of features by exact gradient descent on KL(P || Q).

  The first 250 iterations exaggerate P by 12 with momentum 0.5; the rest use P itself with momentum 0.8. Each
  coordinate has an adaptive gain, as in the reference implementation: +0.2 while its gradient keeps opposing the
  last update (steady descent), x0.8 once they agree (overshoot), at least 0.01. The map is re-centred each step.

  O(N^2) memory and time per iteration: intended for N up to about 5,000 (subsample larger sets first). 2,000
  points x 128 dimensions take about 15 s on one core.

  Args:
    features: [N, D] real and finite, N >= 4.
    perplexity: effective number of neighbours per point. Clipped to (N - 1) / 3 when larger (small N), so a
      default of 30 needs N >= 91 to be used as given.
    iterations: gradient steps in all, including the 250 exaggerated ones (so use a few hundred more than 250).
    seed: seeds the initial map (Gaussian, std 1e-4); the same seed and input give the same map.
    pca_dims: PCA to this many dimensions first when D is larger (SVD); 0 for none.
    learning_rate: step size, or "auto" for max(N / 12 / 4, 50) (Belkina et al. 2019, with this gradient's factor 4).

  Returns:
    float32 [N, 2].

  Raises:
    ValueError: features not [N, D], fewer than 4 points, non-finite values, or a bad perplexity, iteration count,
      pca_dims or learning rate.
  """
  if int(iterations) != iterations or iterations < 1:
    raise ValueError(f"tsne: iterations must be a positive integer, got {iterations}")
  if isinstance(learning_rate, str):
    if learning_rate != "auto":
      raise ValueError(f"tsne: learning_rate must be a positive number or 'auto', got {learning_rate!r}")
  elif not learning_rate > 0:
    raise ValueError(f"tsne: learning_rate must be positive, got {learning_rate}")
  features = _check_features(features, "tsne")
  num_points = features.shape[0]
  p = joint_probabilities(features, perplexity=perplexity, pca_dims=pca_dims)
  if learning_rate == "auto":
    learning_rate = max(num_points / EXAGGERATION / 4.0, 50.0)

  points = np.random.default_rng(seed).normal(0.0, INIT_STD, size=(num_points, 2))
  update = np.zeros_like(points)
  gains = np.ones_like(points)
  gradient_of = _Gradient(p)
  for step in range(int(iterations)):
    early = step < EXAGGERATION_ITERATIONS
    gradient = gradient_of(points, EXAGGERATION if early else 1.0)
    same_direction = (gradient > 0) == (update > 0)
    gains = np.maximum(np.where(same_direction, gains * 0.8, gains + 0.2), MIN_GAIN)
    update = (MOMENTUM_EARLY if early else MOMENTUM_LATE) * update - learning_rate * gains * gradient
    points += update
    points -= points.mean(axis=0)
  return points.astype(np.float32)
