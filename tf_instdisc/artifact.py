"""The export artifact on disk, and `load` for using it from Python.

Layout of an export dir E (written by export/export.py):

  E/manifest.json               what the artifact is (input, embedding size, collection, kNN, versions, the
                                training config) and every file's size; written last
  E/saved_model/<version>/      the serving SavedModel (tf_instdisc.export): TF Serving's versioned layout
  E/index/embeddings.npy        float32 [N, D]: the collection (clean train images through the final network)
  E/index/ids.npy               int64 [N]: the id of each row (its instance id)
  E/index/labels.npy            int64 [N], when the collection is labelled
  E/index/paths.json            the image file of each row, for folder datasets
  E/index/scann/                the ScaNN searcher (tf_instdisc.index), unless exported with --index=none
  E/backbone/                   the backbone alone, to fine-tune (e.g. detection, the paper's Table 6), unless
                                exported with --backbone=false (`write_backbone`):
    backbone.weights.h5         its weights (Keras 3 save_weights): no projection head, no bank
    backbone.keras              the whole backbone (stock Keras layers only), loadable by keras.saving.load_model
                                without tf_instdisc; any image size (H, W free), BatchNormalization unsynchronized
    backbone.json               arch, input shape, features, pixel convention, stage output layers, how to rebuild

An export is built in a sibling staging dir and renamed into place only when complete (`commit`), so E either does
not exist or holds a full artifact; `read_manifest` also checks every file against the manifest's sizes, so a copy
cut short is refused with the file named. The ScaNN index needs `import scann`; without it `load` falls back to
exact search over embeddings.npy. `write_export` is the whole export of a train.py model dir (export/export.py is
its command line); `export_model` writes the same artifact (without backbone/) for a model trained in Python.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.metadata
import json
import numbers
import os
import platform
import shutil
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import tf_instdisc
from tf_instdisc import backbones
from tf_instdisc import checkpointing
from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import export as export_lib
from tf_instdisc import features
from tf_instdisc import index as index_lib
from tf_instdisc import knn
from tf_instdisc import model as model_lib

FORMAT = "tf_instdisc.export/1"
MANIFEST_FILE = "manifest.json"
SAVED_MODEL_DIR, INDEX_DIR, SCANN_DIR = "saved_model", "index", "scann"
EMBEDDINGS_FILE, IDS_FILE, LABELS_FILE, PATHS_FILE = "embeddings.npy", "ids.npy", "labels.npy", "paths.json"
BACKBONE_DIR, BACKBONE_INFO_FILE = "backbone", "backbone.json"
BACKBONE_WEIGHTS_FILE, BACKBONE_KERAS_FILE = "backbone.weights.h5", "backbone.keras"
_STAGING_MARK, _OLD_MARK = ".partial-", ".replaced-"
_STRIDE_PROBE = 224  # An input side divisible by every backbone's total stride (32), to measure stage strides.
_BATCH = 256


# ------------------------------------------------------------------------------------------------------------ writing
def staging_dir(export_dir: str) -> str:
  """A fresh sibling of export_dir to build the artifact in (same filesystem, so `commit` is a rename)."""
  export_dir = os.path.abspath(export_dir)
  for stale in glob.glob(f"{export_dir}{_STAGING_MARK}*") + glob.glob(f"{export_dir}{_OLD_MARK}*"):
    logging.info("removing %s, left by an interrupted export", stale)
    shutil.rmtree(stale, ignore_errors=True)
  path = f"{export_dir}{_STAGING_MARK}{os.getpid()}"
  os.makedirs(path)
  return path


def write_collection(index_dir: str, *, embeddings: np.ndarray, ids: np.ndarray, labels: np.ndarray | None,
                     paths: Sequence[str] = ()) -> None:
  """The collection's arrays (and file paths) under index_dir."""
  os.makedirs(index_dir, exist_ok=True)
  np.save(os.path.join(index_dir, EMBEDDINGS_FILE), embeddings.astype(np.float32))
  np.save(os.path.join(index_dir, IDS_FILE), ids.astype(np.int64))
  if labels is not None:
    np.save(os.path.join(index_dir, LABELS_FILE), labels.astype(np.int64))
  if paths:
    with open(os.path.join(index_dir, PATHS_FILE), "w") as f:
      json.dump(list(paths), f)


def stage_layers(arch: str, backbone: keras.Model) -> list[str]:
  """The layers ending each stage of a backbone, finest first: the taps of a feature pyramid.

  ResNets: the last block's output of each stage (stage1_block2_out ... stage4_block2_out for ResNet-18), not the
  stem; convnet_small: the ReLU before each pooling layer, the global one included (conv1_relu ... conv4_1_relu).
  The same layers as the linear probes' conv1..conv5 (features.stage_layers). None for a keras.<Name> application:
  their stages are not named alike.
  """
  if arch.startswith(backbones.KERAS_PREFIX):
    return []
  stages = features.stage_layers(backbone)
  return [name for paper, name in stages.items() if not (arch.startswith("resnet") and paper == "conv1")]


