"""tf_instdisc: unsupervised feature learning by non-parametric instance discrimination (Wu et al., CVPR 2018).

Modules (one concept each): config, data, augment, backbones, model, memory_bank, objectives, distribute,
schedules, checkpointing, knn, train_lib, export, index, artifact, search; for evaluation features, linear_probe,
finetune, evaluation, results, ablation, tsne, plots. Import modules directly, e.g.
`from tf_instdisc import train_lib`; this package file imports nothing at import time, so `import tf_instdisc`
stays cheap and free of side effects.
"""

__version__ = "0.1.0"


def load(export_dir: str, *, use_scann: bool = True):
  """Opens an export of export/export.py: an object with embed(images), search(queries, k), classify(images).

  See tf_instdisc.artifact.load (imported on call, with TensorFlow).
  """
  from tf_instdisc import artifact

  return artifact.load(export_dir, use_scann=use_scann)
