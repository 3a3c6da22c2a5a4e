"""Recipes as public API: tf_instdisc.recipe(name, **overrides) is the config train.py builds from the same flagfile,
and the one rule for --epochs against --train_minutes, in the library and on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from tests import testing
from tf_instdisc import recipes
from tf_instdisc.cli import train


def _train_config(*args: str):
  """train.py's config for these flags (the length rule applied, as main() does)."""
  train.FLAGS.unparse_flags()
  argv = ["train.py", *args]
  train.FLAGS(argv)
  decided = train.length_of_run(argv)
  return train.config_from_flags(), decided


class RecipeTest(parameterized.TestCase):

  def tearDown(self):
    train.FLAGS.unparse_flags()
    super().tearDown()

  @parameterized.parameters(*recipes.NAMES)
  def test_a_shipped_recipe_is_the_config_train_py_builds_from_its_file(self, name):
    expected, _ = _train_config(f"--flagfile={recipes.path(name)}", "--model_dir=/tmp/m")
    mine = recipes.recipe(name, model_dir="/tmp/m")
    self.assertEqual(mine, expected)

  def test_the_shipped_names_are_the_flagfiles_in_the_package(self):
    self.assertEqual(set(recipes.NAMES), {"cifar10", "fashion_mnist", "imagenet", "smoke"})
    for name in recipes.NAMES:
      self.assertTrue(os.path.isfile(recipes.path(name)))
      # The checkout's top-level flagfile is the same file.
      self.assertEqual(os.path.realpath(os.path.join(testing.REPO_ROOT, f"{name}.flags")),
                       os.path.realpath(recipes.path(name)))

  def test_overrides_are_typed_and_applied_after_the_file(self):
    cfg = recipes.recipe("cifar10", batch_size=64, lr_decay_epochs=[10, 20], learning_rate=1, horizontal_flip=True)
    self.assertEqual(cfg.train.batch_size, 64)
    self.assertEqual(cfg.optim.lr_decay_epochs, (10, 20))
    self.assertEqual(cfg.optim.learning_rate, 1.0)
    self.assertIsInstance(cfg.optim.learning_rate, float)
    self.assertTrue(cfg.augment.horizontal_flip)
    self.assertFalse(recipes.recipe("cifar10").augment.horizontal_flip)  # --nohorizontal_flip in the file.

  def test_a_flagfile_path_nested_flagfiles_and_booleans(self):
    folder = self.create_tempdir()
    inner = folder.create_file("inner.flags", "# comment\n--temperature=0.3\n--nohead_batchnorm\n")
    outer = folder.create_file("outer.flags", f"--flagfile={inner.full_path}\n--epochs=3\n--head_batchnorm=true\n")
    cfg = recipes.recipe(outer.full_path)
    self.assertEqual((cfg.loss.temperature, cfg.train.epochs, cfg.model.head_batchnorm), (0.3, 3, True))

  @parameterized.named_parameters(
      ("unknown_name", ("no_such_recipe",), {}, "--recipe: 'no_such_recipe' is neither a shipped recipe"),
      ("unknown_field", ("smoke",), {"temprature": 0.1}, "temprature: not a recipe field"),
      ("invalid_value", ("smoke",), {"temperature": -1.0}, "--temperature"),
  )
  def test_refusals_name_what_is_wrong(self, args, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      recipes.recipe(*args, **overrides)

  def test_a_bad_flagfile_line_is_named(self):
    bad = self.create_tempdir().create_file("bad.flags", "--epochs=3\ntemperature=0.1\n")
    with self.assertRaisesRegex(ValueError, r"bad.flags line 2: expected --name=value"):
      recipes.recipe(bad.full_path)
    typed = self.create_tempdir().create_file("typed.flags", "--epochs=three\n")
    with self.assertRaisesRegex(ValueError, "--epochs: cannot read 'three'"):
      recipes.recipe(typed.full_path)
    loop = self.create_tempdir().create_file("loop.flags")
    loop.write_text(f"--flagfile={loop.full_path}\n")
    with self.assertRaisesRegex(ValueError, "includes itself"):
      recipes.recipe(loop.full_path)


class LengthRuleTest(parameterized.TestCase):
  """One rule: of --epochs and --train_minutes, the one given later decides."""

  def tearDown(self):
    train.FLAGS.unparse_flags()
    super().tearDown()

  def test_the_rule(self):
    self.assertEqual(recipes.length_rule([("epochs", 5)]), ({}, ""))
    self.assertEqual(recipes.length_rule([("train_minutes", 45.0), ("epochs", 12)])[0], {"train_minutes": 0.0})
    self.assertIn("--epochs=12 given after --train_minutes=45 decides",
                  recipes.length_rule([("train_minutes", 45.0), ("epochs", 12)])[1])
    overrides, decided = recipes.length_rule([("epochs", 12), ("train_minutes", 45.0)])
    self.assertEqual(overrides, {})
    self.assertIn("--train_minutes=45 given after --epochs=12 decides", decided)
    self.assertEqual(recipes.length_rule([("train_minutes", 45.0), ("epochs", 12), ("train_minutes", 0.0)]),
                     ({}, ""))

  def test_library_epochs_after_the_files_budget(self):
    cfg = recipes.recipe("fashion_mnist", epochs=12)
    self.assertEqual((cfg.train.epochs, cfg.train.train_minutes), (12, 0.0))
    cfg = recipes.recipe("fashion_mnist", epochs=12, train_minutes=30)
    self.assertEqual(cfg.train.train_minutes, 30.0)
    self.assertEqual(recipes.recipe("fashion_mnist").train.train_minutes, 45.0)

  def test_command_line_order_decides(self):
    flagfile = f"--flagfile={recipes.path('fashion_mnist')}"
    cfg, decided = _train_config(flagfile, "--epochs=20", "--model_dir=/tmp/m")
    self.assertEqual((cfg.train.epochs, cfg.train.train_minutes), (20, 0.0))
    self.assertIn("--epochs=20 given after --train_minutes=45 decides", decided)
    cfg, decided = _train_config("--epochs=20", flagfile, "--model_dir=/tmp/m")
    self.assertEqual(cfg.train.train_minutes, 45.0)
    self.assertIn("--train_minutes=45 given after --epochs=20 decides", decided)
    cfg, decided = _train_config(flagfile, "--model_dir=/tmp/m")
    self.assertEqual((cfg.train.train_minutes, decided), (45.0, ""))
    cfg, _ = _train_config(flagfile, "--epochs", "7", "--model_dir=/tmp/m")  # The two-word spelling too.
    self.assertEqual((cfg.train.epochs, cfg.train.train_minutes), (7, 0.0))


class RecipeCommandTest(absltest.TestCase):
  """`python train.py --recipe=NAME` through the command's own start (cli.expand_recipe)."""

  def _run(self, *args: str) -> subprocess.CompletedProcess:
    # As a user runs it: without the TF_CPP_MIN_LOG_LEVEL that tests/testing.py sets (the command sets its own).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=testing.REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env=env)

  def test_an_unknown_recipe_is_refused_naming_the_flag(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "run")
    result = self._run("--recipe=fashion", f"--model_dir={model_dir}")
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertIn("--recipe: 'fashion' is neither a shipped recipe (cifar10, fashion_mnist, imagenet, smoke)",
                  result.stderr)
    self.assertFalse(os.path.exists(model_dir))

  def test_a_recipe_by_name_trains_with_later_flags_winning(self):
    model_dir = os.path.join(self.create_tempdir().full_path, "run")
    result = self._run("--recipe=fashion_mnist", "--max_train_examples=256", "--max_eval_examples=64",
                       "--batch_size=64", "--width_multiplier=0.25", "--epochs=1", "--nofinal_eval",
                       "--eval_every_epochs=0", f"--model_dir={model_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("--epochs=1 given after --train_minutes=45 decides", result.stderr)
    self.assertIn("--num_negatives: 4096 capped to 128", result.stderr)
    self.assertNotIn("cuInit", result.stderr)  # The quiet start.
    self.assertNotIn("oneDNN custom operations", result.stderr)
    with open(os.path.join(model_dir, "config.json")) as f:
      recorded = json.load(f)
    self.assertEqual((recorded["train"]["epochs"], recorded["train"]["train_minutes"]), (1, 0.0))
    self.assertEqual(recorded["model"]["pool_grid"], recipes.recipe("fashion_mnist").model.pool_grid)


if __name__ == "__main__":
  absltest.main()
