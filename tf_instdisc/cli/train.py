"""Trains an instance-discrimination embedding (Wu et al. 2018): `instdisc-train`, or `python train.py` in a checkout.

  instdisc-train --recipe=fashion_mnist --model_dir=/tmp/npid
  python train.py --flagfile=fashion_mnist.flags --model_dir=/tmp/npid

Every flag below has the name of a field of tf_instdisc.config; config_from_flags() is where they meet. --recipe=NAME
reads a shipped recipe (tf_instdisc/recipes/NAME.flags) as --flagfile would, in place. Running again with the same
--model_dir resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from tf_instdisc import cli
from tf_instdisc import config as config_lib
from tf_instdisc import recipes

_RECIPE_HELP = ("A shipped recipe (" + ", ".join(recipes.NAMES) + ") or a flagfile, read in place as --flagfile: "
                "flags after it win. One rule for the run's length: of --epochs and --train_minutes, the one given "
                "later decides (an --epochs after a --train_minutes turns the time budget off).")
_HELP = {
    "dataset": "TFDS name (cifar10, imagenet2012, ...), fashion_mnist (local Debian files first) or folder.",
    "data_dir": "TFDS data dir (imagenet2012: its manual dir), the image root for --dataset=folder "
                "(ROOT/train, ROOT/val or ROOT/test), or a directory holding the Fashion-MNIST files.",
    "max_train_examples": "Use only the first N training images (0 = all).",
    "image_size": "Side of the square training crops (0 = the dataset's own fixed size).",
    "image_channels": "Channels to decode folder images to: 1 or 3.",
    "shuffle_buffer": "Shuffle buffer (0 = the whole dataset: an exact permutation every epoch).",
    "eval_split": "Split for kNN evaluation: auto (validation, else test), a split name, or '' for none.",
    "max_eval_examples": "Use only the first N eval images (0 = all).",
    "validation_examples": "Hold out N train images (a fixed seeded draw) as the eval split, out of training and of "
                           "the kNN keys: choose recipes, k and t on them, never on the test set (0 = off).",
    "crop_scale_min": "Random resized crop: smallest fraction of the image area.",
    "crop_scale_max": "Random resized crop: largest fraction of the image area.",
    "color_jitter": "Strength of brightness/contrast/saturation/hue jitter (0 = off).",
    "grayscale_prob": "Probability of converting an RGB crop to grayscale.",
    "horizontal_flip": "Random left-right flips.",
    "eval_crop_fraction": "Centre-crop fraction of evaluation views (0.875 for ImageNet).",
    "blur_prob": "Probability of a Gaussian blur of a training crop (sigma 0.1-2 px; not in NPID).",
    "erasing_prob": "Probability of erasing a random rectangle of 2-25% of a training crop (not in NPID).",
    "views": "1: one augmented view per image (the paper); 2: two views per image, each the other's positive "
             "besides its bank row, symmetric loss (Ye et al. 2019).",
    "arch": f"Backbone: {', '.join(config_lib.ARCHS)}; or keras.<Name>, an untrained keras.applications model "
            "without its top, average-pooled (images of at least 32x32, 75x75 for the Inception models, 71x71 "
            f"for Xception): {', '.join(config_lib.KERAS_ARCHS)}.",
    "embedding_dim": "Size D of the L2-normalised embedding.",
    "width_multiplier": "Scales the channels of every layer of our own archs (0.5: about a quarter of the work per "
                        "image); keras.<Name> archs take only 1.",
    "pool_grid": "The backbone's output: 1 = global average pool of the last stage (the paper); G > 1 = its mean "
                 "over each cell of a G x G grid, flattened (keeps where a pattern lies; not in the paper). Our "
                 "own archs only.",
    "head_batchnorm": "Batch-normalise the projection before the L2 norm (not in the paper; faster start).",
    "head_hidden_dim": "Width of a hidden layer Dense -> BN -> ReLU before the projection (SimCLR's MLP head, Chen "
                       "et al. 2020; not in the paper). 0 = the paper's linear projection.",
    "sync_batchnorm": "Batch-norm statistics over the global batch across replicas (results independent of the "
                      "replica count); off: per-replica statistics, as PyTorch DataParallel.",
    "mixed_precision": "off, auto (bfloat16 on CPU/TPU, float16 on GPU), bfloat16 or float16. "
                       "Logits and the bank stay float32.",
    "bank_init": "Initial memory bank: random (seeded unit rows, the official code) or features (the untrained "
                 "network's clean features: no random targets in the first epoch; one extra forward pass).",
    "bank_dtype": "Storage of the memory bank: float32, or bfloat16 / float16 (half the memory; reads and updates "
                  "compute in float32, the exact softmax multiplies in the bank's dtype).",
    "bank_momentum": "Memory-bank momentum m: v <- normalise(m v + (1 - m) f).",
    "proximal_lambda": "Weight of the proximal term lambda ||f_i - v_i||^2 (0 = off).",
    "objective": "nce (NCE with --num_negatives noise samples), softmax (exact non-parametric softmax over the "
                 "bank) or parametric (a trainable classifier per instance, the baseline).",
    "temperature": "Softmax temperature tau of the non-parametric objectives.",
    "num_negatives": "NCE noise samples per example (m in the paper).",
    "negative_sampling": "shared: one draw of K negatives per global batch (fast); per_example: K per example.",
    "exclude_positive": "Drop noise samples that equal the example's own instance.",
    "normalizer_momentum": "0: NCE normaliser Z fixed from the first global batch (paper); else moving-average rate.",
    "group_clusters": "A CLD-style group term (Wang et al. 2021) over this many k-means groups of the global batch: "
                      "each view against the other view's groups (--views=2), or against its own bank rows' groups "
                      "(--views=1). 0 = off, the paper.",
    "group_weight": "Weight of the group term.",
    "group_temperature": "Temperature of the group term's softmax over the centroids.",
    "neighbours": "Each instance's M most similar other bank rows as further positives (in the spirit of AND, Huang "
                  "et al. 2019); exact search over the whole bank, O(N^2 D). 0 = off, the paper.",
    "neighbour_weight": "Weight of the neighbour positives' mean term.",
    "neighbour_start": "Fraction of the epochs after which the neighbour positives start (the bank must mean "
                       "something first).",
    "neighbour_every_epochs": "Find the bank's nearest rows again every N epochs (each search costs one N x N pass "
                              "over the bank).",
    "learning_rate": "Base learning rate of SGD.",
    "lr_schedule": "step (x lr_decay_factor at --lr_decay_epochs) or cosine.",
    "lr_decay_epochs": "Epochs at which the step schedule decays.",
    "lr_decay_factor": "Factor of each step decay.",
    "warmup_epochs": "Epochs of linear learning-rate warmup.",
    "momentum": "SGD momentum.",
    "weight_decay": "Coupled L2 weight decay (added to the gradient, as the paper's PyTorch SGD).",
    "model_dir": "Directory for checkpoints, config.json, metrics.jsonl and TensorBoard summaries.",
    "batch_size": "Global batch size, across all replicas.",
    "epochs": "Training epochs.",
    "train_minutes": "If > 0: time the training step on this machine at the start and train as many epochs as fit "
                     "in this many minutes of training steps (the same flagfile right on a slow and a fast CPU; "
                     "config.json records the epochs, a resume keeps them); 0 = train --epochs.",
    "seed": "Seed of the bank, negatives, shuffling and augmentation: same flags, same run.",
    "steps_per_loop": "Steps per tf.function call and per progress line.",
    "checkpoint_every_epochs": "Save a checkpoint every N epochs (and at the end).",
    "keep_checkpoints": "Checkpoints to keep.",
    "cpu_devices": "Split the CPU into N logical devices (0: no split): --strategy=mirrored then runs N "
                   "replicas on a CPU host, e.g. to check multi-replica runs without GPUs.",
    "strategy": "auto (mirrored over several GPUs, else one device), default, one_device, mirrored (all GPUs, "
                "or all logical CPUs), multi_worker (MultiWorkerMirroredStrategy from $TF_CONFIG) or tpu (TPUStrategy "
                "on --tpu; not run on our TPU-less machines).",
    "tpu": "--strategy=tpu: local (on a TPU VM), a Cloud TPU name or a grpc://host:port address.",
    "knn_k": "Neighbours of the weighted kNN.",
    "knn_temperature": "Temperature of the kNN vote weights exp(s / t).",
    "eval_every_epochs": "kNN against the memory bank at most every N epochs (0 = never): always after the first "
                         "such epoch (to measure its cost) and the last one, otherwise only while its time stays "
                         "within 5% of the run's wall time so far; epochs without it record no kNN.",
    "final_eval": "After training, kNN against clean recomputed train features.",
    "eval_batch_size": "Batch size of evaluation passes.",
    "monitor_examples": "The per-epoch kNN monitor scores the first N eval images (0 = all); the final "
                        "evaluation always uses the whole eval split.",
}


def _define_flags() -> None:
  """One flag per config field, typed by the field's default."""
  for section_type in config_lib.SECTIONS.values():
    for field in dataclasses.fields(section_type):
      name, default, help_text = field.name, field.default, _HELP[field.name]
      if isinstance(default, bool):
        flags.DEFINE_bool(name, default, help_text)
      elif isinstance(default, int):
        flags.DEFINE_integer(name, default, help_text)
      elif isinstance(default, float):
        flags.DEFINE_float(name, default, help_text)
      elif isinstance(default, tuple):
        flags.DEFINE_list(name, [str(v) for v in default], help_text)
      else:
        flags.DEFINE_string(name, default, help_text)


