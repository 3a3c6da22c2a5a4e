"""Config validation, dict round trips, the flag <-> field mapping of train.py, hygiene of tf_instdisc/, CLI errors."""

from tests import testing  # noqa: I001  (splits the CPU before TensorFlow starts)

import ast
import collections
import dataclasses
import glob
import json
import os
import subprocess
import tempfile
import time

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from tf_instdisc import config as config_lib

from tf_instdisc.cli import train

PACKAGE_DIR = os.path.join(testing.REPO_ROOT, "tf_instdisc")
FORBIDDEN_MODULE_NAMES = ("utils", "util", "common", "helpers", "helper")
CLI_TIMEOUT_SECONDS = 60  # A hang guard; the runs below take well under a second on a quiet machine.


def _tmpdir(test: tf.test.TestCase) -> str:
  """A fresh directory removed after the test (absltest's create_tempdir needs parsed flags, pytest has none)."""
  directory = tempfile.TemporaryDirectory()
  test.addCleanup(directory.cleanup)
  return directory.name


# ------------------------------------------------------------------------------------------------------- validation
class ValidateTest(tf.test.TestCase, parameterized.TestCase):

  def test_valid_config_is_returned(self):
    cfg = testing.tiny_config()
    self.assertIs(config_lib.validate(cfg), cfg)

  def test_defaults_with_model_dir_are_valid(self):
    cfg = config_lib.Config(train=config_lib.TrainConfig(model_dir="/tmp/x"))
    self.assertIs(config_lib.validate(cfg), cfg)

  @parameterized.named_parameters(
      ("unknown_arch", {"arch": "resnet1000"}, "arch"),
      ("unknown_objective", {"objective": "triplet"}, "objective"),
      ("zero_temperature", {"temperature": 0.0}, "temperature"),
      ("negative_temperature", {"temperature": -0.07}, "temperature"),
      ("zero_num_negatives", {"num_negatives": 0}, "num_negatives"),
      ("negative_num_negatives", {"num_negatives": -5}, "num_negatives"),
      ("bank_momentum_one", {"bank_momentum": 1.0}, "bank_momentum"),
      ("bank_momentum_above_one", {"bank_momentum": 1.5}, "bank_momentum"),
      ("negative_bank_momentum", {"bank_momentum": -0.1}, "bank_momentum"),
      ("crop_scale_min_above_max", {"crop_scale_min": 0.9, "crop_scale_max": 0.5}, "crop_scale_min"),
      ("zero_crop_scale_min", {"crop_scale_min": 0.0}, "crop_scale_min"),
      ("crop_scale_max_above_one", {"crop_scale_max": 1.5}, "crop_scale_min"),
      ("empty_model_dir", {"model_dir": ""}, "model_dir"),
      ("zero_batch_size", {"batch_size": 0}, "batch_size"),
      ("unknown_strategy", {"strategy": "tpu_pod"}, "strategy"),
      ("negative_cpu_devices", {"cpu_devices": -1}, "cpu_devices"),
      ("cpu_devices_with_multi_worker", {"cpu_devices": 2, "strategy": "multi_worker"}, "cpu_devices"),
      ("unknown_mixed_precision", {"mixed_precision": "fp8"}, "mixed_precision"),
      ("folder_without_data_dir", {"dataset": "folder", "data_dir": ""}, "data_dir"),
      ("empty_dataset", {"dataset": ""}, "dataset"),
      ("image_channels_two", {"image_channels": 2}, "image_channels"),
      ("negative_image_size", {"image_size": -1}, "image_size"),
      ("negative_max_train_examples", {"max_train_examples": -1}, "max_train_examples"),
      ("color_jitter_above_one", {"color_jitter": 1.5}, "color_jitter"),
      ("zero_eval_crop_fraction", {"eval_crop_fraction": 0.0}, "eval_crop_fraction"),
      ("zero_embedding_dim", {"embedding_dim": 0}, "embedding_dim"),
      ("unknown_negative_sampling", {"negative_sampling": "hard"}, "negative_sampling"),
      ("normalizer_momentum_one", {"normalizer_momentum": 1.0}, "normalizer_momentum"),
      ("unknown_bank_init", {"bank_init": "zeros"}, "bank_init"),
      ("negative_proximal_lambda", {"proximal_lambda": -1.0}, "proximal_lambda"),
      ("zero_learning_rate", {"learning_rate": 0.0}, "learning_rate"),
      ("unknown_lr_schedule", {"lr_schedule": "linear"}, "lr_schedule"),
      ("decreasing_lr_decay_epochs", {"lr_decay_epochs": (160, 120)}, "lr_decay_epochs"),
      ("zero_lr_decay_epoch", {"lr_decay_epochs": (0, 5)}, "lr_decay_epochs"),
      ("warmup_as_long_as_training", {"warmup_epochs": 2, "epochs": 2}, "warmup_epochs"),
      ("zero_epochs", {"epochs": 0}, "epochs"),
      ("negative_train_minutes", {"train_minutes": -1.0, "lr_schedule": "cosine"}, "train_minutes"),
      ("train_minutes_with_step_schedule", {"train_minutes": 10.0, "lr_schedule": "step"}, "train_minutes"),
      ("zero_steps_per_loop", {"steps_per_loop": 0}, "steps_per_loop"),
      ("zero_knn_k", {"knn_k": 0}, "knn_k"),
      ("zero_knn_temperature", {"knn_temperature": 0.0}, "knn_temperature"),
      ("zero_eval_batch_size", {"eval_batch_size": 0}, "eval_batch_size"),
      ("negative_validation_examples", {"validation_examples": -1}, "validation_examples"),
      ("blur_prob_above_one", {"blur_prob": 1.5}, "blur_prob"),
      ("negative_erasing_prob", {"erasing_prob": -0.1}, "erasing_prob"),
      ("three_views", {"views": 3}, "views"),
      ("negative_group_clusters", {"group_clusters": -1}, "group_clusters"),
      ("group_term_parametric", {"group_clusters": 4, "views": 2, "objective": "parametric"}, "group_clusters"),
      ("negative_group_weight", {"group_weight": -1.0}, "group_weight"),
      ("zero_group_temperature", {"group_temperature": 0.0}, "group_temperature"),
      ("negative_monitor_examples", {"monitor_examples": -5}, "monitor_examples"),
      ("negative_neighbours", {"neighbours": -1}, "neighbours"),
      ("neighbours_parametric", {"neighbours": 2, "objective": "parametric"}, "neighbours"),
      ("negative_neighbour_weight", {"neighbour_weight": -0.5}, "neighbour_weight"),
      ("neighbour_start_one", {"neighbour_start": 1.0}, "neighbour_start"),
      ("negative_neighbour_start", {"neighbour_start": -0.1}, "neighbour_start"),
      ("zero_neighbour_every_epochs", {"neighbour_every_epochs": 0}, "neighbour_every_epochs"),
      ("negative_head_hidden_dim", {"head_hidden_dim": -8}, "head_hidden_dim"),
  )
  def test_bad_value_names_its_flag(self, overrides, flag):
    cfg = testing.replace(testing.tiny_config(), **overrides)
    with self.assertRaisesRegex(ValueError, f"^--{flag}: "):
      config_lib.validate(cfg)

  def test_more_groups_than_the_batch_is_refused(self):
    cfg = testing.replace(testing.tiny_config(), views=2, group_clusters=17)
    with self.assertRaisesRegex(ValueError, r"^--group_clusters: 17 groups need a global batch of at least as many "
                                r"images \(--batch_size=16\)"):
      config_lib.validate_against_data(cfg, num_instances=64)

  def test_as_many_neighbours_as_instances_is_refused(self):
    cfg = testing.replace(testing.tiny_config(), neighbours=64)
    with self.assertRaisesRegex(ValueError, r"^--neighbours: 64 neighbours need more instances than that \(64\)"):
      config_lib.validate_against_data(cfg, num_instances=64)
    config_lib.validate_against_data(testing.replace(cfg, neighbours=63), num_instances=64)

  def test_crop_scale_message_shows_both_values(self):
    cfg = testing.replace(testing.tiny_config(), crop_scale_min=0.9, crop_scale_max=0.5)
    with self.assertRaisesRegex(ValueError, r"crop_scale_min \(0\.9\).*crop_scale_max \(0\.5\)"):
      config_lib.validate(cfg)


class ValidateAgainstDataTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("num_negatives_equal_to_instances", {"num_negatives": 64}, 64, "num_negatives"),
      ("num_negatives_above_instances", {"num_negatives": 100}, 64, "num_negatives"),
      ("batch_size_above_instances", {"batch_size": 128, "num_negatives": 8}, 64, "batch_size"),
      ("one_instance", {"batch_size": 1, "num_negatives": 1}, 1, "dataset"),
  )
  def test_too_few_instances_names_flag(self, overrides, num_instances, flag):
    cfg = testing.replace(testing.tiny_config(), **overrides)
    with self.assertRaisesRegex(ValueError, f"^--{flag}: "):
      config_lib.validate_against_data(cfg, num_instances=num_instances)

  @parameterized.named_parameters(
      ("nce_just_enough", {"objective": "nce", "num_negatives": 63, "batch_size": 64}, 64),
      ("softmax_ignores_num_negatives", {"objective": "softmax", "num_negatives": 4096}, 64),
      ("parametric_ignores_num_negatives", {"objective": "parametric", "num_negatives": 4096}, 64),
  )
  def test_enough_instances_passes(self, overrides, num_instances):
    cfg = testing.replace(testing.tiny_config(), **overrides)
    self.assertIsNone(config_lib.validate_against_data(cfg, num_instances=num_instances))

  def test_too_many_negatives_names_a_value_that_works(self):
    cfg = testing.replace(testing.tiny_config(), num_negatives=4096)
    with self.assertRaisesRegex(ValueError, r"^--num_negatives: 4096 must be smaller than the number of instances "
                                r"\(4000\), e\.g\. 2048 "):
      config_lib.validate_against_data(cfg, num_instances=4000)


class FitToDataTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((4000, 2048), (4096, 2048), (1025, 1024), (300, 256), (64, 32), (3, 2), (2, 1))
  def test_num_negatives_is_capped_below_the_instances(self, num_instances, capped):
    cfg = testing.replace(testing.tiny_config(), num_negatives=4096, batch_size=2)
    fitted, notes = config_lib.fit_to_data(cfg, num_instances=num_instances)
    self.assertEqual(fitted.loss.num_negatives, capped)
    self.assertEqual(fitted, testing.replace(cfg, num_negatives=capped))  # Nothing else changes.
    self.assertEqual(notes, [f"--num_negatives: 4096 capped to {capped}, below the {num_instances} training "
                             "instances (NCE draws its negatives from them)"])
    self.assertIsNone(config_lib.validate_against_data(fitted, num_instances=num_instances))
    self.assertEqual(cfg.loss.num_negatives, 4096)  # The given config is left as it was.

  @parameterized.named_parameters(
      ("fewer_negatives_than_instances", {"num_negatives": 4095}, 4096),
      ("softmax", {"objective": "softmax"}, 64),
      ("parametric", {"objective": "parametric"}, 64),
      ("too_few_instances_to_fit", {}, 1),  # validate_against_data names --dataset.
  )
  def test_nothing_to_fit_is_left_alone(self, overrides, num_instances):
    cfg = testing.replace(testing.tiny_config(), **{"num_negatives": 4096, **overrides})
    self.assertEqual(config_lib.fit_to_data(cfg, num_instances=num_instances), (cfg, []))


# ------------------------------------------------------------------------------------------------------ round trips
class DictRoundTripTest(tf.test.TestCase):

  def _non_default_config(self) -> config_lib.Config:
    return testing.tiny_config(model_dir="/tmp/run", lr_decay_epochs=(3, 7, 11), temperature=0.2, objective="softmax",
                               horizontal_flip=False, eval_split="", crop_scale_min=0.3, image_size=32)

  def test_round_trip(self):
    cfg = self._non_default_config()
    self.assertEqual(config_lib.from_dict(config_lib.to_dict(cfg)), cfg)

  def test_round_trip_through_json(self):
    cfg = self._non_default_config()
    restored = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg))))
    self.assertEqual(restored, cfg)
    self.assertEqual(restored.optim.lr_decay_epochs, (3, 7, 11))
    self.assertIsInstance(restored.optim.lr_decay_epochs, tuple)

  def test_to_dict_is_nested_by_section(self):
    values = config_lib.to_dict(self._non_default_config())
    self.assertEqual(set(values), set(config_lib.SECTIONS))
    self.assertEqual(values["loss"]["temperature"], 0.2)
    self.assertEqual(values["optim"]["lr_decay_epochs"], [3, 7, 11])

  def test_missing_sections_take_defaults(self):
    self.assertEqual(config_lib.from_dict({"loss": {"temperature": 0.5}}),
                     config_lib.Config(loss=config_lib.LossConfig(temperature=0.5)))

  def test_unknown_key_raises(self):
    with self.assertRaises(TypeError):
      config_lib.from_dict({"loss": {"temprature": 0.5}})


