"""pytest: import the fixtures first, so the CPU is split into logical devices before TensorFlow starts.

absltest's create_tempdir reads --test_tmpdir; under pytest absl's flags are never parsed, so mark them parsed
with their defaults (under Bazel, absltest.main parses them).
"""

from absl import flags

from tests import testing  # noqa: F401

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
