"""pytest: import the fixtures first, so the CPU is split into logical devices before TensorFlow starts.

absltest's create_tempdir reads --test_tmpdir; under pytest absl's flags are never parsed (and config_test
unparses them after parsing train.py's), so mark them parsed with their defaults before every test. Under Bazel,
absltest.main parses them.
"""

import os

import pytest
from absl import flags

from tests import testing  # noqa: F401


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield


# Long end-to-end tests whose behaviour faster tests also cover; the README's test command (and CI) skips them,
# `python -m pytest tests -q --run-slow` (or TF_INSTDISC_SLOW_TESTS=1) runs them too. Node-id prefixes.
SLOW_TESTS = (
    # The ablation driver end to end (about 100 s); AblateCommandTest's flag checks and tests/ablation_test.py's
    # unit tests stay.
    "tests/ablation_test.py::AblateCommandTest::test_runs_every_variant_once_and_resumes_without_redoing_them",
    # export/export.py and search.py as commands after a real train.py run (about 140 s); tests/artifact_test.py
    # covers the same export in process and both commands' refusals as subprocesses.
    "tests/e2e_export_test.py::ExportEndToEndTest",
    # Semi-supervised fine-tuning's pretrained-beats-scratch claim (about 60 s); its plumbing is in
    # tests/hostile_data_test.py and evaluation_test.py's other protocols.
    "tests/evaluation_test.py::EvaluationTest::test_semi_supervised_pretrained_beats_scratch_at_one_percent",
    # bench/recipe_ablation.py end to end (about 50 s).
    "tests/recipe_ablation_test.py::RecipeAblationTest::test_variants_train_score_and_report_then_a_rerun_skips_them",
    # One SIGKILL and a resume (about 35 s): FaultsTest kills train.py at random moments and compares exactly.
    "tests/e2e_train_test.py::SmokeTrainTest::test_killed_run_resumes_from_its_last_checkpoint",
    # train.py on two CPU replicas (about 30 s): train_lib_test's ReplicaEquivalenceTest compares them step by step.
    "tests/e2e_train_test.py::SmokeTrainTest::test_two_cpu_replicas_train_as_one_device",
)


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run the long end-to-end tests of tests/conftest.py's SLOW_TESTS")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow") or os.environ.get("TF_INSTDISC_SLOW_TESTS") == "1":
    return
  skip = pytest.mark.skip(reason="long end-to-end test: run with --run-slow")
  for item in items:
    if item.nodeid.startswith(SLOW_TESTS):
      item.add_marker(skip)
