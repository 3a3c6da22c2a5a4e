"""Exports a trained model: a SavedModel for TF Serving and any TF program, a ScaNN index, the backbone, a manifest.

  instdisc-export --model_dir=/tmp/npid_fashion --export_dir=/tmp/npid_fashion_export
  python export/export.py ...   (the same, in a checkout)

Restores the latest checkpoint of --model_dir (with the config.json it was trained with), embeds the collection
(the clean train images through the final network, not the momentum bank) and writes, atomically:

  E/saved_model/<version>/   signatures serving_default, embed_bytes, knn, knn_bytes (tf_instdisc/export.py)
  E/index/                   embeddings, ids, labels (paths for folder datasets), and the ScaNN searcher, its
                             search settings tuned to --recall_target on held-out queries (else brute force)
  E/backbone/                the backbone alone, to fine-tune (e.g. for detection): backbone.weights.h5,
                             backbone.keras (loads with stock Keras), backbone.json (stage layers, pixel convention)
  E/manifest.json            input, embedding size, dataset, collection, kNN k and temperature, versions, config

The artifact is built beside E and renamed into place when complete: an interrupted export leaves no E (the next
export removes its leftovers). tf_instdisc/artifact.py describes the layout; docs/export.md shows how to serve it.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from tf_instdisc import cli

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Model dir of a train.py run (checkpoints/, config.json).",
                                 required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where to write the export; must not exist unless --overwrite.",
                                  required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --export_dir, once the new one is complete.")
_VERSION = flags.DEFINE_integer("version", None, "SavedModel version subfolder (TF Serving serves the highest); "
                                "default: the checkpoint's training step.", lower_bound=0)
_INDEX = flags.DEFINE_enum("index", "scann", ["scann", "none"], "scann: a ScaNN searcher (exact brute force below "
                           "tf_instdisc.index.EXACT_BELOW items); none: no index (search is exact, no scann needed).")
_KNN_K = flags.DEFINE_integer("knn_k", None, "Neighbours of the knn signatures and of classify(); default: the "
                              "run's --knn_k.", lower_bound=1)
_KNN_TEMPERATURE = flags.DEFINE_float("knn_temperature", None, "Vote temperature; default: the run's "
                                      "--knn_temperature.", lower_bound=1e-6)
_COLLECTION_EXAMPLES = flags.DEFINE_integer(
    "collection_examples", None, "Train images in the collection: default as trained (--max_train_examples), "
    "0 = the whole train split, N = the first N.", lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per batch when embedding the collection.",
                                   lower_bound=1)
_BACKBONE = flags.DEFINE_bool("backbone", True, "Also write backbone/: the backbone alone (weights, a .keras model "
                               "and backbone.json) to fine-tune, e.g. for detection; false skips it.")
_RECALL_QUERIES = flags.DEFINE_integer("recall_queries", 1000, "Held-out queries (the first eval images) to tune "
                                       "the index on and measure its recall@10 against exact search (recorded in the "
                                       "manifest); 0 = no tuning (the heuristic settings, unmeasured).", lower_bound=0)
_RECALL_TARGET = flags.DEFINE_float("recall_target", 0.95, "Recall@10 the ScaNN index must reach on those queries: "
                                    "its search settings (leaves searched, candidates re-scored) are raised until it "
                                    "does, else the index is exact brute force (docs/export.md). 0 < target <= 1.")
_TUNE_SECONDS = flags.DEFINE_float("tune_seconds", 60.0, "Time budget of that tuning; spent below the target, the "
                                   "index falls back to brute force.", lower_bound=0.0)
flags.register_validator("recall_target", lambda value: 0 < value <= 1,
                         message="expected 0 < target <= 1 (a recall@10 target)")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_tensorflow()
  from tf_instdisc import artifact  # After the flags parse: a bad flag is answered before TensorFlow loads.

  try:
    artifact.write_export(
        _MODEL_DIR.value, _EXPORT_DIR.value, overwrite=_OVERWRITE.value, version=_VERSION.value, index=_INDEX.value,
        knn_k=_KNN_K.value, knn_temperature=_KNN_TEMPERATURE.value, collection_examples=_COLLECTION_EXAMPLES.value,
        batch_size=_BATCH_SIZE.value, recall_queries=_RECALL_QUERIES.value, backbone=_BACKBONE.value,
        recall_target=_RECALL_TARGET.value, tune_seconds=_TUNE_SECONDS.value)
  except ValueError as e:
    print(f"export.py: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # A full disk, permissions, a path that is a file: nothing is left half-written.
    print(f"export.py: cannot write the export: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """The `instdisc-export` command."""
  cli.describe_command(__doc__, __name__, flags.FLAGS)
  app.run(main)


if __name__ == "__main__":
  run()
