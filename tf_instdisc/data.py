"""Datasets of {"image", "label", "instance_id"}: TFDS by name, Fashion-MNIST from local files, image folders.

The train split has a fixed order, so the instance id of an example is its position in it (0..N-1) on every run
and every host. Training datasets are built one epoch at a time from (seed, epoch): the same flags give the same
batches, which is what makes a resumed run continue exactly where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import BinaryIO, Callable, NoReturn, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import augment
from tf_instdisc import config as config_lib

IMAGE_KEY, LABEL_KEY, ID_KEY = "image", "label", "instance_id"
SECOND_VIEW_KEY = "image_view2"  # With --views=2: a second augmentation of the same image, same instance_id.
VALIDATION_SEED = 20180618  # The validation draw is the same for every --seed: recipes are compared on one set.
UNLABELED = -1
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_MAX_CACHED_BYTES = 4 << 30  # Fixed-size splits smaller than this are decoded once and kept in memory.
# What reading or decoding an image file raises inside a pipeline: corrupt data, a file gone or unreadable since it
# was listed. Callers that embed or train on a split catch these and name the file (`name_undecodable`).
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError)


def _identity(image: tf.Tensor) -> tf.Tensor:
  return image


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in a fixed order.

  `make_raw()` yields {"image": stored form, "label": int64}: uint8 pixels, encoded bytes or a file path; `decode`
  turns the stored form into uint8 [H, W, C]. Pipelines shuffle the stored form and decode afterwards, so a
  shuffle buffer holds file paths or JPEG bytes, not decoded ImageNet images.
  """

  make_raw: Callable[[], tf.data.Dataset]
  num_examples: int
  decode: Callable[[tf.Tensor], tf.Tensor] = _identity
  files: tuple[str, ...] = ()  # For image folders: the file of each example, in order.
  make_labels: Callable[[], tf.data.Dataset] | None = None  # Labels only, without decoding images.

  def make(self) -> tf.data.Dataset:
    """{"image": uint8 [H, W, C], "label": int64} in order, decoded."""
    return self.make_raw().map(lambda ex: {**ex, IMAGE_KEY: self.decode(ex[IMAGE_KEY])},
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class DataSource:
  name: str
  train: Split
  eval: Split | None
  image_shape: tuple[int | None, int | None, int]  # (H, W, C); H and W are None when images vary in size.
  num_classes: int  # 0 when the train split carries no labels.
  class_names: tuple[str, ...] = ()  # Label i's name, when the dataset has names.
  # Image folders read without --image_size whose images differ in size: two of them, "A is HxW, B is HxW".
  mixed_sizes: str = ""


# ----------------------------------------------------------------------------------------------------------- loading
def load_source(cfg: config_lib.DataConfig) -> DataSource:
  """Opens the dataset named by cfg.dataset, cut to cfg.max_train_examples / cfg.max_eval_examples.

  An image folder read without --image_size (cfg.image_size 0) has each image's size read from its header: when
  they are all H x W, image_shape is (H, W, C), else (None, None, C) and `mixed_sizes` names two that differ.

  Raises:
    ValueError: unknown dataset, a --data_dir that does not exist (or has no Fashion-MNIST files), empty or
    unreadable folder (naming the file), missing files.
  """
  check_data_dir(cfg.data_dir)
  fashion_dir = _find_fashion_mnist(cfg.data_dir) if cfg.dataset == "fashion_mnist" else None
  if cfg.dataset == "folder":
    source = _load_folder(cfg.data_dir, channels=cfg.image_channels, infer_size=not cfg.image_size)
  elif fashion_dir:
    source = _load_fashion_mnist(fashion_dir)
  else:
    source = _load_tfds(cfg.dataset, cfg.data_dir, eval_split=cfg.eval_split)
  if cfg.eval_split == "":
    source = dataclasses.replace(source, eval=None)
  source = dataclasses.replace(source, train=take_first(source.train, cfg.max_train_examples))
  if cfg.validation_examples:
    source = hold_out_validation(source, cfg.validation_examples)
  return dataclasses.replace(source, eval=source.eval and take_first(source.eval, cfg.max_eval_examples))


def validation_indices(num_examples: int, count: int) -> np.ndarray:
  """Sorted positions [count] of the train split held out for validation: one fixed seeded draw."""
  return np.sort(np.random.default_rng(VALIDATION_SEED).permutation(num_examples)[:count])


def hold_out_validation(source: DataSource, count: int) -> DataSource:
  """Moves `count` train images (validation_indices) into the eval split; training and kNN keys are the rest.

  Instance ids are positions in the remaining train split, so a validation image has no bank row.

  Raises:
    ValueError: naming --validation_examples when it leaves fewer than 2 training images, or the split has no
    labels to score.
  """
  num_examples = source.train.num_examples
  if count > num_examples - 2:
    raise ValueError(f"--validation_examples: {count} leaves fewer than 2 of the {num_examples} training images")
  if source.num_classes == 0:
    raise ValueError("--validation_examples: the train split has no labels to score a validation slice with")
  held_out = validation_indices(num_examples, count)
  kept = np.setdiff1d(np.arange(num_examples), held_out)
  return dataclasses.replace(source, train=take_indices(source.train, kept),
                             eval=take_indices(source.train, held_out))


def take_first(split: Split, count: int) -> Split:
  """The first `count` examples of the split (all of them when count is 0 or at least the split's size)."""
  if count == 0 or count >= split.num_examples:
    return split
  make_labels = split.make_labels and (lambda: split.make_labels().take(count))
  return dataclasses.replace(split, make_raw=lambda: split.make_raw().take(count), num_examples=count,
                             files=split.files[:count], make_labels=make_labels)


def take_indices(split: Split, indices: np.ndarray) -> Split:
  """The examples at the given positions of the split (sorted, unique), in split order: a labelled subset.

  One pass over the stored (undecoded) examples filters by position, so ImageNet's 1% costs a scan of file paths
  or bytes, not a decode of every image.
  """
  indices = np.unique(np.asarray(indices, np.int64))
  if len(indices) and (indices[0] < 0 or indices[-1] >= split.num_examples):
    raise ValueError(f"indices must be in [0, {split.num_examples}), got {indices[0]}..{indices[-1]}")
  keep = np.zeros(split.num_examples, bool)
  keep[indices] = True

  def select(dataset: tf.data.Dataset) -> tf.data.Dataset:
    mask = tf.constant(keep)
    return dataset.enumerate().filter(lambda index, _: tf.gather(mask, index)).map(lambda _, ex: ex)

  make_labels = split.make_labels and (lambda: select(split.make_labels()))
  return dataclasses.replace(split, make_raw=lambda: select(split.make_raw()), num_examples=len(indices),
                             files=tuple(split.files[i] for i in indices) if split.files else (),
                             make_labels=make_labels)


def _remote(path: str) -> bool:
  """A URL-like path (gs://bucket/...): TFDS reads it through tf.io.gfile; os.path cannot check it."""
  return "://" in path


def check_data_dir(data_dir: str) -> None:
  """Raises ValueError naming --data_dir when it is given but is not an existing directory.

  For every dataset: a mistyped path must not train on the default copy (Fashion-MNIST), nor become an empty TFDS
  data dir that TFDS fills with a fresh download. A remote path (gs://...) is left to TFDS.
  """
  if not data_dir or _remote(data_dir):
    return
  if not os.path.exists(data_dir):
    raise ValueError(f"--data_dir: {data_dir} does not exist")
  if not os.path.isdir(data_dir):
    raise ValueError(f"--data_dir: {data_dir} is not a directory")


def _find_fashion_mnist(data_dir: str) -> str | None:
  """The directory of the four Fashion-MNIST files, or None to read Fashion-MNIST through TFDS.

  An explicit data_dir is the only place looked at: it has the files, or is a TFDS data dir (a fashion_mnist/
  folder in it, or a remote path). Without one, the first of FASHION_MNIST_DIRS that has them (Debian's copy), else
  TFDS's default.

  Raises:
    ValueError: naming --data_dir when it has neither the files nor a TFDS fashion_mnist/ folder.
  """
  def has_files(directory: str) -> bool:
    return all(os.path.exists(os.path.join(directory, f)) for f in _FASHION_FILES["train"])

  if not data_dir:
    return next((directory for directory in FASHION_MNIST_DIRS if has_files(directory)), None)
  if has_files(data_dir):
    return data_dir
  if _remote(data_dir) or os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
    return None
  expected = ", ".join(name for pair in _FASHION_FILES.values() for name in pair)
  raise ValueError(f"--data_dir: {data_dir} has no Fashion-MNIST files ({expected}) and no TFDS fashion_mnist/ "
                   "folder")


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) IDX file, the MNIST format: magic 0x0000 type ndim, big-endian dims, then the data.

  Raises:
    ValueError: naming the file when it is not a valid IDX file.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read ({e})") from e
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path}: truncated header, {ndim} dimensions need {4 + 4 * ndim} bytes, found {len(raw)}")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{path}: truncated, expected {int(np.prod(dims))} values, found {data.size}")
  return data.reshape(dims)


