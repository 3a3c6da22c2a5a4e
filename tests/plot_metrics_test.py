"""tools/plot_metrics.py: a readable PNG from a run's records; a clear error without them."""

from __future__ import annotations

import json
import os
import subprocess

from tests import testing

from absl.testing import absltest
from PIL import Image

SCRIPT = os.path.join(testing.REPO_ROOT, "tools", "plot_metrics.py")


class PlotMetricsTest(absltest.TestCase):

  def _run(self, model_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([testing.python(), SCRIPT, f"--model_dir={model_dir}", *extra], capture_output=True,
                          text=True, timeout=120)

  def test_writes_a_png_of_the_curves(self):
    model_dir = self.create_tempdir()
    records = [{"epoch": e, "loss": 10.0 - e, "knn_top1": 0.1 * e if e % 2 else None} for e in range(1, 6)]
    model_dir.create_file("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    model_dir.create_file("final_metrics.json", json.dumps({"epoch": 5, "knn_top1": 0.61}))
    output = os.path.join(model_dir.full_path, "out.png")
    result = self._run(model_dir.full_path, f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    with Image.open(output) as image:
      self.assertEqual(image.format, "PNG")
      self.assertGreater(image.size[0], 600)

  def test_minutes_axis_with_a_baseline(self):
    model_dir = self.create_tempdir()
    records = [{"epoch": e, "loss": 10.0 - e, "knn_top1": 0.1 * e, "time": {"wall_seconds": 60.0 * e}}
               for e in range(1, 4)]
    model_dir.create_file("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    model_dir.create_file("final_metrics.json", json.dumps({"epoch": 3, "knn_top1": 0.4,
                                                            "time": {"wall_seconds": 200.0}}))
    output = os.path.join(model_dir.full_path, "minutes.png")
    result = self._run(model_dir.full_path, f"--output={output}", "--x=minutes", "--baselines=raw pixels=0.79")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    with Image.open(output) as image:
      self.assertEqual(image.format, "PNG")

  def test_minutes_without_wall_times_and_bad_baselines_are_named(self):
    model_dir = self.create_tempdir()
    model_dir.create_file("metrics.jsonl", json.dumps({"epoch": 1, "loss": 9.0, "knn_top1": 0.2}) + "\n")
    result = self._run(model_dir.full_path, "--x=minutes")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--x=minutes: the run's records have no wall time", result.stderr)
    result = self._run(model_dir.full_path, "--baselines=pixels")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--baselines: expected NAME=TOP1", result.stderr)

  def test_missing_records_name_the_flag(self):
    result = self._run(self.create_tempdir().full_path)
    self.assertEqual(result.returncode, 2)
    self.assertIn("--model_dir", result.stderr)
    self.assertIn("metrics.jsonl", result.stderr)


if __name__ == "__main__":
  absltest.main()