class FieldNamesTest(tf.test.TestCase):

  def test_sections_are_the_config_fields(self):
    self.assertEqual(list(config_lib.SECTIONS), [f.name for f in dataclasses.fields(config_lib.Config)])

  def test_names_unique_across_sections(self):
    counts = collections.Counter(f.name for section in config_lib.SECTIONS.values()
                                 for f in dataclasses.fields(section))
    self.assertEqual([name for name, count in counts.items() if count > 1], [])
    self.assertLen(config_lib.field_names(), sum(counts.values()))

  def test_field_names_maps_to_owning_section(self):
    names = config_lib.field_names()
    for section, section_type in config_lib.SECTIONS.items():
      for field in dataclasses.fields(section_type):
        self.assertEqual(names[field.name], section, field.name)
    self.assertEqual(names["temperature"], "loss")
    self.assertEqual(names["model_dir"], "train")

  def test_sections_are_frozen_and_keyword_only(self):
    for section_type in config_lib.SECTIONS.values():
      params = section_type.__dataclass_params__
      self.assertTrue(params.frozen, section_type.__name__)
      self.assertTrue(all(f.kw_only for f in dataclasses.fields(section_type)), section_type.__name__)


# ------------------------------------------------------------------------------------------------------------- flags
class FlagsTest(tf.test.TestCase, parameterized.TestCase):

  def _parse(self, *args: str) -> config_lib.Config:
    train.FLAGS.unparse_flags()  # Values left by anything parsed before must not leak in.
    self.addCleanup(train.FLAGS.unparse_flags)
    train.FLAGS(["train.py", *args])
    return train.config_from_flags()

  def test_train_flags_are_the_config_fields(self):
    # --recipe is the command's own: it names a flagfile (cli.expand_recipe), not a config field.
    train_flags = {flag.name for flag in train.FLAGS.get_flags_for_module(train)} - {"recipe"}
    fields = set(config_lib.field_names())
    self.assertEqual(sorted(train_flags - fields), [], "flags with no config field")
    self.assertEqual(sorted(fields - train_flags), [], "config fields with no flag")

  def test_every_field_flag_is_defined_by_train(self):
    for name in config_lib.field_names():
      self.assertIn(train.FLAGS.find_module_defining_flag(name), (train.__name__, "__main__"), name)

  def test_flag_types_follow_field_types(self):
    expected = {bool: flags.BooleanFlag, int: flags.Flag, float: flags.Flag, str: flags.Flag, tuple: flags.Flag}
    for section_type in config_lib.SECTIONS.values():
      for field in dataclasses.fields(section_type):
        self.assertIsInstance(train.FLAGS[field.name], expected[type(field.default)], field.name)
    self.assertIsInstance(train.FLAGS["horizontal_flip"], flags.BooleanFlag)
    self.assertIsInstance(train.FLAGS["temperature"].parser, flags.FloatParser)
    self.assertIsInstance(train.FLAGS["batch_size"].parser, flags.IntegerParser)
    self.assertIsInstance(train.FLAGS["lr_decay_epochs"].parser, flags.ListParser)

  def test_flag_defaults_are_field_defaults(self):
    cfg = self._parse("--model_dir=/tmp/x")
    self.assertEqual(cfg, config_lib.Config(train=config_lib.TrainConfig(model_dir="/tmp/x")))

  def test_config_from_flags(self):
    cfg = self._parse("--model_dir=/tmp/x", "--temperature=0.2", "--lr_decay_epochs=3,5")
    self.assertEqual(cfg.train.model_dir, "/tmp/x")
    self.assertEqual(cfg.loss.temperature, 0.2)
    self.assertEqual(cfg.optim.lr_decay_epochs, (3, 5))
    self.assertEqual(cfg, config_lib.Config(train=config_lib.TrainConfig(model_dir="/tmp/x"),
                                            loss=config_lib.LossConfig(temperature=0.2),
                                            optim=config_lib.OptimConfig(lr_decay_epochs=(3, 5))))

  def test_config_from_flags_of_every_kind(self):
    cfg = self._parse("--model_dir=/tmp/y", "--nohorizontal_flip", "--objective=softmax", "--batch_size=32",
                      "--eval_split=", "--dataset=folder", "--data_dir=/data/images", "--crop_scale_min=0.5",
                      "--final_eval=false", "--lr_decay_epochs=")
    self.assertFalse(cfg.augment.horizontal_flip)
    self.assertEqual(cfg.loss.objective, "softmax")
    self.assertEqual(cfg.train.batch_size, 32)
    self.assertEqual(cfg.data.eval_split, "")
    self.assertEqual((cfg.data.dataset, cfg.data.data_dir), ("folder", "/data/images"))
    self.assertEqual(cfg.augment.crop_scale_min, 0.5)
    self.assertFalse(cfg.eval.final_eval)
    self.assertEqual(cfg.optim.lr_decay_epochs, ())

  def test_flagfile_then_later_flags_win(self):
    flagfile = os.path.join(_tmpdir(self), "run.flags")
    with open(flagfile, "w") as f:
      f.write("# A header comment.\n--temperature=0.2\n--batch_size=32\n")
    cfg = self._parse(f"--flagfile={flagfile}", "--temperature=0.3", "--model_dir=/tmp/x")
    self.assertEqual(cfg.loss.temperature, 0.3)
    self.assertEqual(cfg.train.batch_size, 32)

  @parameterized.parameters(sorted(glob.glob(os.path.join(testing.REPO_ROOT, "*.flags"))))
  def test_shipped_flagfile_is_valid(self, flagfile):
    cfg = self._parse(f"--flagfile={flagfile}", "--model_dir=/tmp/x")
    self.assertEqual(cfg.train.model_dir, "/tmp/x")

  def test_smoke_flagfile_is_shipped(self):
    self.assertTrue(os.path.exists(os.path.join(testing.REPO_ROOT, "smoke.flags")))

  def test_bad_lr_decay_epochs_names_flag(self):
    with self.assertRaisesRegex(ValueError, "--lr_decay_epochs"):
      self._parse("--model_dir=/tmp/x", "--lr_decay_epochs=a,b")

  def test_invalid_value_names_flag(self):
    with self.assertRaisesRegex(ValueError, "^--temperature: "):
      self._parse("--model_dir=/tmp/x", "--temperature=-1")

  def test_unparse_restores_defaults(self):
    self._parse("--model_dir=/tmp/x", "--temperature=0.2")
    train.FLAGS.unparse_flags()
    self.assertEqual(train.FLAGS["temperature"].value, config_lib.LossConfig().temperature)


