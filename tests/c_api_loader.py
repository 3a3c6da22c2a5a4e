"""Test helper (not a test): builds and drives tests/c_api/run_saved_model.c, a C program that loads a SavedModel
through the TensorFlow C API shipped inside the pip wheel (TF_LoadSessionFromSavedModel, the TF Serving loader).

compile_runner() links the program against the wheel's own shared libraries, signature_tensor_names() maps a
signature's input/output keys to graph tensor names by reading saved_model.pb (no model loading), and run() feeds a
float32 array through the binary in a subprocess and parses what it prints.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_api", "run_saved_model.c")
BINARY_NAME = "run_saved_model"
SERVE_TAG = "serve"
RUN_TIMEOUT_SECONDS = 300
COMPILE_TIMEOUT_SECONDS = 300

# The wheel has no libtensorflow.so. Checked with `nm -D --defined-only` (TF 2.20): the session half of the C API
# (TF_LoadSessionFromSavedModel, TF_SessionRun, TF_NewGraph, TF_GraphOperationByName, ...) is exported, with symbol
# version "tensorflow", by libtensorflow_cc.so.2; the tensor/status/buffer half (TF_NewStatus, TF_AllocateTensor,
# TF_NewBuffer, ...) by libtensorflow_framework.so.2. python/_pywrap_tensorflow_internal.so exports neither.
C_API_LIBRARIES = ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2")


def gcc_path() -> str | None:
  """The gcc on PATH (or $CC if set), or None when there is no C compiler."""
  return shutil.which(os.environ.get("CC", "gcc"))


def tf_include_dir() -> str:
  return os.path.join(os.path.dirname(tf.__file__), "include")


def tf_c_api_libraries() -> list[str]:
  """Full paths of the wheel's shared libraries that together export the C API (see C_API_LIBRARIES)."""
  lib_dir = tf.sysconfig.get_lib()
  paths = [os.path.join(lib_dir, name) for name in C_API_LIBRARIES]
  missing = [path for path in paths if not os.path.exists(path)]
  if missing:
    raise RuntimeError(f"TensorFlow wheel at {lib_dir} lacks the C API libraries {missing}")
  return paths


def compile_runner(build_dir: str) -> str:
  """Compiles run_saved_model.c into build_dir against the installed wheel; returns the binary's path.

  The libraries are linked by full path and their directory is set as the rpath, so the binary runs without
  LD_LIBRARY_PATH. Raises RuntimeError (with gcc's stderr) if there is no compiler or compiling fails.
  """
  compiler = gcc_path()
  if compiler is None:
    raise RuntimeError("no C compiler: gcc (or $CC) is not on PATH")
  os.makedirs(build_dir, exist_ok=True)
  binary = os.path.join(build_dir, BINARY_NAME)
  lib_dir = tf.sysconfig.get_lib()
  command = [
      compiler, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
      "-isystem", tf_include_dir(),  # -isystem: warnings inside TF's headers are not ours to fix.
      SOURCE, "-o", binary,
      *tf_c_api_libraries(),
      f"-Wl,-rpath,{lib_dir}",
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"compiling {SOURCE} failed (exit {result.returncode}):\n$ {' '.join(command)}\n"
                       f"{result.stderr}")
  return binary


def signature_tensor_names(export_dir: str, signature: str, input_key: str, output_key: str) -> tuple[str, str]:
  """Graph tensor names ("op:index") of a signature's input and output keys, read from saved_model.pb."""
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  meta_graphs = [meta for meta in saved_model.meta_graphs if SERVE_TAG in meta.meta_info_def.tags]
  if not meta_graphs:
    raise ValueError(f"{export_dir} has no MetaGraph tagged {SERVE_TAG!r}")
  signatures = meta_graphs[0].signature_def
  if signature not in signatures:
    raise KeyError(f"signature {signature!r} not in {export_dir}; it has {sorted(signatures)}")
  signature_def = signatures[signature]
  if input_key not in signature_def.inputs:
    raise KeyError(f"signature {signature!r} has no input {input_key!r}; inputs: {sorted(signature_def.inputs)}")
  if output_key not in signature_def.outputs:
    raise KeyError(f"signature {signature!r} has no output {output_key!r}; outputs: {sorted(signature_def.outputs)}")
  return signature_def.inputs[input_key].name, signature_def.outputs[output_key].name


def write_input_file(path: str, array: np.ndarray) -> None:
  """The runner's input format, little-endian: int32 rank, int64 dims[rank], float32 data (row-major)."""
  array = np.ascontiguousarray(array, dtype="<f4")
  with open(path, "wb") as f:
    f.write(struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape))
    f.write(array.tobytes())


def parse_output(stdout: str) -> np.ndarray:
  """Inverse of the runner's printing: a shape line (space-separated dims), then one value per line."""
  if not stdout:
    raise ValueError("runner printed nothing")
  lines = stdout.split("\n")
  shape = tuple(int(dim) for dim in lines[0].split())
  values = np.array([float(line) for line in lines[1:] if line.strip()], dtype=np.float32)
  if values.size != int(np.prod(shape, dtype=np.int64)):
    raise ValueError(f"runner printed shape {shape} but {values.size} values")
  return values.reshape(shape)


def run(binary: str, export_dir: str, input_name: str, output_name: str, array: np.ndarray) -> np.ndarray:
  """Feeds `array` (as float32) to input_name, fetches output_name through the C runner; returns it as float32.

  Raises RuntimeError carrying the runner's stderr if it exits non-zero (e.g. TF's loader error message).
  """
  with tempfile.TemporaryDirectory() as tmp:
    input_path = os.path.join(tmp, "input.bin")
    write_input_file(input_path, array)
    command = [binary, export_dir, input_name, output_name, input_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}; stderr:\n{result.stderr}")
  return parse_output(result.stdout)
