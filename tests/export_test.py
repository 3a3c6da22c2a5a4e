"""The serving SavedModel: signatures and names, outputs against the in-memory model and NumPy, and the ways others
load it: a fresh process with only TensorFlow, saved_model_cli, the C API (TF Serving's loader), REST JSON."""

from __future__ import annotations

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import tensorflow as tf

from tests import c_api_loader
from tests import tfserving_rest
from tf_instdisc import augment
from tf_instdisc import export
from tf_instdisc import model as model_lib

SHAPE = (8, 8, 1)
NUM_CLASSES = 4
K = 5
TEMPERATURE = 0.07
ID_OFFSET = 1000  # Collection ids differ from row numbers, so a test sees which one a signature returns.


def _model(shape=SHAPE, seed=0):
  return model_lib.build_embedding_model("convnet_small", shape, embedding_dim=16, seed=seed, head_batchnorm=True)


def _collection(model, *, labelled=True):
  images, labels = testing.tiny_arrays(48, shape=SHAPE, num_classes=NUM_CLASSES, seed=3)
  embeddings = model(images.astype(np.float32), training=False).numpy()
  return export.Collection(embeddings, np.arange(48) + ID_OFFSET, labels if labelled else None,
                           NUM_CLASSES if labelled else 0)


def _queries(n=6, seed=7):
  return testing.tiny_arrays(n, shape=SHAPE, num_classes=NUM_CLASSES, seed=seed)[0]


def numpy_knn(queries, collection, k, temperature, num_classes):
  """Brute force in float64: (ids [Q, k], scores [Q, k], voted label [Q])."""
  similarities = queries.astype(np.float64) @ collection.embeddings.astype(np.float64).T
  rows = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  scores = np.take_along_axis(similarities, rows, axis=1)
  class_scores = np.zeros([len(queries), num_classes])
  for q in range(len(queries)):
    for j in range(k):
      class_scores[q, collection.labels[rows[q, j]]] += np.exp(scores[q, j] / temperature)
  return collection.ids[rows], scores, np.argmax(class_scores, axis=1)


class SavedModelTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.tmp)
    cls.model = _model()
    cls.collection = _collection(cls.model)
    cls.path = os.path.join(cls.tmp, "saved_model", "7")
    spec = export.ServingSpec(image_shape=SHAPE, model_size=SHAPE[0], crop_fraction=1.0)
    archive = export.build_archive(cls.model, spec, cls.collection, k=K, temperature=TEMPERATURE)
    export.write_saved_model(archive, cls.path)
    cls.loaded = tf.saved_model.load(cls.path)

  def _embed(self, images):
    return self.model(np.asarray(images, np.float32), training=False).numpy()

  def test_signatures_inputs_and_outputs(self):
    signatures = self.loaded.signatures
    self.assertContainsSubset(set(export.SIGNATURES), set(signatures))
    expected = {
        export.SERVING_DEFAULT: ({"images": (tf.float32, [None, *SHAPE])}, {"embeddings": tf.float32}),
        export.EMBED_BYTES: ({"image_bytes": (tf.string, [None])}, {"embeddings": tf.float32}),
        export.KNN: ({"images": (tf.float32, [None, *SHAPE])},
                     {"neighbor_ids": tf.int64, "neighbor_scores": tf.float32, "predicted_label": tf.int64}),
        export.KNN_BYTES: ({"image_bytes": (tf.string, [None])},
                           {"neighbor_ids": tf.int64, "neighbor_scores": tf.float32, "predicted_label": tf.int64}),
    }
    for name, (inputs, outputs) in expected.items():
      specs = signatures[name].structured_input_signature[1]
      self.assertEqual({k: (s.dtype, s.shape.as_list()) for k, s in specs.items()}, inputs, name)
      self.assertEqual({k: t.dtype for k, t in signatures[name].structured_outputs.items()}, outputs, name)

  def test_embeddings_match_the_in_memory_model_and_are_unit_norm(self):
    images = _queries()
    got = self.loaded.signatures[export.SERVING_DEFAULT](images=tf.constant(images, tf.float32))["embeddings"]
    self.assertAllClose(got, self._embed(images), atol=1e-5, rtol=0)
    self.assertAllClose(np.linalg.norm(got, axis=1), np.ones(len(images)), atol=1e-5)

  def test_encoded_images_match_their_pixels(self):
    images = _queries()
    png = [tf.io.encode_png(image).numpy() for image in images]
    got = self.loaded.signatures[export.EMBED_BYTES](image_bytes=tf.constant(png))["embeddings"]
    self.assertAllClose(got, self._embed(images), atol=1e-5, rtol=0)
    jpeg = [tf.io.encode_jpeg(image).numpy() for image in images]  # Lossy: compare with the decoded pixels.
    decoded = np.stack([tf.io.decode_jpeg(data, channels=1).numpy() for data in jpeg])
    got = self.loaded.signatures[export.EMBED_BYTES](image_bytes=tf.constant(jpeg))["embeddings"]
    self.assertAllClose(got, self._embed(decoded), atol=1e-5, rtol=0)

  def test_undecodable_bytes_fail(self):
    with self.assertRaises(tf.errors.InvalidArgumentError):
      self.loaded.signatures[export.EMBED_BYTES](image_bytes=tf.constant([b"not an image"]))

  def test_knn_agrees_with_numpy_brute_force(self):
    images = _queries(8)
    ids, scores, labels = numpy_knn(self._embed(images), self.collection, K, TEMPERATURE, NUM_CLASSES)
    for name, feed in ((export.KNN, {"images": tf.constant(images, tf.float32)}),
                       (export.KNN_BYTES, {"image_bytes": tf.constant([tf.io.encode_png(i).numpy() for i in images])})):
      got = self.loaded.signatures[name](**feed)
      self.assertAllEqual(got["neighbor_ids"], ids, name)
      self.assertAllClose(got["neighbor_scores"], scores, atol=1e-5, rtol=0)
      self.assertAllEqual(got["predicted_label"], labels, name)

  def test_reloads_in_a_process_with_only_tensorflow(self):
    images = _queries()
    inputs = os.path.join(self.create_tempdir().full_path, "in.npy")
    np.save(inputs, images.astype(np.float32))
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({self.path!r})\n"
        f"out = m.signatures['serving_default'](images=tf.constant(np.load({inputs!r})))['embeddings'].numpy()\n"
        f"np.save({inputs!r} + '.out.npy', out)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('tf_instdisc', 'tests')))\n")
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=self.create_tempdir().full_path, env=env, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertEqual(result.stdout.strip().splitlines()[-1], "[]")  # None of our code was needed.
    self.assertAllClose(np.load(inputs + ".out.npy"), self._embed(images), atol=1e-5, rtol=0)

  def test_saved_model_cli_lists_the_signatures(self):
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", self.path, "--all"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    text = result.stdout
    for name in export.SIGNATURES:
      self.assertIn(f"signature_def['{name}']:", text)
    for key in ("inputs['images']", "inputs['image_bytes']", "outputs['embeddings']", "outputs['neighbor_ids']",
                "outputs['neighbor_scores']", "outputs['predicted_label']"):
      self.assertIn(key, text)
    self.assertIn("dtype: DT_STRING", text)

  def test_rest_json_maps_onto_the_signatures(self):
    images = _queries(3)
    png = [tf.io.encode_png(image).numpy() for image in images]
    pixels = tfserving_rest.predict(self.loaded, tfserving_rest.request_body(
        "serving_default", [{"images": image.astype(np.float32)} for image in images]))
    self.assertAllClose(json.loads(pixels)["predictions"], self._embed(images), atol=1e-5, rtol=0)
    bare = tfserving_rest.predict(self.loaded, tfserving_rest.request_body("embed_bytes", png))  # One input: bare.
    self.assertAllClose(json.loads(bare)["predictions"], self._embed(images), atol=1e-5, rtol=0)
    answer = json.loads(tfserving_rest.predict(self.loaded, tfserving_rest.request_body(
        "knn_bytes", [{"image_bytes": data} for data in png])))
    ids, _, labels = numpy_knn(self._embed(images), self.collection, K, TEMPERATURE, NUM_CLASSES)
    self.assertLen(answer["predictions"], 3)
    for q, prediction in enumerate(answer["predictions"]):
      self.assertEqual(set(prediction), {"neighbor_ids", "neighbor_scores", "predicted_label"})
      self.assertEqual(prediction["neighbor_ids"], ids[q].tolist())
      self.assertEqual(prediction["predicted_label"], int(labels[q]))

  def test_refuses_to_write_over_a_directory(self):
    with self.assertRaisesRegex(ValueError, "already exists"):
      export.write_saved_model(export.build_archive(self.model, export.ServingSpec(SHAPE, SHAPE[0], 1.0)), self.tmp)


