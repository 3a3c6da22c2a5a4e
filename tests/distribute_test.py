"""Strategy construction and the replica collectives (no-ops on one replica, real on two logical CPUs)."""

from __future__ import annotations

from tests import testing

import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import distribute


class MakeStrategyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("auto_without_gpus", "auto", tf.distribute.OneDeviceStrategy, 1),
      ("one_device", "one_device", tf.distribute.OneDeviceStrategy, 1),
      ("mirrored_over_logical_cpus", "mirrored", tf.distribute.MirroredStrategy, testing.NUM_LOGICAL_CPUS),
  )
  def test_kinds(self, kind, expected_type, replicas):
    strategy = distribute.make_strategy(kind)
    self.assertIsInstance(strategy, expected_type)
    self.assertEqual(strategy.num_replicas_in_sync, replicas)

  def test_default_is_the_default_strategy(self):
    self.assertIs(distribute.make_strategy("default"), tf.distribute.get_strategy())

  def test_unknown_kind_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--strategy"):
      distribute.make_strategy("tpu_pod")

  def test_split_cpu_again_with_the_same_count_is_a_no_op(self):
    distribute.split_cpu(testing.NUM_LOGICAL_CPUS)
    self.assertLen(tf.config.list_logical_devices("CPU"), testing.NUM_LOGICAL_CPUS)


class CollectivesTest(tf.test.TestCase):

  def test_one_replica_collectives_are_identity(self):
    value = tf.constant([[1.0, 2.0]])
    self.assertAllEqual(distribute.all_gather(value), value)
    self.assertAllEqual(distribute.all_reduce_mean(value), value)
    self.assertEqual(int(distribute.replica_id()), 0)
    variable = tf.Variable([1.0])
    self.assertIs(distribute.local_variable(variable), variable)

  def test_two_replicas_gather_in_replica_order_and_average(self):
    strategy = testing.two_replica_strategy()

    @tf.function
    def run():
      def replica_fn():
        rid = tf.cast(distribute.replica_id(), tf.float32)
        return distribute.all_gather(tf.reshape(rid, [1])), distribute.all_reduce_mean(rid)
      return strategy.run(replica_fn)

    gathered, mean = run()
    for value in strategy.experimental_local_results(gathered):
      self.assertAllEqual(value, [0.0, 1.0])
    for value in strategy.experimental_local_results(mean):
      self.assertEqual(float(value), 0.5)


if __name__ == "__main__":
  tf.test.main()
