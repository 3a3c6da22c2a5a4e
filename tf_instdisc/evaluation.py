"""The paper's evaluation protocols on a trained run: kNN, linear probes per layer, semi-supervised fine-tuning and
transfer to another dataset. `evaluate()` runs the chosen ones and writes, under its output dir, one JSON file per
protocol, rows of the Markdown results table, and PNG plots (training curves, a t-SNE map, per-layer and
label-fraction curves). evaluate.py is its command line; ablate.py calls it for every ablation variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import features as features_lib
from tf_instdisc import finetune as finetune_lib
from tf_instdisc import knn
from tf_instdisc import linear_probe
from tf_instdisc import plots
from tf_instdisc import results as results_lib
from tf_instdisc import tsne as tsne_lib

PROTOCOLS = ("knn", "linear", "semi_supervised", "transfer")
AS_TRAINED = -1  # max_train_examples / max_eval_examples: the run's own setting.
# The knn protocol's rows: the embedding (the protocol's result), the pooled backbone features the projection head
# reads, and the raw pixels of the eval view (cosine on the input: what the network added over its input).
KNN_FEATURES = (features_lib.EMBEDDING, features_lib.BACKBONE, features_lib.PIXELS)
# The pixels row keeps every train and eval image's eval view in memory as float32, and the kNN a unit-norm copy:
# it is skipped when (train + eval images) x pixel values exceeds this (2 GB of float32). CIFAR-10 (60,000 x 3,072
# = 1.8e8) and all of Fashion-MNIST (70,000 x 784) fit; ImageNet (1.33M x 150,528 = 2e11), or 1% of it, does not.
MAX_PIXEL_VALUES = 500_000_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
  """What to evaluate and how; every field is an evaluate.py flag of the same name."""

  protocols: tuple[str, ...] = ("knn",)
  knn_k: tuple[int, ...] = (200,)
  knn_temperature: float = 0.07
  knn_features: tuple[str, ...] = KNN_FEATURES  # kNN rows, from KNN_FEATURES; "embedding" is always one.
  layers: tuple[str, ...] = ()  # Linear probe layers; () = every stage and the embedding.
  max_layer_dims: int = features_lib.DEFAULT_MAX_DIMS
  probe: linear_probe.ProbeConfig = linear_probe.ProbeConfig()
  label_fractions: tuple[float, ...] = (1.0, 2.0, 4.0, 10.0, 20.0)  # Percent of the labels.
  finetune: finetune_lib.FinetuneConfig = finetune_lib.FinetuneConfig()
  transfer_dataset: str = ""
  transfer_data_dir: str = ""
  max_train_examples: int = AS_TRAINED  # Labelled train images for keys / probes / subsets (0 = all).
  max_eval_examples: int = AS_TRAINED
  batch_size: int = 256
  output_dir: str = ""  # Default: MODEL_DIR/eval (MODEL_DIR/eval_untrained with untrained).
  results_table: str = ""  # A Markdown file to append rows to ("" = OUTPUT_DIR/results.md).
  run_name: str = ""  # The table's "run" column (default: the model dir's name).
  plots: bool = True
  tsne_points: int = 2000
  untrained: bool = False  # Evaluate the seeded, untrained network of the same config (a baseline).
  study: str = ""  # Set by ablate.py: the ablation study and setting of this run, for the paper's column.
  setting: str = ""


def validate(options: EvalOptions) -> EvalOptions:
  """Raises ValueError naming the flag of a bad option; returns options."""
  def check(ok: bool, flag: str, message: str) -> None:
    if not ok:
      raise ValueError(f"--{flag}: {message}")
  check(bool(options.protocols) and all(p in PROTOCOLS for p in options.protocols), "protocol",
        f"got {','.join(options.protocols)}, expected some of {', '.join(PROTOCOLS)}")
  check(bool(options.knn_k) and all(k > 0 for k in options.knn_k), "knn_k", "must be positive integers")
  check(options.knn_temperature > 0, "knn_temperature", "must be > 0")
  check(features_lib.EMBEDDING in options.knn_features and set(options.knn_features) <= set(KNN_FEATURES),
        "knn_features", f"got {','.join(options.knn_features)}, expected embedding and any of backbone, pixels")
  check(options.max_layer_dims > 0, "max_layer_dims", "must be > 0")
  check(all(0 < f <= 100 for f in options.label_fractions) and bool(options.label_fractions), "label_fractions",
        "must be percentages in (0, 100]")
  check("transfer" not in options.protocols or bool(options.transfer_dataset), "transfer_dataset",
        "--protocol=transfer needs the dataset to transfer to")
  check(options.max_train_examples >= AS_TRAINED, "max_train_examples", "must be >= -1 (-1: as trained, 0: all)")
  check(options.max_eval_examples >= AS_TRAINED, "max_eval_examples", "must be >= -1 (-1: as trained, 0: all)")
  check(options.batch_size > 0, "batch_size", "must be > 0")
  check(options.tsne_points >= 0, "tsne_points", "must be >= 0")
  linear_probe.validate(options.probe)
  finetune_lib.validate(options.finetune)
  return options


def _data_config(cfg: config_lib.Config, options: EvalOptions, *, transfer: bool = False) -> config_lib.DataConfig:
  data = cfg.data
  if transfer:
    data = config_lib.DataConfig(dataset=options.transfer_dataset, data_dir=options.transfer_data_dir,
                                 image_channels=cfg.data.image_channels)
  if options.max_train_examples != AS_TRAINED:
    data = dataclasses.replace(data, max_train_examples=options.max_train_examples)
  if options.max_eval_examples != AS_TRAINED:
    data = dataclasses.replace(data, max_eval_examples=options.max_eval_examples)
  if not transfer and data.eval_split == "":
    data = dataclasses.replace(data, eval_split="auto")
  return data


def _labelled(source: data_lib.DataSource, flag: str) -> None:
  if source.eval is None or source.num_classes == 0:
    raise ValueError(f"--{flag}: {source.name} needs labelled train and eval splits for this protocol")


def _features(run: features_lib.TrainedRun, source: data_lib.DataSource, layers: list[str], options: EvalOptions,
              cfg: config_lib.Config, *, transfer: bool = False, pixels: bool = False
              ) -> tuple[dict, np.ndarray, dict, np.ndarray]:
  """Features of the train (keys, probe training) and eval splits, with their eval views' pixels when `pixels`. A
  transfer target is viewed at its own size when fixed and square, then resized to the model's input
  (features.adapt_images)."""
  extractor = features_lib.build_extractor(run.model, layers, max_dims=options.max_layer_dims)
  height, width, _ = source.image_shape
  view = height if transfer and height is not None and height == width else run.input_shape[0]
  common = dict(image_size=view, batch_size=options.batch_size, pixels=pixels)
  flag = "--transfer_data_dir" if transfer else "--data_dir"
  out = []
  for split in (source.train, source.eval):
    try:
      out.extend(features_lib.extract(extractor, split, cfg.augment, **common))
    except data_lib.DECODE_ERRORS as e:  # A folder's file the pipeline cannot decode: name it.
      data_lib.name_undecodable(split, e, flag=flag)
  train, train_labels, test, test_labels = out
  return train, train_labels, test, test_labels


def _load_target(cfg: config_lib.Config, options: EvalOptions) -> data_lib.DataSource:
  """The transfer target; errors about its data name --transfer_data_dir, the flag that gave it."""
  try:
    return data_lib.load_source(_data_config(cfg, options, transfer=True))
  except ValueError as e:
    prefix = "--data_dir:"
    if str(e).startswith(prefix):
      raise ValueError(f"--transfer_data_dir:{str(e)[len(prefix):]}") from e
    raise


def knn_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, *,
               ks: tuple[int, ...], temperature: float, num_classes: int) -> dict[str, dict[str, float]]:
  """{"k=K": {"top1", "top5"}} of the weighted kNN for every k, keys = train features (clean views)."""
  keys = tf.constant(train)
  out = {}
  for k in ks:
    scores = knn.knn_accuracy(test, test_labels, keys, train_labels, k=min(k, len(train)), temperature=temperature,
                              num_classes=num_classes)
    out[f"k={k}"] = {"top1": scores["knn_top1"], "top5": scores["knn_top5"]}
  return out


def pixels_fit(num_images: int, pixel_dims: int) -> bool:
  """Whether the pixels kNN row is computed: num_images (train + eval) x pixel_dims <= MAX_PIXEL_VALUES."""
  return num_images * pixel_dims <= MAX_PIXEL_VALUES


def _knn_kinds(options: EvalOptions, source: data_lib.DataSource, input_shape: tuple[int, int, int]
               ) -> tuple[list[str], dict[str, str]]:
  """The kNN rows to compute (options.knn_features, in KNN_FEATURES order) and {row: why it was skipped}."""
  kinds = [kind for kind in KNN_FEATURES if kind in options.knn_features]
  skipped = {}
  num_images, pixel_dims = source.train.num_examples + source.eval.num_examples, int(np.prod(input_shape))
  if features_lib.PIXELS in kinds and not pixels_fit(num_images, pixel_dims):
    skipped[features_lib.PIXELS] = (f"{num_images:,} images x {pixel_dims:,} pixel values = "
                                    f"{num_images * pixel_dims:,} > {MAX_PIXEL_VALUES:,} (evaluation.MAX_PIXEL_VALUES)")
    logging.warning("kNN on pixels skipped: %s", skipped[features_lib.PIXELS])
    kinds.remove(features_lib.PIXELS)
  return kinds, skipped


def _unit_rows(values: np.ndarray) -> np.ndarray:
  """A float32 copy of values [M, F] with unit-L2-norm rows (an all-zero row stays zero)."""
  norms = np.linalg.norm(values, axis=1, keepdims=True)
  return (values / np.maximum(norms, 1e-12)).astype(np.float32)


def _knn_protocol(extracted: tuple[dict, np.ndarray, dict, np.ndarray], kinds: list[str], *,
                  options: EvalOptions, num_classes: int) -> tuple[dict[str, dict], dict[str, int]]:
  """kNN scores {kind: {"k=K": {"top1", "top5"}}} and dims {kind: F} of every row kind, against the same keys.

  The embedding is unit norm already; the backbone and pixel features are L2-normalised here (cosine similarity).
  """
  train, train_labels, test, test_labels = extracted
  by_kind, dims = {}, {}
  for kind in kinds:
    keys, queries = train[kind], test[kind]
    if kind != features_lib.EMBEDDING:
      keys, queries = _unit_rows(keys), _unit_rows(queries)
    by_kind[kind] = knn_scores(keys, train_labels, queries, test_labels, ks=options.knn_k,
                               temperature=options.knn_temperature, num_classes=num_classes)
    dims[kind] = int(keys.shape[1])
  return by_kind, dims


def _linear_scores(train: dict, train_labels, test: dict, test_labels, *, layers: list[str], options: EvalOptions,
                   num_classes: int) -> dict[str, dict[str, Any]]:
  out = {}
  for layer in layers:
    out[layer] = linear_probe.evaluate(train[layer], train_labels, test[layer], test_labels, num_classes=num_classes,
                                       cfg=options.probe)
    logging.info("linear probe %s (%d dims): top-1 %.2f%% top-5 %.2f%%", layer, out[layer]["dims"],
                 100 * out[layer]["top1"], 100 * out[layer]["top5"])
  return out


def semi_supervised(model_dir: str, source: data_lib.DataSource, cfg: config_lib.Config, options: EvalOptions
                    ) -> dict[str, dict[str, Any]]:
  """{"P%": {"pretrained": {...}, "scratch": {...}, "indices_sha": ...}} for every label fraction P."""
  _labelled(source, "dataset")
  labels = data_lib.load_labels(source.train)
  out = {}
  for percent in options.label_fractions:
    indices = finetune_lib.label_subset(labels, percent / 100, seed=options.finetune.seed)
    row = {"labelled_examples": int(len(indices)), "subset_digest": _digest(indices)}
    for arm, untrained in (("pretrained", False), ("scratch", True)):
      model = features_lib.load_run(model_dir, untrained=untrained).model
      try:
        row[arm] = finetune_lib.finetune(model, source, indices, data_cfg=cfg.data, augment_cfg=cfg.augment,
                                         cfg=options.finetune, eval_batch_size=options.batch_size,
                                         name=f"{arm} {percent:g}%")
      except data_lib.DECODE_ERRORS as e:  # Fine-tuning reads the labelled subset of train, then eval.
        data_lib.name_undecodable((data_lib.take_indices(source.train, indices), source.eval), e)
      logging.info("semi-supervised %g%% labels, %s: top-1 %.2f%% top-5 %.2f%%", percent, arm,
                   100 * row[arm]["top1"], 100 * row[arm]["top5"])
    out[f"{percent:g}%"] = row
  return out


def _digest(indices: np.ndarray) -> str:
  return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


def evaluate(model_dir: str, options: EvalOptions) -> dict[str, Any]:
  """Runs options.protocols on the latest checkpoint of model_dir; writes JSON, table rows and plots.

  Returns:
    {protocol: results} as written to OUTPUT_DIR/<protocol>.json.

  Raises:
    ValueError: naming the flag or file at fault (model dir, config, checkpoint, dataset).
  """
  validate(options)
  run = features_lib.load_run(model_dir, untrained=options.untrained)
  cfg = run.cfg
  # The untrained baseline has its own default dir: it must not overwrite the trained run's knn.json.
  output_dir = options.output_dir or os.path.join(model_dir, "eval_untrained" if options.untrained else "eval")
  run_name = options.run_name or os.path.basename(os.path.normpath(model_dir))
  table = options.results_table or os.path.join(output_dir, "results.md")
  all_layers = features_lib.layer_names(run.model)
  layers = list(options.layers) or all_layers  # build_extractor names an unknown one.
  epochs = 0 if options.untrained else len(results_lib.read_epochs(model_dir)) or cfg.train.epochs
  describe = dict(run=run_name, dataset=cfg.data.dataset, arch=cfg.model.arch, objective=_objective(cfg),
                  epochs=epochs)
  trained_for = None if options.untrained else results_lib.train_seconds(model_dir)
  everything: dict[str, Any] = {}
  source = None
  if {"knn", "linear", "semi_supervised"} & set(options.protocols):
    source = data_lib.load_source(_data_config(cfg, options))
    _labelled(source, "model_dir")
  knn_kinds, skipped = _knn_kinds(options, source, run.input_shape) if "knn" in options.protocols else ([], {})
  knn_layers = [kind for kind in knn_kinds if kind != features_lib.PIXELS]  # Pixels: no layer, `extract` flattens.
  # knn and linear share one pass over the data: the embedding, for linear its layers, for knn the backbone and
  # the pixels.
  feature_layers = list(dict.fromkeys([*(layers if "linear" in options.protocols else []), features_lib.EMBEDDING,
                                       *knn_layers]))
  extracted = None
  for protocol in options.protocols:
    start = time.time()
    rows = []
    base = {"model_dir": os.path.abspath(model_dir), "checkpoint": run.checkpoint, "step": run.step,
            "untrained": options.untrained, "protocol": protocol, **describe}
    if protocol in ("knn", "linear") and extracted is None:
      extracted = _features(run, source, feature_layers, options, cfg, pixels=features_lib.PIXELS in knn_kinds)
    if protocol == "knn":
      by_kind, dims = _knn_protocol(extracted, knn_kinds, options=options, num_classes=source.num_classes)
      # "scores" stays the embedding's (ablate.py and older readers); "features" has every row kind.
      result = {**base, "temperature": options.knn_temperature, "keys": source.train.num_examples,
                "queries": source.eval.num_examples, "scores": by_kind[features_lib.EMBEDDING], "features": by_kind,
                "feature_dims": dims, "skipped": skipped}
      for k in options.knn_k:
        for kind, scores in by_kind.items():
          rows.append((f"{kind} ({dims[kind]}-d), k={k}, t={options.knn_temperature:g}", scores[f"k={k}"],
                       _paper(options, cfg, "knn", kind)))
      if options.plots and options.tsne_points:
        _, _, test, test_labels = extracted
        _tsne_plot(test[features_lib.EMBEDDING], test_labels, source, options, output_dir, run_name)
    elif protocol == "linear":
      train, train_labels, test, test_labels = extracted
      scores = _linear_scores(train, train_labels, test, test_labels, layers=layers, options=options,
                              num_classes=source.num_classes)
      result = {**base, "loss": options.probe.loss, "scores": scores}
      for layer in layers:
        rows.append((f"{layer} ({scores[layer]['dims']}-d), {options.probe.loss}", scores[layer],
                     _paper(options, cfg, "linear", layer)))
      if options.plots and len(layers) > 1:
        plots.ablation_curve(os.path.join(output_dir, "linear_layers.png"), xs=list(range(len(layers))),
                             ours={"linear": [100 * scores[name]["top1"] for name in layers]},
                             paper=_paper_layer_series(cfg, layers), xlabel="layer", x_ticklabels=layers,
                             title=f"Linear probe per layer ({run_name})")
    elif protocol == "semi_supervised":
      scores = semi_supervised(model_dir, source, cfg, options)
      result = {**base, "recipe": dataclasses.asdict(options.finetune), "scores": scores,
                "paper": results_lib.PAPER_SEMI_SUPERVISED_NOTE}
      for fraction, row in scores.items():
        for arm in ("pretrained", "scratch"):
          rows.append((f"{fraction} labels, {arm}", row[arm], None))
      if options.plots:
        fractions = [float(f.rstrip("%")) for f in scores]
        plots.ablation_curve(os.path.join(output_dir, "semi_supervised.png"), xs=fractions, log_x=True,
                             ours={arm: [100 * row[arm]["top1"] for row in scores.values()]
                                   for arm in ("pretrained", "scratch")},
                             xlabel="labelled fraction (%)", x_ticklabels=[f"{f:g}%" for f in fractions],
                             title=f"Semi-supervised fine-tuning ({run_name})")
    else:  # transfer
      target = _load_target(cfg, options)
      _labelled(target, "transfer_dataset")
      transfer_layers = list(dict.fromkeys([*options.layers, features_lib.EMBEDDING])) if options.layers else [
          all_layers[-2], features_lib.EMBEDDING]
      train, train_labels, test, test_labels = _features(run, target, transfer_layers, options, cfg, transfer=True)
      knn_result = knn_scores(train[features_lib.EMBEDDING], train_labels, test[features_lib.EMBEDDING],
                              test_labels, ks=options.knn_k, temperature=options.knn_temperature,
                              num_classes=target.num_classes)
      linear_result = _linear_scores(train, train_labels, test, test_labels, layers=transfer_layers,
                                     options=options, num_classes=target.num_classes)
      result = {**base, "target": options.transfer_dataset, "knn": knn_result, "linear": linear_result}
      for setting, score in knn_result.items():
        rows.append((f"-> {target.name}, kNN {setting}", score, _paper(options, cfg, "knn", "embedding", True)))
      for layer, score in linear_result.items():
        rows.append((f"-> {target.name}, linear {layer}", score, _paper(options, cfg, "linear", layer, True)))
    seconds = time.time() - start
    result["seconds"] = seconds
    results_lib.write_json(os.path.join(output_dir, f"{protocol}.json"), result)
    results_lib.append_rows(table, [
        results_lib.table_row(protocol=protocol, setting=setting, top1=score.get("top1"), top5=score.get("top5"),
                              paper=paper, seconds=seconds, train_seconds=trained_for, **describe)
        for setting, score, paper in rows])
    everything[protocol] = result
  if options.plots:
    _curves_plot(model_dir, output_dir, run_name)
  return everything


def _objective(cfg: config_lib.Config) -> str:
  if cfg.loss.objective == "nce":
    return f"nce m={cfg.loss.num_negatives}"
  return cfg.loss.objective


def _paper(options: EvalOptions, cfg: config_lib.Config, protocol: str, layer: str,
           transfer: bool = False) -> tuple[float, str] | None:
  """The paper's number for a row: an ablation's study and setting (ablate.py probes the embedding only), else
  the same architecture's layer in Table 2 (or Table 3 for transfer)."""
  if options.study:
    if layer != features_lib.EMBEDDING:
      return None
    return results_lib.paper_number(options.study, options.setting, protocol)
  return results_lib.paper_number("transfer" if transfer else "layers", f"{cfg.model.arch}:{layer}", protocol)


