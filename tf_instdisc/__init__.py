"""tf_instdisc: unsupervised feature learning by non-parametric instance discrimination (Wu et al., CVPR 2018).

The method as one Keras model: `tf_instdisc.InstanceDiscrimination(encoder, num_instances)`, or a shipped recipe's
model, data and settings: `tf_instdisc.recipe(name, **overrides)`, `InstanceDiscrimination.from_recipe(recipe,
num_instances, input_shape)` and `tf_instdisc.training_dataset(images, recipe)`; with
`tf_instdisc.with_instance_ids(dataset)`, the callbacks `tf_instdisc.KnnMonitor`, `tf_instdisc.Throughput` and
`tf_instdisc.NeighbourSearch`, and `tf_instdisc.export_model(model, images, export_dir)`; these load TensorFlow on
first use.

Modules (one concept each): instance_discrimination (the method), recipes (the shipped flagfiles as configs), cli
(the commands), callbacks, config, data, augment, backbones, batchnorm, precision, model, memory_bank, objectives,
distribute, schedules, checkpointing, knn, train_lib, export, index, artifact, search, flops; for evaluation
features, linear_probe, finetune, evaluation, results, ablation, tsne, plots. Import modules
directly, e.g. `from tf_instdisc import train_lib`; this package file imports nothing at import time.
"""

__version__ = "0.3.0"

# Imported on first use (PEP 562), so `import tf_instdisc` stays cheap and loads TensorFlow only when needed.
_LAZY = {
    "InstanceDiscrimination": ("tf_instdisc.instance_discrimination", "InstanceDiscrimination"),
    "with_instance_ids": ("tf_instdisc.instance_discrimination", "with_instance_ids"),
    "KnnMonitor": ("tf_instdisc.callbacks", "KnnMonitor"),
    "Throughput": ("tf_instdisc.callbacks", "Throughput"),
    "NeighbourSearch": ("tf_instdisc.callbacks", "NeighbourSearch"),
    "export_model": ("tf_instdisc.artifact", "export_model"),
    "recipe": ("tf_instdisc.recipes", "recipe"),
    "training_dataset": ("tf_instdisc.data", "training_dataset"),
}


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'tf_instdisc' has no attribute {name!r}")
  import importlib

  module, attribute = _LAZY[name]
  return getattr(importlib.import_module(module), attribute)


def load(export_dir: str, *, use_scann: bool = True):
  """Opens an export of export/export.py: an object with embed(images), search(queries, k), classify(images).

  See tf_instdisc.artifact.load (imported on call, with TensorFlow).
  """
  from tf_instdisc import artifact

  return artifact.load(export_dir, use_scann=use_scann)
