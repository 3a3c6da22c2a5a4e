"""The command-line programs: `instdisc-train`, `instdisc-evaluate`, `instdisc-export`, `instdisc-search` (installed
by pip), the same as `python train.py`, `python evaluate.py`, `python export/export.py` and
`python export/search.py` in a checkout. Each module here defines its flags (only these entry points do) and a
`run()`; this file holds what they share: recipes by name and a quiet TensorFlow start. No TensorFlow import here:
flag errors are answered before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Callable, Sequence

from absl import logging as absl_logging

# TensorFlow's C++ start-up lines on a machine without a GPU, none of them actionable: the CUDA stubs' probes, the
# oneDNN note and the CPU-feature note. `quiet_tensorflow` drops them unless TF_CPP_MIN_LOG_LEVEL is set by the user.
STARTUP_NOISE = re.compile("|".join((
    r"failed call to cuInit", r"Could not find cuda drivers", r"oneDNN custom operations are on",
    r"cpu_feature_guard", r"^To enable the following instructions", r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TF-TRT Warning", r"computation placer already registered", r"All log messages before absl::InitializeLog",
    r"Local rendezvous is aborting with status: OUT_OF_RANGE")))


def describe_command(doc: str, module_name: str, flag_values) -> None:
  """Makes --help show this command's description and flags (`flag_values`: absl's FLAGS, which the command
  module owns), whether it runs as the console script, a checkout's script or `python -m`: absl prints the main
  module's docstring and the flags it finds under sys.argv[0]."""
  sys.modules["__main__"].__doc__ = doc
  for flag in flag_values.get_key_flags_for_module(module_name):
    flag_values.register_key_flag_for_module(sys.argv[0], flag)


def expand_recipe(argv: Sequence[str]) -> list[str]:
  """argv with each `--recipe=NAME_OR_FILE` replaced by `--flagfile=PATH` (a shipped recipe's file inside the
  package), in place: flags after it still win. Raises ValueError naming --recipe for an unknown name."""
  from tf_instdisc import recipes

  expanded = []
  for arg in argv:
    if arg.startswith("--recipe="):
      arg = f"--flagfile={recipes.path(arg[len('--recipe='):])}"
    elif arg == "--recipe":
      raise ValueError("--recipe: give it a value, --recipe=NAME (" + ", ".join(recipes.NAMES) + ") or a flagfile")
    expanded.append(arg)
  return expanded


def quiet_tensorflow(configure_devices: Callable[[], None] | None = None) -> None:
  """Imports TensorFlow, calls `configure_devices` (what must come before the devices start, e.g. splitting the CPU
  into logical devices), and starts its devices, with the C++ start-up noise off the console (STARTUP_NOISE); every
  other line of that start passes through. A user who sets TF_CPP_MIN_LOG_LEVEL (0 shows all) gets TensorFlow as it
  is. Also keeps the INFO lines TensorFlow's Python code logs through absl ("Sharding callback duration: 74
  microseconds" at every checkpoint save) off the console; --verbosity=1 shows them."""
  quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
  if quiet:
    # INFO lines of the C++ runtime (end-of-sequence notes of every epoch's iterator) would drown progress lines.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
  with _filtered_stderr(STARTUP_NOISE) if quiet else contextlib.nullcontext():
    import tensorflow as tf

    if configure_devices is not None:
      configure_devices()
    tf.config.list_logical_devices()  # The devices start here (and the CUDA probe runs).
  tensorflow_dir = os.path.dirname(os.path.abspath(tf.__file__)) + os.sep

  def keep(record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= absl_logging.DEBUG
            or not os.path.abspath(record.pathname).startswith(tensorflow_dir))

  absl_logging.get_absl_logger().addFilter(keep)


class _filtered_stderr:  # noqa: N801 - used as a context manager, named like one.
  """While active, file descriptor 2 goes through a pipe; lines matching `noise` are dropped, the rest copied to
  the real stderr (a thread drains the pipe, so a chatty writer never blocks)."""

  def __init__(self, noise: re.Pattern):
    self.noise = noise

  def __enter__(self):
    sys.stderr.flush()
    self.saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    self.thread = threading.Thread(target=self._drain, args=(read_end,), daemon=True)
    self.thread.start()
    return self

  def _drain(self, read_end: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
      for line in pipe:
        if not self.noise.search(line.decode("utf-8", "replace")):
          os.write(self.saved, line)

  def __exit__(self, *exc_info) -> None:
    sys.stderr.flush()
    os.dup2(self.saved, 2)  # Closes the pipe's last write end: the drain thread sees the end and stops.
    self.thread.join(timeout=5)
    os.close(self.saved)
