"""Tests of tf_instdisc.data: Fashion-MNIST files, TFDS (mocked), image folders, and the train/eval pipelines."""

from tests import testing  # noqa: I001  (splits the CPU before TensorFlow starts)

import dataclasses
import gzip
import io
import os
import re
import shutil
import tempfile
from typing import ClassVar
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized
from PIL import Image

from tf_instdisc import config as config_lib
from tf_instdisc import data

_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                  "t10k-labels-idx1-ubyte.gz")
_AUGMENT = config_lib.AugmentConfig()


# ----------------------------------------------------------------------------------------------------------- helpers
def _idx_bytes(array: np.ndarray) -> bytes:
  """The IDX (MNIST) encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, data."""
  header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _tmpdir(test: tf.test.TestCase) -> str:
  """A fresh directory removed after the test (absltest's create_tempdir needs parsed flags, pytest has none)."""
  directory = tempfile.TemporaryDirectory()
  test.addCleanup(directory.cleanup)
  return directory.name


def _write(path: str, content: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)
  return path


def _write_gzip(path: str, content: bytes) -> str:
  return _write(path, gzip.compress(content))


def _image(height: int, width: int, channels: int = 3, *, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _write_png(path: str, image: np.ndarray) -> str:
  return _write(path, tf.io.encode_png(image).numpy())


def _write_jpeg(path: str, image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  return _write(path, buffer.getvalue())


def _images(split: data.Split) -> list[np.ndarray]:
  return [ex[data.IMAGE_KEY] for ex in split.make().as_numpy_iterator()]


def _batches(ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
  return list(ds.as_numpy_iterator())


def _ids(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
  return np.concatenate([b[data.ID_KEY] for b in batches])


# Folder trees that load_source must reject: each returns the path the error must name (besides --data_dir).
def _no_train_dir(root: str) -> str:
  os.makedirs(os.path.join(root, "test", "a"))
  return os.path.join(root, "train")


def _empty_train_dir(root: str) -> str:
  os.makedirs(os.path.join(root, "train", "a"))
  _write(os.path.join(root, "train", "a", "notes.txt"), b"not an image suffix")
  return os.path.join(root, "train")


def _empty_image_file(root: str) -> str:
  _write_png(os.path.join(root, "train", "a", "good.png"), _image(4, 4))
  return _write(os.path.join(root, "train", "a", "empty.png"), b"")


def _text_with_jpg_suffix(root: str) -> str:
  _write_png(os.path.join(root, "train", "a", "good.png"), _image(4, 4))
  return _write(os.path.join(root, "train", "b", "fake.jpg"), b"this is plain text, not a JPEG")


def _empty_file_in_eval_split(root: str) -> str:
  _write_png(os.path.join(root, "train", "a", "good.png"), _image(4, 4))
  return _write(os.path.join(root, "test", "a", "empty.png"), b"")


def _eval_class_not_in_train(root: str) -> str:
  _write_png(os.path.join(root, "train", "a", "good.png"), _image(4, 4))
  _write_png(os.path.join(root, "test", "zebra", "x.png"), _image(4, 4))
  return os.path.join(root, "test", "zebra")


# ----------------------------------------------------------------------------------------------------- Fashion-MNIST
class FashionMnistTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.full = data.load_source(config_lib.DataConfig(dataset="fashion_mnist"))
    cls.full_train_labels = data.load_labels(cls.full.train)
    cls.full_eval_labels = data.load_labels(cls.full.eval)
    # The Debian files linked into a --data_dir, with the default location switched off: only data_dir can work.
    cls.linked_dir = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.linked_dir)
    for name in _FASHION_FILES:
      os.symlink(os.path.join(testing.FASHION_MNIST_DIR, name), os.path.join(cls.linked_dir, name))
    with mock.patch.object(data, "FASHION_MNIST_DIRS", ()):
      cls.cut = data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=cls.linked_dir,
                                                       max_train_examples=100, max_eval_examples=30))
    cls.cut_examples = list(cls.cut.train.make().as_numpy_iterator())

  def test_uncut_shapes_sizes_and_classes(self):
    self.assertEqual(self.full.name, "fashion_mnist")
    self.assertEqual(self.full.image_shape, (28, 28, 1))
    self.assertEqual(self.full.num_classes, 10)
    self.assertEqual(self.full.class_names[0], "T-shirt/top")
    self.assertLen(self.full.class_names, 10)
    self.assertEqual(self.full.train.num_examples, 60000)
    self.assertEqual(self.full.eval.num_examples, 10000)

  def test_uncut_labels_are_balanced_and_in_range(self):
    self.assertEqual(self.full_train_labels.dtype, np.int64)
    self.assertAllEqual(np.bincount(self.full_train_labels, minlength=10), [6000] * 10)
    self.assertAllEqual(np.bincount(self.full_eval_labels, minlength=10), [1000] * 10)

  def test_symlinked_data_dir_is_used(self):
    self.assertEqual(self.cut.name, "fashion_mnist")
    self.assertEqual(self.cut.image_shape, (28, 28, 1))
    self.assertEqual(self.cut.num_classes, 10)

  def test_cut_to_max_examples(self):
    self.assertEqual(self.cut.train.num_examples, 100)
    self.assertEqual(self.cut.eval.num_examples, 30)
    self.assertLen(self.cut_examples, 100)
    self.assertLen(list(self.cut.eval.make()), 30)

  def test_cut_examples(self):
    image = self.cut_examples[0][data.IMAGE_KEY]
    self.assertEqual(image.shape, (28, 28, 1))
    self.assertEqual(image.dtype, np.uint8)
    self.assertGreater(image.max(), 100)  # A real garment, not a blank image.
    labels = np.array([ex[data.LABEL_KEY] for ex in self.cut_examples])
    self.assertAllInRange(labels, 0, 9)
    self.assertAllEqual(labels, self.full_train_labels[:100])

  def test_load_labels_of_cut_splits(self):
    self.assertAllEqual(data.load_labels(self.cut.train), self.full_train_labels[:100])
    self.assertAllEqual(data.load_labels(self.cut.eval), self.full_eval_labels[:30])

  def test_data_dir_files_are_read(self):
    data_dir = _tmpdir(self)
    train_images = _image(5, 28 * 28, 1, seed=1).reshape(5, 28, 28)
    test_images = _image(3, 28 * 28, 1, seed=2).reshape(3, 28, 28)
    contents = (train_images, np.array([0, 1, 2, 3, 9], np.uint8), test_images, np.array([4, 5, 6], np.uint8))
    for name, array in zip(_FASHION_FILES, contents):
      _write_gzip(os.path.join(data_dir, name), _idx_bytes(array))
    source = data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=data_dir))
    self.assertEqual(source.train.num_examples, 5)
    self.assertEqual(source.eval.num_examples, 3)
    self.assertAllEqual(np.stack(_images(source.train)), train_images[..., None])
    self.assertAllEqual(data.load_labels(source.train), [0, 1, 2, 3, 9])
    self.assertAllEqual(data.load_labels(source.eval), [4, 5, 6])
    no_eval = data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=data_dir, eval_split=""))
    self.assertIsNone(no_eval.eval)

  def test_corrupt_file_in_data_dir_is_named(self):
    data_dir = _tmpdir(self)
    for name in _FASHION_FILES[1:]:
      os.symlink(os.path.join(testing.FASHION_MNIST_DIR, name), os.path.join(data_dir, name))
    bad = _write(os.path.join(data_dir, _FASHION_FILES[0]), b"not gzip at all")
    with self.assertRaisesRegex(ValueError, re.escape(bad)):
      data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=data_dir))

  def test_image_label_count_mismatch_is_named(self):
    data_dir = _tmpdir(self)
    contents = (np.zeros((5, 28, 28)), np.zeros(4), np.zeros((3, 28, 28)), np.zeros(3))
    for name, array in zip(_FASHION_FILES, contents):
      _write_gzip(os.path.join(data_dir, name), _idx_bytes(array))
    with self.assertRaisesRegex(ValueError, "5 images but .* 4 labels"):
      data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=data_dir))


class ReadIdxTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("plain", "a.idx", _write),
      ("gzipped", "a.idx.gz", _write_gzip),
  )
  def test_round_trip(self, name, writer):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = writer(os.path.join(_tmpdir(self), name), _idx_bytes(array))
    self.assertAllEqual(data.read_idx(path), array)

  def test_reads_debian_labels(self):
    labels = data.read_idx(os.path.join(testing.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    self.assertEqual(labels.shape, (10000,))
    self.assertAllInRange(labels, 0, 9)

  @parameterized.named_parameters(
      ("empty", "x.idx", _write, b""),
      ("three_bytes", "x.idx", _write, b"\x00\x00\x08"),
      ("wrong_magic", "x.idx", _write, b"\x12\x34\x08\x01" + (2).to_bytes(4, "big") + b"ab"),
      ("not_unsigned_bytes", "x.idx", _write, b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"abcd"),
      ("truncated_data", "x.idx", _write, b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc"),
      ("header_shorter_than_its_dims", "x.idx", _write, b"\x00\x00\x08\x03\x00"),
      ("text", "x.idx", _write, b"hello world, this is not an IDX file"),
      ("not_gzip_with_gz_suffix", "x.idx.gz", _write, b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"a"),
      ("truncated_gzip", "x.idx.gz", lambda p, c: _write(p, gzip.compress(c)[:20]), _idx_bytes(np.zeros(500))),
      ("gzipped_truncated_data", "x.idx.gz", _write_gzip, _idx_bytes(np.zeros((4, 4)))[:-3]),
  )
  def test_invalid_file_raises_naming_it(self, name, writer, content):
    path = writer(os.path.join(_tmpdir(self), name), content)
    with self.assertRaisesRegex(ValueError, re.escape(path)):
      data.read_idx(path)

  def test_missing_file_raises_naming_it(self):
    path = os.path.join(_tmpdir(self), "missing.idx.gz")
    with self.assertRaisesRegex(ValueError, re.escape(path)):
      data.read_idx(path)


# -------------------------------------------------------------------------------------------------------- TFDS (mock)
_MOCK_EXAMPLES = 8  # Per split.


class Cifar10Test(tf.test.TestCase):
  """cifar10 through TFDS, with tfds.testing.mock_data (random examples, no download)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES))
    cls.source = data.load_source(config_lib.DataConfig(dataset="cifar10"))
    cls.element_spec = cls.source.train.make().element_spec
    cls.labels = data.load_labels(cls.source.train)
    cls.eval_labels = data.load_labels(cls.source.eval)
    cls.batches = _batches(data.make_train_dataset(cls.source, config_lib.DataConfig(), _AUGMENT, batch_size=4,
                                                   seed=0, epoch=0))

  def test_source(self):
    self.assertEqual(self.source.name, "cifar10")
    self.assertEqual(self.source.image_shape, (32, 32, 3))
    self.assertEqual(self.source.num_classes, 10)
    self.assertLen(self.source.class_names, 10)  # mock_data has no real metadata: the names are "0".."9".
    self.assertEqual(self.source.train.num_examples, _MOCK_EXAMPLES)

  def test_eval_split_found(self):
    self.assertIsNotNone(self.source.eval)
    self.assertEqual(self.source.eval.num_examples, _MOCK_EXAMPLES)
    self.assertLen(self.eval_labels, _MOCK_EXAMPLES)
    self.assertAllInRange(self.eval_labels, 0, 9)

  def test_images_and_labels(self):
    self.assertEqual(self.element_spec[data.IMAGE_KEY], tf.TensorSpec([32, 32, 3], tf.uint8))
    self.assertEqual(self.element_spec[data.LABEL_KEY], tf.TensorSpec([], tf.int64))
    self.assertEqual(self.labels.shape, (_MOCK_EXAMPLES,))
    self.assertAllInRange(self.labels, 0, 9)

  def test_train_epoch_has_every_instance_once(self):
    self.assertLen(self.batches, 2)
    self.assertEqual(self.batches[0][data.IMAGE_KEY].shape, (4, 32, 32, 3))
    self.assertAllEqual(np.sort(_ids(self.batches)), np.arange(_MOCK_EXAMPLES))
    self.assertAllEqual(np.concatenate([b[data.LABEL_KEY] for b in self.batches]), self.labels[_ids(self.batches)])


class Imagenet2012Test(tf.test.TestCase):
  """imagenet2012 (variable-size images, 1000 classes) through TFDS, with tfds.testing.mock_data."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES))
    cls.cfg = config_lib.DataConfig(dataset="imagenet2012", image_size=64)
    cls.source = data.load_source(cls.cfg)
    cls.shapes = {image.shape for image in _images(cls.source.train)}
    cls.batches = _batches(data.make_train_dataset(cls.source, cls.cfg, _AUGMENT, batch_size=4, seed=1, epoch=0))
    cls.eval_batches = _batches(data.make_eval_dataset(cls.source.eval, _AUGMENT, image_size=64, batch_size=3))

  def test_source(self):
    self.assertEqual(self.source.name, "imagenet2012")
    self.assertEqual(self.source.image_shape, (None, None, 3))
    self.assertEqual(self.source.num_classes, 1000)
    self.assertEqual(self.source.train.num_examples, _MOCK_EXAMPLES)
    self.assertGreater(len(self.shapes), 1, "mock ImageNet images should vary in size")

  def test_eval_split_found(self):
    self.assertIsNotNone(self.source.eval)
    self.assertEqual(self.source.eval.num_examples, _MOCK_EXAMPLES)

  def test_needs_image_size(self):
    with self.assertRaisesRegex(ValueError, "--image_size"):
      data.resolve_image_size(self.source, 0)
    with self.assertRaisesRegex(ValueError, "--image_size"):
      data.make_train_dataset(self.source, config_lib.DataConfig(dataset="imagenet2012"), _AUGMENT, batch_size=4,
                              seed=0, epoch=0)

  def test_train_batches_at_image_size(self):
    self.assertLen(self.batches, 2)
    for batch in self.batches:
      self.assertEqual(batch[data.IMAGE_KEY].shape, (4, 64, 64, 3))
      self.assertEqual(batch[data.IMAGE_KEY].dtype, np.float32)
      self.assertAllInRange(batch[data.IMAGE_KEY], 0.0, 255.0)
    self.assertGreater(max(b[data.IMAGE_KEY].max() for b in self.batches), 1.0)  # [0, 255], not [0, 1].

  def test_train_epoch_has_every_instance_once(self):
    self.assertAllEqual(np.sort(_ids(self.batches)), np.arange(_MOCK_EXAMPLES))

  def test_eval_batches_in_order_at_image_size(self):
    self.assertAllEqual(_ids(self.eval_batches), np.arange(_MOCK_EXAMPLES))
    self.assertEqual([b[data.IMAGE_KEY].shape for b in self.eval_batches],
                     [(3, 64, 64, 3), (3, 64, 64, 3), (2, 64, 64, 3)])


def _imagenet_like_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """Stands in for TFDS's reader: like the real imagenet2012, the "test" split has no labels (label -1)."""
  del self, decoders, read_config, kwargs
  labels = np.full(4, -1, np.int64) if str(split) == "test" else np.arange(4, dtype=np.int64)
  return tf.data.Dataset.from_tensor_slices({"image": np.zeros((4, 5, 7, 3), np.uint8), "label": labels})


class ImagenetEvalSplitTest(tf.test.TestCase):

  def test_auto_eval_split_has_labels(self):
    # TFDS imagenet2012 5.1.0 has train, validation and an unlabeled test split (label -1, imagenet_common.py):
    # kNN evaluation must use validation, as the paper does.
    with tfds.testing.mock_data(as_dataset_fn=_imagenet_like_as_dataset):
      source = data.load_source(config_lib.DataConfig(dataset="imagenet2012"))
      labels = data.load_labels(source.eval)
    self.assertAllInRange(labels, 0, 999)


class UnknownDatasetTest(tf.test.TestCase):

  def test_unknown_dataset_names_flag(self):
    with self.assertRaisesRegex(ValueError, "--dataset"):
      data.load_source(config_lib.DataConfig(dataset="no_such_dataset_xyz"))

  def test_without_tensorflow_datasets_the_extra_is_named(self):
    with mock.patch.dict("sys.modules", {"tensorflow_datasets": None}):
      with self.assertRaisesRegex(ValueError, r"--dataset=cifar10 reads TFDS, which is not installed: pip install "
                                  r"'tf-instdisc\[tfds\]'"):
        data.load_source(config_lib.DataConfig(dataset="cifar10"))


# ------------------------------------------------------------------------------------------------------------ folders
class FolderTest(tf.test.TestCase, parameterized.TestCase):

  def _labeled_tree(self) -> tuple[str, dict[str, np.ndarray]]:
    """ROOT/train/{cat,ant,dog}, ROOT/test/{ant,dog}: PNG and JPEG, varying sizes."""
    root = _tmpdir(self)
    written = {
        "train/cat/b.png": _image(6, 9, seed=1),
        "train/cat/a.png": _image(7, 5, seed=2),
        "train/ant/z.png": _image(5, 5, seed=3),
        "train/dog/sub/c.png": _image(8, 4, seed=4),
        "test/dog/y.png": _image(4, 6, seed=5),
        "test/ant/x.png": _image(3, 3, seed=6),
    }
    for relative, image in written.items():
      _write_png(os.path.join(root, relative), image)
    _write_jpeg(os.path.join(root, "train", "ant", "j.JPG"), _image(16, 16, seed=7))
    _write(os.path.join(root, "train", "cat", "README.txt"), b"ignored: not an image suffix")
    return root, written

  def test_labels_from_sorted_class_folders(self):
    root, written = self._labeled_tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    relative_files = [os.path.relpath(f, root) for f in source.train.files]
    self.assertEqual(relative_files, ["train/ant/j.JPG", "train/ant/z.png", "train/cat/a.png", "train/cat/b.png",
                                      "train/dog/sub/c.png"])
    self.assertEqual(source.num_classes, 3)
    self.assertEqual(source.class_names, ("ant", "cat", "dog"))
    self.assertEqual(source.image_shape, (None, None, 3))
    self.assertEqual(source.train.num_examples, 5)
    self.assertAllEqual(data.load_labels(source.train), [0, 0, 1, 1, 2])
    examples = list(source.train.make().as_numpy_iterator())
    self.assertAllEqual([ex[data.LABEL_KEY] for ex in examples], [0, 0, 1, 1, 2])
    self.assertEqual(examples[0][data.IMAGE_KEY].shape, (16, 16, 3))
    self.assertAllEqual(examples[2][data.IMAGE_KEY], written["train/cat/a.png"])
    self.assertAllEqual(examples[4][data.IMAGE_KEY], written["train/dog/sub/c.png"])

  def test_test_folder_is_the_eval_split(self):
    root, written = self._labeled_tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertIsNotNone(source.eval)
    self.assertEqual(source.eval.num_examples, 2)
    self.assertAllEqual(data.load_labels(source.eval), [0, 2])  # ant, dog: the train split's class indices.
    images = _images(source.eval)
    self.assertAllEqual(images[0], written["test/ant/x.png"])
    self.assertAllEqual(images[1], written["test/dog/y.png"])

  def test_folder_max_examples(self):
    root, _ = self._labeled_tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, max_train_examples=2,
                                                    max_eval_examples=1))
    self.assertEqual(source.train.num_examples, 2)
    self.assertLen(source.train.files, 2)
    self.assertLen(_images(source.train), 2)
    self.assertAllEqual(data.load_labels(source.eval), [0])

  def test_loose_images_are_unlabeled(self):
    root = _tmpdir(self)
    for i in range(3):
      _write_png(os.path.join(root, "train", f"img{i}.png"), _image(5, 5, seed=i))
    _write_png(os.path.join(root, "test", "t.png"), _image(5, 5))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(data.UNLABELED, -1)
    self.assertEqual(source.num_classes, 0)
    self.assertIsNone(source.eval)
    self.assertEqual(source.train.num_examples, 3)
    self.assertAllEqual(data.load_labels(source.train), [data.UNLABELED] * 3)

  def test_val_folder_is_preferred_to_test(self):
    root = _tmpdir(self)
    for name in ("a", "b"):
      _write_png(os.path.join(root, "train", name, "x.png"), _image(4, 4))
    _write_png(os.path.join(root, "val", "b", "v.png"), _image(4, 4))
    _write_png(os.path.join(root, "test", "a", "t.png"), _image(4, 4))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual([os.path.relpath(f, root) for f in source.eval.files], ["val/b/v.png"])
    self.assertAllEqual(data.load_labels(source.eval), [1])

  def test_loose_train_images_with_labeled_test_folder_have_no_eval(self):
    # kNN needs labeled train features, so the eval split is dropped; its class folders must not be an error.
    root = _tmpdir(self)
    for i in range(3):
      _write_png(os.path.join(root, "train", f"img{i}.png"), _image(5, 5, seed=i))
    _write_png(os.path.join(root, "test", "cat", "t.png"), _image(5, 5))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.num_classes, 0)
    self.assertIsNone(source.eval)

  @parameterized.named_parameters(
      ("missing_train_dir", _no_train_dir),
      ("train_dir_without_images", _empty_train_dir),
      ("empty_image_file", _empty_image_file),
      ("text_file_with_jpg_suffix", _text_with_jpg_suffix),
      ("empty_file_in_eval_split", _empty_file_in_eval_split),
      ("eval_class_not_in_train", _eval_class_not_in_train),
  )
  def test_bad_tree_raises_naming_path_and_flag(self, make_tree):
    root = _tmpdir(self)
    bad_path = make_tree(root)
    with self.assertRaisesRegex(ValueError, re.escape(bad_path)) as raised:
      data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertIn("--data_dir", str(raised.exception))

  def test_truncated_png_is_found_by_find_undecodable(self):
    root = _tmpdir(self)
    good = _write_png(os.path.join(root, "train", "a", "good.png"), _image(32, 32))
    png = tf.io.encode_png(_image(32, 32, seed=9)).numpy()
    bad = _write(os.path.join(root, "train", "a", "half.png"), png[:len(png) // 2])
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))  # The header is valid.
    self.assertEqual(source.train.files, (good, bad))
    self.assertEqual(data.find_undecodable(source.train.files, channels=3), bad)
    self.assertIsNone(data.find_undecodable((good,), channels=3))
    with self.assertRaises(tf.errors.InvalidArgumentError):
      _images(source.train)

  def test_grayscale_decode(self):
    root = _tmpdir(self)
    gray = _image(6, 7, 1, seed=3)
    _write_png(os.path.join(root, "train", "a", "rgb.png"), np.repeat(gray, 3, axis=-1))
    _write_png(os.path.join(root, "train", "b", "gray.png"), gray)
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_channels=1))
    self.assertEqual(source.image_shape, (6, 7, 1))  # No --image_size: both are 6x7, read from their headers.
    images = _images(source.train)
    self.assertEqual([image.shape for image in images], [(6, 7, 1), (6, 7, 1)])
    self.assertAllClose(images[0].astype(np.int32), gray.astype(np.int32), atol=1)
    self.assertAllEqual(images[1], gray)

  def test_rgb_decode_of_grayscale_file(self):
    root = _tmpdir(self)
    gray = _image(4, 5, 1, seed=3)
    _write_png(os.path.join(root, "train", "a", "gray.png"), gray)
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_channels=3))
    self.assertAllEqual(_images(source.train)[0], np.repeat(gray, 3, axis=-1))

  def test_folder_needs_image_size(self):
    root, _ = self._labeled_tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    with self.assertRaisesRegex(ValueError, "--image_size"):
      data.resolve_image_size(source, 0)

  def test_folder_train_dataset_at_image_size(self):
    root, _ = self._labeled_tree()
    cfg = config_lib.DataConfig(dataset="folder", data_dir=root, image_size=12)
    source = data.load_source(cfg)
    batches = _batches(data.make_train_dataset(source, cfg, _AUGMENT, batch_size=2, seed=0, epoch=0))
    self.assertLen(batches, 2)  # 5 images, batch 2: the last partial batch is dropped.
    self.assertEqual(batches[0][data.IMAGE_KEY].shape, (2, 12, 12, 3))
    self.assertLen(set(_ids(batches)), 4)


