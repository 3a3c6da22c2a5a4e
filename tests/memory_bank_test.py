"""MemoryBank: update math vs NumPy, duplicates, lookup, init, normaliser, negative sampling, two replicas."""

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import distribute, memory_bank

NUM_INSTANCES = 12
DIM = 5


def _unit_rows(num_rows, seed):
  rows = np.random.default_rng(seed).normal(size=[num_rows, DIM]).astype(np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def numpy_update(bank, ids, features, momentum):
  """v_i <- normalise(m v_i + (1 - m) f_i); a repeated id first averages its features (explicit loops)."""
  bank = bank.astype(np.float64).copy()
  grouped = {}
  for i, feature in zip(ids, features):
    grouped.setdefault(int(i), []).append(feature.astype(np.float64))
  for i, group in grouped.items():
    mean_feature = sum(group) / len(group)
    mixed = momentum * bank[i] + (1.0 - momentum) * mean_feature
    bank[i] = mixed / np.sqrt(np.sum(mixed ** 2))
  return bank


class UpdateTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(0.0, 0.5, 0.9)
  def test_update_matches_numpy(self, momentum):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    before = bank.bank.numpy()
    ids = np.array([7, 2, 11, 0])
    features = _unit_rows(4, seed=1)
    bank.update(tf.constant(ids), tf.constant(features), momentum=momentum)
    self.assertAllClose(bank.bank.numpy(), numpy_update(before, ids, features, momentum), rtol=1e-6, atol=1e-6)

  def test_rows_not_in_ids_are_untouched(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    before = bank.bank.numpy()
    ids = np.array([3, 9])
    bank.update(tf.constant(ids), tf.constant(_unit_rows(2, seed=2)), momentum=0.5)
    after = bank.bank.numpy()
    others = np.setdiff1d(np.arange(NUM_INSTANCES), ids)
    self.assertAllEqual(after[others], before[others])  # Bit-exact.
    self.assertNotAllClose(after[ids], before[ids])

  def test_updated_rows_are_unit_norm(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    bank.update(tf.constant([1, 4, 4]), tf.constant(_unit_rows(3, seed=3)), momentum=0.5)
    self.assertAllClose(np.linalg.norm(bank.bank.numpy(), axis=1), np.ones(NUM_INSTANCES), atol=1e-6)

  @parameterized.parameters(0.0, 0.5)
  def test_duplicate_ids_average_their_features(self, momentum):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    before = bank.bank.numpy()
    ids = np.array([5, 1, 5, 8, 5])
    features = _unit_rows(5, seed=4)
    bank.update(tf.constant(ids), tf.constant(features), momentum=momentum)
    self.assertAllClose(bank.bank.numpy(), numpy_update(before, ids, features, momentum), rtol=1e-6, atol=1e-6)
    # Not "last write wins" (what a plain scatter would do).
    last_wins = numpy_update(before, ids[-1:], features[-1:], momentum)
    self.assertNotAllClose(bank.bank.numpy()[5], last_wins[5])

  @parameterized.parameters([[4, 0, 3, 2, 1]], [[1, 2, 3, 4, 0]], [[2, 4, 1, 0, 3]])
  def test_duplicate_ids_independent_of_order(self, permutation):
    ids = np.array([5, 1, 5, 8, 5])
    features = _unit_rows(5, seed=5)
    reference = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    reference.update(tf.constant(ids), tf.constant(features), momentum=0.5)
    permuted = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    permuted.update(tf.constant(ids[permutation]), tf.constant(features[permutation]), momentum=0.5)
    # The mean is a float sum, so a different order may round differently in the last bit, no more.
    self.assertAllClose(permuted.bank.numpy(), reference.bank.numpy(), rtol=1e-6, atol=1e-7)

  def test_same_update_twice_is_bit_identical(self):
    ids = tf.constant([5, 1, 5, 8, 5])
    features = tf.constant(_unit_rows(5, seed=6))
    banks = [memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0) for _ in range(2)]
    for bank in banks:
      bank.update(ids, features, momentum=0.5)
    self.assertAllEqual(banks[0].bank.numpy(), banks[1].bank.numpy())

  def test_update_inside_tf_function_matches_eager(self):
    ids = np.array([0, 6, 6, 10])
    features = _unit_rows(4, seed=7)
    eager = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    eager.update(tf.constant(ids), tf.constant(features), momentum=0.5)
    traced = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    tf.function(lambda i, f: traced.update(i, f, momentum=0.5))(tf.constant(ids), tf.constant(features))
    self.assertAllClose(traced.bank.numpy(), eager.bank.numpy(), rtol=1e-6, atol=1e-7)

  def test_lookup_reads_before_update_writes(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    before = bank.bank.numpy()

    @tf.function
    def read_then_write(ids, features):
      rows = bank.lookup(ids)
      bank.update(ids, features, momentum=0.5)
      return rows

    rows = read_then_write(tf.constant([2, 3]), tf.constant(_unit_rows(2, seed=8)))
    self.assertAllEqual(rows, before[[2, 3]])
    self.assertNotAllClose(bank.bank.numpy()[[2, 3]], before[[2, 3]])


class LookupAndInitTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(([4, 0, 4],), ([[1, 2], [11, 3]],))
  def test_lookup(self, ids):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    rows = bank.lookup(tf.constant(ids, tf.int64))
    self.assertEqual(rows.shape, (*np.shape(ids), DIM))
    self.assertEqual(rows.dtype, tf.float32)
    self.assertAllEqual(rows, bank.bank.numpy()[np.array(ids)])

  def test_initial_rows_unit_norm(self):
    bank = memory_bank.MemoryBank(100, 16, seed=3)
    rows = bank.bank.numpy()
    self.assertEqual(rows.dtype, np.float32)
    self.assertAllClose(np.linalg.norm(rows, axis=1), np.ones(100), atol=1e-6)
    self.assertFalse(bank.bank.trainable)

  def test_same_seed_same_rows(self):
    first = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=7).bank.numpy()
    second = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=7).bank.numpy()
    self.assertAllEqual(first, second)

  @parameterized.parameters((0, 1), (7, 8), (1, 100))
  def test_different_seed_different_rows(self, seed, other_seed):
    first = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=seed).bank.numpy()
    second = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=other_seed).bank.numpy()
    self.assertFalse(np.any(np.all(first == second, axis=1)))  # No row in common.

  def test_rows_are_not_degenerate(self):
    rows = memory_bank.MemoryBank(200, 8, seed=0).bank.numpy()
    # Isotropic draws: the mean row is near 0 and no two rows coincide.
    self.assertLess(np.linalg.norm(rows.mean(axis=0)), 0.25)
    similarities = rows @ rows.T - 2.0 * np.eye(200)
    self.assertLess(similarities.max(), 0.999)


  def test_initialize_from_features(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    features = np.random.default_rng(10).normal(size=[NUM_INSTANCES, DIM]).astype(np.float32)  # Not unit norm.
    bank.initialize_from(tf.constant(features))
    self.assertAllClose(bank.bank.numpy(), features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-6)


class NormalizerTest(tf.test.TestCase, parameterized.TestCase):

  def test_unset_at_start(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    self.assertFalse(bank.normalizer_is_set())
    self.assertEqual(bank.normalizer.numpy(), memory_bank.UNSET_NORMALIZER)

  def test_fixed_mode_sets_once_and_never_changes(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    returned = [float(bank.maybe_set_normalizer(tf.constant(value), momentum=0.0)) for value in (40.0, 90.0, 7.0)]
    self.assertEqual(returned, [40.0, 40.0, 40.0])
    self.assertEqual(float(bank.normalizer.numpy()), 40.0)
    self.assertTrue(bank.normalizer_is_set())

  def test_fixed_mode_inside_tf_function(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    set_z = tf.function(lambda value: bank.maybe_set_normalizer(value, momentum=0.0))
    returned = [float(set_z(tf.constant(value))) for value in (25.0, 80.0, 3.0)]
    self.assertEqual(returned, [25.0, 25.0, 25.0])
    self.assertEqual(set_z.experimental_get_tracing_count(), 1)

  @parameterized.named_parameters(
      # Z_1 = e_1; Z_t = m Z_{t-1} + (1 - m) e_t.
      {"testcase_name": "m0.5", "momentum": 0.5, "expected": [40.0, 0.5 * 40 + 0.5 * 80, 0.5 * 60 + 0.5 * 20]},
      {"testcase_name": "m0.9", "momentum": 0.9, "expected": [40.0, 0.9 * 40 + 0.1 * 80, 0.9 * 44 + 0.1 * 20]},
  )
  def test_moving_average_mode(self, momentum, expected):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    returned = [float(bank.maybe_set_normalizer(tf.constant(value), momentum=momentum))
                for value in (40.0, 80.0, 20.0)]
    self.assertAllClose(returned, expected, rtol=1e-6)
    self.assertAllClose(bank.normalizer.numpy(), expected[-1], rtol=1e-6)


class SampleNegativesTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(([50],), ([4, 50],))
  def test_same_seed_same_draw_in_range(self, shape):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    first = bank.sample_negatives(shape, seed=tf.constant([3, 9]))
    second = bank.sample_negatives(shape, seed=tf.constant([3, 9]))
    self.assertEqual(first.dtype, tf.int64)
    self.assertEqual(first.shape, tuple(shape))
    self.assertAllEqual(first, second)
    self.assertAllInRange(first, 0, NUM_INSTANCES - 1)

  @parameterized.parameters(([3, 9], [3, 10]), ([3, 9], [4, 9]), ([0, 0], [0, 1]))
  def test_different_seed_different_draw(self, seed, other_seed):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    first = bank.sample_negatives([4, 50], seed=tf.constant(seed))
    second = bank.sample_negatives([4, 50], seed=tf.constant(other_seed))
    self.assertNotAllEqual(first, second)

  def test_independent_of_bank_seed(self):
    # Negatives depend on the step seed only, not on the bank's init seed.
    first = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0).sample_negatives([20], seed=tf.constant([1, 2]))
    second = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=5).sample_negatives([20], seed=tf.constant([1, 2]))
    self.assertAllEqual(first, second)

  def test_roughly_uniform(self):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    draws = bank.sample_negatives([12000], seed=tf.constant([1, 1])).numpy()
    counts = np.bincount(draws, minlength=NUM_INSTANCES)
    self.assertLen(counts, NUM_INSTANCES)
    # 1000 expected per id, standard deviation about 30.
    self.assertAllInRange(counts, 850, 1150)


class ReducedPrecisionTest(tf.test.TestCase, parameterized.TestCase):
  """--bank_dtype: half the memory; float32 reads and updates; one rounding per write."""

  @parameterized.parameters(("bfloat16", 2e-2), ("float16", 2e-3))
  def test_storage_lookup_update_and_similarities(self, dtype, tolerance):
    bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0, dtype=dtype)
    reference = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    self.assertEqual(bank.bank.dtype, tf.as_dtype(dtype))
    self.assertEqual(bank.bank.numpy().nbytes * 2, reference.bank.numpy().nbytes)
    ids = tf.constant([3, 7])
    self.assertEqual(bank.lookup(ids).dtype, tf.float32)
    self.assertAllClose(bank.lookup(ids), reference.lookup(ids), atol=tolerance)
    before = bank.bank.numpy().astype(np.float32)
    features = _unit_rows(2, seed=4)
    bank.update(ids, tf.constant(features), momentum=0.5)
    expected = numpy_update(before, ids.numpy(), features, 0.5)  # From the rounded rows, in float64.
    self.assertAllClose(bank.bank.numpy().astype(np.float32), expected, atol=tolerance)
    queries = _unit_rows(3, seed=5)
    similarities = bank.similarities(tf.constant(queries))
    self.assertEqual(similarities.dtype, tf.float32)
    self.assertAllClose(similarities, queries @ bank.as_float32().numpy().T, atol=2 * tolerance)

  def test_two_replicas_stay_bit_identical(self):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0, dtype="bfloat16")

    @tf.function
    def step(ids, features):
      def replica_fn(ids, features):
        bank.update(distribute.all_gather(ids), distribute.all_gather(features), momentum=0.5)
      strategy.run(replica_fn, args=(ids, features))

    ids = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant([ctx.replica_id_in_sync_group]))
    features = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(_unit_rows(1, seed=10 + ctx.replica_id_in_sync_group)))
    step(ids, features)
    copies = [v.numpy() for v in bank.bank.values]
    self.assertAllEqual(copies[0], copies[1])
    self.assertFalse(np.array_equal(copies[0][:2], memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0,
                                                                          dtype="bfloat16").bank.numpy()[:2]))