# ----------------------------------------------------------------------------------------------------------- hygiene
def _package_modules() -> list[str]:
  return sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True))


def _parse_module(path: str) -> ast.Module:
  with open(path) as f:
    return ast.parse(f.read(), filename=path)


def imports_absl_flags(tree: ast.Module) -> bool:
  """True when the module imports absl.flags in any spelling (import absl.flags, from absl import flags, ...)."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import) and any(a.name == "absl.flags" or a.name.startswith("absl.flags.")
                                            for a in node.names):
      return True
    if isinstance(node, ast.ImportFrom) and node.module == "absl" and any(a.name == "flags" for a in node.names):
      return True
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("absl.flags"):
      return True
  return False


class HygieneTest(tf.test.TestCase, parameterized.TestCase):

  def test_package_has_modules(self):
    names = {os.path.basename(path) for path in _package_modules()}
    self.assertContainsSubset({"__init__.py", "config.py", "data.py", "augment.py"}, names)

  @parameterized.named_parameters(
      ("from_absl_import_flags", "from absl import flags\n", True),
      ("from_absl_import_app_and_flags", "from absl import app, flags as f\n", True),
      ("import_absl_flags", "import absl.flags\n", True),
      ("import_absl_flags_as", "import absl.flags as absl_flags\n", True),
      ("from_absl_flags_import", "from absl.flags import FLAGS\n", True),
      ("inside_function", "def f():\n  from absl import flags\n", True),
      ("from_absl_import_logging", "from absl import logging\n", False),
      ("import_absl_app", "import absl.app\n", False),
      ("flags_in_a_string", "text = 'from absl import flags'\n", False),
  )
  def test_absl_flags_detector(self, source, expected):
    self.assertEqual(imports_absl_flags(ast.parse(source)), expected)

  def test_no_library_module_imports_absl_flags(self):
    # The command-line programs (tf_instdisc/cli/: instdisc-train and the others) are the entry points.
    offenders = [os.path.relpath(p, PACKAGE_DIR) for p in _package_modules()
                 if imports_absl_flags(_parse_module(p)) and os.path.relpath(p, PACKAGE_DIR).split(os.sep)[0] != "cli"]
    self.assertEqual(offenders, [], "only entry points may define flags (docs/design.md, house style)")

  def test_only_the_commands_define_flags(self):
    commands = {os.path.relpath(p, PACKAGE_DIR) for p in _package_modules() if imports_absl_flags(_parse_module(p))}
    self.assertEqual(commands, {"cli/train.py", "cli/evaluate.py", "cli/export.py", "cli/search.py"})

  def test_every_library_module_has_a_docstring(self):
    missing = [os.path.relpath(p, PACKAGE_DIR) for p in _package_modules() if not ast.get_docstring(_parse_module(p))]
    self.assertEqual(missing, [])

  def test_no_grab_bag_module_names(self):
    stems = [os.path.splitext(os.path.relpath(p, PACKAGE_DIR))[0] for p in _package_modules()]
    bad = [stem for stem in stems if set(stem.split(os.sep)) & set(FORBIDDEN_MODULE_NAMES)]
    self.assertEqual(bad, [], "one concept per module, named after it (docs/design.md, house style)")


# --------------------------------------------------------------------------------------------------------------- CLI
class CliErrorTest(tf.test.TestCase, parameterized.TestCase):
  """`python train.py` with a bad flag exits non-zero and names the flag, before TensorFlow is imported."""

  def _run(self, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    # A `tensorflow` package that fails to import shadows the real one: these errors must come before TF loads.
    shadow = _tmpdir(self)
    os.makedirs(os.path.join(shadow, "tensorflow"))
    with open(os.path.join(shadow, "tensorflow", "__init__.py"), "w") as f:
      f.write("raise ImportError('tensorflow imported before the flags were validated')\n")
    env = {**os.environ, "PYTHONPATH": shadow}
    start = time.monotonic()
    result = subprocess.run([testing.python(), *argv], cwd=testing.REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_SECONDS, check=False)
    return result, time.monotonic() - start

  def _run_train(self, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    return self._run("train.py", *args)

  @parameterized.named_parameters(
      ("negative_temperature", ("--temperature=-1",), "--temperature"),
      ("unknown_objective", ("--objective=bogus",), "--objective"),
      ("bad_lr_decay_epochs", ("--lr_decay_epochs=a,b",), "--lr_decay_epochs"),
      ("folder_without_data_dir", ("--dataset=folder",), "--data_dir"),
      ("non_numeric_temperature", ("--temperature=abc",), "--temperature"),
      ("unknown_flag", ("--temprature=0.1",), "temprature"),
  )
  def test_bad_flag_exits_nonzero_naming_it(self, args, flag):
    model_dir = os.path.join(_tmpdir(self), "run")
    result, seconds = self._run_train(*args, f"--model_dir={model_dir}")
    self.assertNotEqual(result.returncode, 0, result.stderr)
    self.assertIn(flag, result.stderr)
    self.assertNotIn("Traceback", result.stderr)
    self.assertNotIn("tensorflow imported", result.stderr)
    self.assertFalse(os.path.exists(model_dir), "a rejected run must not create its model_dir")
    self.assertLess(seconds, CLI_TIMEOUT_SECONDS / 2)

  def test_objective_error_without_model_dir(self):
    result, _ = self._run_train("--objective=bogus")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("--objective", result.stderr)

  def test_shadow_tensorflow_fails_an_import(self):
    # What the checks above rely on: a run that reaches `import tensorflow` fails loudly.
    result, _ = self._run("-c", "import tensorflow")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("tensorflow imported before the flags were validated", result.stderr)


if __name__ == "__main__":
  tf.test.main()