class HiddenEntriesTest(tf.test.TestCase):
  """Names starting with "." are skipped at every level, as image_dataset_from_directory skips hidden classes."""

  def _tree(self) -> str:
    root = _tmpdir(self)
    for relative in ("train/cat/a.png", "train/dog/b.png", "test/dog/c.png", "train/.ipynb_checkpoints/a.png",
                     "train/cat/.ipynb_checkpoints/a-checkpoint.png", "test/.ipynb_checkpoints/c.png"):
      _write_png(os.path.join(root, relative), _image(4, 4))
    for relative in ("train/.DS_Store", "train/cat/.DS_Store", "test/.DS_Store", "test/dog/.DS_Store"):
      _write(os.path.join(root, relative), b"\x00\x00\x00\x01Bud1")
    _write(os.path.join(root, "train", "cat", "._a.png"), b"\x00\x05\x16\x07 macOS resource fork")  # AppleDouble.
    return root

  def test_hidden_folders_are_no_classes_and_hidden_files_no_images(self):
    root = self._tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_size=4))
    self.assertEqual(source.class_names, ("cat", "dog"))  # Not (".ipynb_checkpoints", "cat", "dog").
    self.assertEqual([os.path.relpath(f, root) for f in source.train.files], ["train/cat/a.png", "train/dog/b.png"])
    self.assertAllEqual(data.load_labels(source.train), [0, 1])
    self.assertEqual([os.path.relpath(f, root) for f in source.eval.files], ["test/dog/c.png"])
    self.assertAllEqual(data.load_labels(source.eval), [1])

  def test_hidden_entries_beside_loose_train_images(self):
    root = _tmpdir(self)
    _write_png(os.path.join(root, "train", "x.png"), _image(4, 4))
    _write(os.path.join(root, "train", "._x.png"), b"\x00\x05\x16\x07")
    _write_png(os.path.join(root, "train", ".ipynb_checkpoints", "x-checkpoint.png"), _image(4, 4))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.train.files, (os.path.join(root, "train", "x.png"),))
    self.assertEqual(source.num_classes, 0)  # Loose images only: the hidden folder made no class either.


