"""bench/recipe_ablation.py end to end on smoke.flags: one-epoch variants, the table, JSON and plot; reruns skip."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import tensorflow as tf

from tests import testing
from tf_instdisc.cli import train

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
    for run, epochs in (("paper_recipe", 7), ("paper_recipe.seed2", 9)):  # Seed 2's run chose its own epochs.
      os.makedirs(os.path.join(root, run))
      with open(os.path.join(root, run, "config.json"), "w") as f:
        json.dump({"train": {"epochs": epochs}}, f)
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
                                                 # A seed's run takes the epochs of its source's run of that seed.
                                                 "lever_seed2": ["--train_minutes=0", "--epochs=9"],
                                                 "order_seeds_finished": ["crops_0.9"],
                                                 "order_seed_missing": (
                                                     "--epochs_of=paper_recipe is not one of --variants (crops_0.9) "
                                                     f"nor a finished run in --root={root} (no paper_recipe.seed1)"),
                                                 # Against epochs only when all runs but one variant's (one per
                                                 # seed) train another's epochs.
                                                 "axes": ["epoch", "epoch", "minutes", "minutes", "minutes",
                                                          "epoch", "minutes"]})

  def test_seeds_train_one_run_each_and_report_the_mean_and_standard_deviation(self):
    root = self.create_tempdir().full_path
    result = subprocess.run([testing.python(), "-c", _SEEDS, root], cwd=testing.REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    report = json.loads(result.stdout.splitlines()[-1])  # After the script's "training ..." / "scoring ..." lines.
    self.assertIn("training paper_recipe.seed4: --train_minutes=1 --lr_schedule=cosine", result.stdout)
    # One train.py run per seed, each in its own dir, with --seed for all but seed 0 (train.py's default).
    self.assertEqual(report["trained"], [[os.path.join(root, "paper_recipe"), None],
                                         [os.path.join(root, "paper_recipe.seed1"), "--seed=1"],
                                         [os.path.join(root, "paper_recipe.seed4"), "--seed=4"]])
    self.assertEqual(report["runs"], ["paper_recipe", "paper_recipe.seed1", "paper_recipe.seed4"])
    scores = np.array([[0.80, 0.81, 0.82, 0.83], [0.84, 0.85, 0.86, 0.87], [0.89, 0.90, 0.91, 0.92]])  # As faked.
    (summary,) = report["summary"]
    self.assertEqual((summary["name"], summary["seeds"]), ("paper_recipe", [0, 1, 4]))
    self.assertAllClose([summary["mean"][str(k)] for k in (10, 20, 50, 200)], scores.mean(axis=0))
    self.assertAllClose([summary["sd"][str(k)] for k in (10, 20, 50, 200)], scores.std(axis=0, ddof=1))
    self.assertIn("| paper_recipe (seed 4) |", report["table"])
    self.assertIn(f"| **paper_recipe, mean of 3 seeds** | +/- the sample s.d. | | | | | "
                  f"{100 * scores[:, 0].mean():.2f} +/- {100 * scores[:, 0].std(ddof=1):.2f} |", report["table"])

  def test_seeds_tabulate_finished_runs_per_seed_through_main(self):
    # The script's own loop over --seeds, on finished runs (train.py and evaluate.py are skipped for them).
    root = self.create_tempdir().full_path
    for run, top1 in (("paper_recipe", 0.80), ("paper_recipe.seed3", 0.86)):
      os.makedirs(os.path.join(root, run, "eval"))
      with open(os.path.join(root, run, "final_metrics.json"), "w") as f:
        json.dump({"time": {"train_seconds": 60.0, "wall_seconds": 66.0}}, f)
      with open(os.path.join(root, run, "config.json"), "w") as f:
        json.dump({"train": {"epochs": 2}}, f)
      with open(os.path.join(root, run, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps({"epoch": e, "loss": 9.0 - e, "knn_top1": top1,
                                          "time": {"wall_seconds": 30.0 * e}}) for e in (1, 2)))
      with open(os.path.join(root, run, "eval", "knn.json"), "w") as f:  # Written after final_metrics.json.
        json.dump({"features": {kind: {f"k={k}": {"top1": top1} for k in (10, 20, 50, 200)}
                                for kind in ("embedding", "pixels")}}, f)
    result = run_ablation(f"--root={root}", "--variants=paper_recipe", "--seeds=0,3", "--epochs=2")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertNotIn("training", result.stdout)
    self.assertIn("paper_recipe.seed3: k=200 86.00%", result.stdout)
    with open(os.path.join(root, "recipe_ablation.md")) as f:
      table = f.read()
    self.assertIn("| paper_recipe (seed 3) |", table)
    self.assertIn(f"83.00 +/- {100 * np.std([0.80, 0.86], ddof=1):.2f}", table)
    self.assertGreater(os.path.getsize(os.path.join(root, "recipe_ablation.png")), 1000)

  def test_seeds_must_be_distinct_non_negative_integers(self):
    root = os.path.join(self.create_tempdir().full_path, "never")
    for seeds in ("1,1", "-1", "one"):
      with self.subTest(seeds):
        result = run_ablation(f"--root={root}", "--variants=paper_recipe", f"--seeds={seeds}")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--seeds: expected distinct integers >= 0", result.stderr)
        self.assertFalse(os.path.exists(root))

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
def refusal(call):
  try:
    call()
  except ValueError as e:
    return str(e)
  return None

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
                  "lever_seed2": script.budget_flags(lever, root, 10.0, "paper_recipe", 0, 2),
                  "order_seeds_finished": script.training_order(["crops_0.9"], root, "paper_recipe", (0, 2)),
                  "order_seed_missing": refusal(lambda: script.training_order(["crops_0.9"], root, "paper_recipe",
                                                                              (0, 1))),
                  "axes": [script.plot_axis([{"name": n} for n in names], epochs_of) for names, epochs_of in (
                      (["paper_recipe", "bfloat16"], ""), (["paper_recipe", "crops_0.9"], "paper_recipe"),
                      (["paper_recipe", "crops_0.9"], ""), (["paper_recipe", "crops_0.9", "bfloat16"], ""),
                      (["paper_recipe"], ""))] + [
                      script.plot_axis([{"name": n, "seed": s} for n in ("paper_recipe", "crops_0.9") for s in (0, 1)],
                                       epochs_of) for epochs_of in ("paper_recipe", "")]}))
"""

