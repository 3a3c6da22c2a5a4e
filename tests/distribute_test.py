"""Strategy construction and the replica collectives (no-ops on one replica, real on two logical CPUs)."""

from __future__ import annotations

from tests import testing

import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import checkpointing
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

  def test_tpu_without_a_tpu_names_the_flag(self):
    # No TPU here: the error must come at once and name the flag, not only print a C++ trace. (An address where
    # nothing listens is retried by TensorFlow's connect without end; that path is not tested.)
    with self.assertRaisesRegex(ValueError, r"--strategy=tpu: no TPU at --tpu='local'"):
      distribute.make_strategy("tpu", tpu="local")

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


def _free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


class MultiWorkerTest(tf.test.TestCase):
  """Two worker processes on localhost under MultiWorkerMirroredStrategy (docs/distributed.md's local launch)."""

  def _start_workers(self, tmp: str, model_dir: str, epochs: int, tag: str = "") -> list[subprocess.Popen]:
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    script = os.path.join(testing.REPO_ROOT, "tests", "multi_worker_worker.py")
    processes = []
    for index in range(2):
      env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
             "TF_CPP_MIN_LOG_LEVEL": "2"}
      log = open(os.path.join(tmp, f"worker{index}{tag}.log"), "w")
      self.addCleanup(log.close)
      processes.append(subprocess.Popen(
          [sys.executable, script, model_dir, os.path.join(tmp, f"w{index}.npz"), str(epochs)],
          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=testing.REPO_ROOT))
      self.addCleanup(lambda p=processes[-1]: p.poll() is None and p.kill())
    return processes

  def test_killed_workers_restart_from_the_chiefs_checkpoint(self):
    tmp = self.create_tempdir().full_path
    model_dir = os.path.join(tmp, "run")
    processes = self._start_workers(tmp, model_dir, epochs=3)
    checkpoints = os.path.join(model_dir, "checkpoints")
    deadline = time.time() + 300
    while tf.train.latest_checkpoint(checkpoints) is None and time.time() < deadline:
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)  # A worker dies mid-run; the cluster manager restarts everyone.
    processes[1].wait()
    # The survivor does not hang: its collectives are aborted and it exits with WorkerLost's code.
    self.assertEqual(processes[0].wait(timeout=120), 75)
    self.assertIn("Restart every worker", open(os.path.join(tmp, "worker0.log")).read())
    saved = tf.train.latest_checkpoint(checkpoints)
    self.assertIsNotNone(saved, "no checkpoint before the deadline")
    step = int(saved.rsplit("-", 1)[1])
    self.assertLess(step, 3 * 64 // 16)
    for index, process in enumerate(self._start_workers(tmp, model_dir, epochs=3, tag="-restart")):
      self.assertEqual(process.wait(timeout=400), 0,
                       open(os.path.join(tmp, f"worker{index}-restart.log")).read()[-3000:])
      self.assertIn(f"resumed at step {step} ", open(os.path.join(tmp, f"worker{index}-restart.log")).read())
    w0, w1 = (np.load(os.path.join(tmp, f"w{i}.npz")) for i in range(2))
    self.assertEqual(int(w0["step"]), 3 * 64 // 16)
    self.assertAllEqual(w0["bank"], w1["bank"])
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r["epoch"] for r in records], [1, 2, 3])
    self.assertTrue(all(np.isfinite(r["loss"]) for r in records))

  def test_a_hung_worker_makes_the_survivor_exit(self):
    # SIGSTOP: the peer's connections stay open but it stops answering heartbeats (a frozen host).
    tmp = self.create_tempdir().full_path
    model_dir = os.path.join(tmp, "run")
    processes = self._start_workers(tmp, model_dir, epochs=50)
    deadline = time.time() + 300
    while tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")) is None and time.time() < deadline:
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGSTOP)
    self.addCleanup(lambda: processes[1].send_signal(signal.SIGCONT))
    self.assertEqual(processes[0].wait(timeout=120), 75)
    self.assertIn("Restart every worker", open(os.path.join(tmp, "worker0.log")).read())

  def test_two_workers_hold_the_same_bank_and_only_the_chief_writes(self):
    tmp = self.create_tempdir().full_path
    model_dir = os.path.join(tmp, "run")
    processes = self._start_workers(tmp, model_dir, epochs=2)
    for index, process in enumerate(processes):
      try:
        code = process.wait(timeout=400)
      except subprocess.TimeoutExpired:
        for p in processes:
          p.kill()
        raise
      self.assertEqual(code, 0, open(os.path.join(tmp, f"worker{index}.log")).read()[-3000:])
    w0, w1 = (np.load(os.path.join(tmp, f"w{i}.npz")) for i in range(2))
    self.assertEqual(int(w0["replicas"]), 2)
    self.assertEqual((bool(w0["chief"]), bool(w1["chief"])), (True, False))
    self.assertEqual(int(w0["step"]), 2 * 64 // 16)
    self.assertAllEqual(w0["bank"], w1["bank"])  # Bit-identical across processes.
    self.assertEqual(float(w0["normalizer"]), float(w1["normalizer"]))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    self.assertEndsWith(latest, "ckpt-8")
    self.assertAllEqual(tf.train.load_variable(latest, checkpointing.BANK_KEY), w0["bank"])
    self.assertEqual(sorted(os.listdir(model_dir)), ["checkpoints", "config.json", "final_metrics.json",
                                                      "metrics.jsonl", "run.json", "train"])  # No scratch left.


class TfConfigTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("", "{not json", '{"cluster": {}}',
                            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}')
  def test_bad_tf_config_names_it(self, value):
    with mock.patch.dict(os.environ, {"TF_CONFIG": value}):
      with self.assertRaisesRegex(ValueError, "--strategy=multi_worker: TF_CONFIG"):
        distribute.make_strategy("multi_worker")

  def test_single_process_strategies_are_chief(self):
    self.assertTrue(distribute.is_chief(tf.distribute.get_strategy()))
    self.assertTrue(distribute.is_chief(testing.two_replica_strategy()))
    self.assertEqual(distribute.task_name(tf.distribute.get_strategy()), "local")