class ImageSizeInferenceTest(tf.test.TestCase, parameterized.TestCase):
  """Without --image_size, a folder's image sizes are read from the file headers; one shared size is the input."""

  @parameterized.named_parameters(
      ("png", "png", "PNG", {}),
      ("jpeg", "jpg", "JPEG", {}),
      ("progressive_jpeg_with_exif_and_big_icc_profile", "jpg", "JPEG",
       {"progressive": True, "exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00", "icc_profile": b"\x00" * 70_000}),
      ("gif", "gif", "GIF", {}),
      ("bmp", "bmp", "BMP", {}),
  )
  def test_each_format_gives_the_decoded_size(self, suffix, image_format, save_args):
    root = _tmpdir(self)
    for relative, seed in (("train/a/1", 1), ("train/b/2", 2), ("test/a/3", 3)):
      path = os.path.join(root, f"{relative}.{suffix}")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(_image(13, 21, seed=seed)).save(path, format=image_format, **save_args)
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.image_shape, (13, 21, 3))
    self.assertEqual({image.shape for image in _images(source.train) + _images(source.eval)}, {(13, 21, 3)})

  def test_top_down_bmp_has_its_positive_height(self):
    root = _tmpdir(self)
    buffer = io.BytesIO()
    Image.fromarray(_image(5, 7)).save(buffer, format="BMP")
    raw = bytearray(buffer.getvalue())
    raw[22:26] = (-5).to_bytes(4, "little", signed=True)  # Rows stored top-down.
    _write(os.path.join(root, "train", "a", "top_down.bmp"), bytes(raw))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.image_shape, (5, 7, 3))
    self.assertEqual(_images(source.train)[0].shape, (5, 7, 3))

  def test_same_sized_square_images_need_no_image_size_and_the_size_is_logged(self):
    root = _tmpdir(self)
    _write_png(os.path.join(root, "train", "a", "1.png"), _image(28, 28))
    _write_jpeg(os.path.join(root, "train", "b", "2.jpg"), _image(28, 28))
    _write_png(os.path.join(root, "val", "b", "3.png"), _image(28, 28))
    # Patched, not assertLogs: absl drops INFO when an earlier test in the process lowered its verbosity.
    with mock.patch.object(data.logging, "info") as info:
      source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.image_shape, (28, 28, 3))
    self.assertEqual(data.resolve_image_size(source, 0), 28)
    self.assertEqual(data.resolve_image_size(source, 32), 32)  # --image_size still wins.
    messages = [call.args[0] % call.args[1:] for call in info.call_args_list]
    self.assertIn(f"no --image_size: all 3 images under {root} are 28x28 (height x width)", messages)
    batches = _batches(data.make_train_dataset(source, config_lib.DataConfig(), _AUGMENT, batch_size=2, seed=0,
                                               epoch=0))
    self.assertEqual(batches[0][data.IMAGE_KEY].shape, (2, 28, 28, 3))

  def test_sizes_that_differ_are_refused_naming_two_files(self):
    root = _tmpdir(self)
    first = _write_png(os.path.join(root, "train", "a", "1.png"), _image(28, 28))
    _write_png(os.path.join(root, "train", "a", "2.png"), _image(28, 28))
    other = _write_png(os.path.join(root, "train", "b", "7.png"), _image(32, 40))
    _write_png(os.path.join(root, "train", "b", "8.png"), _image(50, 50))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.image_shape, (None, None, 3))
    with self.assertRaises(ValueError) as raised:
      data.resolve_image_size(source, 0)
    self.assertEqual(str(raised.exception), f"--image_size: images differ in size ({first} is 28x28, {other} is "
                                            "32x40); pass --image_size")
    self.assertEqual(data.resolve_image_size(source, 24), 24)

  def test_an_eval_image_of_another_size_is_named(self):
    root = _tmpdir(self)
    first = _write_png(os.path.join(root, "train", "a", "1.png"), _image(8, 8))
    other = _write_png(os.path.join(root, "test", "a", "2.png"), _image(9, 8))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    with self.assertRaisesRegex(ValueError, re.escape(f"({first} is 8x8, {other} is 9x8); pass --image_size")):
      data.resolve_image_size(source, 0)

  def test_same_sized_images_that_are_not_square(self):
    root = _tmpdir(self)
    _write_png(os.path.join(root, "train", "a", "1.png"), _image(8, 6))
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(source.image_shape, (8, 6, 3))
    with self.assertRaises(ValueError) as raised:
      data.resolve_image_size(source, 0)
    self.assertEqual(str(raised.exception), "--image_size: folder images are 8x6, set --image_size explicitly")

  def test_with_image_size_no_header_is_read(self):
    root = _tmpdir(self)
    _write_png(os.path.join(root, "train", "a", "1.png"), _image(28, 28))
    _write_png(os.path.join(root, "train", "b", "7.png"), _image(32, 40))
    with mock.patch.object(data, "_header_size", side_effect=AssertionError("header read")):
      source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_size=16))
    self.assertEqual((source.image_shape, source.mixed_sizes), ((None, None, 3), ""))
    self.assertEqual(data.resolve_image_size(source, 16), 16)

  def test_a_header_that_cannot_be_read_is_decoded_and_named_when_that_fails(self):
    root = _tmpdir(self)
    _write_png(os.path.join(root, "train", "a", "good.png"), _image(8, 8))
    bad = _write(os.path.join(root, "train", "a", "no_ihdr.png"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with self.assertRaises(ValueError) as raised:
      data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")
    # With --image_size nothing is measured at load: as before, the file is named when training decodes it.
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_size=8))
    self.assertEqual(data.find_undecodable(source.train.files, channels=3), bad)