# train_and_score with train.py and evaluate.py faked (they write the files the script reads): seeds 0, 1 and 4.
_SEEDS = _LOAD + """
root = sys.argv[1]
script.FLAGS(["recipe_ablation.py", f"--root={root}"])
trained, scores = [], {0: 0.80, 1: 0.84, 4: 0.89}

def fake_run(command, log_path):
  model_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--model_dir="))
  seed = int(next((a.split("=", 1)[1] for a in command if a.startswith("--seed=")), 0))
  if command[1] == "train.py":
    trained.append([model_dir, next((a for a in command if a.startswith("--seed=")), None)])
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "final_metrics.json"), "w") as f:
      json.dump({"time": {"train_seconds": 60.0, "wall_seconds": 66.0}}, f)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
      json.dump({"train": {"epochs": 3, "seed": seed}}, f)
  else:
    with open(os.path.join(model_dir, "config.json")) as f:
      seed = json.load(f)["train"]["seed"]
    os.makedirs(os.path.join(model_dir, "eval"))
    top1 = {f"k={k}": {"top1": round(scores[seed] + 0.01 * i, 4)} for i, k in enumerate(script.KS)}
    with open(os.path.join(model_dir, "eval", "knn.json"), "w") as f:
      json.dump({"features": {"embedding": top1, "pixels": top1}}, f)

script._run = fake_run
rows = [script.train_and_score(script.VARIANTS["paper_recipe"], root, 1.0, [], seed=s) for s in (0, 1, 4)]
output = os.path.join(root, "table")
script.write_table(rows, output, "python bench/recipe_ablation.py --seeds=0,1,4")
with open(output + ".md") as f:
  table = f.read()
with open(output + ".json") as f:
  summary = json.load(f)["seed_summary"]
print(json.dumps({"trained": trained, "runs": [r["run"] for r in rows], "summary": summary, "table": table}))
"""

if __name__ == "__main__":
  tf.test.main()
