"""Run configuration: frozen dataclass sections and their validation.

Every field name is also the name of one `train.py` flag (docs/design.md): `config_from_flags()` in
tf_instdisc/cli/train.py builds a config from the parsed flags, and tf_instdisc.recipes from a flagfile's text for
the library (tests/recipes_test.py: the same config for every shipped recipe). Durations are in epochs here;
`train_lib.run` converts them to steps once, because only it knows the dataset size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHS = ("resnet18", "resnet50", "resnet18_cifar", "convnet_small")
# --arch=keras.<Name>: an untrained keras.applications model (backbones.build_keras_application). Kept here, not
# asked of Keras, so that flags are validated before TensorFlow loads; tests/backbones_test.py checks this list
# against the installed Keras (backbones.keras_application_names).
KERAS_ARCHS = tuple(f"keras.{name}" for name in (
    "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtSmall", "ConvNeXtTiny", "ConvNeXtXLarge", "DenseNet121", "DenseNet169",
    "DenseNet201", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetB4",
    "EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
    "EfficientNetV2B3", "EfficientNetV2L", "EfficientNetV2M", "EfficientNetV2S", "InceptionResNetV2", "InceptionV3",
    "MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small", "NASNetLarge", "NASNetMobile", "ResNet101",
    "ResNet101V2", "ResNet152", "ResNet152V2", "ResNet50", "ResNet50V2", "VGG16", "VGG19", "Xception"))
OBJECTIVES = ("nce", "softmax", "parametric")
NEGATIVE_SAMPLING = ("shared", "per_example")
LR_SCHEDULES = ("step", "cosine")
MIXED_PRECISION = ("off", "auto", "bfloat16", "float16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
BANK_INITS = ("random", "features")
BANK_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the images come from."""

  dataset: str = "fashion_mnist"  # A TFDS name, "fashion_mnist" (local files first) or "folder".
  data_dir: str = ""  # TFDS data dir, the folder root for "folder", or the Fashion-MNIST files' dir.
  max_train_examples: int = 0  # 0 = the whole train split; else its first N examples.
  image_size: int = 0  # 0 = the dataset's own size (must be fixed); else square crops of this side.
  image_channels: int = 3  # Used by "folder" only: 1 (grayscale) or 3.
  shuffle_buffer: int = 0  # 0 = the whole dataset (exact per-epoch permutation).
  eval_split: str = "auto"  # "auto" picks validation, else test; "" disables kNN evaluation.
  max_eval_examples: int = 0  # 0 = the whole eval split.
  # Hold out this many train images (a fixed seeded draw, the same for every run) as the eval split: they leave
  # the training set and the kNN keys, so recipes, k and t are chosen on them and never on the test set.
  validation_examples: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
  """Training augmentation, as the paper's official code (lemniscate.pytorch)."""

  crop_scale_min: float = 0.2
  crop_scale_max: float = 1.0
  color_jitter: float = 0.4  # Strength of brightness, contrast, saturation and hue jitter.
  grayscale_prob: float = 0.2
  horizontal_flip: bool = True
  eval_crop_fraction: float = 1.0  # Centre crop for evaluation views; 0.875 is the usual ImageNet choice.
  blur_prob: float = 0.0  # Probability of a Gaussian blur (sigma 0.1-2 px, 3x3 window) of a crop. Not in NPID.
  erasing_prob: float = 0.0  # Probability of erasing a random rectangle (2-25% of the area). Not in NPID.
  # 1: one augmented view per image per step (the paper). 2: two views, each the other's positive besides its bank
  # row, with a symmetric loss (Ye et al., CVPR 2019); each step then costs two forward-backward passes per image.
  views: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  arch: str = "resnet18"
  embedding_dim: int = 128
  # Batch-normalise the 128-d projection before the L2 norm. Not in the paper: an untrained network maps every
  # image near one common direction, and centring it spreads the embeddings from the first step on.
  head_batchnorm: bool = False
  # Width H of a hidden layer in the projection head: Dense(H) -> BN -> ReLU before the projection to D (the MLP head
  # of SimCLR, Chen et al. 2020, and MoCo v2). Not in the paper; 0 = its linear projection.
  head_hidden_dim: int = 0
  # Batch-norm statistics over the global batch (all replicas) rather than each replica's share: results then do
  # not depend on the number of replicas. One all-reduce per BN layer per step. Keras' synchronised layer uses
  # E[x^2] - E[x]^2, so it is used on one replica too: the same formula everywhere keeps N-vs-1 runs within 1e-5.
  sync_batchnorm: bool = True
  mixed_precision: str = "off"
  # Scales the channels of every layer of our own archs (not keras.<Name>): 0.5 is about a quarter of the work.
  width_multiplier: float = 1.0
  # The backbone's output: 1 averages the last stage over all of it (the paper's global average pool); G > 1 over
  # each cell of a G x G grid, flattened (G^2 times the features), so where on the image a pattern lies is kept:
  # for small centred images (Fashion-MNIST) that is much of what tells classes apart. Our own archs only.
  pool_grid: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class BankConfig:
  # random: seeded random unit rows (the official code). features: the untrained network's clean features, so the
  # first epoch pulls each image towards its own view instead of a random target (one extra forward pass).
  bank_init: str = "random"
  bank_momentum: float = 0.5  # v <- normalise(m v + (1 - m) f); 0 writes the new feature as is.
  proximal_lambda: float = 0.0  # Weight of the paper's proximal term lambda ||f_i - v_i||^2 (Sec. 3.3).
  # Storage of the bank: float32, or bfloat16 / float16 at half the memory for collections whose float32 bank
  # does not fit on a device. Reads and updates compute in float32; only the stored rows are rounded.
  bank_dtype: str = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  objective: str = "nce"
  temperature: float = 0.07
  num_negatives: int = 4096
  negative_sampling: str = "shared"  # "shared": one draw of K per global batch; "per_example": K per example.
  exclude_positive: bool = False  # Drop negatives that equal the example's own instance.
  normalizer_momentum: float = 0.0  # 0: Z fixed from the first global batch; else its moving-average rate.
  # A group-level term in the spirit of CLD (Wang et al., CVPR 2021): spherical k-means of one view's features over
  # the global batch into group_clusters groups; the other view's features are classified against those centroids
  # at group_temperature; weight group_weight. With one view, the other view is the batch's bank rows (the view the
  # bank kept). 0 clusters: off (the paper).
  group_clusters: int = 0
  group_weight: float = 0.25
  group_temperature: float = 0.2
  # The bank's nearest rows as further positives, in the spirit of AND (Huang et al., ICML 2019): each instance's
  # `neighbours` most similar other bank rows, found over the whole bank (exact, O(N^2 D)) at the start of every
  # neighbour_every_epochs-th epoch from the fraction neighbour_start of the epochs on, add neighbour_weight times
  # the mean of their positive terms. 0 neighbours: off (the paper).
  neighbours: int = 0
  neighbour_weight: float = 0.5
  neighbour_start: float = 0.5
  neighbour_every_epochs: int = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  learning_rate: float = 0.03
  lr_schedule: str = "step"
  lr_decay_epochs: tuple[int, ...] = (120, 160)
  lr_decay_factor: float = 0.1
  warmup_epochs: int = 0
  momentum: float = 0.9
  weight_decay: float = 1e-4  # Coupled (added to the gradient), as PyTorch SGD in the paper.


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  model_dir: str = ""
  batch_size: int = 256  # Global batch, across all replicas.
  epochs: int = 200
  # > 0: a fresh start measures its training step on this machine and sets `epochs` so that the training steps take
  # about this many minutes (config.json records the epochs chosen; a resume keeps them). 0: `epochs` as given.
  train_minutes: float = 0.0
  seed: int = 0
  steps_per_loop: int = 50
  checkpoint_every_epochs: int = 1
  keep_checkpoints: int = 3
  strategy: str = "auto"
  cpu_devices: int = 0  # Split the CPU into this many logical devices (0: no split), e.g. for --strategy=mirrored.
  tpu: str = "local"  # --strategy=tpu: "local" (a TPU VM), a Cloud TPU name or a grpc:// address.


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  knn_k: int = 200
  knn_temperature: float = 0.07
  eval_every_epochs: int = 1  # kNN against the bank; 0 disables the monitor.
  # The monitor scores this many eval images (the first ones, a fixed subset; 0 = all). The final evaluation is
  # always exact over the whole eval split.
  monitor_examples: int = 0
  final_eval: bool = True  # kNN against recomputed clean train features after the last epoch.
  eval_batch_size: int = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  model: ModelConfig = ModelConfig()
  bank: BankConfig = BankConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()