def _array_split(images: np.ndarray, labels: np.ndarray) -> Split:
  labels = labels.astype(np.int64)
  return Split(make_raw=lambda: tf.data.Dataset.from_tensor_slices({IMAGE_KEY: images, LABEL_KEY: labels}),
               num_examples=len(images), make_labels=lambda: tf.data.Dataset.from_tensor_slices(labels))


def source_from_arrays(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                       eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None, *,
                       num_classes: int) -> DataSource:
  """A DataSource over in-memory uint8 images [M, H, W, C] and int labels [M] (eval arrays optional)."""
  evaluation = None if eval_images is None else _array_split(eval_images, eval_labels)
  return DataSource(name=name, train=_array_split(train_images, train_labels), eval=evaluation,
                    image_shape=tuple(train_images.shape[1:]), num_classes=num_classes)


def _load_fashion_mnist(directory: str) -> DataSource:
  """Fashion-MNIST from its four original files (Debian's dataset-fashion-mnist, or any dir that has them).

  TFDS's registered checksums reject Debian's re-gzipped copies, and the files are tiny: reading the IDX format
  directly needs no download config and no prepared TFDS directory.
  """
  splits = {}
  for split, (image_file, label_file) in _FASHION_FILES.items():
    images = read_idx(os.path.join(directory, image_file))[..., None]  # [N, 28, 28, 1]
    labels = read_idx(os.path.join(directory, label_file))
    if len(images) != len(labels):
      raise ValueError(f"{directory}: {image_file} has {len(images)} images but {label_file} {len(labels)} labels")
    splits[split] = (images, labels)
  source = source_from_arrays("fashion_mnist", *splits["train"], *splits["test"], num_classes=10)
  return dataclasses.replace(source, class_names=FASHION_MNIST_CLASSES)


def _load_tfds(name: str, data_dir: str, *, eval_split: str) -> DataSource:
  """Any TFDS image-classification dataset with "image" and "label" features (imagenet2012: manual dir)."""
  try:
    import tensorflow_datasets as tfds  # Imported here: only this source needs it, and it is slow to import.
  except ImportError as e:
    raise ValueError(f"--dataset={name} reads TFDS, which is not installed: pip install 'tf-instdisc[tfds]' "
                     f"({e})") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # TFDS raises several types (DatasetNotFoundError, ...) for a bad name.
    raise ValueError(f"--dataset: unknown dataset {name!r} ({type(e).__name__}: {e})") from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"--dataset: {name!r} has no 'image' and 'label' features ({list(features.keys())})")
  download_config = tfds.download.DownloadConfig(manual_dir=data_dir or None)
  builder.download_and_prepare(download_config=download_config)

  def split_of(split_name: str) -> Split:
    def make_raw() -> tf.data.Dataset:  # Encoded images: decoding waits until after the shuffle.
      ds = builder.as_dataset(split=split_name, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
      return ds.map(lambda ex: {IMAGE_KEY: ex["image"], LABEL_KEY: tf.cast(ex["label"], tf.int64)})

    def make_labels() -> tf.data.Dataset:
      ds = builder.as_dataset(split=split_name, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
      return ds.map(lambda ex: tf.cast(ex["label"], tf.int64))

    known = builder.info.splits[split_name].num_examples if split_name in builder.info.splits else 0
    return Split(make_raw=make_raw, num_examples=known or _count(make_labels()),
                 decode=features["image"].decode_example, make_labels=make_labels)

  shape = tuple(features["image"].shape)
  eval_name = _pick_eval_split(builder, eval_split)
  train = _maybe_cache(split_of("train"), shape)
  evaluation = _maybe_cache(split_of(eval_name), shape) if eval_name else None
  return DataSource(name=name, train=train, eval=evaluation, image_shape=shape,
                    num_classes=int(features["label"].num_classes), class_names=tuple(features["label"].names))


def _pick_eval_split(builder, eval_split: str) -> str | None:
  if eval_split not in ("auto", ""):
    return eval_split
  if eval_split == "":
    return None
  known = set(builder.info.splits.keys())
  for candidate in ("validation", "test"):
    if candidate in known:
      return candidate
  if known:  # A dataset with splits but neither: no kNN evaluation.
    return None
  for candidate in ("validation", "test"):  # Split names unknown (e.g. under tfds.testing.mock_data).
    try:
      builder.as_dataset(split=candidate).take(1)
      return candidate
    except (ValueError, KeyError):
      continue
  return None


def _count(ds: tf.data.Dataset) -> int:
  return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def _maybe_cache(split: Split, shape: tuple) -> Split:
  if None in shape or split.num_examples * int(np.prod(shape)) > _MAX_CACHED_BYTES:
    return split
  return Split(make_raw=_cached(split.make), num_examples=split.num_examples, make_labels=split.make_labels)


def _cached(make: Callable[[], tf.data.Dataset]) -> Callable[[], tf.data.Dataset]:
  """Decodes the split once into NumPy arrays; later datasets slice them (no re-decoding every epoch)."""
  arrays = {}

  def cached_make() -> tf.data.Dataset:
    if not arrays:
      batches = list(make().batch(4096).as_numpy_iterator())
      arrays.update({k: np.concatenate([b[k] for b in batches]) for k in (IMAGE_KEY, LABEL_KEY)})
    return tf.data.Dataset.from_tensor_slices(dict(arrays))

  return cached_make


# ------------------------------------------------------------------------------------------------------------ folder
def _hidden(name: str) -> bool:
  """Names starting with "." (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg): never classes or images."""
  return name.startswith(".")


def _list_images(directory: str, class_names: list[str] | None) -> tuple[list[str], list[int], list[str]]:
  """Files under `directory` (sorted) with labels from their first-level subfolder; loose files are UNLABELED.

  Hidden entries (`_hidden`) are skipped at every level, as Keras' image_dataset_from_directory skips hidden class
  folders: a .ipynb_checkpoints folder is no class, and no copy of the images in it is read.
  """
  entries = sorted(e for e in os.listdir(directory) if not _hidden(e))
  if class_names is None:
    class_names = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
  files, labels = [], []
  for entry in entries:
    path = os.path.join(directory, entry)
    if os.path.isdir(path):
      if entry not in class_names:
        raise ValueError(f"--data_dir: class folder {path} does not exist in the train split")
      for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))  # In place: os.walk then skips the hidden ones.
        for file_name in sorted(names):
          if not _hidden(file_name) and file_name.lower().endswith(_IMAGE_SUFFIXES):
            files.append(os.path.join(root, file_name))
            labels.append(class_names.index(entry))
    elif entry.lower().endswith(_IMAGE_SUFFIXES):
      files.append(path)
      labels.append(UNLABELED)
  return files, labels, class_names


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
  """(height, width) from the first start-of-frame segment of a JPEG file opened at byte 2, or None."""
  while True:
    byte = f.read(1)
    while byte and byte != b"\xff":  # Tolerates stray bytes between segments, as libjpeg does.
      byte = f.read(1)
    while byte == b"\xff":  # Fill bytes.
      byte = f.read(1)
    if not byte:
      return None
    marker = byte[0]
    if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # Segments without a length.
      continue
    if marker in (0xD9, 0xDA):  # End of image, or scan data before any frame header.
      return None
    length = f.read(2)
    if len(length) < 2 or struct.unpack(">H", length)[0] < 2:
      return None
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 (not DHT, JPG, DAC).
      frame = f.read(5)  # Precision, height, width.
      if len(frame) < 5:
        return None
      height, width = struct.unpack(">HH", frame[1:5])
      return (height, width) if height and width else None  # Height 0: given later by a DNL segment.
    f.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)


def _header_size(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
  """(height, width) of an image from its header (PNG IHDR, BMP info header, JPEG frame), or None.

  None for GIFs: TensorFlow's GIF decoder does not decode at the header's logical screen size (giflib reconciles it
  with the first frame's), so a GIF's size is learnt by decoding it.
  """
  if head.startswith(b"\x89PNG") and head[12:16] == b"IHDR" and len(head) >= 24:
    width, height = struct.unpack(">II", head[16:24])
  elif head.startswith(b"BM") and len(head) >= 26:
    if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes.
      width, height = struct.unpack("<HH", head[18:22])
    else:
      width, height = struct.unpack("<ii", head[18:26])  # Negative height: rows stored top-down.
      height = abs(height)
  elif head.startswith(b"\xff\xd8"):
    f.seek(2)
    return _jpeg_size(f)
  else:
    return None
  return (height, width) if height > 0 and width > 0 else None


def _check_image(path: str, *, measure: bool) -> tuple[int, int] | None:
  """check_image_file(path) and, when `measure`, the image's (height, width): from its header when it can be read
  there, else by decoding it.

  Raises:
    ValueError: naming `path` as check_image_file does, or when it cannot be decoded to learn its size.
  """
  try:
    with open(path, "rb") as f:
      head = f.read(32)
      if not head:
        raise ValueError(f"--data_dir: image file {path} is empty")
      if not head.startswith(_IMAGE_MAGIC):
        raise ValueError(f"--data_dir: {path} is not a JPEG, PNG, GIF or BMP image")
      size = _header_size(f, head) if measure else None
  except OSError as e:
    raise ValueError(f"--data_dir: cannot read image {path}: {e}") from e
  if measure and size is None:  # A header this parser does not know: TensorFlow's decoder decides.
    try:
      shape = tf.shape(tf.io.decode_image(tf.io.read_file(path), expand_animations=False)).numpy()
    except DECODE_ERRORS as e:
      raise ValueError(f"--data_dir: cannot decode image {path}") from e
    size = (int(shape[0]), int(shape[1]))
  return size


def check_image_file(path: str) -> None:
  """Raises ValueError naming `path` if it is empty, unreadable, or not a JPEG, PNG, GIF or BMP."""
  _check_image(path, measure=False)


def decode_image_file(contents: tf.Tensor, *, channels: int) -> tf.Tensor:
  """uint8 [H, W, channels] of an encoded JPEG, PNG, GIF or BMP (the first frame of an animation).

  TensorFlow decodes GIF and BMP to colour only (channels=1 is an error for them): with channels=1 those are decoded
  as RGB and converted to grayscale.
  """
  if channels != 1:
    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  head = tf.strings.substr(contents, 0, 2)
  colour_only = tf.logical_or(tf.equal(head, b"GI"), tf.equal(head, b"BM"))
  image = tf.cond(
      colour_only,
      lambda: tf.image.rgb_to_grayscale(tf.io.decode_image(contents, channels=3, expand_animations=False)),
      lambda: tf.io.decode_image(contents, channels=1, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 1])


def find_undecodable(files: Sequence[str], *, channels: int, start: int = 0) -> str | None:
  """The first of `files[start:]` that cannot be read and decoded to `channels` channels, or None; used to name
  the file after a decode error."""
  for path in files[start:]:
    try:
      decode_image_file(tf.io.read_file(path), channels=channels)
    except DECODE_ERRORS:
      return path
  return None


def name_undecodable(split: Split | Sequence[Split], error: Exception, *, flag: str = "--data_dir",
                     start: int = 0) -> NoReturn:
  """Raises ValueError naming the first file of the split(s) that its decode rejects; else re-raises `error`.

  Call it from an `except DECODE_ERRORS as error:` around a pass over a split (training, embedding, features):
  a tf.data error says what failed, not which file. Splits without files (arrays, TFDS) re-raise `error`.

  Args:
    split: the split the failed pass read, or several (searched in order).
    error: the caught TensorFlow error (re-raised when no file is at fault).
    flag: the flag that named the data (--data_dir; evaluate.py's transfer target: --transfer_data_dir).
    start: the position of the first example not yet seen when the error came (in-order pipelines): the search of
      the (first) split starts there, and falls back to its start.

  Raises:
    ValueError: f"{flag}: cannot decode image {path}" (or "cannot read image", when the file is gone).
  """
  for index, one in enumerate([split] if isinstance(split, Split) else list(split)):
    offset = start if index == 0 else 0
    bad = None
    for begin in dict.fromkeys((offset, 0)):  # From `start`, then from the beginning.
      bad = _undecodable_in(one, begin)
      if bad is not None:
        break
    if bad is not None:
      what = "cannot decode image" if os.path.isfile(bad) else "cannot read image (no such file)"
      raise ValueError(f"{flag}: {what} {bad}") from error
  raise error


def _undecodable_in(split: Split, start: int) -> str | None:
  """The first of split.files[start:] that split.decode (the pipeline's own decode) rejects, or None."""
  for path in split.files[start:]:
    try:
      split.decode(tf.constant(path))
    except DECODE_ERRORS:
      return path
  return None


def _folder_split(files: list[str], labels: list[int], channels: int) -> Split:
  """The stored form of a folder image is its path: shuffling moves paths, decoding reads the file."""

  def decode(path: tf.Tensor) -> tf.Tensor:
    return decode_image_file(tf.io.read_file(path), channels=channels)

  label_array = np.asarray(labels, np.int64)
  return Split(make_raw=lambda: tf.data.Dataset.from_tensor_slices({IMAGE_KEY: files, LABEL_KEY: label_array}),
               num_examples=len(files), decode=decode, files=tuple(files),
               make_labels=lambda: tf.data.Dataset.from_tensor_slices(label_array))


def _check_images(files: list[str], *, measure: bool) -> tuple[tuple[int, int] | None, str]:
  """Checks every file (check_image_file); when `measure`, also reads sizes from the headers until two differ.

  Returns:
    ((height, width) shared by every file, "") or (None, "A is HxW, B is HxW") naming the first two that differ;
    (None, "") when not measured.
  """
  first, mixed = None, ""
  for path in files:
    size = _check_image(path, measure=measure and not mixed)
    if size is None:
      continue
    if first is None:
      first = (path, size)
    elif size != first[1]:
      mixed = f"{first[0]} is {first[1][0]}x{first[1][1]}, {path} is {size[0]}x{size[1]}"
  if mixed or first is None:
    return None, mixed
  return first[1], ""


def _load_folder(root: str, *, channels: int, infer_size: bool = False) -> DataSource:
  """ROOT/train (class subfolders give labels; loose images are unlabeled), ROOT/val or ROOT/test for eval.

  With infer_size, every image's size is read from its header: image_shape is (H, W, channels) when all are H x W.
  """
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    raise ValueError(f"--data_dir: {train_dir} does not exist (expected ROOT/train with images)")
  files, labels, class_names = _list_images(train_dir, None)
  if not files:
    raise ValueError(f"--data_dir: no images (.jpg, .jpeg, .png, .gif, .bmp) under {train_dir}")
  labeled = bool(class_names) and all(label != UNLABELED for label in labels)
  eval_split, files_to_check = None, files
  for name in ("val", "test") if labeled else ():  # kNN needs labelled train features.
    if os.path.isdir(os.path.join(root, name)):
      eval_files, eval_labels, _ = _list_images(os.path.join(root, name), class_names)
      if eval_files:
        files_to_check = files + eval_files
        eval_split = _folder_split(eval_files, eval_labels, channels)
        break
  size, mixed = _check_images(files_to_check, measure=infer_size)
  if size is not None:
    logging.info("no --image_size: all %d images under %s are %dx%d (height x width)", len(files_to_check), root,
                 *size)
  elif mixed:
    logging.info("no --image_size: the images under %s differ in size (%s)", root, mixed)
  image_shape = (*size, channels) if size else (None, None, channels)
  return DataSource(name="folder", train=_folder_split(files, labels, channels), eval=eval_split,
                    image_shape=image_shape, num_classes=len(class_names) if labeled else 0,
                    class_names=tuple(class_names) if labeled else (), mixed_sizes=mixed)


# ---------------------------------------------------------------------------------------------------------- pipelines
def with_instance_ids(split: Split) -> tf.data.Dataset:
  """The split's stored (undecoded) examples with "instance_id" (int64, its position) added to each."""
  return split.make_raw().enumerate().map(lambda index, ex: {**ex, ID_KEY: index})


def resolve_image_size(source: DataSource, image_size: int) -> int:
  """The side of the model input: cfg.image_size, or the dataset's own square size when it is 0.

  Raises:
    ValueError: --image_size is 0 but the images have no fixed square size (naming two of different sizes, when
    known).
  """
  if image_size:
    return image_size
  height, width, _ = source.image_shape
  if height is None and source.mixed_sizes:
    raise ValueError(f"--image_size: images differ in size ({source.mixed_sizes}); pass --image_size")
  if height is None or height != width:
    raise ValueError(f"--image_size: {source.name} images are {height}x{width}, set --image_size explicitly")
  return height


def epoch_seed(seed: int, epoch: int | tf.Tensor) -> int | tf.Tensor:
  """The shuffle seed of one epoch (a Python int for an int epoch, an int64 tensor for a tensor one: equal values
  give the same permutation)."""
  if isinstance(epoch, int):
    return (seed * 1_000_003 + epoch) % (2**31 - 1)
  return (tf.constant(seed * 1_000_003, tf.int64) + tf.cast(epoch, tf.int64)) % (2**31 - 1)


def _epoch_batches(split: Split, augment_cfg: config_lib.AugmentConfig, *, size: int, shuffle_buffer: int,
                   batch_size: int, seed: int, epoch: int | tf.Tensor,
                   skip_examples: int | tf.Tensor = 0) -> tf.data.Dataset:
  """One epoch of augmented batches of `split`, a function of (seed, epoch) only: the one definition of an epoch,
  shared by train.py's driver (`make_train_dataset`) and Keras `fit` (`make_training_stream`). The first
  `skip_examples` examples (whole batches already trained on) are dropped before they are decoded."""
  buffer = shuffle_buffer or split.num_examples
  # Ids come before the shuffle; shuffle within one epoch only, so every epoch sees every instance once.
  ds = with_instance_ids(split).shuffle(buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
  ds = ds.skip(skip_examples)

  def train_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = split.decode(example[IMAGE_KEY])
    views = {key: augment.augment_for_train(image, augment.example_seed(seed, example[ID_KEY], epoch, view=view),
                                            augment_cfg, size=size)
             for view, key in enumerate((IMAGE_KEY, SECOND_VIEW_KEY)[:augment_cfg.views])}
    return {**example, **views}

  ds = ds.map(train_view, num_parallel_calls=input_parallelism(), deterministic=True)
  return ds.batch(batch_size, drop_remainder=True)


def make_train_dataset(source: DataSource, cfg: config_lib.DataConfig, augment_cfg: config_lib.AugmentConfig, *,
                       batch_size: int, seed: int, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
  """One epoch of augmented training batches; the same (seed, epoch) gives the same batches.

  Args:
    source: from `load_source`.
    cfg: the data section (image_size, shuffle_buffer).
    augment_cfg: the augmentation section.
    batch_size: examples per batch (the global batch; a strategy splits it).
    seed: the run's seed.
    epoch: which epoch (0-based): picks the permutation and the augmentation seeds.
    skip_batches: batches of this epoch already trained on (resuming mid-epoch).

  Returns:
    A dataset of {"image": float32 [batch, S, S, C] in [0, 255], "label": int64 [batch],
    "instance_id": int64 [batch]}, plus "image_view2" (another augmentation of each image) when
    augment_cfg.views is 2; the last partial batch is dropped.
  """
  return make_training_stream(source.train, augment_cfg, size=resolve_image_size(source, cfg.image_size),
                              shuffle_buffer=cfg.shuffle_buffer, batch_size=batch_size, seed=seed,
                              first_epoch=epoch, epochs=epoch + 1, skip_batches=skip_batches)


def make_training_stream(split: Split, augment_cfg: config_lib.AugmentConfig, *, size: int, shuffle_buffer: int,
                         batch_size: int, seed: int, first_epoch: int, epochs: int,
                         skip_batches: int = 0) -> tf.data.Dataset:
  """Epochs first_epoch..epochs-1 of `_epoch_batches`, back to back, skipping the first `skip_batches` batches;
  its cardinality is known (Keras `fit` reads it)."""
  steps_per_epoch = split.num_examples // batch_size
  if not 0 <= skip_batches < steps_per_epoch or first_epoch >= epochs:
    raise ValueError(f"no batches left: epochs {first_epoch}..{epochs - 1}, skipping {skip_batches} of "
                     f"{steps_per_epoch} batches per epoch")
  common = dict(size=size, shuffle_buffer=shuffle_buffer, batch_size=batch_size, seed=seed)
  if first_epoch + 1 == epochs:  # One epoch (train.py's driver): no flat_map, the epoch a Python int.
    ds = _epoch_batches(split, augment_cfg, epoch=first_epoch, skip_examples=skip_batches * batch_size, **common)
  else:
    skip = tf.constant(skip_batches * batch_size, tf.int64)
    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(lambda epoch: _epoch_batches(
        split, augment_cfg, epoch=epoch, skip_examples=tf.where(epoch == first_epoch, skip, tf.zeros_like(skip)),
        **common))
  batches = (epochs - first_epoch) * steps_per_epoch - skip_batches
  ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
  return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


def input_parallelism() -> int:
  """Parallel calls of the input maps: one per CPU this process may run on (what autotuning starts from)."""
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """The dataset without tf.data's autotuning model thread (the maps run `input_parallelism()` calls, fixed).

  Destroying an iterator waits for that thread, which sleeps between optimisation rounds: in a fashion_mnist.flags
  run on a 2-core CPU, 6 of epochs 2-12 ended with a 53-58 s wait for it (gdb, 2026-12-02: the main thread in
  ~RootDataset::Iterator -> ~LogicalThreadWrapper, the model thread in Model::OptimizeLoop's wait); without it
  no epoch waited. Prefetch buffers still adapt (their own autotuner needs no model thread).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def make_eval_dataset(split: Split, augment_cfg: config_lib.AugmentConfig, *, image_size: int,
                      batch_size: int) -> tf.data.Dataset:
  """The split in order, un-augmented (centre view), batched; the last batch may be short.

  Returns:
    {"image": float32 [b, S, S, C] in [0, 255], "label": int64 [b], "instance_id": int64 [b]}.
  """
  def eval_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = augment.preprocess_for_eval(split.decode(example[IMAGE_KEY]), size=image_size,
                                        crop_fraction=augment_cfg.eval_crop_fraction)
    return {**example, IMAGE_KEY: image}

  ds = with_instance_ids(split).map(eval_view, num_parallel_calls=input_parallelism(), deterministic=True)
  return without_autotune(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def load_labels(split: Split) -> np.ndarray:
  """int64 [num_examples] labels of the split in order (one pass; images are not decoded when avoidable)."""
  labels = split.make_labels() if split.make_labels else split.make().map(lambda ex: ex[LABEL_KEY])
  return np.concatenate(list(labels.batch(65536).as_numpy_iterator())).astype(np.int64)


def _images_split(images: np.ndarray | tf.data.Dataset) -> Split:
  """A Split over a Keras user's images: an array [N, H, W, C] (or [N, H, W]) of pixels in [0, 255], or an
  unbatched dataset of such images (each [H, W, C]), in a fixed order; labels UNLABELED.

  Raises:
    ValueError: naming `images`, for another rank, or a batched dataset (elements of rank 4).
  """
  if isinstance(images, tf.data.Dataset):
    spec = images.element_spec
    if not isinstance(spec, tf.TensorSpec):
      raise ValueError(f"images: expected a dataset of images, got elements {spec}; map it to the images first "
                       "(e.g. dataset.map(lambda image, label: image))")
    if spec.shape.rank == 4:
      raise ValueError("images: the dataset is batched (elements of rank 4); pass dataset.unbatch(), and keep its "
                       "order fixed (e.g. keras.utils.image_dataset_from_directory(..., batch_size=None, "
                       "shuffle=False))")
    if spec.shape.rank == 2:
      images = images.map(lambda image: image[..., None])
    elif spec.shape.rank != 3:
      raise ValueError(f"images: expected elements [H, W, C], got shape {spec.shape}")
    count = int(images.cardinality())
    if count < 0:
      count = _count(images)
    dataset = images
    return Split(make_raw=lambda: dataset.map(lambda image: {IMAGE_KEY: image, LABEL_KEY: tf.constant(UNLABELED,
                                                                                                         tf.int64)}),
                 num_examples=count)
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"images: expected an array [N, H, W, C] (or [N, H, W]), got shape {images.shape}")
  return _array_split(images, np.full(len(images), UNLABELED, np.int64))


def training_dataset(images: np.ndarray | tf.data.Dataset, recipe: config_lib.Config, *,
                     initial_epoch: int = 0) -> tf.data.Dataset:
  """The recipe's training pipeline over a Keras user's images: what train.py trains on, for `model.fit`.

  Ids are the images' positions (given before any shuffle); each epoch is an exact permutation (or the recipe's
  shuffle buffer), every image augmented by the recipe with a seed of (seed, id, epoch); batches of the recipe's
  batch_size, the last partial one dropped. All epochs follow each other in one dataset, which carries
  `steps_per_epoch`: `InstanceDiscrimination.fit(dataset, epochs=recipe.train.epochs)` takes one of them per Keras
  epoch. To resume at epoch e, build it with initial_epoch=e and pass fit initial_epoch=e.

  Args:
    images: uint8 (or float in [0, 255]) [N, H, W, C] or [N, H, W]; or an unbatched tf.data.Dataset of images in a
      fixed order.
    recipe: a config, e.g. `tf_instdisc.recipe("fashion_mnist", epochs=12)`; its data.image_size (0: the images'
      own side, which must be square), augment, train.batch_size, train.seed, train.epochs and
      data.shuffle_buffer are used.
    initial_epoch: the first epoch of the stream.

  Returns:
    {"image": float32 [B, S, S, C] in [0, 255], "label": int64 [B] (-1), "instance_id": int64 [B]} batches
    ("image_view2" too with views=2), with `.steps_per_epoch` set.

  Raises:
    ValueError: naming `images` or the recipe field.
  """
  train, augment_cfg = recipe.train, recipe.augment
  if train.train_minutes:
    raise ValueError(f"recipe: train_minutes={train.train_minutes:g} sets the length by time, which only train.py "
                     "measures; pass epochs=N, e.g. tf_instdisc.recipe(name, epochs=12)")
  split = _images_split(images)
  height, width = _split_image_size(split)
  size = recipe.data.image_size or height
  if not recipe.data.image_size and height != width:
    raise ValueError(f"recipe image_size: the images are {height}x{width}, not square; pass image_size=S")
  if split.num_examples < train.batch_size:
    raise ValueError(f"images: {split.num_examples} make no batch of the recipe's batch_size={train.batch_size}")
  if not 0 <= initial_epoch < train.epochs:
    raise ValueError(f"initial_epoch: {initial_epoch} is not in [0, {train.epochs}) (the recipe's epochs)")
  stream = make_training_stream(split, augment_cfg, size=size, shuffle_buffer=recipe.data.shuffle_buffer,
                                batch_size=train.batch_size, seed=train.seed, first_epoch=initial_epoch,
                                epochs=train.epochs)
  stream.steps_per_epoch = split.num_examples // train.batch_size
  return stream


def _split_image_size(split: Split) -> tuple[int, int]:
  """(H, W) of the split's first image."""
  first = next(iter(split.make().take(1)))[IMAGE_KEY]
  return int(first.shape[0]), int(first.shape[1])