class TwoReplicaTest(tf.test.TestCase):

  def test_copies_identical_and_match_numpy(self):
    strategy = testing.two_replica_strategy()
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    initial = bank.bank.values[0].numpy()
    # Per step and replica: 3 ids; id 5 appears on both replicas in step 0 and twice on replica 1 in step 1.
    ids = np.array([[[0, 3, 5], [5, 7, 9]],
                    [[1, 2, 5], [5, 5, 11]],
                    [[3, 4, 6], [0, 8, 10]]])  # [steps, replicas, B]
    features = _unit_rows(ids.size, seed=9).reshape(*ids.shape, DIM)

    @tf.function
    def step(step_ids, step_features):
      def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        bank.update(distribute.all_gather(tf.gather(step_ids, replica)),
                    distribute.all_gather(tf.gather(step_features, replica)), momentum=0.5)
      strategy.run(replica_fn)

    expected = initial
    for step_ids, step_features in zip(ids, features):
      step(tf.constant(step_ids), tf.constant(step_features))
      expected = numpy_update(expected, step_ids.reshape(-1), step_features.reshape(-1, DIM), 0.5)

    copies = [value.numpy() for value in bank.bank.values]
    self.assertLen(copies, 2)
    self.assertEqual(bank.bank.values[0].device, "/job:localhost/replica:0/task:0/device:CPU:0")
    self.assertEqual(bank.bank.values[1].device, "/job:localhost/replica:0/task:0/device:CPU:1")
    np.testing.assert_array_equal(copies[0], copies[1])  # Bit-identical.
    self.assertAllClose(copies[0], expected, rtol=1e-6, atol=1e-6)
    self.assertNotAllClose(copies[0], initial)

  def test_initial_copies_identical(self):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=4)
    np.testing.assert_array_equal(bank.bank.values[0].numpy(), bank.bank.values[1].numpy())
    np.testing.assert_array_equal(bank.bank.values[0].numpy(), memory_bank.random_unit_rows(NUM_INSTANCES, DIM,
                                                                                            seed=4).numpy())

  def test_initialize_from_reaches_every_copy(self):
    strategy = testing.two_replica_strategy()
    with strategy.scope():
      bank = memory_bank.MemoryBank(NUM_INSTANCES, DIM, seed=0)
    features = _unit_rows(NUM_INSTANCES, seed=11)
    bank.initialize_from(tf.constant(features))
    for copy in bank.bank.values:
      self.assertAllClose(copy.numpy(), features, atol=1e-6)


if __name__ == "__main__":
  tf.test.main()
