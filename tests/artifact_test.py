"""The export artifact: layout and manifest, load() with embed/search/classify, ScaNN or exact search, atomic
writes, clear errors for missing, cut-short or corrupt files, and the backbone files (loaded without our code in a
clean process). Exports a tiny run trained on Fashion-MNIST."""

from __future__ import annotations

from tests import testing  # First: splits the CPU before TensorFlow starts.

# isort: split

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import h5py
import keras
import numpy as np
import tensorflow as tf

import tf_instdisc
from tf_instdisc import artifact
from tf_instdisc import backbones
from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import distribute
from tf_instdisc import features
from tf_instdisc import index as index_lib
from tf_instdisc import model as model_lib
from tf_instdisc import search
from tf_instdisc import train_lib


def _fashion_images(n: int) -> np.ndarray:
  return data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))[:n, ..., None]


# Run in a clean process where tf_instdisc cannot be imported (a finder refuses it: the package may be installed,
# e.g. editable, as CI does): load backbone.keras with Keras alone, compute the pooled features and the stage outputs
# of the test images, and the stage shapes for a larger image.
_LOAD_WITH_KERAS_ONLY = """
import json, sys

class _NoProject:
  def find_spec(self, name, path=None, target=None):
    if name == "tf_instdisc" or name.startswith("tf_instdisc."):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, _NoProject())
import keras, numpy as np
assert not [m for m in sys.modules if m.startswith("tf_instdisc")]
export_dir, out = sys.argv[1], sys.argv[2]
info = json.load(open(f"{export_dir}/backbone/backbone.json"))
backbone = keras.saving.load_model(f"{export_dir}/backbone/backbone.keras")
stages = [backbone.get_layer(stage["layer"]).output for stage in info["stages"]]
taps = keras.Model(backbone.input, [backbone.output, *stages])
images = np.load(f"{out}/images.npy")
for i, array in enumerate(taps.predict(images, verbose=0)):
  np.save(f"{out}/out{i}.npy", array)
large = taps.predict(np.zeros([1, 64, 48, images.shape[-1]], np.float32), verbose=0)
assert not [m for m in sys.modules if m.startswith("tf_instdisc")], "loading imported tf_instdisc"
json.dump({"large_shapes": [list(a.shape) for a in large], "layers": sorted({type(l).__module__ for l in
           backbone.layers}), "synchronized": [l.synchronized for l in backbone.layers if hasattr(l, "synchronized")]},
          open(f"{out}/facts.json", "w"))
"""


