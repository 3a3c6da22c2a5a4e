"""Evaluates a trained run with the paper's protocols: kNN, linear probes per layer, semi-supervised fine-tuning,
transfer to another dataset.

  instdisc-evaluate --model_dir=/tmp/npid_fashion --protocol=knn,linear
  instdisc-evaluate --model_dir=/tmp/npid_fashion --protocol=semi_supervised --label_fractions=1,2,4,10,20
  instdisc-evaluate --model_dir=/tmp/npid_fashion --protocol=transfer --transfer_dataset=folder \\
      --transfer_data_dir=/data/other
  python evaluate.py ...   (the same, in a checkout)

Writes MODEL_DIR/eval/<protocol>.json, appends rows to the Markdown results table (--results_table, default
MODEL_DIR/eval/results.md) with the paper's number beside ours where the paper has one, and plots PNGs there:
curves.png (loss and kNN against epoch), tsne.png (test embeddings), linear_layers.png, semi_supervised.png.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from tf_instdisc import cli

cli.quiet_tensorflow()  # The protocols' modules import TensorFlow: start it quietly first.
from tf_instdisc import evaluation  # noqa: E402
from tf_instdisc import finetune as finetune_lib  # noqa: E402
from tf_instdisc import linear_probe  # noqa: E402

_PROBE, _FINETUNE, _OPTIONS = linear_probe.ProbeConfig(), finetune_lib.FinetuneConfig(), evaluation.EvalOptions()

flags.DEFINE_string("model_dir", None, "A train.py --model_dir (its config.json and latest checkpoint).",
                    required=True)
flags.DEFINE_list("protocol", list(_OPTIONS.protocols), f"Protocols to run: {', '.join(evaluation.PROTOCOLS)}.")
flags.DEFINE_list("knn_k", [str(k) for k in _OPTIONS.knn_k], "kNN neighbour counts, e.g. 10,20,200.")
flags.DEFINE_float("knn_temperature", _OPTIONS.knn_temperature, "Temperature of the kNN vote weights.")
flags.DEFINE_list("knn_features", list(_OPTIONS.knn_features),
                  "kNN rows: embedding (the result), backbone (pooled features before the projection head) and "
                  "pixels (the raw eval view; skipped when the images' pixels exceed evaluation.MAX_PIXEL_VALUES), "
                  "each L2-normalised.")
flags.DEFINE_list("layers", [], "Linear-probe layers (conv1..conv5, backbone, embedding); empty = the stages and "
                  "the embedding.")
flags.DEFINE_integer("max_layer_dims", _OPTIONS.max_layer_dims,
                     "A stage's feature map is average-pooled to at most this many values (the paper: about 10k).")
flags.DEFINE_enum("linear_loss", _PROBE.loss, linear_probe.LOSSES,
                  "logistic (multinomial logistic regression) or svm (one-vs-rest linear SVM, squared hinge).")
flags.DEFINE_integer("linear_epochs", _PROBE.epochs, "Epochs of each linear-probe fit.")
flags.DEFINE_integer("linear_batch_size", _PROBE.batch_size, "Batch of the linear-probe fits.")
flags.DEFINE_float("linear_learning_rate", _PROBE.learning_rate, "Adam learning rate of the linear probes.")
flags.DEFINE_list("linear_weight_decays", [str(w) for w in _PROBE.weight_decays],
                  "L2 penalties tried on a held-out part of the train split; the best one is refitted.")
flags.DEFINE_float("linear_val_fraction", _PROBE.val_fraction, "Held-out fraction of the train split.")
flags.DEFINE_list("label_fractions", [f"{f:g}" for f in _OPTIONS.label_fractions],
                  "semi_supervised: percentages of the train labels (class-stratified, seeded, nested).")
flags.DEFINE_integer("finetune_epochs", _FINETUNE.epochs, "semi_supervised: epochs over the labelled subset.")
flags.DEFINE_integer("finetune_batch_size", _FINETUNE.batch_size, "semi_supervised: batch size.")
flags.DEFINE_float("finetune_learning_rate", _FINETUNE.learning_rate,
                   "semi_supervised: SGD learning rate (x0.1 at 3/7 and 6/7 of the epochs).")
flags.DEFINE_float("finetune_momentum", _FINETUNE.momentum, "semi_supervised: SGD momentum.")
flags.DEFINE_float("finetune_weight_decay", _FINETUNE.weight_decay, "semi_supervised: weight decay.")
flags.DEFINE_integer("seed", 0, "Seed of the label subsets, held-out parts and fits.")
flags.DEFINE_string("transfer_dataset", "", "transfer: the dataset to evaluate on (as train.py's --dataset).")
flags.DEFINE_string("transfer_data_dir", "", "transfer: its --data_dir.")
flags.DEFINE_integer("max_train_examples", evaluation.AS_TRAINED,
                     "Labelled train images for kNN keys, probes and subsets: -1 as trained, 0 all, else the first N.")
flags.DEFINE_integer("max_eval_examples", evaluation.AS_TRAINED, "Eval images: -1 as trained, 0 all, else N.")
flags.DEFINE_integer("batch_size", _OPTIONS.batch_size, "Batch of the feature passes.")
flags.DEFINE_string("output_dir", "",
                    "Where JSON and plots go (default MODEL_DIR/eval; MODEL_DIR/eval_untrained with --untrained).")
flags.DEFINE_string("results_table", "", "Markdown table to append rows to (default OUTPUT_DIR/results.md).")
flags.DEFINE_string("run_name", "", "The table's run column (default: the model dir's name).")
flags.DEFINE_bool("plots", True, "Write the PNG plots.")
flags.DEFINE_integer("tsne_points", _OPTIONS.tsne_points, "Test embeddings in the t-SNE map (0: no map).")
flags.DEFINE_bool("untrained", False, "Evaluate the same architecture and seed untrained (the random baseline).")

FLAGS = flags.FLAGS


def _numbers(name: str, kind: type) -> tuple:
  try:
    return tuple(kind(v) for v in FLAGS[name].value)
  except ValueError as e:
    raise ValueError(f"--{name}: expected comma-separated numbers, got {','.join(FLAGS[name].value)}") from e


def options_from_flags() -> evaluation.EvalOptions:
  probe = linear_probe.ProbeConfig(
      loss=FLAGS.linear_loss, epochs=FLAGS.linear_epochs, batch_size=FLAGS.linear_batch_size,
      learning_rate=FLAGS.linear_learning_rate, weight_decays=_numbers("linear_weight_decays", float),
      val_fraction=FLAGS.linear_val_fraction, seed=FLAGS.seed)
  finetune = finetune_lib.FinetuneConfig(
      epochs=FLAGS.finetune_epochs, batch_size=FLAGS.finetune_batch_size, learning_rate=FLAGS.finetune_learning_rate,
      momentum=FLAGS.finetune_momentum, weight_decay=FLAGS.finetune_weight_decay, seed=FLAGS.seed)
  return evaluation.validate(evaluation.EvalOptions(
      protocols=tuple(FLAGS.protocol), knn_k=_numbers("knn_k", int), knn_temperature=FLAGS.knn_temperature,
      knn_features=tuple(FLAGS.knn_features), layers=tuple(FLAGS.layers), max_layer_dims=FLAGS.max_layer_dims,
      probe=probe, label_fractions=_numbers("label_fractions", float), finetune=finetune,
      transfer_dataset=FLAGS.transfer_dataset, transfer_data_dir=FLAGS.transfer_data_dir,
      max_train_examples=FLAGS.max_train_examples, max_eval_examples=FLAGS.max_eval_examples,
      batch_size=FLAGS.batch_size, output_dir=FLAGS.output_dir, results_table=FLAGS.results_table,
      run_name=FLAGS.run_name, plots=FLAGS.plots, tsne_points=FLAGS.tsne_points, untrained=FLAGS.untrained))


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    options = options_from_flags()
    results = evaluation.evaluate(FLAGS.model_dir, options)
  except ValueError as e:
    print(f"evaluate.py: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # A full disk, permissions, an --output_dir that is a file.
    print(f"evaluate.py: {e}", file=sys.stderr)
    return 2
  for protocol, result in results.items():
    print(f"{protocol}: {evaluation.summary(result)}")
  return 0


def run() -> None:
  """The `instdisc-evaluate` command."""
  cli.describe_command(__doc__, __name__, flags.FLAGS)
  app.run(main)


if __name__ == "__main__":
  run()