_define_flags()
# Expanded by run() before absl parses (cli.expand_recipe); defined so --help lists it and a stray one is named.
flags.DEFINE_string("recipe", "", _RECIPE_HELP)
FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.Config:
  """The only place where flag names meet config field names (they are the same names)."""
  sections = {}
  for section_name, section_type in config_lib.SECTIONS.items():
    values = {}
    for field in dataclasses.fields(section_type):
      value = FLAGS[field.name].value
      if isinstance(field.default, tuple):
        try:
          value = tuple(int(v) for v in value)
        except ValueError as e:
          raise ValueError(f"--{field.name}: expected comma-separated integers, got {value}") from e
      values[field.name] = value
    sections[section_name] = section_type(**values)
  return config_lib.validate(config_lib.Config(**sections))


def length_of_run(argv: list[str]) -> str:
  """Applies the one rule for --epochs against --train_minutes (tf_instdisc.recipes.length_rule) to the parsed
  flags, from their order on the command line with flagfiles expanded; returns the sentence saying which decided
  ("" when at most one was given)."""
  expanded = FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  assignments = []
  for position, arg in enumerate(expanded):
    name, sep, value = arg.lstrip("-").partition("=")
    if arg.startswith("--") and name in ("epochs", "train_minutes"):
      value = value if sep else (expanded[position + 1] if position + 1 < len(expanded) else "")
      assignments.append((name, FLAGS[name].parser.parse(value)))
  overrides, decided = recipes.length_rule(assignments)
  for name, value in overrides.items():
    FLAGS[name].value = value
  return decided


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.recipe:
    print("train.py: --recipe is read by the command (instdisc-train or python train.py), before absl parses the "
          "flags; a program calling main() passes --flagfile=tf_instdisc.recipes.path(NAME) instead", file=sys.stderr)
    return 2
  try:
    decided = length_of_run(sys.argv)
    cfg = config_from_flags()
  except ValueError as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 2
  # TensorFlow is imported after flag parsing, so --help and flag errors answer at once.
  def split_cpu() -> None:  # Before the devices start.
    if cfg.train.cpu_devices:
      from tf_instdisc import distribute

      distribute.split_cpu(cfg.train.cpu_devices)

  cli.quiet_tensorflow(split_cpu)
  from tf_instdisc import distribute
  from tf_instdisc import train_lib

  if decided:
    absl_logging.info("%s", decided)

  # Nothing is written before the run accepts this start: train_lib writes flags.txt (these flags, whole) with
  # config.json and run.json once the data, the resume check and the restore have passed.
  try:
    train_lib.run(cfg, distribute.make_strategy(cfg.train.strategy, tpu=cfg.train.tpu),
                  flags_text=FLAGS.flags_into_string())
  except (ValueError, FloatingPointError, OSError) as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 1
  except train_lib.TrainingStopped as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 128 + 15  # The shell's code for a SIGTERM ending.
  except train_lib.WorkerLost as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 75  # EX_TEMPFAIL: try again (restart all workers).
  return 0


def run() -> None:
  """The `instdisc-train` command: --recipe=NAME expanded, then absl's app.run(main)."""
  cli.describe_command(__doc__, __name__, flags.FLAGS)
  try:
    sys.argv = [sys.argv[0], *cli.expand_recipe(sys.argv[1:])]
  except ValueError as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
