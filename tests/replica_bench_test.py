"""Smoke test of bench/replica_bench.py --quick: it runs and writes the JSON it promises (numbers: docs/)."""

from __future__ import annotations

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import json
import os
import subprocess
import sys

import tensorflow as tf

BENCH = os.path.join(testing.REPO_ROOT, "bench", "replica_bench.py")


class ReplicaBenchTest(tf.test.TestCase):

  def test_quick_run_writes_its_results(self):
    output = os.path.join(self.create_tempdir().full_path, "replicas.json")
    result = subprocess.run([sys.executable, BENCH, "--quick", f"--output={output}"], capture_output=True, text=True,
                            timeout=300, cwd=testing.REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as f:
      report = json.load(f)
    results = report["results"]
    self.assertEqual(set(results["images_per_sec"]), {"1_replicas", "2_replicas"})
    self.assertTrue(all(v > 0 for v in results["images_per_sec"].values()))
    self.assertGreater(results["bank_write_ms"]["with_gather"], 0.0)
    self.assertIn("gather_ms_per_step", results)
    self.assertIn("| replicas (logical CPUs) | images/s | step ms |", result.stdout)

  def test_odd_batch_is_refused(self):
    result = subprocess.run([sys.executable, BENCH, "--quick", "--batch_size=15", "--output=/dev/null"],
                            capture_output=True, text=True, timeout=120, cwd=testing.REPO_ROOT)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("--batch_size must be even", result.stderr)


if __name__ == "__main__":
  tf.test.main()