SECTIONS = {f.name: type(f.default) for f in dataclasses.fields(Config)}


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ValueError(f"--{field}: {message}")


def check_width_multiplier(arch: str, width_multiplier: float) -> None:
  """Raises ValueError naming --width_multiplier unless it is > 0, and 1 for a keras.<Name> arch."""
  _check(width_multiplier > 0, "width_multiplier", f"must be > 0, got {width_multiplier}")
  _check(width_multiplier == 1.0 or arch in ARCHS, "width_multiplier",
         f"scales our own archs ({', '.join(ARCHS)}); --arch={arch} builds keras.applications' own widths, so it "
         f"takes only 1, got {width_multiplier}")


def check_pool_grid(arch: str, pool_grid: int) -> None:
  """Raises ValueError naming --pool_grid unless it is >= 1, and 1 for a keras.<Name> arch."""
  _check(pool_grid >= 1, "pool_grid", f"must be >= 1 (1: global average pool), got {pool_grid}")
  _check(pool_grid == 1 or arch in ARCHS, "pool_grid",
         f"sets the pooling of our own archs ({', '.join(ARCHS)}); --arch={arch} pools as keras.applications "
         f"does, so it takes only 1, got {pool_grid}")


def _check_choice(value: str, field: str, choices: tuple[str, ...]) -> None:
  _check(value in choices, field, f"got {value!r}, expected one of {', '.join(choices)}")