def _paper_layer_series(cfg: config_lib.Config, layers: list[str]) -> dict[str, list[float | None]] | None:
  values = [results_lib.paper_number("layers", f"{cfg.model.arch}:{layer}", "linear") for layer in layers]
  if not any(values):
    return None
  return {f"paper linear (ImageNet, {cfg.model.arch})": [v and v[0] for v in values]}


def _tsne_plot(embeddings: np.ndarray, labels: np.ndarray, source: data_lib.DataSource, options: EvalOptions,
               output_dir: str, run_name: str) -> None:
  rng = np.random.default_rng(0)
  chosen = np.sort(rng.permutation(len(embeddings))[:options.tsne_points])
  start = time.time()
  points = tsne_lib.tsne(embeddings[chosen], seed=0)
  logging.info("t-SNE of %d test embeddings: %.0f s", len(chosen), time.time() - start)
  plots.embedding_map(points, labels[chosen], os.path.join(output_dir, "tsne.png"),
                      class_names=list(source.class_names) or None,
                      title=f"t-SNE of {len(chosen)} {source.name} test embeddings ({run_name})")


def _curves_plot(model_dir: str, output_dir: str, run_name: str) -> None:
  records = results_lib.read_epochs(model_dir)
  if records:
    plots.training_curves({run_name: records}, os.path.join(output_dir, "curves.png"),
                          title=f"Training loss and bank kNN top-1 ({run_name})")