@unittest.skipIf(c_api_loader.gcc_path() is None, "gcc is not on PATH: cannot build the C API runner")
class CApiTest(tf.test.TestCase):
  """TF_LoadSessionFromSavedModel, the loader TF Serving uses, runs our export from C with no Python."""

  def test_c_program_loads_and_runs_the_export(self):
    tmp = self.create_tempdir().full_path
    model = _model()
    collection = _collection(model)
    path = os.path.join(tmp, "saved_model", "1")
    archive = export.build_archive(model, export.ServingSpec(SHAPE, SHAPE[0], 1.0), collection, k=K)
    export.write_saved_model(archive, path)
    binary = c_api_loader.compile_runner(os.path.join(tmp, "build"))
    images = _queries().astype(np.float32)
    embeddings = model(images, training=False).numpy()
    names = c_api_loader.signature_tensor_names(path, "serving_default", "images", "embeddings")
    self.assertAllClose(c_api_loader.run(binary, path, *names, images), embeddings, atol=1e-5, rtol=0)
    names = c_api_loader.signature_tensor_names(path, "knn", "images", "neighbor_scores")
    _, scores, _ = numpy_knn(embeddings, collection, K, 0.07, NUM_CLASSES)
    self.assertAllClose(c_api_loader.run(binary, path, *names, images), scores, atol=1e-5, rtol=0)


class VariableSizeTest(tf.test.TestCase):

  def test_any_image_size_is_centre_cropped_and_resized_inside(self):
    # A dataset without a fixed size (ImageNet, folders): the signature takes any H x W, as train eval views do.
    model = _model((8, 8, 3))
    spec = export.ServingSpec(image_shape=(None, None, 3), model_size=8, crop_fraction=0.875)
    path = os.path.join(self.create_tempdir().full_path, "1")
    export.write_saved_model(export.build_archive(model, spec), path)
    loaded = tf.saved_model.load(path)
    images = testing.tiny_arrays(2, shape=(20, 14, 3), seed=2)[0]
    expected = model(augment.preprocess_for_eval(images, size=8, crop_fraction=0.875), training=False)
    got = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))["embeddings"]
    self.assertAllClose(got, expected, atol=1e-5, rtol=0)
    self.assertNotIn("knn", loaded.signatures)  # No collection given, no knn signature.
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    got = loaded.signatures["embed_bytes"](image_bytes=tf.constant(encoded))["embeddings"]
    self.assertAllClose(got, expected, atol=1e-5, rtol=0)

  def test_unlabelled_collection_has_no_predicted_label(self):
    model = _model()
    path = os.path.join(self.create_tempdir().full_path, "1")
    archive = export.build_archive(model, export.ServingSpec(SHAPE, 8, 1.0), _collection(model, labelled=False), k=3)
    export.write_saved_model(archive, path)
    outputs = tf.saved_model.load(path).signatures["knn"](images=tf.constant(_queries(2), tf.float32))
    self.assertEqual(set(outputs), {"neighbor_ids", "neighbor_scores"})
    self.assertEqual(outputs["neighbor_ids"].shape, (2, 3))


if __name__ == "__main__":
  tf.test.main()
