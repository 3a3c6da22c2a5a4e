"""A Keras 3 SavedModel export loads and runs through the wheel's TensorFlow C API (TF_LoadSessionFromSavedModel,
the TF Serving loader) from a small C program with no Python, and matches the in-memory model."""

from __future__ import annotations

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import os
import shutil
import tempfile
import unittest

import keras
import numpy as np
import tensorflow as tf

from tests import c_api_loader

IMAGE_SHAPE = (8, 8, 1)
EMBEDDING_DIM = 4
SIGNATURE = "serving_default"
INPUT_KEY = "images"
OUTPUT_KEY = "embeddings"


def _tiny_model() -> keras.Model:
  inputs = keras.Input(IMAGE_SHAPE, name="images")
  x = keras.layers.Flatten()(inputs)
  x = keras.layers.Dense(EMBEDDING_DIM)(x)
  outputs = keras.layers.UnitNormalization()(x)
  return keras.Model(inputs, outputs)


def _export(model: keras.Model, export_dir: str) -> None:
  """serving_default: images [B, 8, 8, 1] float32 -> {"embeddings": [B, 4]}, written as a SavedModel."""
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(SIGNATURE, lambda images: {OUTPUT_KEY: model(images, training=False)},
                       input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32, name=INPUT_KEY)])
  archive.write_out(export_dir, verbose=False)


@unittest.skipIf(c_api_loader.gcc_path() is None, "gcc is not on PATH: cannot build the C API runner (CI installs it)")
class CApiLoaderTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Linking against the wheel's big shared libraries takes seconds: build the runner once for the whole class.
    build_dir = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, build_dir)
    cls.binary = c_api_loader.compile_runner(build_dir)

  def test_saved_model_output_matches_keras_model(self):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    export_dir = os.path.join(self.create_tempdir().full_path, "export")
    _export(model, export_dir)
    input_name, output_name = c_api_loader.signature_tensor_names(export_dir, SIGNATURE, INPUT_KEY, OUTPUT_KEY)
    # Keras/TF name the signature's placeholder "<signature>_<input key>"; the output is the call op's first output.
    self.assertEqual(input_name, "serving_default_images:0")
    self.assertRegex(output_name, r"^StatefulPartitionedCall(_\d+)?:0$")

    images = testing.tiny_arrays(3, shape=IMAGE_SHAPE)[0].astype(np.float32) / 255.0  # Noisy images in [0, 1].
    embeddings = c_api_loader.run(self.binary, export_dir, input_name, output_name, images)

    expected = keras.ops.convert_to_numpy(model(images, training=False))
    self.assertEqual(embeddings.dtype, np.float32)
    self.assertEqual(embeddings.shape, (3, EMBEDDING_DIM))
    self.assertAllClose(embeddings, expected, rtol=1e-5, atol=1e-5)
    self.assertAllClose(np.linalg.norm(embeddings, axis=1), np.ones(3), atol=1e-5)

  def test_missing_export_dir_fails_with_tf_error(self):
    missing_dir = os.path.join(self.create_tempdir().full_path, "no_such_export")
    images = np.zeros((1, *IMAGE_SHAPE), np.float32)
    with self.assertRaisesRegex(RuntimeError, r"(?s)TF_LoadSessionFromSavedModel failed.*Could not find SavedModel"):
      c_api_loader.run(self.binary, missing_dir, "serving_default_images:0", "StatefulPartitionedCall:0", images)


if __name__ == "__main__":
  tf.test.main()