def knn_table(result: dict[str, Any]) -> str:
  """The knn protocol's rows as a short text table: one line per k and row kind, top-1 / top-5 in percent."""
  lines = [f"weighted kNN, t={result['temperature']:g}, {result['keys']} keys, {result['queries']} queries "
           "(top-1 / top-5 %)"]
  for setting in result["scores"]:
    for kind, scores in result["features"].items():
      name = f"{kind} ({result['feature_dims'][kind]}-d)"
      lines.append(f"  {setting:<7} {name:<20} {100 * scores[setting]['top1']:6.2f} / "
                   f"{100 * scores[setting]['top5']:6.2f}")
  lines.extend(f"  {kind}: skipped, {why}" for kind, why in result.get("skipped", {}).items())
  return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
  """A protocol's results: "setting top-1/top-5" pairs in percent on one line; the knn rows as a short table."""
  if "features" in result:
    return knn_table(result)
  def pairs(scores: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, score in scores.items():
      if "top1" in score:
        out.append(f"{prefix}{name} {100 * score['top1']:.2f}/{100 * score['top5']:.2f}")
      else:
        out.extend(pairs({k: v for k, v in score.items() if isinstance(v, dict)}, f"{prefix}{name} "))
    return out
  parts = []
  for key in ("scores", "knn", "linear"):
    if key in result:
      parts.extend(pairs(result[key], "" if key == "scores" else f"{key} "))
  return "; ".join(parts) + " (top-1/top-5 %)"