class DataDirTest(tf.test.TestCase, parameterized.TestCase):
  """An explicit --data_dir is the data: a mistyped one is refused, never replaced by a default copy."""

  @parameterized.named_parameters(("fashion_mnist", "fashion_mnist"), ("cifar10", "cifar10"),
                                  ("imagenet2012", "imagenet2012"), ("folder", "folder"))
  def test_missing_data_dir_is_refused_for_every_dataset(self, dataset):
    missing = os.path.join(_tmpdir(self), "mistyped", "path")
    with mock.patch.object(data, "_load_tfds", side_effect=AssertionError("TFDS reached")):
      with self.assertRaises(ValueError) as raised:
        data.load_source(config_lib.DataConfig(dataset=dataset, data_dir=missing))
    self.assertEqual(str(raised.exception), f"--data_dir: {missing} does not exist")
    self.assertFalse(os.path.exists(missing))  # Not created (TFDS would have).

  def test_a_file_is_no_data_dir(self):
    path = _write(os.path.join(_tmpdir(self), "train-images-idx3-ubyte.gz"), b"")
    with self.assertRaises(ValueError) as raised:
      data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=path))
    self.assertEqual(str(raised.exception), f"--data_dir: {path} is not a directory")

  def test_fashion_mnist_data_dir_without_the_files_does_not_fall_back(self):
    empty = _tmpdir(self)
    _write(os.path.join(empty, "t10k-images-idx3-ubyte.gz"), b"")  # Not enough: the train files are missing.
    with mock.patch.object(data, "FASHION_MNIST_DIRS", (testing.FASHION_MNIST_DIR,)), \
        mock.patch.object(data, "_load_tfds", side_effect=AssertionError("TFDS reached")):
      with self.assertRaises(ValueError) as raised:
        data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=empty))
    self.assertEqual(str(raised.exception), f"--data_dir: {empty} has no Fashion-MNIST files "
                     "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                     "t10k-labels-idx1-ubyte.gz) and no TFDS fashion_mnist/ folder")

  def test_fashion_mnist_data_dir_that_is_a_tfds_data_dir_goes_to_tfds(self):
    tfds_dir = _tmpdir(self)
    os.makedirs(os.path.join(tfds_dir, "fashion_mnist", "3.0.1"))
    with mock.patch.object(data, "_load_tfds", return_value=testing.tiny_source(4, n_eval=2)) as load_tfds:
      data.load_source(config_lib.DataConfig(dataset="fashion_mnist", data_dir=tfds_dir))
    load_tfds.assert_called_once_with("fashion_mnist", tfds_dir, eval_split="auto")

  def test_empty_data_dir_keeps_the_defaults(self):
    with mock.patch.object(data, "FASHION_MNIST_DIRS", ()), \
        mock.patch.object(data, "_load_tfds", return_value=testing.tiny_source(4, n_eval=2)) as load_tfds:
      data.load_source(config_lib.DataConfig(dataset="fashion_mnist"))
      data.load_source(config_lib.DataConfig(dataset="cifar10"))
    self.assertEqual([c.args for c in load_tfds.call_args_list], [("fashion_mnist", ""), ("cifar10", "")])

  def test_a_remote_data_dir_is_left_to_tfds(self):
    with mock.patch.object(data, "_load_tfds", return_value=testing.tiny_source(4, n_eval=2)) as load_tfds:
      data.load_source(config_lib.DataConfig(dataset="cifar10", data_dir="gs://bucket/tensorflow_datasets"))
    load_tfds.assert_called_once_with("cifar10", "gs://bucket/tensorflow_datasets", eval_split="auto")


