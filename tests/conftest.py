"""pytest: import the fixtures first, so the CPU is split into logical devices before TensorFlow starts.

absltest's create_tempdir reads --test_tmpdir; under pytest absl's flags are never parsed (and config_test
unparses them after parsing train.py's), so mark them parsed with their defaults before every test. Under Bazel,
absltest.main parses them.
"""

import pytest
from absl import flags

from tests import testing  # noqa: F401


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield
