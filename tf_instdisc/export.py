"""The serving SavedModel: an embedding model and its collection, as stock-TensorFlow signatures.

`build_archive` wraps a trained embedding model in a keras.export.ExportArchive with four signatures:

  serving_default  images float32 [B, H, W, C] (raw pixels 0-255)  -> embeddings float32 [B, D], unit norm
  embed_bytes      image_bytes string [B] (JPEG / PNG / GIF / BMP)  -> embeddings
  knn              images                                           -> neighbor_ids int64 [B, k],
                                                                       neighbor_scores float32 [B, k],
                                                                       predicted_label int64 [B] (labelled only)
  knn_bytes        image_bytes                                      -> the same as knn

The evaluation preprocessing (centre crop, resize to the model's input side) runs inside the graph, so clients send
pixels or encoded files as they are. `knn` is exact search (matmul + top_k, then the paper's weighted vote) over the
collection stored in the SavedModel's variables: only stock ops, so TF Serving, the C API and any TF program run it
without our code and without ScaNN. This module restores nothing (export/export.py restores the checkpoint) and
writes only where it is told (`write_saved_model`); the artifact around it is `artifact`'s.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tf_instdisc import augment
from tf_instdisc import knn

SERVING_DEFAULT, EMBED_BYTES, KNN, KNN_BYTES = "serving_default", "embed_bytes", "knn", "knn_bytes"
SIGNATURES = (SERVING_DEFAULT, EMBED_BYTES, KNN, KNN_BYTES)
IMAGES, IMAGE_BYTES = "images", "image_bytes"  # Signature input names.
EMBEDDINGS, NEIGHBOR_IDS, NEIGHBOR_SCORES, PREDICTED_LABEL = (
    "embeddings", "neighbor_ids", "neighbor_scores", "predicted_label")  # Signature output names.
SAVED_MODEL_TAG = "serve"


@dataclasses.dataclass(frozen=True)
class Collection:
  """What `knn` searches: embeddings of known images, their ids and (optionally) labels.

  embeddings: float32 [N, D], unit norm.
  ids: int64 [N], e.g. the instance id (train-split position) of each row.
  labels: int64 [N], or None for an unlabelled collection.
  num_classes: C when labelled.
  """

  embeddings: np.ndarray
  ids: np.ndarray
  labels: np.ndarray | None = None
  num_classes: int = 0


@dataclasses.dataclass(frozen=True)
class ServingSpec:
  """The input side of the signatures.

  image_shape: (H, W, C) of `images`; H and W are None when the dataset's images vary in size (then any size is
    accepted, the same within one request).
  model_size: the model's input side S; preprocessing centre-crops and resizes to S x S.
  crop_fraction: the evaluation centre crop (AugmentConfig.eval_crop_fraction).
  """

  image_shape: tuple[int | None, int | None, int]
  model_size: int
  crop_fraction: float


def _embedder(model: keras.Model, spec: ServingSpec):
  def embed_pixels(images: tf.Tensor) -> tf.Tensor:
    images = augment.preprocess_for_eval(images, size=spec.model_size, crop_fraction=spec.crop_fraction)
    return tf.cast(model(images, training=False), tf.float32)

  def decode_one(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=spec.image_shape[2], expand_animations=False)
    return augment.preprocess_for_eval(image, size=spec.model_size, crop_fraction=spec.crop_fraction)

  def embed_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
    size, channels = spec.model_size, spec.image_shape[2]
    images = tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))
    return tf.cast(model(images, training=False), tf.float32)

  return embed_pixels, embed_bytes


def build_archive(model: keras.Model, spec: ServingSpec, collection: Collection | None = None, *, k: int = 200,
                  temperature: float = 0.07) -> keras.export.ExportArchive:
  """The export archive of `model` (and of `collection`, when given, for the knn signatures).

  Args:
    model: images float32 [B, S, S, C] in [0, 255] -> embeddings [B, D] (model.build_embedding_model).
    spec: the signatures' input side.
    collection: the embedded collection for `knn` / `knn_bytes`; None exports the embedding signatures only.
    k: neighbours returned and voted over (clipped to the collection size).
    temperature: the vote's tau (paper Sec. 3.4).

  Returns:
    An archive ready for `write_saved_model`.
  """
  archive = keras.export.ExportArchive()
  archive.track(model)
  embed_pixels, embed_bytes = _embedder(model, spec)
  height, width, channels = spec.image_shape
  images_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name=IMAGES)
  bytes_spec = tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)
  archive.add_endpoint(SERVING_DEFAULT, lambda images: {EMBEDDINGS: embed_pixels(images)},
                       input_signature=[images_spec])
  archive.add_endpoint(EMBED_BYTES, lambda image_bytes: {EMBEDDINGS: embed_bytes(image_bytes)},
                       input_signature=[bytes_spec])
  if collection is None:
    return archive
  keys = tf.Variable(collection.embeddings.astype(np.float32), trainable=False, name="collection_embeddings")
  ids = tf.Variable(collection.ids.astype(np.int64), trainable=False, name="collection_ids")
  variables = [keys, ids]
  if collection.labels is not None:
    labels = tf.Variable(collection.labels.astype(np.int64), trainable=False, name="collection_labels")
    variables.append(labels)
  archive.add_variable_collection("collection", variables)
  k = min(k, len(collection.embeddings))

  def search(embeddings: tf.Tensor) -> dict[str, tf.Tensor]:
    scores, rows = knn.top_k_neighbors(embeddings, keys, k=k)
    outputs = {NEIGHBOR_IDS: tf.gather(ids, rows), NEIGHBOR_SCORES: scores}
    if collection.labels is not None:
      class_scores = knn.vote(scores, tf.gather(labels, rows), temperature=temperature,
                              num_classes=collection.num_classes)
      outputs[PREDICTED_LABEL] = tf.argmax(class_scores, axis=1, output_type=tf.int64)
    return outputs

  archive.add_endpoint(KNN, lambda images: search(embed_pixels(images)), input_signature=[images_spec])
  archive.add_endpoint(KNN_BYTES, lambda image_bytes: search(embed_bytes(image_bytes)), input_signature=[bytes_spec])
  return archive


def write_saved_model(archive: keras.export.ExportArchive, directory: str) -> None:
  """Writes the SavedModel to `directory` (which must not exist yet), quietly."""
  if os.path.exists(directory):
    raise ValueError(f"{directory} already exists")
  archive.write_out(directory, verbose=False)