class UndecodableTest(tf.test.TestCase):
  """name_undecodable turns a pipeline's decode error into a ValueError naming the file."""

  def _tree(self) -> tuple[str, str]:
    root = _tmpdir(self)
    for name in ("a", "b"):
      _write_png(os.path.join(root, "train", name, "x.png"), _image(8, 8))
    _write_png(os.path.join(root, "test", "a", "1.png"), _image(8, 8))
    png = tf.io.encode_png(_image(8, 8, seed=9)).numpy()
    bad = _write(os.path.join(root, "test", "b", "2.png"), png[:len(png) // 2])  # The header is intact.
    _write_png(os.path.join(root, "test", "b", "3.png"), _image(8, 8))
    return root, bad

  def _decode_error(self, split: data.Split) -> Exception:
    with self.assertRaises(data.DECODE_ERRORS) as raised:
      _images(split)
    return raised.exception

  def test_a_corrupt_eval_image_is_named(self):
    root, bad = self._tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))  # Headers are fine.
    error = self._decode_error(source.eval)
    for start in (0, 1, 2):  # From where the pipeline stopped; from the start when the file is earlier.
      with self.subTest(start=start), self.assertRaises(ValueError) as raised:
        data.name_undecodable(source.eval, error, start=start)
      self.assertEqual(str(raised.exception), f"--data_dir: cannot decode image {bad}")
      self.assertIs(raised.exception.__cause__, error)
    with self.assertRaises(ValueError) as raised:
      data.name_undecodable([source.train, source.eval], error, flag="--transfer_data_dir")
    self.assertEqual(str(raised.exception), f"--transfer_data_dir: cannot decode image {bad}")

  def test_a_file_gone_since_listing_is_named(self):
    root, bad = self._tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    gone = source.train.files[1]
    os.remove(gone)
    error = self._decode_error(source.train)
    with self.assertRaises(ValueError) as raised:
      data.name_undecodable(source.train, error)
    self.assertEqual(str(raised.exception), f"--data_dir: cannot read image (no such file) {gone}")

  def test_without_a_bad_file_the_error_is_re_raised(self):
    root, _ = self._tree()
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root))
    error = tf.errors.InvalidArgumentError(None, None, "not a file's fault")
    with self.assertRaises(tf.errors.InvalidArgumentError) as raised:
      data.name_undecodable(source.train, error)
    self.assertIs(raised.exception, error)
    with self.assertRaises(tf.errors.InvalidArgumentError):  # A split without files: nothing to name.
      data.name_undecodable(testing.tiny_source(4, n_eval=2).train, error)

  def test_gif_and_bmp_decode_to_grayscale(self):
    # TensorFlow refuses channels=1 for GIF and BMP; the folder decode converts their RGB instead.
    root = _tmpdir(self)
    rgb = _image(6, 7, seed=4)
    for suffix, image_format in (("gif", "GIF"), ("bmp", "BMP")):
      path = os.path.join(root, "train", "a", f"x.{suffix}")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(rgb).save(path, format=image_format)
    source = data.load_source(config_lib.DataConfig(dataset="folder", data_dir=root, image_channels=1))
    self.assertEqual(source.image_shape, (6, 7, 1))
    for path, image in zip(source.train.files, _images(source.train)):
      expected = tf.image.rgb_to_grayscale(tf.io.decode_image(tf.io.read_file(path), channels=3,
                                                              expand_animations=False))
      self.assertAllEqual(image, expected)
    self.assertIsNone(data.find_undecodable(source.train.files, channels=1))


