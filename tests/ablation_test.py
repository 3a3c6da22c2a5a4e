"""The ablation studies' variants and summary, and ablate.py end to end on smoke.flags (one epoch per variant)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unittest

from tests import testing

import tensorflow as tf  # noqa: E402

from tf_instdisc import ablation  # noqa: E402
from tf_instdisc import results  # noqa: E402


class VariantsTest(tf.test.TestCase):

  def test_studies_follow_the_paper(self):
    plan = ablation.variants(ablation.STUDIES, fractions=(10, 30), num_train=60000)
    by_study = {s: [v.setting for v in plan if v.study == s] for s in ablation.STUDIES}
    self.assertEqual(by_study["objective"], ["nce_m4096", "softmax", "parametric", "nce_m1", "nce_m10", "nce_m512"])
    self.assertEqual(by_study["embedding"], ["32", "64", "256", "128"])
    self.assertEqual(by_study["fraction"], ["10%", "30%", "100%"])
    self.assertEqual(by_study["proximal"], ["momentum 0.5", "no momentum", "proximal lambda=30"])
    names = {v.name: v.flags for v in plan}
    self.assertEqual(names["frac10"], ("--objective=nce", "--num_negatives=4096", "--max_train_examples=6000"))
    self.assertEqual(names["proximal30"][-2:], ("--bank_momentum=0", "--proximal_lambda=30"))
    self.assertLen({v.name for v in plan if v.name == "nce_m4096"}, 1)
    # Every Table 1 setting has the paper's kNN and SVM numbers.
    for v in plan:
      if v.study == "objective":
        self.assertIsNotNone(results.paper_number("objective", v.setting, "knn"), v.setting)

  def test_bad_requests_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--studies"):
      ablation.variants(("objective", "depth"))
    with self.assertRaisesRegex(ValueError, "--fractions"):
      ablation.variants(("fraction",), fractions=(150,), num_train=100)
    with self.assertRaisesRegex(ValueError, "--fractions: 1% is 600 images"):
      ablation.variants(("fraction",), fractions=(1,), num_train=60000)

  def test_markdown_has_a_table_per_study(self):
    rows = [dict(study="embedding", setting="32", knn_top1=0.7, knn_top5=0.99, linear_top1=None, paper_knn=34.0,
                 paper_linear=None, paper_where="Table 4", epochs=3, train_seconds=125)]
    text = ablation.markdown(rows)
    self.assertIn("### embedding", text)
    self.assertIn("| 32 | 70.00 | 99.00 |  | 34.0 |  | Table 4 | 3 | 2m05s |", text)
    self.assertNotIn("### objective", text)


@unittest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class AblateCommandTest(tf.test.TestCase):

  def _ablate(self, root: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "ablate.py", f"--root={root}", "--base_flagfile=smoke.flags", "--epochs=1",
               "--num_negatives=64", "--studies=fraction,proximal", "--fractions=50", "--eval_train_examples=1024",
               "--linear_epochs=5", "--train_flags=--max_eval_examples=256,--eval_every_epochs=1", *extra]
    return subprocess.run(command, cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=900)

  def test_runs_every_variant_once_and_resumes_without_redoing_them(self):
    root = self.create_tempdir().full_path
    result = self._ablate(root)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(os.path.join(root, "ablation.json")) as f:
      rows = json.load(f)["rows"]
    self.assertEqual([(r["study"], r["setting"]) for r in rows],
                     [("fraction", "50%"), ("fraction", "100%"), ("proximal", "momentum 0.5"),
                      ("proximal", "no momentum"), ("proximal", "proximal lambda=30")])
    for row in rows:
      self.assertEqual(row["epochs"], 1)
      self.assertGreater(row["knn_top1"], 0.3, row)
      self.assertGreater(row["linear_top1"], 0.3, row)
    self.assertEqual(rows[0]["paper_knn"], None)  # The paper has no 50% row.
    with open(os.path.join(root, "frac50", "config.json")) as f:
      self.assertEqual(json.load(f)["data"]["max_train_examples"], 512)
    table = os.path.join(root, "results.md")
    self.assertLen(results.read_table(table), 8)  # knn + linear of the 4 distinct runs.
    for name in ("fraction.png", "proximal.png", "proximal_curves.png", "ablation.md"):
      self.assertTrue(os.path.exists(os.path.join(root, name)), name)
    start = time.time()
    again = self._ablate(root)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertLen(results.read_table(table), 8)  # Nothing retrained or re-evaluated.
    self.assertLess(time.time() - start, 60)

  def test_bad_flags_are_named_before_anything_trains(self):
    for flag in ("--studies=depth", "--protocols=knn,svm", "--fractions=ten", "--fractions=150",
                 "--base_flagfile=missing.flags"):
      with self.subTest(flag=flag):
        root = self.create_tempdir().full_path
        result = self._ablate(root, flag)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertIn(flag.split("=")[0], result.stderr)
        self.assertEqual(os.listdir(root), [])


if __name__ == "__main__":
  tf.test.main()