def write_backbone(directory: str, backbone: keras.Model, *, arch: str, input_shape: Sequence[int | None],
                   step: int, width_multiplier: float = 1.0, pool_grid: int = 1) -> dict[str, Any]:
  """The backbone alone under directory (the layout in the module docstring), to start e.g. a detector from.

  backbone.weights.h5 is `backbone` itself. backbone.keras is a rebuild with the same layers and weights, but with
  the spatial input size left free (a Keras model saved at the training size refuses any other, and a detector
  feeds its own) and BatchNormalization unsynchronized (Keras refuses synchronized=True outside its TensorFlow
  backend; the weights are the same either way).

  Returns:
    The manifest's "backbone" entry (paths relative to the export dir).
  """
  os.makedirs(directory)
  backbone.save_weights(os.path.join(directory, BACKBONE_WEIGHTS_FILE))
  channels = input_shape[-1]
  free = tuple(input_shape) if arch in backbones.FIXED_SIZE_ONLY else (None, None, channels)
  portable = backbones.build_backbone(arch, free, policy="float32", sync_batchnorm=False,
                                      width_multiplier=width_multiplier, pool_grid=pool_grid)
  for layer in portable.layers:
    layer.set_weights(backbone.get_layer(layer.name).get_weights())
  keras.saving.save_model(portable, os.path.join(directory, BACKBONE_KERAS_FILE))

  stages = stage_layers(arch, portable)
  shapes = []
  if stages:
    taps = keras.Model(portable.inputs, [portable.get_layer(name).output for name in stages])
    shapes = taps.compute_output_shape((1, _STRIDE_PROBE, _STRIDE_PROBE, channels))
  standardize = portable.get_layer("standardize")  # Rescaling: x * scale + offset = (x - mean) / std.
  features = int(portable.output.shape[-1])
  shape_text = ", ".join(str(d) for d in input_shape)
  width_text = "" if width_multiplier == 1.0 else f", width_multiplier={width_multiplier}"
  width_text += "" if pool_grid == 1 else f", pool_grid={pool_grid}"
  pooled = ("global average pool of the last stage" if pool_grid == 1 else
            f"the last stage averaged over each cell of a {pool_grid}x{pool_grid} grid, flattened (row, column, "
            "channel)")
  checkpointing.write_json_atomic(os.path.join(directory, BACKBONE_INFO_FILE), {
      "arch": arch,
      "width_multiplier": width_multiplier,
      "pool_grid": pool_grid,
      "input_shape": list(input_shape),
      "keras_input_shape": list(free),
      "output": {"layer": portable.layers[-1].name, "features": features,
                 "what": f"{pooled} (the embedding model's projection comes after)"},
      "pixels": {"dtype": "float32", "range": [0, 255], "channels": channels,
                 "mean": -standardize.offset / standardize.scale, "std": 1.0 / standardize.scale,
                 "standardization": "inside the model (layer 'standardize'): (x - mean) / std on every channel; "
                                    "feed raw pixels"},
      "stages": [{"layer": name, "stride": _STRIDE_PROBE // int(shape[1]), "channels": int(shape[-1])}
                 for name, shape in zip(stages, shapes)],
      "files": {"weights": BACKBONE_WEIGHTS_FILE, "keras": BACKBONE_KERAS_FILE},
      "load": f"keras.saving.load_model('{BACKBONE_KERAS_FILE}')",
      "rebuild": f"tf_instdisc.backbones.build_backbone('{arch}', ({shape_text}){width_text}) then "
                 f".load_weights('{BACKBONE_WEIGHTS_FILE}')",
      "checkpoint_step": step,
  })
  relative = os.path.basename(directory)
  return {"dir": relative, "arch": arch, "features": features,
          **{key: os.path.join(relative, name) for key, name in (
              ("weights", BACKBONE_WEIGHTS_FILE), ("keras", BACKBONE_KERAS_FILE), ("info", BACKBONE_INFO_FILE))}}


def _file_sizes(root: str) -> dict[str, int]:
  sizes = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, root)
      if relative != MANIFEST_FILE:
        sizes[relative] = os.path.getsize(path)
  return dict(sorted(sizes.items()))


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
  """Writes root/manifest.json with FORMAT and the size of every file under root: call it last."""
  checkpointing.write_json_atomic(os.path.join(root, MANIFEST_FILE),
                                  {"format": FORMAT, **manifest, "files": _file_sizes(root)})