# ---------------------------------------------------------------------------------------------------------- pipelines
class TrainDatasetTest(tf.test.TestCase, parameterized.TestCase):
  """make_train_dataset on 24 tiny images, batch 4 (6 batches per epoch)."""

  _epochs: ClassVar[dict] = {}  # (seed, epoch, skip_batches) -> batches, shared by the tests of this class.

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.source = testing.tiny_source(24, n_eval=4, shape=(8, 8, 1))
    cls.train_images, cls.train_labels = testing.tiny_arrays(24, shape=(8, 8, 1), seed=0)

  def _epoch(self, seed: int = 0, epoch: int = 0, skip_batches: int = 0) -> list[dict[str, np.ndarray]]:
    key = (seed, epoch, skip_batches)
    if key not in self._epochs:
      self._epochs[key] = _batches(data.make_train_dataset(self.source, config_lib.DataConfig(), _AUGMENT,
                                                           batch_size=4, seed=seed, epoch=epoch,
                                                           skip_batches=skip_batches))
    return self._epochs[key]

  def test_element_spec(self):
    ds = data.make_train_dataset(self.source, config_lib.DataConfig(), _AUGMENT, batch_size=4, seed=0, epoch=0)
    self.assertEqual(ds.element_spec, {
        data.IMAGE_KEY: tf.TensorSpec([4, 8, 8, 1], tf.float32),
        data.LABEL_KEY: tf.TensorSpec([4], tf.int64),
        data.ID_KEY: tf.TensorSpec([4], tf.int64),
    })

  def test_no_autotune_model_thread(self):
    # Destroying an iterator waited up to a minute for tf.data's autotuning thread at epoch ends (data.py).
    ds = data.make_train_dataset(self.source, config_lib.DataConfig(), _AUGMENT, batch_size=4, seed=0, epoch=0)
    self.assertFalse(ds.options().autotune.enabled)
    eval_ds = data.make_eval_dataset(self.source.eval, _AUGMENT, image_size=8, batch_size=4)
    self.assertFalse(eval_ds.options().autotune.enabled)
    self.assertGreaterEqual(data.input_parallelism(), 1)

  def test_element_spec_at_image_size_rgb(self):
    source = testing.tiny_source(8, n_eval=4, shape=(10, 10, 3))
    ds = data.make_train_dataset(source, config_lib.DataConfig(image_size=6), _AUGMENT, batch_size=2, seed=0,
                                 epoch=0)
    self.assertEqual(ds.element_spec[data.IMAGE_KEY], tf.TensorSpec([2, 6, 6, 3], tf.float32))
    self.assertEqual(next(ds.as_numpy_iterator())[data.IMAGE_KEY].shape, (2, 6, 6, 3))

  def test_pixels_in_0_255(self):
    images = np.concatenate([b[data.IMAGE_KEY] for b in self._epoch()])
    self.assertEqual(images.dtype, np.float32)
    self.assertAllInRange(images, 0.0, 255.0)
    self.assertGreater(images.max(), 100.0)

  @parameterized.parameters(0, 1, 3)
  def test_every_instance_exactly_once_per_epoch(self, epoch):
    batches = self._epoch(epoch=epoch)
    self.assertEqual([len(b[data.ID_KEY]) for b in batches], [4] * 6)
    self.assertAllEqual(np.sort(_ids(batches)), np.arange(24))

  def test_every_instance_once_with_small_shuffle_buffer(self):
    ds = data.make_train_dataset(self.source, config_lib.DataConfig(shuffle_buffer=5), _AUGMENT, batch_size=4,
                                 seed=0, epoch=0)
    self.assertAllEqual(np.sort(_ids(_batches(ds))), np.arange(24))

  def test_labels_follow_instance_ids(self):
    batches = self._epoch(epoch=1)
    labels = np.concatenate([b[data.LABEL_KEY] for b in batches])
    self.assertAllEqual(labels, self.train_labels[_ids(batches)])

  def test_drop_remainder(self):
    source = testing.tiny_source(26, n_eval=4, shape=(8, 8, 1))
    batches = _batches(data.make_train_dataset(source, config_lib.DataConfig(), _AUGMENT, batch_size=4, seed=0,
                                               epoch=0))
    self.assertEqual([len(b[data.ID_KEY]) for b in batches], [4] * 6)
    self.assertLen(set(_ids(batches)), 24)

  def test_same_seed_and_epoch_same_batches(self):
    first = self._epoch(seed=7, epoch=2)
    second = _batches(data.make_train_dataset(self.source, config_lib.DataConfig(), _AUGMENT, batch_size=4, seed=7,
                                              epoch=2))
    self.assertLen(second, len(first))
    for a, b in zip(first, second):
      self.assertAllEqual(a[data.ID_KEY], b[data.ID_KEY])
      self.assertAllEqual(a[data.IMAGE_KEY], b[data.IMAGE_KEY])

  def test_different_epoch_different_order(self):
    self.assertNotAllEqual(_ids(self._epoch(epoch=0)), _ids(self._epoch(epoch=1)))

  def test_different_seed_different_order(self):
    self.assertNotAllEqual(_ids(self._epoch(seed=0)), _ids(self._epoch(seed=1)))

  def test_augmentation_differs_between_epochs(self):
    def images_by_id(batches):
      return np.concatenate([b[data.IMAGE_KEY] for b in batches])[np.argsort(_ids(batches))]

    self.assertNotAllClose(images_by_id(self._epoch(epoch=0)), images_by_id(self._epoch(epoch=1)))

  @parameterized.parameters(1, 2, 5)
  def test_skip_batches_resumes_mid_epoch(self, skip):
    full = self._epoch(seed=3, epoch=4)
    resumed = self._epoch(seed=3, epoch=4, skip_batches=skip)
    self.assertLen(resumed, len(full) - skip)
    for a, b in zip(full[skip:], resumed):
      self.assertAllEqual(a[data.ID_KEY], b[data.ID_KEY])
      self.assertAllEqual(a[data.LABEL_KEY], b[data.LABEL_KEY])
      self.assertAllEqual(a[data.IMAGE_KEY], b[data.IMAGE_KEY])


class EvalDatasetTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.source = testing.tiny_source(24, n_eval=10, shape=(8, 8, 1))
    self.eval_images, self.eval_labels = testing.tiny_arrays(10, shape=(8, 8, 1), seed=1)

  def test_in_order_with_short_last_batch(self):
    batches = _batches(data.make_eval_dataset(self.source.eval, _AUGMENT, image_size=8, batch_size=4))
    self.assertEqual([len(b[data.ID_KEY]) for b in batches], [4, 4, 2])
    self.assertAllEqual(_ids(batches), np.arange(10))
    self.assertAllEqual(np.concatenate([b[data.LABEL_KEY] for b in batches]), self.eval_labels)
    images = np.concatenate([b[data.IMAGE_KEY] for b in batches])
    self.assertEqual(images.dtype, np.float32)
    self.assertAllEqual(images, self.eval_images.astype(np.float32))  # Native size, full crop: unchanged.

  @parameterized.parameters(4, 12)
  def test_eval_views_of_fixed_size_images_at_another_size(self, size):
    # E.g. Fashion-MNIST (28 x 28) with --image_size=32.
    batches = _batches(data.make_eval_dataset(self.source.train, _AUGMENT, image_size=size, batch_size=16))
    self.assertEqual([b[data.IMAGE_KEY].shape for b in batches], [(16, size, size, 1), (8, size, size, 1)])
    self.assertAllEqual(_ids(batches), np.arange(24))

  def test_load_labels(self):
    self.assertAllEqual(data.load_labels(self.source.eval), self.eval_labels)
    self.assertAllEqual(data.load_labels(self.source.train), testing.tiny_arrays(24, shape=(8, 8, 1))[1])
    self.assertEqual(data.load_labels(self.source.train).dtype, np.int64)

  def test_load_labels_without_make_labels(self):
    split = data.Split(make_raw=self.source.eval.make, num_examples=10)
    self.assertAllEqual(data.load_labels(split), self.eval_labels)


class ResolveImageSizeTest(tf.test.TestCase, parameterized.TestCase):

  def test_native_square_size(self):
    self.assertEqual(data.resolve_image_size(testing.tiny_source(4, n_eval=2, shape=(8, 8, 1)), 0), 8)

  def test_explicit_size_wins(self):
    self.assertEqual(data.resolve_image_size(testing.tiny_source(4, n_eval=2, shape=(8, 8, 1)), 32), 32)

  @parameterized.named_parameters(
      ("variable_size", (None, None, 3)),
      ("non_square", (8, 6, 3)),
  )
  def test_errors_name_flag(self, image_shape):
    source = data.DataSource(name="x", train=data.Split(make_raw=None, num_examples=1), eval=None,
                             image_shape=image_shape, num_classes=0)
    with self.assertRaisesRegex(ValueError, "--image_size"):
      data.resolve_image_size(source, 0)


if __name__ == "__main__":
  tf.test.main()


