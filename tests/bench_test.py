"""bench/train_step_bench.py: the --quick smoke run writes a complete JSON report; bad flags fail fast."""

from __future__ import annotations

import json
import os
import subprocess

import tensorflow as tf

from tests import testing

SCRIPT = os.path.join("bench", "train_step_bench.py")
OBJECTIVES = ("nce", "softmax", "parametric")
PRECISIONS = ("fp32", "bf16")
ROW_KEYS = ("arch", "precision", "objective", "bank_size", "batch_size", "images_per_sec", "encoder_images_per_sec",
            "head_bank_share", "step_seconds", "encoder_step_seconds", "steps_per_repeat", "repeats", "loss",
            "flops_per_image", "gflops", "peak_fraction", "encoder_gflops", "encoder_peak_fraction")
PEAK_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# A hang guard, not the budget: --quick takes well under a minute on a quiet 2-core machine.
TIMEOUT_SECONDS = 300


def run_bench(*args: str, log_level: str = "2") -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": log_level, "CUDA_VISIBLE_DEVICES": ""}
  return subprocess.run([testing.python(), SCRIPT, *args], cwd=testing.REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_SECONDS, check=False)


class TrainStepBenchTest(tf.test.TestCase):

  def test_quick_writes_every_config_with_positive_rates(self):
    output = os.path.join(self.get_temp_dir(), "results", "train_step.json")
    result = run_bench("--quick", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as f:
      report = json.load(f)
    for key in ("cpu_count", "tensorflow", "date", "load_average_at_start"):
      self.assertIn(key, report["machine"])
    self.assertEqual(report["machine"]["tensorflow"], tf.__version__)
    self.assertIn("input cost ~0", report["input"])
    self.assertEqual(report["official_pytorch_reference"]["images_per_sec"], [51.0, 56.0])
    self.assertTrue(report["settings"]["quick"])
    # The matmul peak, measured before and after the steps; the best of both rates the rows.
    peak = report["peak_gflops"]
    self.assertCountEqual(peak, ("float32", "bfloat16"))
    for dtype in peak:
      self.assertGreater(peak[dtype], 0.0)
      self.assertEqual(peak[dtype], max(report["peak"][when]["gflops"][dtype] for when in ("before_steps",
                                                                                         "after_steps")))
    self.assertEqual(report["peak"]["before_steps"]["matmul"], "512x512 @ 512x512")
    self.assertIn("2*D*(K+1)", report["flops_convention"])
    rows = report["results"]
    self.assertCountEqual([(r["objective"], r["precision"]) for r in rows],
                          [(o, p) for o in OBJECTIVES for p in PRECISIONS])
    for row in rows:
      self.assertNotIn("error", row)
      for key in ROW_KEYS:
        self.assertIn(key, row)
      self.assertEqual((row["arch"], row["bank_size"]), ("convnet_small", 1000))
      self.assertGreater(row["images_per_sec"], 0.0)
      self.assertGreater(row["encoder_images_per_sec"], 0.0)
      self.assertLess(row["head_bank_share"], 1.0)
      self.assertTrue(row["loss_finite"])
      flops = row["flops_per_image"]
      self.assertGreater(flops["network"], 0)
      self.assertEqual(flops["total"], flops["forward"] + flops["backward"])
      self.assertGreater(flops["total"], flops["network"])  # The objective adds its own matmuls.
      self.assertAlmostEqual(row["gflops"], flops["total"] * row["images_per_sec"] / 1e9)
      self.assertAlmostEqual(row["encoder_gflops"], flops["network"] * row["encoder_images_per_sec"] / 1e9)
      self.assertGreater(row["gflops"], 0.0)
      self.assertAlmostEqual(row["peak_fraction"], row["gflops"] / peak[PEAK_DTYPES[row["precision"]]])
      self.assertAlmostEqual(row["encoder_peak_fraction"],
                             row["encoder_gflops"] / peak[PEAK_DTYPES[row["precision"]]])
      self.assertGreater(row["peak_fraction"], 0.0)
    self.assertIn("| arch | precision | objective | bank rows |", result.stdout)
    self.assertIn("| MFLOP/img | GFLOP/s | peak fraction |", result.stdout)
    for precision, dtype in PEAK_DTYPES.items():
      self.assertIn(f"| peak: matmul 512x512 @ 512x512 | {precision} | | | | | | ", result.stdout)
      self.assertIn(f"| {peak[dtype]:.1f} | 100% |", result.stdout)
    self.assertIn("QUOTED from another run, not measured here", result.stdout)

  def test_the_fashion_mnist_step_is_measured_at_its_width_image_shape_and_pool_grids(self):
    output = os.path.join(self.get_temp_dir(), "fashion.json")
    result = run_bench("--quick", "--objectives=nce", "--precisions=fp32", "--width_multiplier=0.5",
                       "--image_shape=28,28,1", "--pool_grids=1,4", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as f:
      report = json.load(f)
    self.assertEqual((report["settings"]["width_multiplier"], report["settings"]["image_shape"],
                      report["settings"]["pool_grids"]), (0.5, ["28", "28", "1"], ["1", "4"]))
    self.assertIn("synthetic float32 28x28x1 batches", report["input"])
    self.assertEqual([row["pool_grid"] for row in report["results"]], [1, 4])  # One case per grid.
    for row in report["results"]:
      self.assertNotIn("error", row)
      self.assertGreater(row["images_per_sec"], 0.0)
    # The grid's 4x4 cells feed 16x the features to the projection: only the head's count differs.
    one, four = (row["flops_per_image"] for row in report["results"])
    self.assertEqual(four["backbone_forward"], one["backbone_forward"])
    self.assertEqual(four["head_forward"], 16 * one["head_forward"])
    self.assertIn("| convnet_small | fp32 |", result.stdout)
    self.assertIn("| convnet_small, pool grid 4 | fp32 |", result.stdout)

  def test_xla_encoder_compiles_the_baseline_step_with_xla(self):
    output = os.path.join(self.get_temp_dir(), "xla.json")
    result = run_bench("--quick", "--objectives=nce", "--precisions=fp32", "--xla_encoder", f"--output={output}",
                       log_level="0")  # TensorFlow's INFO line says when XLA compiled a cluster.
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("Compiled cluster using XLA", result.stderr)
    with open(output) as f:
      report = json.load(f)
    self.assertTrue(report["settings"]["xla_encoder"])
    [row] = report["results"]
    self.assertNotIn("error", row)
    self.assertGreater(row["encoder_images_per_sec"], 0.0)
    without = run_bench("--quick", "--objectives=nce", "--precisions=fp32", f"--output={output}", log_level="0")
    self.assertEqual(without.returncode, 0, without.stderr[-3000:])
    self.assertNotIn("Compiled cluster using XLA", without.stderr)

  def test_bad_flag_fails_before_measuring(self):
    output = os.path.join(self.get_temp_dir(), "bad.json")
    result = run_bench("--quick", "--num_negatives=5000", f"--output={output}")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--num_negatives", result.stderr)
    self.assertFalse(os.path.exists(output))
    for bad in ("--image_shape=28,28", "--image_shape=28,x,1", "--width_multiplier=0", "--pool_grids=0",
                "--pool_grids=2,x", "--bank_sizes=x", "--bank_sizes=0", "--peak_matmul_size=0", "--peak_seconds=0",
                "--peak_repeats=0"):
      with self.subTest(bad):
        result = run_bench("--quick", bad, f"--output={output}")
        self.assertEqual(result.returncode, 2)
        self.assertIn(bad.split("=")[0], result.stderr)
        self.assertFalse(os.path.exists(output))


if __name__ == "__main__":
  tf.test.main()