def commit(staging: str, export_dir: str, *, overwrite: bool) -> None:
  """Moves the finished staging dir to export_dir; an existing export is replaced only with overwrite.

  Raises:
    ValueError: export_dir exists and overwrite is False (naming --export_dir).
  """
  export_dir = os.path.abspath(export_dir)
  read_manifest(staging)  # Never publish an artifact that would not load.
  old = None
  if os.path.exists(export_dir):
    if not overwrite:
      raise ValueError(f"--export_dir: {export_dir} already exists; pass --overwrite to replace it")
    old = f"{export_dir}{_OLD_MARK}{os.getpid()}"
    os.rename(export_dir, old)
  os.rename(staging, export_dir)
  if old:
    shutil.rmtree(old)


def _versions() -> dict[str, str | None]:
  versions = {"tf_instdisc": tf_instdisc.__version__, "python": platform.python_version()}
  for package in ("tensorflow", "keras", "scann", "numpy", "tensorflow-datasets"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def _check_export_arguments(export_dir: str, *, overwrite: bool, index: str, recall_target: float,
                            tune_seconds: float, flag: Callable[[str], str]) -> tuple[str, float, float]:
  """(absolute export_dir, recall_target, tune_seconds), or ValueError naming the flag (`flag("index")` is
  "--index" for export/export.py, "index" for export_model's arguments)."""
  export_dir = os.path.abspath(export_dir)
  overwrite_text = "--overwrite" if flag("x").startswith("--") else "overwrite=True"
  if os.path.exists(export_dir) and not overwrite:
    raise ValueError(f"{flag('export_dir')}: {export_dir} already exists; pass {overwrite_text} to replace it")
  if index not in ("scann", "none"):
    raise ValueError(f"{flag('index')}: got {index!r}, expected scann or none")
  if index == "scann" and not index_lib.scann_available():
    raise ValueError(f"{flag('index')}=scann needs the scann package (pip install 'tf-instdisc[scann]', Linux); "
                     f"or pass {flag('index')}=none (exact search)")
  return (export_dir, index_lib.check_recall_target(recall_target, flag("recall_target")),
          _check_tune_seconds(tune_seconds, flag("tune_seconds")))


def write_export(model_dir: str, export_dir: str, *, overwrite: bool = False, version: int | None = None,
                 index: str = "scann", knn_k: int | None = None, knn_temperature: float | None = None,
                 collection_examples: int | None = None, batch_size: int = 256, recall_queries: int = 1000,
                 backbone: bool = True, recall_target: float = index_lib.RECALL_TARGET,
                 tune_seconds: float = index_lib.TUNE_SECONDS) -> str:
  """Exports the latest checkpoint of a train.py model dir (export/export.py's flags document the arguments).

  Restores the model (float32 compute, whatever the training precision), embeds the collection (the clean train
  split), builds the SavedModel, the index and (with `backbone`) the backbone files in a staging dir, writes the
  manifest last and commits.

  Returns:
    The absolute export dir.

  Raises:
    ValueError: naming the flag or file (the model dir, its config or checkpoint, the export dir, the data).
  """
  start = time.time()
  export_dir, recall_target, tune_seconds = _check_export_arguments(
      export_dir, overwrite=overwrite, index=index, recall_target=recall_target, tune_seconds=tune_seconds,
      flag=lambda name: f"--{name}")
  run = features.load_run(model_dir)
  cfg, model, checkpoint, step = run.cfg, run.model, run.checkpoint, run.step
  data_cfg = cfg.data
  if collection_examples is not None:
    data_cfg = dataclasses.replace(data_cfg, max_train_examples=collection_examples)
  source = data_lib.load_source(data_cfg)
  size = run.input_shape[0]
  logging.info("restored %s (step %d)", checkpoint, step)
  version = step if version is None else version
  knn_k = min(knn_k or cfg.eval.knn_k, source.train.num_examples)
  temperature = knn_temperature or cfg.eval.knn_temperature

  logging.info("embedding the collection: %d train images", source.train.num_examples)
  embeddings, labels = knn.embed_split(model, source.train, cfg.augment, image_size=size, batch_size=batch_size)
  labelled = source.num_classes > 0 and bool(np.all(labels >= 0))
  ids = np.arange(len(embeddings), dtype=np.int64)  # The instance id: the position in the train split.
  collection = export_lib.Collection(embeddings, ids, labels if labelled else None, source.num_classes)
  spec = export_lib.ServingSpec(image_shape=tuple(source.image_shape), model_size=size,
                                crop_fraction=cfg.augment.eval_crop_fraction)

  def held_out_queries() -> np.ndarray | None:  # Collection rows would find themselves.
    if not recall_queries or source.eval is None:
      return None
    return knn.embed_split(model, data_lib.take_first(source.eval, recall_queries), cfg.augment,
                           image_size=size, batch_size=batch_size)[0]

  def backbone_writer(directory: str) -> dict[str, Any]:
    return write_backbone(directory, model_lib.backbone_of(model), arch=cfg.model.arch,
                          input_shape=(size, size, source.image_shape[2]), step=step,
                          width_multiplier=cfg.model.width_multiplier, pool_grid=cfg.model.pool_grid)

  return _write_artifact(
      export_dir, model, spec, collection, overwrite=overwrite, version=step if version is None else version,
      index=index, knn_k=knn_k, temperature=temperature, queries=held_out_queries, recall_queries=recall_queries,
      recall_target=recall_target, tune_seconds=tune_seconds, backbone_writer=backbone_writer if backbone else None,
      paths=source.train.files, start=start, manifest={
          "dataset": cfg.data.dataset, "embedding_dim": cfg.model.embedding_dim,
          "collection": {"size": len(embeddings), "source": "train split, clean views, final network",
                         "labelled": labelled, "num_classes": source.num_classes,
                         "class_names": list(source.class_names), "has_paths": bool(source.train.files)},
          "checkpoint": {"path": checkpoint, "step": step, "model_dir": os.path.abspath(model_dir)},
          "config": config_lib.to_dict(cfg)})


def _write_artifact(export_dir: str, model: keras.Model, spec: export_lib.ServingSpec,
                    collection: export_lib.Collection, *, overwrite: bool, version: int, index: str, knn_k: int,
                    temperature: float, queries, recall_queries: int, recall_target: float, tune_seconds: float,
                    backbone_writer, paths: Sequence[str] | None, start: float, manifest: dict[str, Any]) -> str:
  """Builds the SavedModel, the index and (with backbone_writer) the backbone in a staging dir beside export_dir,
  writes the manifest last and commits; on any failure nothing is left behind and export_dir is untouched.

  `queries` is a callable giving held-out query embeddings to tune the index on (or None: then a seeded sample of
  recall_queries collection rows, each of which finds itself); `manifest` holds the entries that depend on where
  the model came from.
  """
  embeddings = collection.embeddings
  staging = staging_dir(export_dir)
  try:
    archive = export_lib.build_archive(model, spec, collection, k=knn_k, temperature=temperature)
    export_lib.write_saved_model(archive, os.path.join(staging, SAVED_MODEL_DIR, str(version)))
    backbone_info = backbone_writer(os.path.join(staging, BACKBONE_DIR)) if backbone_writer else None
    index_dir = os.path.join(staging, INDEX_DIR)
    write_collection(index_dir, embeddings=embeddings, ids=collection.ids, labels=collection.labels, paths=paths)
    index_info = {"kind": "none", "settings": None}
    if index == "scann":
      held_out = queries() if queries is not None else None
      queries_from = "held-out queries"
      if held_out is None:
        rows = np.random.default_rng(0).permutation(len(embeddings))[:recall_queries]
        held_out, queries_from = embeddings[rows], "a seeded sample of collection rows (each finds itself)"
      index_info = _build_index(embeddings, held_out, os.path.join(index_dir, SCANN_DIR), k=knn_k,
                                recall_target=recall_target, tune_seconds=tune_seconds)
      if len(held_out):
        index_info["recall_queries_from"] = queries_from
    write_manifest(staging, {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "inputs": {
            export_lib.IMAGES: {"shape": [None, *spec.image_shape], "dtype": "float32", "range": [0, 255]},
            export_lib.IMAGE_BYTES: {"shape": [None], "dtype": "string", "formats": ["jpeg", "png", "gif", "bmp"]},
        },
        "model_input_size": spec.model_size, "eval_crop_fraction": spec.crop_fraction,
        "knn": {"k": knn_k, "temperature": temperature},
        "saved_model": {"version": version, "tag": export_lib.SAVED_MODEL_TAG,
                        "signatures": list(export_lib.SIGNATURES)},
        "index": index_info,
        "backbone": backbone_info,
        "versions": _versions(),
        **manifest,
    })
    commit(staging, export_dir, overwrite=overwrite)
  except BaseException:  # KeyboardInterrupt too: leave nothing half-written behind.
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logging.info("exported %s in %.0f s: SavedModel version %d, %d items, index %s", export_dir, time.time() - start,
               version, len(embeddings), index_info["kind"])
  return export_dir


def export_model(model: keras.Model, images: np.ndarray, export_dir: str, *, labels: np.ndarray | None = None,
                 class_names: Sequence[str] = (), queries: np.ndarray | None = None, knn_k: int = 200,
                 knn_temperature: float = 0.07, index: str = "scann", overwrite: bool = False,
                 version: int | None = None, batch_size: int = _BATCH, recall_target: float = index_lib.RECALL_TARGET,
                 tune_seconds: float = index_lib.TUNE_SECONDS) -> str:
  """Exports a model trained in Python (e.g. InstanceDiscrimination with fit), without a train.py model dir: the
  same artifact as export/export.py (SavedModel signatures, index, manifest), without the backbone/ files.

  Args:
    model: an InstanceDiscrimination model (its embedding layers are exported, not the bank) or any Keras model
      images float [B, H, W, C] in [0, 255] -> unit-norm embeddings [B, D].
    images: the collection, float or uint8 pixels [N, H, W, C] with H == W (the model's input size); row i gets
      id i.
    export_dir: where to write; must not exist unless overwrite.
    labels: int [N] class labels of the collection (the knn signatures then vote a label), or None.
    class_names: names of the classes, when labelled.
    queries: held-out images [Q, H, W, C] to tune the index on and measure its recall@10 (default: a seeded
      sample of 1,000 collection rows).
    knn_k: neighbours of the knn signatures (clipped to N).
    knn_temperature: the vote's temperature.
    index: "scann" or "none" (exact search).
    overwrite: replace an existing export_dir once the new export is complete.
    version: the SavedModel version; default the model's step counter (0 for other models).
    batch_size: images per batch when embedding.
    recall_target: the ScaNN index's search settings are raised until recall@10 on the queries reaches this
      (0 < target <= 1), else it is exact brute force (index.tune).
    tune_seconds: time budget of that tuning (>= 0).

  Returns:
    The absolute export dir.

  Raises:
    ValueError: naming the argument (images, labels, index, export_dir, recall_target, tune_seconds).
  """
  start = time.time()
  export_dir, recall_target, tune_seconds = _check_export_arguments(
      export_dir, overwrite=overwrite, index=index, recall_target=recall_target, tune_seconds=tune_seconds,
      flag=lambda name: name)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != images.shape[2] or len(images) == 0:
    raise ValueError(f"images: expected square images [N, S, S, C], got shape {images.shape}")
  if labels is not None:
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(images),) or labels.min() < 0:
      raise ValueError(f"labels: expected {len(images)} non-negative class ids, got shape {labels.shape}")
  embedding_model = model.embedding_model(images.shape[1:]) if hasattr(model, "embedding_model") else model

  def embed(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(embedding_model.predict(pixels.astype(np.float32), batch_size=batch_size, verbose=0),
                      np.float32)

  embeddings = embed(images)
  num_classes = max(len(class_names), int(labels.max()) + 1) if labels is not None else 0
  collection = export_lib.Collection(embeddings, np.arange(len(images), dtype=np.int64), labels, num_classes)
  spec = export_lib.ServingSpec(image_shape=tuple(images.shape[1:]), model_size=int(images.shape[1]),
                                crop_fraction=1.0)
  step = int(model.step.numpy()) if hasattr(model, "step") else 0
  settings = model.get_config() if hasattr(model, "embedding_model") else {}
  settings.pop("encoder", None)
  return _write_artifact(
      export_dir, embedding_model, spec, collection, overwrite=overwrite,
      version=step if version is None else version, index=index, knn_k=min(knn_k, len(images)),
      temperature=knn_temperature, queries=None if queries is None else (lambda: embed(np.asarray(queries))),
      recall_queries=1000, recall_target=recall_target, tune_seconds=tune_seconds, backbone_writer=None, paths=None,
      start=start, manifest={
          "dataset": "custom", "embedding_dim": int(embeddings.shape[1]),
          "collection": {"size": len(images), "source": "images given to export_model", "labelled": labels is not None,
                         "num_classes": num_classes, "class_names": list(class_names), "has_paths": False},
          "checkpoint": {"path": None, "step": step, "model_dir": None},
          "model": {"class": type(model).__name__, "settings": config_lib.json_ready(settings)}})


def _check_tune_seconds(value: float, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
    raise ValueError(f"{name}: got {value!r}, expected seconds >= 0")
  return float(value)


def _build_index(embeddings: np.ndarray, queries: np.ndarray, directory: str, *, k: int,
                 recall_target: float = index_lib.RECALL_TARGET, tune_seconds: float = index_lib.TUNE_SECONDS
                 ) -> dict[str, Any]:
  """Builds the ScaNN searcher, tunes it to recall_target on `queries` (index.tune) and saves it.

  Returns:
    The manifest's "index" entry: kind and settings (what `Export.search` searches with), build_seconds,
    recall_target, and with queries recall_at_10 (of those settings), recall_queries, fell_back (to brute force)
    and tuning (index.tune's record: every setting tried with its recall, why it stopped, the seconds).
  """
  recall_target = index_lib.check_recall_target(recall_target)
  settings = index_lib.choose_settings(len(embeddings), k=k)
  start = time.time()
  searcher = index_lib.build_searcher(embeddings, settings, k=k)
  info = {"kind": settings.kind, "settings": settings.to_dict(), "build_seconds": round(time.time() - start, 2),
          "recall_target": recall_target}
  if len(queries):
    searcher, settings, tuning = index_lib.tune(searcher, embeddings, queries, settings, target=recall_target,
                                                seconds=tune_seconds)
    tuning.pop("recall_target")
    info.update(kind=settings.kind, settings=settings.to_dict(), recall_at_10=tuning.pop("recall_at_10"),
                recall_queries=len(queries), fell_back=tuning.pop("fell_back"), tuning=tuning)
    logging.info("index %s: recall@10 %.4f (target %.4f) on %d queries after %d settings in %.1f s (%s), built in "
                 "%.1f s", settings.kind, info["recall_at_10"], recall_target, len(queries), len(tuning["tried"]),
                 tuning["seconds"], tuning["stopped"], info["build_seconds"])
  index_lib.save_searcher(searcher, directory)
  return info


# ------------------------------------------------------------------------------------------------------------ reading
def read_manifest(export_dir: str) -> dict[str, Any]:
  """The manifest of a complete export, after checking that every file it lists is there with its size.

  Raises:
    ValueError: naming the dir or file when the export is missing, incomplete, cut short or not ours.
  """
  if not os.path.isdir(export_dir):
    raise ValueError(f"export dir {export_dir} does not exist")
  path = os.path.join(export_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{export_dir} is not a complete export: {MANIFEST_FILE} is missing (an interrupted export, "
                     "or not an export dir)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is corrupt: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
    raise ValueError(f"{path} is not a {FORMAT} manifest")
  for relative, size in manifest["files"].items():
    file_path = os.path.join(export_dir, relative)
    if not os.path.exists(file_path):
      raise ValueError(f"export {export_dir} is incomplete: {file_path} is missing")
    if os.path.getsize(file_path) != size:
      raise ValueError(f"export {export_dir} is corrupt: {file_path} has {os.path.getsize(file_path)} bytes, "
                       f"the manifest says {size}")
  return manifest


def saved_model_path(export_dir: str, manifest: dict[str, Any]) -> str:
  return os.path.join(export_dir, SAVED_MODEL_DIR, str(manifest["saved_model"]["version"]))


@dataclasses.dataclass(frozen=True)
class Neighbors:
  """Search results for Q queries: ids [Q, k] int64 (collection ids), scores [Q, k] float32 (cosine, descending),
  labels [Q, k] int64 or None, rows [Q, k] int64 (row numbers in the collection, e.g. into `Export.paths`)."""

  ids: np.ndarray
  scores: np.ndarray
  labels: np.ndarray | None
  rows: np.ndarray


class Export:
  """A loaded export: `embed`, `search` and `classify` (use `load` to make one)."""

  def __init__(self, export_dir: str, manifest: dict[str, Any], *, use_scann: bool = True):
    self.export_dir, self.manifest = export_dir, manifest
    path = saved_model_path(export_dir, manifest)
    try:
      self.saved_model = tf.saved_model.load(path)
    except Exception as e:  # TF raises several types for a damaged SavedModel.
      raise ValueError(f"cannot load the SavedModel {path}: {type(e).__name__}: {e}") from e
    index_dir = os.path.join(export_dir, INDEX_DIR)
    self.embeddings = self._load_array(index_dir, EMBEDDINGS_FILE)
    self.ids = self._load_array(index_dir, IDS_FILE)
    has_labels = os.path.exists(os.path.join(index_dir, LABELS_FILE))
    self.labels = self._load_array(index_dir, LABELS_FILE) if has_labels else None
    self.paths = None
    if os.path.exists(os.path.join(index_dir, PATHS_FILE)):
      with open(os.path.join(index_dir, PATHS_FILE)) as f:
        self.paths = json.load(f)
    self._check_files_against_manifest()
    self.searcher, self.backend = None, "exact"
    scann_dir = os.path.join(index_dir, SCANN_DIR)
    if use_scann and os.path.isdir(scann_dir):
      if index_lib.scann_available():
        self.searcher, self.backend = index_lib.load_searcher(scann_dir), "scann"
      else:
        logging.warning("%s holds a ScaNN index but scann is not installed: exact search instead (pip install "
                        "'tf-instdisc[scann]' for the index)", export_dir)
    self._settings = self._check_searcher_against_manifest() if self.searcher else None

  def _check_files_against_manifest(self) -> None:
    """Raises ValueError unless the arrays and the SavedModel's serving_default agree with the manifest.

    read_manifest checked every file's size, but not manifest.json itself (not in its own list): an edited one,
    or files from another export under the same sizes, would load and then answer wrongly or fail deep inside.
    Each message names the export, manifest.json with its value and the file with its own.
    """
    where = f"export {self.export_dir}"
    manifest = self.manifest

    def said(*keys: str) -> Any:
      value = manifest
      for key in keys:
        if not isinstance(value, dict) or key not in value:
          raise ValueError(f"{where}: {MANIFEST_FILE} has no {'.'.join(keys)}")
        value = value[key]
      return value

    embeddings_name, ids_name, labels_name = (f"{INDEX_DIR}/{name}" for name in (EMBEDDINGS_FILE, IDS_FILE,
                                                                                 LABELS_FILE))
    embeddings = self.embeddings
    if embeddings.ndim != 2:
      raise ValueError(f"{where}: {embeddings_name} has shape {list(embeddings.shape)}, expected [rows, columns]")
    if embeddings.dtype != np.float32:
      raise ValueError(f"{where}: {embeddings_name} holds {embeddings.dtype}, but a {FORMAT} export "
                       f"({MANIFEST_FILE}) stores float32")
    embedding_dim, size = said("embedding_dim"), said("collection", "size")
    if embedding_dim != embeddings.shape[1]:
      raise ValueError(f"{where}: {MANIFEST_FILE} says embedding_dim {embedding_dim}, {embeddings_name} has "
                       f"{embeddings.shape[1]} columns")
    for name, array in ((ids_name, self.ids), (labels_name, self.labels)):
      if array is not None and (array.ndim != 1 or array.dtype.kind not in "iu"):
        raise ValueError(f"{where}: {name} holds {array.dtype} {list(array.shape)}, expected int64 [rows]")
    for name, array in ((embeddings_name, embeddings), (ids_name, self.ids), (labels_name, self.labels)):
      if array is not None and len(array) != size:
        raise ValueError(f"{where}: {MANIFEST_FILE} says collection size {size}, {name} has {len(array)} rows")
    labelled = said("collection", "labelled")
    if bool(labelled) != (self.labels is not None):
      raise ValueError(f"{where}: {MANIFEST_FILE} says collection labelled {str(bool(labelled)).lower()}, but "
                       f"{labels_name} {'is missing' if labelled else 'exists'}")
    if self.paths is not None and len(self.paths) != size:
      raise ValueError(f"{where}: {MANIFEST_FILE} says collection size {size}, {INDEX_DIR}/{PATHS_FILE} has "
                       f"{len(self.paths)} paths")

    saved_model = os.path.relpath(saved_model_path(self.export_dir, manifest), self.export_dir)
    serving = f"{saved_model} {export_lib.SERVING_DEFAULT}"
    if export_lib.SERVING_DEFAULT not in self.saved_model.signatures:
      raise ValueError(f"{where}: {saved_model} has no {export_lib.SERVING_DEFAULT} signature")
    signature = self.saved_model.signatures[export_lib.SERVING_DEFAULT]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if set(inputs) != {export_lib.IMAGES} or export_lib.EMBEDDINGS not in outputs:
      raise ValueError(f"{where}: {serving} takes {sorted(inputs)} and returns {sorted(outputs)}, expected "
                       f"{export_lib.IMAGES} -> {export_lib.EMBEDDINGS}")
    manifest_shape = said("inputs", export_lib.IMAGES, "shape")
    model_shape = inputs[export_lib.IMAGES].shape.as_list()
    if manifest_shape != model_shape:
      raise ValueError(f"{where}: {MANIFEST_FILE} says inputs.{export_lib.IMAGES} shape {_shape(manifest_shape)}, "
                       f"{serving} takes {_shape(model_shape)}")
    output_dim = outputs[export_lib.EMBEDDINGS].shape[-1]
    if output_dim != embedding_dim:
      raise ValueError(f"{where}: {MANIFEST_FILE} says embedding_dim {embedding_dim}, {serving} returns embeddings "
                       f"of {output_dim}")

  def _check_searcher_against_manifest(self) -> index_lib.IndexSettings:
    """The manifest's index settings (what search passes to ScaNN), after checking them against index/scann/."""
    where, scann = f"export {self.export_dir}", f"{INDEX_DIR}/{SCANN_DIR}/"
    try:
      settings = index_lib.IndexSettings.from_dict(self.manifest["index"]["settings"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: {MANIFEST_FILE} has no valid index.settings for {scann} ({e})") from e
    if self.searcher.size() != len(self.embeddings):
      raise ValueError(f"{where}: {scann} holds {self.searcher.size()} rows, {INDEX_DIR}/{EMBEDDINGS_FILE} has "
                       f"{len(self.embeddings)}")
    kind = "tree_ah" if "partitioning {" in self.searcher.config() else "brute_force"
    if settings.kind != kind:
      raise ValueError(f"{where}: {MANIFEST_FILE} says index kind {settings.kind}, {scann} is a {kind} searcher")
    return settings

  @staticmethod
  def _load_array(directory: str, name: str) -> np.ndarray:
    path = os.path.join(directory, name)
    try:
      return np.load(path)
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"cannot read {path}: {e}") from e

  def collection_images(self, rows: np.ndarray) -> dict[int, np.ndarray]:
    """uint8 images [H, W, C] of the given collection rows (any shape of ints), keyed by row: read from their
    files for folder datasets, else by one pass over the train split the export was made from (which must be
    readable here: Fashion-MNIST's files, or the TFDS data)."""
    wanted = sorted({int(row) for row in np.ravel(rows)})
    channels = self.manifest["inputs"][export_lib.IMAGES]["shape"][-1]
    if self.paths is not None:
      return {row: tf.io.decode_image(tf.io.read_file(self.paths[row]), channels=channels,
                                      expand_animations=False).numpy() for row in wanted}
    if "config" not in self.manifest:
      raise ValueError(f"{self.export_dir} was exported from Python (export_model) without image files or a "
                       "dataset config: its collection images are not in the export")
    cfg = config_lib.from_dict(self.manifest["config"])
    data_cfg = dataclasses.replace(cfg.data, max_train_examples=self.manifest["collection"]["size"])
    split = data_lib.load_source(data_cfg).train
    wanted_ids = tf.constant(wanted, tf.int64)
    found = data_lib.with_instance_ids(split).filter(
        lambda ex: tf.reduce_any(tf.equal(ex[data_lib.ID_KEY], wanted_ids)))
    return {int(ex[data_lib.ID_KEY]): split.decode(ex[data_lib.IMAGE_KEY]).numpy() for ex in found}

  @property
  def embedding_dim(self) -> int:
    return int(self.manifest["embedding_dim"])

  @property
  def class_names(self) -> list[str]:
    return list(self.manifest["collection"].get("class_names", []))

  def embed(self, images: Any) -> np.ndarray:
    """Embeddings float32 [B, D] of images: pixels [B, H, W, C] or [H, W, C] (0-255), or encoded images (bytes)
    or image file paths (str), one or a list."""
    if isinstance(images, (str, bytes)) or (isinstance(images, (list, tuple)) and images
                                             and isinstance(images[0], (str, bytes))):
      items = [images] if isinstance(images, (str, bytes)) else list(images)
      encoded = [_read(item) if isinstance(item, str) else item for item in items]
      signature, key, batch = self.saved_model.signatures["embed_bytes"], "image_bytes", np.array(encoded, object)
    else:
      batch = np.asarray(images, np.float32)
      if batch.ndim == 3:
        batch = batch[None]
      signature, key = self.saved_model.signatures["serving_default"], "images"
    outputs = [signature(**{key: tf.constant(batch[start:start + _BATCH])})["embeddings"].numpy()
               for start in range(0, len(batch), _BATCH)]
    return np.concatenate(outputs) if outputs else np.zeros([0, self.embedding_dim], np.float32)

  def _as_embeddings(self, queries: Any) -> np.ndarray:
    if isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim in (1, 2) and (
        queries.shape[-1] == self.embedding_dim):
      return np.atleast_2d(queries).astype(np.float32)
    return self.embed(queries)

  def search(self, queries: Any, k: int = 10) -> Neighbors:
    """The k nearest collection items of each query (images as for `embed`, or embeddings [Q, D] / [D])."""
    embeddings = self._as_embeddings(queries)
    if self.searcher is not None:
      rows, scores = index_lib.search(self.searcher, embeddings, k, settings=self._settings)
    else:
      rows, scores = index_lib.exact_search(embeddings, self.embeddings, k)
    return Neighbors(ids=self.ids[rows], scores=scores, rows=rows,
                     labels=None if self.labels is None else self.labels[rows])

  def classify(self, queries: Any) -> np.ndarray:
    """Predicted labels int64 [Q]: the paper's weighted kNN vote (the manifest's k and temperature)."""
    if self.labels is None:
      raise ValueError(f"{self.export_dir}: the collection has no labels, so there is nothing to classify with")
    settings = self.manifest["knn"]
    neighbors = self.search(queries, k=int(settings["k"]))
    class_scores = knn.vote(tf.constant(neighbors.scores), tf.constant(neighbors.labels),
                            temperature=float(settings["temperature"]),
                            num_classes=int(self.manifest["collection"]["num_classes"]))
    return np.argmax(class_scores.numpy(), axis=1).astype(np.int64)


def _shape(shape: Sequence[int | None]) -> str:
  return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def load(export_dir: str, *, use_scann: bool = True) -> Export:
  """Opens an export made by export/export.py.

  Args:
    export_dir: the export dir (E, holding manifest.json).
    use_scann: search with the ScaNN index when there is one and scann imports; False forces exact search.

  Raises:
    ValueError: naming the file when the export is missing, incomplete or corrupt.
  """
  return Export(export_dir, read_manifest(export_dir), use_scann=use_scann)
