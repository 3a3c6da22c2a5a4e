"""Instance-discrimination losses (Wu et al. 2018, Sec. 3.1-3.3), pure and per example.

Shapes: B = per-replica batch, N = num_instances, K = num_negatives, C = groups. Every loss returns [B] float32 and
never reduces across examples or replicas: the train step does that once with tf.nn.compute_average_loss. Beyond
the paper: a second view's feature as a further positive (Ye et al., CVPR 2019), a group-level term against
k-means centroids of the other view (in the spirit of CLD, Wang et al., CVPR 2021) and the bank's nearest rows as
further positives (in the spirit of AND, Huang et al., ICML 2019).
"""

from __future__ import annotations

import math

import tensorflow as tf


def nce_logits(similarities: tf.Tensor, *, temperature: float, num_instances: int, num_negatives: int,
               normalizer: tf.Tensor) -> tf.Tensor:
  """NCE logits l = log P(i|v) - log(K P_n) for bank similarities (paper Eq. 4-5).

  With P(i|v) = exp(s / tau) / Z and P_n = 1 / N: l = s / tau - log Z + log N - log K, so that
  h = P / (P + K P_n) = sigmoid(l).

  Args:
    similarities: any shape, float32 cosine similarities v . f.
    temperature: tau > 0.
    num_instances: N.
    num_negatives: K.
    normalizer: scalar float32 Z > 0.

  Returns:
    Logits of the same shape as `similarities`.
  """
  offset = tf.math.log(normalizer) - math.log(num_instances) + math.log(num_negatives)
  return similarities / temperature - offset


def nce_loss(pos_logits: tf.Tensor, neg_logits: tf.Tensor, *, neg_mask: tf.Tensor | None = None,
             view_logits: tf.Tensor | None = None) -> tf.Tensor:
  """Per-example NCE loss -log h(pos) - sum_k log(1 - h(neg_k)) (paper Eq. 6).

  Written with softplus so it stays finite for any logit: -log sigmoid(l) = softplus(-l) and
  -log(1 - sigmoid(l)) = softplus(l). With `view_logits` (two views), the other view's feature is a second
  positive: the positive term becomes the mean of -log h(bank row) and -log h(other view).

  Args:
    pos_logits: [B] float32, `nce_logits` of each example's own bank row.
    neg_logits: [B, K] float32, `nce_logits` of the noise rows.
    neg_mask: optional [B, K] bool, False drops that negative (e.g. the positive drawn as noise).
    view_logits: optional [B] float32, `nce_logits` of the similarity to the same image's other view.

  Returns:
    [B] float32 losses.
  """
  neg_terms = tf.nn.softplus(neg_logits)  # [B, K]
  if neg_mask is not None:
    neg_terms = tf.where(neg_mask, neg_terms, tf.zeros_like(neg_terms))
  pos_terms = tf.nn.softplus(-pos_logits)
  if view_logits is not None:
    pos_terms = 0.5 * (pos_terms + tf.nn.softplus(-view_logits))
  return pos_terms + tf.reduce_sum(neg_terms, axis=-1)


def softmax_instance_loss(logits: tf.Tensor, instance_ids: tf.Tensor, *, temperature: float,
                          view_similarity: tf.Tensor | None = None) -> tf.Tensor:
  """Per-example cross-entropy of the non-parametric softmax over all N instances (paper Eq. 2).

  With `view_similarity` (two views, Ye et al. 2019), the same image's other view joins the N bank rows as one
  more candidate, and both it and the bank row are positives: the loss is the mean of -log P(bank row i) and
  -log P(other view) under one softmax over N + 1 candidates.

  Args:
    logits: [B, N] float32 similarities f . v_j (or w_j . f for the parametric baseline).
    instance_ids: [B] int, in [0, N).
    temperature: tau > 0; the logits are divided by it.
    view_similarity: optional [B] float32, f . f' with f' the other view's feature (carries gradient to both).

  Returns:
    [B] float32 losses.
  """
  if view_similarity is None:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=instance_ids, logits=logits / temperature)
  log_probs = tf.nn.log_softmax(tf.concat([logits, view_similarity[:, None]], axis=1) / temperature)  # [B, N+1]
  bank_term = -tf.gather(log_probs, tf.cast(instance_ids, tf.int32), batch_dims=1)
  return 0.5 * (bank_term - log_probs[:, -1])


def nce_neighbour_loss(neighbour_logits: tf.Tensor) -> tf.Tensor:
  """Per-example mean of -log h(neighbour) over each example's bank neighbours: they count as positives.

  Args:
    neighbour_logits: [B, M] float32, `nce_logits` of the similarities to the M nearest bank rows.

  Returns:
    [B] float32.
  """
  return tf.reduce_mean(tf.nn.softplus(-neighbour_logits), axis=-1)


def softmax_neighbour_loss(logits: tf.Tensor, neighbour_ids: tf.Tensor, *, temperature: float) -> tf.Tensor:
  """Per-example mean of -log P(neighbour) under the softmax over all N bank rows (paper Eq. 2).

  Args:
    logits: [B, N] float32 similarities f . v_j (softmax_instance_loss's).
    neighbour_ids: [B, M] int, in [0, N): each example's M nearest bank rows.
    temperature: tau > 0.

  Returns:
    [B] float32.
  """
  log_probs = tf.nn.log_softmax(logits / temperature)  # [B, N]
  return -tf.reduce_mean(tf.gather(log_probs, tf.cast(neighbour_ids, tf.int32), batch_dims=1), axis=-1)