@unittest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class ArtifactTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.tmp)
    cls.model_dir = os.path.join(cls.tmp, "run")
    cls.cfg = testing.tiny_config(cls.model_dir, epochs=1)
    train_lib.run(cls.cfg, distribute.make_strategy("one_device"))
    cls.export_dir = artifact.write_export(cls.model_dir, os.path.join(cls.tmp, "export"), recall_queries=16)
    cls.exported = tf_instdisc.load(cls.export_dir)
    cls.backbone = model_lib.backbone_of(features.load_run(cls.model_dir).model)
    with open(os.path.join(cls.export_dir, "backbone", "backbone.json")) as f:
      cls.backbone_info = json.load(f)

  def _copy(self) -> str:
    copy = os.path.join(self.create_tempdir().full_path, "export")
    shutil.copytree(self.export_dir, copy)
    return copy

  @staticmethod
  def _edit_manifest(export_dir: str, edit) -> None:
    """Applies edit(manifest) to export_dir/manifest.json and rewrites it (the files keep their recorded sizes)."""
    path = os.path.join(export_dir, "manifest.json")
    with open(path) as f:
      manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
      json.dump(manifest, f)

  def _replace_array(self, export_dir: str, relative: str, array: np.ndarray) -> None:
    """A new .npy file with its size recorded in the manifest, so only the cross-checks can tell."""
    np.save(os.path.join(export_dir, relative), array)
    size = os.path.getsize(os.path.join(export_dir, relative))
    self._edit_manifest(export_dir, lambda manifest: manifest["files"].update({relative: size}))

  def test_layout_and_manifest(self):
    manifest = self.exported.manifest
    self.assertEqual(manifest["format"], artifact.FORMAT)
    step = 64 // self.cfg.train.batch_size
    self.assertEqual(manifest["saved_model"]["version"], step)
    self.assertTrue(os.path.exists(os.path.join(self.export_dir, "saved_model", str(step), "saved_model.pb")))
    for name in ("embeddings.npy", "ids.npy", "labels.npy"):
      self.assertTrue(os.path.exists(os.path.join(self.export_dir, "index", name)), name)
    self.assertEqual(manifest["inputs"]["images"], {"shape": [None, 28, 28, 1], "dtype": "float32",
                                                    "range": [0, 255]})
    self.assertEqual(manifest["embedding_dim"], 16)
    self.assertEqual(manifest["dataset"], "fashion_mnist")
    self.assertEqual(manifest["collection"]["size"], 64)
    self.assertEqual(manifest["collection"]["class_names"], list(data_lib.FASHION_MNIST_CLASSES))
    self.assertEqual(manifest["knn"], {"k": self.cfg.eval.knn_k, "temperature": self.cfg.eval.knn_temperature})
    self.assertEqual(manifest["index"]["kind"], "brute_force")  # 64 items: below index.EXACT_BELOW.
    self.assertEqual(manifest["index"]["recall_at_10"], 1.0)
    self.assertEqual(manifest["index"]["recall_target"], 0.95)
    self.assertEqual(manifest["index"]["recall_queries_from"], "held-out queries")
    self.assertFalse(manifest["index"]["fell_back"])
    self.assertLen(manifest["index"]["tuning"]["tried"], 1)  # Brute force: measured, nothing to tune.
    self.assertEqual(manifest["versions"]["tensorflow"], tf.__version__)
    self.assertEqual(config_lib.from_dict(manifest["config"]), self.cfg)
    self.assertEqual(set(manifest["files"]), {os.path.relpath(p, self.export_dir) for p in glob.glob(
        os.path.join(self.export_dir, "**", "*"), recursive=True) if os.path.isfile(p)} - {"manifest.json"})
    self.assertEmpty(glob.glob(f"{self.export_dir}.*"))  # No staging leftovers beside it.
    self.assertEqual(manifest["backbone"], {
        "dir": "backbone", "arch": "convnet_small", "features": 256, "weights": "backbone/backbone.weights.h5",
        "keras": "backbone/backbone.keras", "info": "backbone/backbone.json"})
    for key in ("weights", "keras", "info"):
      self.assertIn(manifest["backbone"][key], manifest["files"])

  def test_backbone_weights_load_into_a_fresh_backbone(self):
    path = os.path.join(self.export_dir, self.exported.manifest["backbone"]["weights"])
    with h5py.File(path) as f:
      names = []
      f.visit(names.append)
    self.assertLen([name for name in names if "/vars/" in name], len(self.backbone.weights))  # The backbone alone.
    self.assertEmpty([name for name in names if "dense" in name or "bank" in name])  # No projection head, no bank.
    images = _fashion_images(5).astype(np.float32)
    expected = self.backbone(images, training=False).numpy()
    for input_shape in ((28, 28, 1), (None, None, 1)):  # Fully convolutional: any input size takes the weights.
      fresh = backbones.build_backbone("convnet_small", input_shape, seed=self.cfg.train.seed + 1)
      self.assertGreater(np.abs(fresh(images, training=False).numpy() - expected).max(), 1e-3)
      fresh.load_weights(path)
      self.assertAllClose(fresh(images, training=False).numpy(), expected, atol=1e-5)

  def test_backbone_keras_loads_with_keras_alone_in_a_clean_process(self):
    out = self.create_tempdir().full_path
    images = _fashion_images(5).astype(np.float32)
    np.save(os.path.join(out, "images.npy"), images)
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")  # No PYTHONPATH: the repo is not importable.
    subprocess.run([sys.executable, "-c", _LOAD_WITH_KERAS_ONLY, self.export_dir, out], cwd=out, env=env, check=True,
                   timeout=300)
    stages = [self.backbone.get_layer(stage["layer"]).output for stage in self.backbone_info["stages"]]
    taps = keras.Model(self.backbone.input, [self.backbone.output, *stages])
    for i, expected in enumerate(taps(images, training=False)):
      self.assertAllClose(np.load(os.path.join(out, f"out{i}.npy")), expected.numpy(), atol=1e-5)
    with open(os.path.join(out, "facts.json")) as f:
      facts = json.load(f)
    # Any image size, not only the 28 x 28 it was trained at: 64 x 48 shows each stage's stride.
    self.assertEqual(facts["large_shapes"], [[1, 256], [1, 64, 48, 32], [1, 32, 24, 64], [1, 16, 12, 128],
                                             [1, 8, 6, 256]])
    self.assertTrue(all(module.startswith("keras.") for module in facts["layers"]), facts["layers"])
    self.assertNotIn(True, facts["synchronized"])  # Keras refuses synchronized BN outside its TF backend.
    self.assertLen(facts["synchronized"], 6)

  def test_backbone_json_describes_the_backbone(self):
    info = self.backbone_info
    self.assertEqual(info["arch"], self.cfg.model.arch)
    self.assertEqual(info["input_shape"], [28, 28, 1])
    self.assertEqual(info["keras_input_shape"], [None, None, 1])
    self.assertEqual(info["output"]["features"], self.backbone.output.shape[-1])
    self.assertEqual(info["output"]["layer"], self.backbone.layers[-1].name)
    self.assertEqual({k: info["pixels"][k] for k in ("dtype", "range", "mean", "std")},
                     {"dtype": "float32", "range": [0, 255], "mean": 127.5, "std": 64.0})
    self.assertEqual(info["stages"], [{"layer": "conv1_relu", "stride": 1, "channels": 32},
                                      {"layer": "conv2_2_relu", "stride": 2, "channels": 64},
                                      {"layer": "conv3_2_relu", "stride": 4, "channels": 128},
                                      {"layer": "conv4_1_relu", "stride": 8, "channels": 256}])
    for stage in info["stages"]:
      self.assertEqual(self.backbone.get_layer(stage["layer"]).output.shape[-1], stage["channels"])
    self.assertEqual(info["files"], {"weights": "backbone.weights.h5", "keras": "backbone.keras"})
    self.assertIn("build_backbone('convnet_small', (28, 28, 1))", info["rebuild"])

  def test_a_narrower_backbone_is_rebuilt_at_its_width(self):
    backbone = backbones.build_backbone("convnet_small", (28, 28, 1), seed=3, width_multiplier=0.5)
    directory = os.path.join(self.create_tempdir().full_path, "backbone")
    artifact.write_backbone(directory, backbone, arch="convnet_small", input_shape=(28, 28, 1), step=7,
                            width_multiplier=0.5)
    with open(os.path.join(directory, artifact.BACKBONE_INFO_FILE)) as f:
      info = json.load(f)
    self.assertEqual(info["width_multiplier"], 0.5)
    self.assertIn("build_backbone('convnet_small', (28, 28, 1), width_multiplier=0.5)", info["rebuild"])
    self.assertEqual([stage["channels"] for stage in info["stages"]], [16, 32, 64, 128])
    loaded = keras.saving.load_model(os.path.join(directory, artifact.BACKBONE_KERAS_FILE))
    images = _fashion_images(3).astype(np.float32)
    self.assertAllClose(loaded(images, training=False), backbone(images, training=False), atol=1e-5)

  def test_a_grid_pooled_backbone_is_rebuilt_with_its_grid(self):
    backbone = backbones.build_backbone("convnet_small", (28, 28, 1), seed=4, width_multiplier=0.5, pool_grid=2)
    directory = os.path.join(self.create_tempdir().full_path, "backbone")
    artifact.write_backbone(directory, backbone, arch="convnet_small", input_shape=(28, 28, 1), step=7,
                            width_multiplier=0.5, pool_grid=2)
    with open(os.path.join(directory, artifact.BACKBONE_INFO_FILE)) as f:
      info = json.load(f)
    self.assertEqual((info["pool_grid"], info["output"]["features"]), (2, 512))
    self.assertIn("2x2 grid", info["output"]["what"])
    self.assertIn("build_backbone('convnet_small', (28, 28, 1), width_multiplier=0.5, pool_grid=2)", info["rebuild"])
    loaded = keras.saving.load_model(os.path.join(directory, artifact.BACKBONE_KERAS_FILE))
    images = _fashion_images(3).astype(np.float32)
    self.assertAllClose(loaded(images, training=False), backbone(images, training=False), atol=1e-5)

  def test_resnet_stages_end_with_each_stage_last_block(self):
    for arch, last_blocks in (("resnet18_cifar", (2, 2, 2, 2)), ("resnet50", (3, 4, 6, 3))):
      backbone = backbones.build_backbone(arch, (32, 32, 3))
      self.assertEqual(artifact.stage_layers(arch, backbone),
                       [f"stage{stage}_block{block}_out" for stage, block in enumerate(last_blocks, start=1)])

  def test_embed_accepts_pixels_bytes_and_files(self):
    images = _fashion_images(4)
    from_pixels = self.exported.embed(images)
    self.assertEqual(from_pixels.shape, (4, 16))
    self.assertAllClose(np.linalg.norm(from_pixels, axis=1), np.ones(4), atol=1e-5)
    self.assertAllClose(self.exported.embed(images[0]), from_pixels[:1], atol=1e-6)
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    self.assertAllClose(self.exported.embed(encoded), from_pixels, atol=1e-5)
    path = os.path.join(self.create_tempdir().full_path, "q.png")
    with open(path, "wb") as f:
      f.write(encoded[2])
    self.assertAllClose(self.exported.embed(path), from_pixels[2:3], atol=1e-5)

  def test_search_finds_a_collection_item_first(self):
    rows = np.array([0, 17, 63])
    neighbors = self.exported.search(self.exported.embeddings[rows], k=3)
    self.assertAllEqual(neighbors.rows[:, 0], rows)
    self.assertAllEqual(neighbors.ids[:, 0], self.exported.ids[rows])
    self.assertAllClose(neighbors.scores[:, 0], np.ones(3), atol=1e-5)
    self.assertAllEqual(neighbors.labels, self.exported.labels[neighbors.rows])
    self.assertTrue(np.all(np.diff(neighbors.scores, axis=1) <= 1e-6))

  def test_collection_images_come_from_the_train_split(self):
    images = self.exported.collection_images(np.array([[5, 0], [5, 63]]))
    self.assertEqual(sorted(images), [0, 5, 63])
    train = data_lib.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    for row, image in images.items():
      self.assertAllEqual(image[..., 0], train[row])

  def test_search_files_lists_neighbours_and_draws_the_grid(self):
    tmp = self.create_tempdir().full_path
    paths = []
    for i, image in enumerate(_fashion_images(2)):
      paths.append(os.path.join(tmp, f"q{i}.png"))
      tf.io.write_file(paths[-1], tf.io.encode_png(image))
    grid = os.path.join(tmp, "grid.png")
    lines = search.search_files(self.export_dir, paths, k=3, grid=grid)
    self.assertEqual(lines[0], f"{self.export_dir}: 64 items, scann search")
    self.assertEqual([line for line in lines if line.startswith("query")], [f"query {p}" for p in paths])
    self.assertLen([line for line in lines if "score" in line], 6)
    self.assertRegex(lines[2], r"^\s+1  score [01]\.\d{4}  id \d+  label \S")
    self.assertEqual(lines[-1], f"wrote {grid}")
    self.assertGreater(os.path.getsize(grid), 1000)

  def test_bad_query_files_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--image: /no/such.png does not exist"):
      search.read_queries(["/no/such.png"], channels=1)
    not_image = os.path.join(self.create_tempdir().full_path, "x.png")
    with open(not_image, "w") as f:
      f.write("text")
    with self.assertRaisesRegex(ValueError, f"--image: cannot decode {not_image}"):
      search.read_queries([not_image], channels=1)

  def test_scann_and_exact_search_agree(self):
    self.assertEqual(self.exported.backend, "scann")
    exact = tf_instdisc.load(self.export_dir, use_scann=False)
    self.assertEqual(exact.backend, "exact")
    images = _fashion_images(10)
    a, b = self.exported.search(images, k=5), exact.search(images, k=5)
    self.assertAllEqual(a.ids, b.ids)
    self.assertAllClose(a.scores, b.scores, atol=1e-4)

  def test_classify_is_the_knn_signature_vote(self):
    images = _fashion_images(12)
    signature = self.exported.saved_model.signatures["knn"]
    expected = signature(images=tf.constant(images, tf.float32))["predicted_label"].numpy()
    self.assertAllEqual(self.exported.classify(images), expected)

  def test_falls_back_to_exact_search_without_scann(self):
    with mock.patch.object(index_lib, "scann_available", return_value=False):
      exported = tf_instdisc.load(self.export_dir)
    self.assertEqual(exported.backend, "exact")
    self.assertAllEqual(exported.search(_fashion_images(3), k=4).ids, self.exported.search(_fashion_images(3), k=4).ids)

  def test_export_without_index_or_backbone(self):
    export_dir = artifact.write_export(self.model_dir, os.path.join(self.create_tempdir().full_path, "e"),
                                       index="none", backbone=False)
    exported = tf_instdisc.load(export_dir)
    self.assertEqual(exported.manifest["index"]["kind"], "none")
    self.assertFalse(os.path.exists(os.path.join(export_dir, "index", "scann")))
    self.assertEqual(exported.backend, "exact")
    self.assertIsNone(exported.manifest["backbone"])
    self.assertFalse(os.path.exists(os.path.join(export_dir, "backbone")))

  def test_knn_batch_and_recall_options(self):
    export_dir = artifact.write_export(self.model_dir, os.path.join(self.create_tempdir().full_path, "e"),
                                       knn_k=3, knn_temperature=0.5, batch_size=7, recall_queries=0)
    exported = tf_instdisc.load(export_dir)
    self.assertEqual(exported.manifest["knn"], {"k": 3, "temperature": 0.5})
    self.assertNotIn("recall_at_10", exported.manifest["index"])
    self.assertAllClose(exported.embeddings, self.exported.embeddings, atol=1e-5)  # Batching changes nothing.
    neighbors = exported.saved_model.signatures["knn"](images=tf.constant(_fashion_images(2), tf.float32))
    self.assertEqual(neighbors["neighbor_ids"].shape, (2, 3))

  def test_search_files_exact(self):
    path = os.path.join(self.create_tempdir().full_path, "q.png")
    tf.io.write_file(path, tf.io.encode_png(_fashion_images(1)[0]))
    exact = search.search_files(self.export_dir, [path], k=2, exact=True)
    self.assertEqual(exact[0], f"{self.export_dir}: 64 items, exact search")
    self.assertEqual(exact[1:], search.search_files(self.export_dir, [path], k=2)[1:])

  def test_existing_export_dir_is_refused_then_replaced_with_overwrite(self):
    export_dir = self._copy()
    with self.assertRaisesRegex(ValueError, "--export_dir: .* already exists; pass --overwrite"):
      artifact.write_export(self.model_dir, export_dir)
    artifact.write_export(self.model_dir, export_dir, overwrite=True, version=99, index="none")
    self.assertEqual(artifact.read_manifest(export_dir)["saved_model"]["version"], 99)
    self.assertEqual(os.listdir(os.path.join(export_dir, "saved_model")), ["99"])
    self.assertEmpty(glob.glob(f"{export_dir}.*"))

  def test_an_export_dir_under_a_file_is_one_line_naming_it(self):
    blocker = os.path.join(self.create_tempdir().full_path, "a_file")
    with open(blocker, "w") as f:
      f.write("not a directory")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, os.path.join(testing.REPO_ROOT, "export", "export.py"),
                             f"--model_dir={self.model_dir}", f"--export_dir={blocker}/export", "--index=none",
                             "--nobackbone"], cwd=testing.REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertNotIn("Traceback", result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    self.assertStartsWith(last, "export.py: ")
    self.assertIn(blocker, last)
    with open(blocker) as f:
      self.assertEqual(f.read(), "not a directory")

  def test_interrupted_export_leaves_no_artifact(self):
    export_dir = os.path.join(self.create_tempdir().full_path, "e")
    with mock.patch.object(index_lib, "save_searcher", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        artifact.write_export(self.model_dir, export_dir)
    self.assertFalse(os.path.exists(export_dir))
    self.assertEmpty(glob.glob(f"{export_dir}.*"))

  def test_interrupted_replacement_keeps_the_old_export(self):
    export_dir = self._copy()
    before = artifact.read_manifest(export_dir)
    with mock.patch.object(index_lib, "save_searcher", side_effect=OSError(28, "No space left on device")):
      with self.assertRaises(OSError):
        artifact.write_export(self.model_dir, export_dir, overwrite=True, version=5)
    self.assertEqual(artifact.read_manifest(export_dir), before)

  def test_a_staging_dir_never_loads_as_complete(self):
    staging = artifact.staging_dir(os.path.join(self.create_tempdir().full_path, "e"))
    shutil.copytree(os.path.join(self.export_dir, "saved_model"), os.path.join(staging, "saved_model"))
    with self.assertRaisesRegex(ValueError, "not a complete export: manifest.json is missing"):
      tf_instdisc.load(staging)

  def test_missing_and_corrupt_files_are_named(self):
    with self.assertRaisesRegex(ValueError, "does not exist"):
      tf_instdisc.load(os.path.join(self.tmp, "nowhere"))
    cases = {
        "manifest.json": (lambda p: open(p, "w").write("{not json"), "manifest.json is corrupt"),
        "index/embeddings.npy": (lambda p: open(p, "r+b").truncate(100), "embeddings.npy has 100 bytes"),
        "index/labels.npy": (os.remove, "labels.npy is missing"),
        "backbone/backbone.weights.h5": (lambda p: open(p, "r+b").truncate(1000), "backbone.weights.h5 has 1000 bytes"),
        "backbone/backbone.keras": (os.remove, "backbone.keras is missing"),
    }
    for relative, (damage, message) in cases.items():
      export_dir = self._copy()
      damage(os.path.join(export_dir, relative))
      with self.assertRaisesRegex(ValueError, message):
        tf_instdisc.load(export_dir)

  def test_a_manifest_that_disagrees_with_its_files_is_refused_naming_both(self):
    version = self.exported.manifest["saved_model"]["version"]
    embeddings = self.exported.embeddings

    def set_key(*keys_and_value):
      *keys, last, value = keys_and_value

      def edit(manifest):
        entry = manifest
        for key in keys:
          entry = entry[key]
        entry[last] = value
      return edit

    cases = {
        "embedding_dim": (set_key("embedding_dim", 32),
                          "manifest.json says embedding_dim 32, index/embeddings.npy has 16 columns"),
        "collection_size": (set_key("collection", "size", 65),
                            "manifest.json says collection size 65, index/embeddings.npy has 64 rows"),
        "input_shape": (set_key("inputs", "images", "shape", [None, 32, 32, 1]),
                        f"manifest.json says inputs.images shape [None, 32, 32, 1], saved_model/{version} "
                        "serving_default takes [None, 28, 28, 1]"),
        "labelled": (set_key("collection", "labelled", False),
                     "manifest.json says collection labelled false, but index/labels.npy exists"),
        "index_kind": (set_key("index", "settings", "kind", "tree_ah"),
                       "manifest.json says index kind tree_ah, index/scann/ is a brute_force searcher"),
        "float64": (lambda d: self._replace_array(d, "index/embeddings.npy", embeddings.astype(np.float64)),
                    "index/embeddings.npy holds float64, but a tf_instdisc.export/1 export (manifest.json) stores "
                    "float32"),
        "short_ids": (lambda d: self._replace_array(d, "index/ids.npy", self.exported.ids[:63]),
                      "manifest.json says collection size 64, index/ids.npy has 63 rows"),
        "other_model": (lambda d: (self._replace_array(d, "index/embeddings.npy", np.tile(embeddings, 2)),
                                   self._edit_manifest(d, set_key("embedding_dim", 32))),
                        f"manifest.json says embedding_dim 32, saved_model/{version} serving_default returns "
                        "embeddings of 16"),
    }
    for name, (damage, message) in cases.items():
      with self.subTest(name):
        export_dir = self._copy()
        if name in ("float64", "short_ids", "other_model"):
          damage(export_dir)
        else:
          self._edit_manifest(export_dir, damage)
        artifact.read_manifest(export_dir)  # The sizes still agree: only the cross-checks refuse it.
        with self.assertRaises(ValueError) as raised:
          tf_instdisc.load(export_dir)
        self.assertEqual(str(raised.exception), f"export {export_dir}: {message}")

  def test_search_command_prints_the_refusal_and_exits_non_zero(self):
    export_dir = self._copy()
    self._edit_manifest(export_dir, lambda manifest: manifest.update(embedding_dim=32))
    query = os.path.join(self.create_tempdir().full_path, "q.png")
    tf.io.write_file(query, tf.io.encode_png(_fashion_images(1)[0]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, os.path.join(testing.REPO_ROOT, "export", "search.py"),
                             f"--export_dir={export_dir}", f"--image={query}"], cwd=testing.REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertEqual(result.stdout, "")
    self.assertEqual([line for line in result.stderr.splitlines() if "manifest.json" in line], [
        f"search.py: export {export_dir}: manifest.json says embedding_dim 32, index/embeddings.npy has 16 columns"])

  def test_corrupt_scann_index_is_named(self):
    export_dir = self._copy()
    scann_dir = os.path.join(export_dir, "index", "scann")
    for path in glob.glob(os.path.join(scann_dir, "*")):  # Same sizes, so only the loader can tell.
      size = os.path.getsize(path)
      with open(path, "wb") as f:
        f.write(b"\xff" * size)
    with self.assertRaisesRegex(ValueError, "scann"):
      tf_instdisc.load(export_dir)

  def test_a_model_dir_without_a_run_is_named(self):
    with self.assertRaisesRegex(ValueError, "--model_dir: .*config.json does not exist"):
      artifact.write_export(self.create_tempdir().full_path, os.path.join(self.create_tempdir().full_path, "e"))


class FolderExportTest(tf.test.TestCase):
  """A folder dataset: the index keeps every row's file, search names it and the grid reads neighbours from it."""

  def test_paths_are_kept_and_searched(self):
    root = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    files = []
    for label, name in enumerate(("ants", "bees")):
      os.makedirs(os.path.join(root, "train", name))
      for i in range(8):
        image = np.clip(rng.normal(60 + 120 * label, 30, (10, 12, 3)), 0, 255).astype(np.uint8)
        files.append(os.path.join(root, "train", name, f"{i}.png"))
        tf.io.write_file(files[-1], tf.io.encode_png(image))
    model_dir = os.path.join(root, "run")
    cfg = testing.tiny_config(model_dir, dataset="folder", data_dir=root, image_size=8, epochs=1, eval_every_epochs=0,
                                num_negatives=8, batch_size=8)
    train_lib.run(cfg, distribute.make_strategy("one_device"))
    exported = tf_instdisc.load(artifact.write_export(model_dir, os.path.join(root, "export"), index="none"))
    self.assertEqual(exported.paths, files)
    self.assertEqual(exported.manifest["inputs"]["images"]["shape"], [None, None, None, 3])
    self.assertEqual(exported.class_names, ["ants", "bees"])
    neighbors = exported.search([files[3], files[12]], k=4)
    self.assertAllEqual(neighbors.rows[:, 0], [3, 12])  # Each file finds itself first.
    self.assertAllClose(neighbors.scores[:, 0], [1.0, 1.0], atol=1e-5)
    images = exported.collection_images(neighbors.rows)
    self.assertEqual(set(images), set(neighbors.rows.ravel().tolist()))
    self.assertAllEqual(images[12], tf.io.decode_png(tf.io.read_file(files[12])))


if __name__ == "__main__":
  tf.test.main()