def validate(cfg: Config, *, run: bool = True) -> Config:
  """Checks every field that can be checked without data; returns cfg. run=False skips what only a train.py run
  needs (a --model_dir): a recipe for Keras `fit` has none.

  Raises:
    ValueError: naming the offending flag (= field) and why.
  """
  d, a, m, b, loss, o, t, e = (cfg.data, cfg.augment, cfg.model, cfg.bank, cfg.loss, cfg.optim, cfg.train, cfg.eval)
  _check(bool(d.dataset), "dataset", "must be set")
  _check(d.dataset != "folder" or bool(d.data_dir), "data_dir", "--dataset=folder needs --data_dir=ROOT")
  _check(d.max_train_examples >= 0, "max_train_examples", "must be >= 0")
  _check(d.max_eval_examples >= 0, "max_eval_examples", "must be >= 0")
  _check(d.image_size >= 0, "image_size", "must be >= 0 (0 = native size)")
  _check(d.image_channels in (1, 3), "image_channels", "must be 1 or 3")
  _check(d.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
  _check(d.validation_examples >= 0, "validation_examples", "must be >= 0 (0 = no validation slice)")
  _check(0.0 < a.crop_scale_min <= a.crop_scale_max <= 1.0, "crop_scale_min",
         f"need 0 < crop_scale_min ({a.crop_scale_min}) <= crop_scale_max ({a.crop_scale_max}) <= 1")
  _check(0.0 <= a.color_jitter <= 1.0, "color_jitter", "must be in [0, 1]")
  _check(0.0 <= a.grayscale_prob <= 1.0, "grayscale_prob", "must be in [0, 1]")
  _check(0.0 < a.eval_crop_fraction <= 1.0, "eval_crop_fraction", "must be in (0, 1]")
  _check(0.0 <= a.blur_prob <= 1.0, "blur_prob", "must be in [0, 1]")
  _check(0.0 <= a.erasing_prob <= 1.0, "erasing_prob", "must be in [0, 1]")
  _check(a.views in (1, 2), "views", f"must be 1 or 2, got {a.views}")
  _check_choice(m.arch, "arch", ARCHS + KERAS_ARCHS)
  _check(m.embedding_dim > 0, "embedding_dim", "must be > 0")
  _check(m.head_hidden_dim >= 0, "head_hidden_dim", "must be >= 0 (0: the paper's linear projection)")
  check_width_multiplier(m.arch, m.width_multiplier)
  check_pool_grid(m.arch, m.pool_grid)
  _check_choice(m.mixed_precision, "mixed_precision", MIXED_PRECISION)
  _check_choice(b.bank_init, "bank_init", BANK_INITS)
  _check_choice(b.bank_dtype, "bank_dtype", BANK_DTYPES)
  _check(0.0 <= b.bank_momentum < 1.0, "bank_momentum", "must be in [0, 1)")
  _check(b.proximal_lambda >= 0.0, "proximal_lambda", "must be >= 0")
  _check_choice(loss.objective, "objective", OBJECTIVES)
  _check(loss.temperature > 0.0, "temperature", f"must be > 0, got {loss.temperature}")
  _check(loss.num_negatives > 0, "num_negatives", "must be > 0")
  _check_choice(loss.negative_sampling, "negative_sampling", NEGATIVE_SAMPLING)
  _check(0.0 <= loss.normalizer_momentum < 1.0, "normalizer_momentum", "must be in [0, 1)")
  _check(loss.group_clusters >= 0, "group_clusters", "must be >= 0 (0 = no group term)")
  _check(loss.group_clusters == 0 or loss.objective != "parametric", "group_clusters",
         "the group term is for the non-parametric objectives (nce, softmax)")
  _check(loss.group_weight >= 0.0, "group_weight", "must be >= 0")
  _check(loss.group_temperature > 0.0, "group_temperature", "must be > 0")
  _check(loss.neighbours >= 0, "neighbours", "must be >= 0 (0 = no neighbour positives)")
  _check(loss.neighbours == 0 or loss.objective != "parametric", "neighbours",
         "neighbour positives are bank rows: for the non-parametric objectives (nce, softmax)")
  _check(loss.neighbour_weight >= 0.0, "neighbour_weight", "must be >= 0")
  _check(0.0 <= loss.neighbour_start < 1.0, "neighbour_start", "must be in [0, 1) (a fraction of the epochs)")
  _check(loss.neighbour_every_epochs >= 1, "neighbour_every_epochs", "must be >= 1")
  _check(o.learning_rate > 0.0, "learning_rate", "must be > 0")
  _check_choice(o.lr_schedule, "lr_schedule", LR_SCHEDULES)
  _check(list(o.lr_decay_epochs) == sorted(o.lr_decay_epochs) and all(x > 0 for x in o.lr_decay_epochs),
         "lr_decay_epochs", "must be increasing positive epochs")
  _check(0.0 < o.lr_decay_factor <= 1.0, "lr_decay_factor", "must be in (0, 1]")
  _check(t.epochs > 0, "epochs", "must be > 0")
  _check(t.train_minutes >= 0.0, "train_minutes", "must be >= 0 (0 = train --epochs)")
  _check(not t.train_minutes or o.lr_schedule == "cosine", "train_minutes",
         "sets the epochs at the start, so it needs --lr_schedule=cosine (the step schedule decays at fixed epochs)")
  _check(0 <= o.warmup_epochs < t.epochs, "warmup_epochs", "must be in [0, epochs)")
  _check(0.0 <= o.momentum < 1.0, "momentum", "must be in [0, 1)")
  _check(o.weight_decay >= 0.0, "weight_decay", "must be >= 0")
  _check(bool(t.model_dir) or not run, "model_dir", "must be set (checkpoints, config.json and metrics go there)")
  _check(t.batch_size > 0, "batch_size", "must be > 0")
  _check(t.steps_per_loop > 0, "steps_per_loop", "must be > 0")
  _check(t.checkpoint_every_epochs > 0, "checkpoint_every_epochs", "must be > 0")
  _check(t.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
  _check(t.cpu_devices >= 0, "cpu_devices", "must be >= 0")
  _check(t.cpu_devices == 0 or t.strategy in ("mirrored", "one_device", "default"), "cpu_devices",
         f"splits one host's CPU for a single-process strategy, not --strategy={t.strategy}")
  _check_choice(t.strategy, "strategy", STRATEGIES)
  _check(bool(t.tpu), "tpu", "must name a TPU (local on a TPU VM)")
  _check(e.knn_k > 0, "knn_k", "must be > 0")
  _check(e.knn_temperature > 0.0, "knn_temperature", "must be > 0")
  _check(e.eval_every_epochs >= 0, "eval_every_epochs", "must be >= 0")
  _check(e.eval_batch_size > 0, "eval_batch_size", "must be > 0")
  _check(e.monitor_examples >= 0, "monitor_examples", "must be >= 0 (0 = the whole eval split)")
  return cfg


def validate_against_data(cfg: Config, *, num_instances: int) -> None:
  """Checks the fields that depend on the dataset size.

  Raises:
    ValueError: naming the offending flag.
  """
  _check(num_instances >= 2, "dataset", f"needs at least 2 training images, found {num_instances}")
  if cfg.loss.objective == "nce":
    _check(cfg.loss.num_negatives < num_instances, "num_negatives",
           f"{cfg.loss.num_negatives} must be smaller than the number of instances ({num_instances}), e.g. "
           f"{power_of_two_below(num_instances)} (fit_to_data caps it so: train.py does)")
  _check(cfg.loss.group_clusters <= cfg.train.batch_size, "group_clusters",
         f"{cfg.loss.group_clusters} groups need a global batch of at least as many images (--batch_size="
         f"{cfg.train.batch_size})")
  _check(cfg.loss.neighbours < num_instances, "neighbours",
         f"{cfg.loss.neighbours} neighbours need more instances than that ({num_instances})")
  _check(cfg.train.batch_size <= num_instances, "batch_size",
         f"{cfg.train.batch_size} is larger than the number of instances ({num_instances})")


def power_of_two_below(number: int) -> int:
  """The largest power of two smaller than number (>= 2)."""
  return 1 << ((number - 1).bit_length() - 1)


def fit_to_data(cfg: Config, *, num_instances: int) -> tuple[Config, list[str]]:
  """cfg fitted to a training set of num_instances images, and a note (a sentence naming the flag) per change.

  --num_negatives of the objective nce must be smaller than the number of instances (the noise is drawn from the
  bank's rows); a recipe's 4096, sized for ImageNet and CIFAR, is capped to the largest power of two below the
  number of instances, so a small folder trains with the recipe as it is. Nothing else changes; a dataset of fewer
  than 2 images is left to validate_against_data to refuse. Pure: the caller logs the notes (train_lib does, and
  config.json records the capped value).
  """
  notes = []
  loss = cfg.loss
  if loss.objective == "nce" and num_instances >= 2 and loss.num_negatives >= num_instances:
    capped = power_of_two_below(num_instances)
    notes.append(f"--num_negatives: {loss.num_negatives} capped to {capped}, below the {num_instances} training "
                 "instances (NCE draws its negatives from them)")
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(loss, num_negatives=capped))
  return cfg, notes


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
  """The config as JSON-ready nested dicts (tuples become lists)."""
  return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  return value


def from_dict(values: dict[str, dict[str, Any]]) -> Config:
  """Inverse of `to_dict`; unknown keys raise TypeError."""
  sections = {}
  for name, section_type in SECTIONS.items():
    fields = dict(values.get(name, {}))
    for f in dataclasses.fields(section_type):
      if f.name in fields and isinstance(fields[f.name], list):
        fields[f.name] = tuple(fields[f.name])
    sections[name] = section_type(**fields)
  return Config(**sections)


def field_names() -> dict[str, str]:
  """Maps every field name to its section name; names are unique across sections."""
  names = {}
  for section, section_type in SECTIONS.items():
    for f in dataclasses.fields(section_type):
      assert f.name not in names, f"field {f.name} appears in {names.get(f.name)} and {section}"
      names[f.name] = section
  return names