def nearest_rows(bank: tf.Tensor, *, num_neighbours: int, chunk: int = 4096) -> tf.Tensor:
  """Each bank row's `num_neighbours` most similar other rows (cosine; exact, O(N^2 D)), nearest first.

  Args:
    bank: [N, D] float32, unit rows; N > num_neighbours.
    num_neighbours: M >= 1.
    chunk: rows compared with the whole bank at once ([chunk, N] similarities in memory).

  Returns:
    [N, M] int64 ids; a row is never its own neighbour.
  """
  bank = tf.convert_to_tensor(bank, tf.float32)
  num_rows = int(bank.shape[0])
  parts = [_nearest_of_rows(bank, tf.range(start, min(start + chunk, num_rows), dtype=tf.int64),
                            num_neighbours=num_neighbours) for start in range(0, num_rows, chunk)]
  return tf.concat(parts, axis=0)


@tf.function(reduce_retracing=True)
def _nearest_of_rows(bank: tf.Tensor, rows: tf.Tensor, *, num_neighbours: int) -> tf.Tensor:
  similarities = tf.matmul(tf.gather(bank, rows), bank, transpose_b=True)  # [c, N]
  itself = tf.range(tf.shape(bank, out_type=tf.int64)[0])[None] == rows[:, None]
  similarities = tf.where(itself, -3.0, similarities)  # Below any cosine: a row is not its own neighbour.
  return tf.cast(tf.math.top_k(similarities, k=num_neighbours).indices, tf.int64)


def spherical_kmeans(features: tf.Tensor, *, num_clusters: int, iterations: int, seed: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """Spherical k-means (cosine) of unit features, without gradient; the group step of the CLD-style term.

  Starts from `num_clusters` distinct rows drawn with `seed`; a group that loses all its members keeps its last
  centroid.

  Args:
    features: [M, D] float32, unit norm; M >= num_clusters.
    num_clusters: C.
    iterations: assignment-update rounds.
    seed: [2] int.

  Returns:
    (centroids [C, D] float32 unit norm, assignments [M] int32 in [0, C)).
  """
  features = tf.stop_gradient(features)
  start = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(features)[0]), seed=seed)[:num_clusters]
  centroids = tf.gather(features, start)  # [C, D]
  for _ in range(iterations):
    assignments = tf.argmax(tf.matmul(features, centroids, transpose_b=True), axis=1, output_type=tf.int32)
    sums = tf.math.unsorted_segment_sum(features, assignments, num_clusters)  # [C, D]
    occupied = tf.reduce_sum(tf.square(sums), axis=1, keepdims=True) > 0.0
    centroids = tf.where(occupied, tf.math.l2_normalize(sums, axis=1), centroids)
  assignments = tf.argmax(tf.matmul(features, centroids, transpose_b=True), axis=1, output_type=tf.int32)
  return centroids, assignments


def group_loss(features: tf.Tensor, centroids: tf.Tensor, assignments: tf.Tensor, *, temperature: float
               ) -> tf.Tensor:
  """Per-example cross-entropy of features against another view's group centroids (CLD's cross-level term).

  Args:
    features: [B, D] float32, unit norm: one view.
    centroids: [C, D] float32, unit norm, from the other view's k-means (no gradient).
    assignments: [B] int, in [0, C): the group of each example's other view.
    temperature: > 0.

  Returns:
    [B] float32.
  """
  logits = tf.matmul(features, tf.stop_gradient(centroids), transpose_b=True) / temperature  # [B, C]
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=assignments, logits=logits)


def proximal_loss(features: tf.Tensor, bank_rows: tf.Tensor, *, proximal_lambda: float) -> tf.Tensor:
  """The paper's proximal regulariser lambda ||f_i - v_i||^2 (Eq. 7); v_i carries no gradient.

  Args:
    features: [B, D] float32 current features.
    bank_rows: [B, D] float32 rows read from the bank before this step's update.
    proximal_lambda: lambda >= 0.

  Returns:
    [B] float32.
  """
  diff = features - tf.stop_gradient(bank_rows)
  return proximal_lambda * tf.reduce_sum(tf.square(diff), axis=-1)


def estimate_normalizer(pos_similarities: tf.Tensor, neg_similarities: tf.Tensor, *, temperature: float,
                        num_instances: int) -> tf.Tensor:
  """Monte-Carlo estimate of Z = sum_j exp(v_j . f / tau), as the official code: N * mean of exp(s / tau).

  The mean is over every similarity the batch computed (positives and negatives). Under a strategy the caller
  averages this across replicas so that all replicas share one Z.

  Args:
    pos_similarities: [B] float32.
    neg_similarities: [B, K] float32.
    temperature: tau > 0.
    num_instances: N.

  Returns:
    Scalar float32 Z, without gradient.
  """
  scores = tf.concat([pos_similarities[:, None], neg_similarities], axis=1)  # [B, K+1]
  return tf.stop_gradient(num_instances * tf.reduce_mean(tf.exp(scores / temperature)))
