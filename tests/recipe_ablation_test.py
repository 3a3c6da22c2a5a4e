"""bench/recipe_ablation.py end to end on smoke.flags: one-epoch variants, the table, JSON and plot; reruns skip."""

from __future__ import annotations

import json
import os
import subprocess

import tensorflow as tf

import train
from tests import testing

SCRIPT = os.path.join("bench", "recipe_ablation.py")
TIMEOUT_SECONDS = 900  # A hang guard: two one-epoch smoke trainings and their kNN evaluations.


def run_ablation(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  return subprocess.run([testing.python(), SCRIPT, *args], cwd=testing.REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_SECONDS, check=False)


class RecipeAblationTest(tf.test.TestCase):

  def test_variants_train_score_and_report_then_a_rerun_skips_them(self):
    if not testing.has_fashion_mnist():
      self.skipTest("needs Debian's dataset-fashion-mnist")
    root = self.create_tempdir().full_path
    args = (f"--root={root}", "--base_flagfile=smoke.flags", "--validation_examples=200", "--minutes=0.01",
            "--variants=paper_recipe,two_views_group,bfloat16")
    first = run_ablation(*args)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    self.assertIn("training two_views_group: --train_minutes=0.01 --lr_schedule=cosine", first.stdout)
    self.assertIn("training bfloat16: --train_minutes=0 --epochs=1", first.stdout)  # paper_recipe's epochs.
    with open(os.path.join(root, "recipe_ablation.json")) as f:
      report = json.load(f)
    self.assertEqual([row["name"] for row in report["rows"]], ["paper_recipe", "two_views_group", "bfloat16"])
    for row in report["rows"]:
      self.assertEqual(sorted(row["top1"]), ["backbone", "embedding", "pixels"])
      self.assertEqual(sorted(row["top1"]["embedding"]), ["10", "20", "200", "50"])
      self.assertGreater(row["time"]["wall_seconds"], row["time"]["train_seconds"])
    with open(os.path.join(root, "two_views_group", "config.json")) as f:
      cfg = json.load(f)
    self.assertEqual((cfg["augment"]["views"], cfg["loss"]["group_clusters"]), (2, 32))
    self.assertEqual(cfg["data"]["validation_examples"], 200)
    self.assertEqual(cfg["train"]["train_minutes"], 0.01)
    with open(os.path.join(root, "recipe_ablation.md")) as f:
      table = f.read()
    self.assertIn("| pixels | raw pixels (784)", table)
    self.assertIn("| two_views_group | --views=2 --group_clusters=32", table)
    self.assertTrue(os.path.getsize(os.path.join(root, "recipe_ablation.png")) > 1000)

    again = run_ablation(*args)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertNotIn("training", again.stdout)
    self.assertNotIn("scoring", again.stdout)

  def test_unknown_variant_is_refused_before_anything_runs(self):
    root = os.path.join(self.create_tempdir().full_path, "never")
    result = run_ablation(f"--root={root}", "--variants=paper_recipe,bigger_batch")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--variants: unknown bigger_batch", result.stderr)
    self.assertFalse(os.path.exists(root))

  def test_negative_epochs_are_refused_before_anything_runs(self):
    root = os.path.join(self.create_tempdir().full_path, "never")
    result = run_ablation(f"--root={root}", "--variants=paper_recipe", "--epochs=-3")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--epochs: must be >= 0", result.stderr)
    self.assertFalse(os.path.exists(root))

  def test_epochs_of_must_be_one_of_the_variants(self):
    root = os.path.join(self.create_tempdir().full_path, "never")
    result = run_ablation(f"--root={root}", "--variants=crops_0.9,jitter_0", "--epochs_of=paper_recipe")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--epochs_of=paper_recipe is not one of --variants (crops_0.9, jitter_0)", result.stderr)
    self.assertFalse(os.path.exists(root))
    # A variant whose own epochs come from another run is refused the same way (it used to fail on a missing file).
    result = run_ablation(f"--root={root}", "--variants=bfloat16")
    self.assertEqual(result.returncode, 2)
    self.assertIn("bfloat16 trains the epochs of paper_recipe, which is not one of --variants (bfloat16)",
                  result.stderr)
    self.assertFalse(os.path.exists(root))

  def test_epochs_of_gives_every_other_variant_the_epochs_its_run_chose(self):
    root = self.create_tempdir().full_path
    os.makedirs(os.path.join(root, "paper_recipe"))
    with open(os.path.join(root, "paper_recipe", "config.json"), "w") as f:
      json.dump({"train": {"epochs": 7}}, f)
    # In a process of its own: the script defines absl flags at import, as train.py and evaluate.py do.
    result = subprocess.run([testing.python(), "-c", _BUDGETS, root], cwd=testing.REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    on_minutes = ["--train_minutes=10", "--lr_schedule=cosine"]
    self.assertEqual(json.loads(result.stdout), {"lever": ["--train_minutes=0", "--epochs=7"], "base": on_minutes,
                                                 "lever_alone": on_minutes,
                                                 # Equal compute: 7 / 2 and 7 / 1.75 epochs, rounded.
                                                 "two_views": ["--train_minutes=0", "--epochs=4"],
                                                 "softmax": ["--train_minutes=0", "--epochs=4"],
                                                 # --epochs replaces --minutes only for runs without a source.
                                                 "base_epochs": ["--train_minutes=0", "--epochs=12"],
                                                 "lever_epochs": ["--train_minutes=0", "--epochs=7"],
                                                 "order": ["paper_recipe", "crops_0.9", "jitter_0"],
                                                 "order_alone": ["crops_0.9", "paper_recipe"],
                                                 "order_finished": ["crops_0.9"],
                                                 # Against epochs only when all runs but one train another's epochs.
                                                 "axes": ["epoch", "epoch", "minutes", "minutes", "minutes"]})

  def test_every_variant_is_a_valid_train_config_that_sets_its_flags(self):
    # A typo in a variant's flags would otherwise surface only when its turn comes, maybe an hour into a run.
    result = subprocess.run([testing.python(), "-c", _VARIANT_FLAGS], cwd=testing.REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    variants = json.loads(result.stdout)
    self.assertIn("crops_1.0", variants)
    self.addCleanup(train.FLAGS.unparse_flags)
    for name, variant_flags in variants.items():
      with self.subTest(name):
        train.FLAGS.unparse_flags()
        train.FLAGS(["train.py", f"--flagfile={os.path.join(testing.REPO_ROOT, 'fashion_mnist.flags')}",
                     "--validation_examples=5000", "--monitor_examples=1000", *variant_flags,
                     "--train_minutes=10", "--model_dir=/tmp/unused"])
        cfg = train.config_from_flags()
        for flag in variant_flags:  # Each of the variant's flags has the value it gives (none is shadowed).
          key, _, value = flag.lstrip("-").partition("=")
          if not value:  # A boolean: --name or --noname.
            key, value = (key[2:], False) if key.startswith("no") and key[2:] in train.FLAGS else (key, True)
          expected = train.FLAGS[key].parser.parse(value) if isinstance(value, str) else value
          self.assertEqual(train.FLAGS[key].value, expected, flag)
        self.assertEqual(cfg.data.validation_examples, 5000)

  def test_equal_epoch_runs_are_plotted_against_epochs(self):
    root = self.create_tempdir().full_path
    for name in ("paper_recipe", "crops_0.9"):
      os.makedirs(os.path.join(root, name))
      with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:  # No wall times: x="minutes" would refuse.
        f.write("\n".join(json.dumps({"epoch": e, "loss": 9.0 - e, "knn_top1": 0.5 + 0.1 * e}) for e in (1, 2)))
    result = subprocess.run([testing.python(), "-c", _PLOT, root], cwd=testing.REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertGreater(os.path.getsize(os.path.join(root, "plot.png")), 1000)
    self.assertIn("has no 'minutes'", result.stdout)  # Against minutes the same runs are refused.


# The script in a process of its own (it defines absl flags at import, as train.py does), as `script`.
_LOAD = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("recipe_ablation", "bench/recipe_ablation.py")
script = importlib.util.module_from_spec(spec)
sys.modules["recipe_ablation"] = script
spec.loader.exec_module(script)
"""

_PLOT = _LOAD + """
root = sys.argv[1]
rows = [{"name": n, "top1": {}} for n in ("paper_recipe", "crops_0.9")]
script.write_plot(rows, root, os.path.join(root, "plot"), x="epoch")
try:
  script.write_plot(rows, root, os.path.join(root, "minutes"), x="minutes")
except ValueError as e:
  print(e)
"""

_VARIANT_FLAGS = _LOAD + """
print(json.dumps({name: list(variant.flags) for name, variant in script.VARIANTS.items()}))
"""

_BUDGETS = _LOAD + """
root, lever, base = sys.argv[1], script.VARIANTS["crops_0.9"], script.VARIANTS["paper_recipe"]
print(json.dumps({"lever": script.budget_flags(lever, root, 10.0, "paper_recipe"),
                  "base": script.budget_flags(base, root, 10.0, "paper_recipe"),
                  "lever_alone": script.budget_flags(lever, root, 10.0),
                  "two_views": script.budget_flags(script.VARIANTS["two_views"], root, 10.0, "paper_recipe"),
                  "softmax": script.budget_flags(script.VARIANTS["softmax"], root, 10.0, "paper_recipe"),
                  "base_epochs": script.budget_flags(base, root, 10.0, "paper_recipe", 12),
                  "lever_epochs": script.budget_flags(lever, root, 10.0, "paper_recipe", 12),
                  "order": script.training_order(["crops_0.9", "jitter_0", "paper_recipe"], root, "paper_recipe"),
                  "order_alone": script.training_order(["crops_0.9", "paper_recipe"], root),
                  # paper_recipe's run is finished in root: crops_0.9 may take its epochs without it.
                  "order_finished": script.training_order(["crops_0.9"], root, "paper_recipe"),
                  "axes": [script.plot_axis([{"name": n} for n in names], epochs_of) for names, epochs_of in (
                      (["paper_recipe", "bfloat16"], ""), (["paper_recipe", "crops_0.9"], "paper_recipe"),
                      (["paper_recipe", "crops_0.9"], ""), (["paper_recipe", "crops_0.9", "bfloat16"], ""),
                      (["paper_recipe"], ""))]}))
"""

if __name__ == "__main__":
  tf.test.main()