class ValidationSliceTest(tf.test.TestCase):
  """--validation_examples: a fixed held-out part of the train split, out of training and of the kNN keys."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cfg = config_lib.DataConfig(dataset="fashion_mnist", max_train_examples=600, validation_examples=100)
    cls.source = data.load_source(cfg)
    cls.whole = data.load_source(config_lib.DataConfig(dataset="fashion_mnist", max_train_examples=600))

  def _images(self, split):
    return np.stack([ex[data.IMAGE_KEY] for ex in split.make().as_numpy_iterator()])

  def test_sizes_and_the_test_split_is_not_used(self):
    self.assertEqual(self.source.train.num_examples, 500)
    self.assertEqual(self.source.eval.num_examples, 100)
    self.assertLen(self._images(self.source.train), 500)

  def test_disjoint_from_training_images_and_kNN_keys(self):
    held_out = data.validation_indices(600, 100)
    everything = self._images(self.whole.train)
    train_images, validation_images = self._images(self.source.train), self._images(self.source.eval)
    self.assertAllEqual(validation_images, everything[held_out])
    self.assertAllEqual(train_images, np.delete(everything, held_out, axis=0))
    self.assertAllEqual(data.load_labels(self.source.eval), data.load_labels(self.whole.train)[held_out])
    # The training dataset (instance ids 0..499) and the kNN keys are the same 500 images: none held out.
    train_ds = data.make_train_dataset(self.source, config_lib.DataConfig(), config_lib.AugmentConfig(),
                                       batch_size=100, seed=0, epoch=0)
    ids = np.concatenate([b[data.ID_KEY].numpy() for b in train_ds])
    self.assertAllEqual(np.sort(ids), np.arange(500))
    train_set = {image.tobytes() for image in train_images}
    self.assertFalse(any(image.tobytes() in train_set for image in validation_images))

  def test_same_draw_for_every_run_and_sorted(self):
    first, second = data.validation_indices(600, 100), data.validation_indices(600, 100)
    self.assertAllEqual(first, second)
    self.assertAllEqual(first, np.sort(first))
    self.assertLen(set(first.tolist()), 100)
    self.assertGreater(first[-1], 500)  # A seeded draw over the split, not its tail or its head.
    self.assertLess(first[0], 100)

  def test_too_many_or_unlabelled_is_refused_naming_the_flag(self):
    with self.assertRaisesRegex(ValueError, r"--validation_examples: 599 leaves fewer than 2 of the 600"):
      data.hold_out_validation(self.whole, 599)
    unlabelled = dataclasses.replace(self.whole, num_classes=0)
    with self.assertRaisesRegex(ValueError, r"--validation_examples: the train split has no labels"):
      data.hold_out_validation(unlabelled, 10)


class TwoViewsTest(tf.test.TestCase):

  def test_second_view_is_another_augmentation_of_the_same_image(self):
    source = testing.tiny_source(32, shape=(12, 12, 1))
    one = data.make_train_dataset(source, config_lib.DataConfig(), config_lib.AugmentConfig(), batch_size=8, seed=0,
                                  epoch=0)
    two = data.make_train_dataset(source, config_lib.DataConfig(), config_lib.AugmentConfig(views=2),
                                  batch_size=8, seed=0, epoch=0)
    for single, pair in zip(one, two):
      self.assertNotIn(data.SECOND_VIEW_KEY, single)
      self.assertAllEqual(single[data.ID_KEY], pair[data.ID_KEY])
      self.assertAllEqual(single[data.IMAGE_KEY], pair[data.IMAGE_KEY])  # View 1 is the one-view run's view.
      self.assertEqual(pair[data.SECOND_VIEW_KEY].shape, pair[data.IMAGE_KEY].shape)
      self.assertNotAllClose(pair[data.SECOND_VIEW_KEY], pair[data.IMAGE_KEY])


class TrainingDatasetTest(tf.test.TestCase):
  """tf_instdisc.training_dataset: the recipe's pipeline over a Keras user's images, the batches train.py trains on."""

  def _recipe(self, **overrides) -> config_lib.Config:
    return testing.replace(testing.tiny_config(epochs=3, batch_size=16, crop_scale_min=0.5,
                                               color_jitter=0.3, horizontal_flip=True), **overrides)

  def _same_batches(self, mine, theirs) -> None:
    self.assertEqual(sorted(mine), sorted(theirs))
    for key in theirs:
      self.assertAllEqual(mine[key], theirs[key], msg=key)

  def test_every_epoch_is_train_pys_epoch_from_an_array(self):
    images, labels = testing.tiny_arrays(64)
    recipe = self._recipe()
    stream = data.training_dataset(images, recipe)
    self.assertEqual(stream.steps_per_epoch, 4)
    self.assertEqual(int(stream.cardinality()), 3 * 4)
    batches = list(stream)
    source = data.source_from_arrays("tiny", images, labels, num_classes=4)
    for epoch in range(3):
      for step, theirs in enumerate(data.make_train_dataset(source, recipe.data, recipe.augment, batch_size=16,
                                                            seed=recipe.train.seed, epoch=epoch)):
        mine = batches[epoch * 4 + step]
        self.assertAllEqual(mine["instance_id"], theirs["instance_id"])
        self.assertAllEqual(mine["image"], theirs["image"])
    # Each epoch is a permutation of all ids; epochs differ.
    for epoch in range(3):
      ids = np.concatenate([b["instance_id"].numpy() for b in batches[epoch * 4:(epoch + 1) * 4]])
      self.assertCountEqual(ids, range(64))
    self.assertNotAllEqual(batches[0]["instance_id"], batches[4]["instance_id"])

  def test_a_dataset_of_images_gives_the_same_batches_as_the_array(self):
    images, _ = testing.tiny_arrays(64)
    recipe = self._recipe(epochs=2)
    from_array = list(data.training_dataset(images, recipe))
    from_dataset = list(data.training_dataset(tf.data.Dataset.from_tensor_slices(images), recipe))
    self.assertLen(from_dataset, len(from_array))
    for mine, theirs in zip(from_dataset, from_array):
      self._same_batches(mine, theirs)
    grey = list(data.training_dataset(images[..., 0], recipe))  # [N, H, W] gets its channel axis.
    self.assertAllEqual(grey[0]["image"], from_array[0]["image"])

  def test_resuming_at_an_epoch_continues_the_same_stream(self):
    images, _ = testing.tiny_arrays(64)
    recipe = self._recipe()
    whole = list(data.training_dataset(images, recipe))
    later = list(data.training_dataset(images, recipe, initial_epoch=2))
    self.assertLen(later, 4)
    for mine, theirs in zip(later, whole[8:]):
      self._same_batches(mine, theirs)

  def test_refusals(self):
    images, _ = testing.tiny_arrays(64)
    with self.assertRaisesRegex(ValueError, "batched .*unbatch"):
      data.training_dataset(tf.data.Dataset.from_tensor_slices(images).batch(8), self._recipe())
    with self.assertRaisesRegex(ValueError, "train_minutes=5 .*epochs=N"):
      data.training_dataset(images, self._recipe(train_minutes=5.0, lr_schedule="cosine"))
    with self.assertRaisesRegex(ValueError, "images: 8 make no batch"):
      data.training_dataset(images[:8], self._recipe())
    with self.assertRaisesRegex(ValueError, r"images: expected an array \[N, H, W, C\]"):
      data.training_dataset(images[0, 0, 0], self._recipe())
    with self.assertRaisesRegex(ValueError, "initial_epoch: 3"):
      data.training_dataset(images, self._recipe(), initial_epoch=3)
    with self.assertRaisesRegex(ValueError, "not square; pass image_size"):
      data.training_dataset(np.zeros((32, 8, 6, 1), np.uint8), self._recipe())
