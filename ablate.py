"""Runs the paper's ablation studies on a dataset we have: trains every variant with train.py, evaluates it by kNN
and a linear probe on the embedding, and writes the summary with the paper's numbers beside ours.

  python ablate.py --root=/tmp/ablation --base_flagfile=fashion_mnist.flags --epochs=3 \\
      --studies=objective,embedding,fraction,proximal --results_table=docs/results.md

Each variant trains in ROOT/<variant> (`python train.py --flagfile=BASE --epochs=E <variant flags>`), so a
rerun skips finished runs and resumes interrupted ones. Writes ROOT/ablation.json, ROOT/ablation.md (one table per
study), ROOT/<study>.png (ours against the paper's) and ROOT/proximal_curves.png (training curves, Figure 3 style);
appends every evaluation to --results_table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

from tf_instdisc import ablation
from tf_instdisc import checkpointing
from tf_instdisc import evaluation
from tf_instdisc import linear_probe
from tf_instdisc import plots
from tf_instdisc import results as results_lib

_REPO = os.path.dirname(os.path.abspath(__file__))

_ROOT = flags.DEFINE_string("root", None, "Directory of the variants' model dirs and the summary.", required=True)
_BASE = flags.DEFINE_string("base_flagfile", os.path.join(_REPO, "fashion_mnist.flags"),
                            "train.py flagfile every variant starts from.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs of every variant (overrides the flagfile's).")
_STUDIES = flags.DEFINE_list("studies", list(ablation.STUDIES), f"Studies: {', '.join(ablation.STUDIES)}.")
_FRACTIONS = flags.DEFINE_list("fractions", ["10", "30"],
                               "fraction study: percentages of the training images (100% is the base run).")
_NEGATIVES = flags.DEFINE_integer("num_negatives", ablation.PAPER_NEGATIVES,
                                  "NCE m of the base run (and of the embedding, fraction, proximal studies).")
_EVAL_TRAIN = flags.DEFINE_integer("eval_train_examples", 0,
                                   "Labelled train images for kNN keys and the probe (0: all, whatever a variant "
                                   "trained on).")
_LAMBDA = flags.DEFINE_float("proximal_lambda", 30.0, "proximal study: lambda of the proximal variant.")
_EXTRA = flags.DEFINE_list("train_flags", [], "More train.py flags for every variant, e.g. --eval_every_epochs=1.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["knn", "linear"], "Evaluations of every variant: knn, linear.")
_KNN_K = flags.DEFINE_integer("knn_k", 200, "kNN neighbours.")
_LINEAR_LOSS = flags.DEFINE_enum("linear_loss", "svm", linear_probe.LOSSES,
                                 "The linear probe: svm (as the paper's Table 1) or logistic.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", linear_probe.ProbeConfig().epochs, "Linear-probe epochs.")
_TABLE = flags.DEFINE_string("results_table", "", "Markdown results table to append to (default ROOT/results.md).")

FLAGS = flags.FLAGS


def _train(variant: ablation.Variant, model_dir: str) -> None:
  if os.path.exists(os.path.join(model_dir, "final_metrics.json")):
    logging.info("%s: trained already (%s)", variant.name, model_dir)
    return
  command = [sys.executable, os.path.join(_REPO, "train.py"), f"--flagfile={_BASE.value}",
             f"--epochs={_EPOCHS.value}", "--train_minutes=0",  # Epochs, not the flagfile's time budget.
             *_EXTRA.value, *variant.flags, f"--model_dir={model_dir}"]
  logging.info("%s: %s", variant.name, " ".join(command))
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "train.log"), "a") as log:
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO)
  if code != 0:
    raise RuntimeError(f"{variant.name}: train.py exited with {code}; see {os.path.join(model_dir, 'train.log')}")


def _evaluate(variant: ablation.Variant, model_dir: str, table: str) -> dict:
  """knn / linear results of the variant (cached in MODEL_DIR/eval/ while the checkpoint and probe are the same)."""
  output_dir = os.path.join(model_dir, "eval")
  results = {}
  for protocol in _PROTOCOLS.value:
    path = os.path.join(output_dir, f"{protocol}.json")
    if os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      same_probe = protocol != "linear" or cached.get("loss") == _LINEAR_LOSS.value
      if same_probe and os.path.exists(cached.get("checkpoint", "") + ".index"):
        results[protocol] = cached
        continue
    # The studies compare embeddings; the pixels row would be the same for every variant.
    options = evaluation.EvalOptions(
        protocols=(protocol,), knn_k=(_KNN_K.value,), knn_features=("embedding",), layers=("embedding",),
        probe=linear_probe.ProbeConfig(loss=_LINEAR_LOSS.value, epochs=_LINEAR_EPOCHS.value),
        max_train_examples=_EVAL_TRAIN.value, output_dir=output_dir,
        results_table=table, run_name=f"ablation/{variant.name}", plots=False, study=variant.study,
        setting=variant.setting)
    results.update(evaluation.evaluate(model_dir, options))
  return results


def _row(variant: ablation.Variant, model_dir: str, results: dict) -> dict:
  knn = results.get("knn", {}).get("scores", {}).get(f"k={_KNN_K.value}", {})
  linear = results.get("linear", {}).get("scores", {}).get("embedding", {})
  paper_knn = results_lib.paper_number(variant.study, variant.setting, "knn")
  paper_linear = results_lib.paper_number(variant.study, variant.setting, "linear")
  return {"name": variant.name, "study": variant.study, "setting": variant.setting, "x": variant.x,
          "flags": list(variant.flags), "knn_top1": knn.get("top1"), "knn_top5": knn.get("top5"),
          "linear_top1": linear.get("top1"), "linear_top5": linear.get("top5"),
          "paper_knn": paper_knn and paper_knn[0], "paper_linear": paper_linear and paper_linear[0],
          "paper_where": (paper_knn or paper_linear or (None, None))[1],
          "epochs": len(results_lib.read_epochs(model_dir)), "train_seconds": results_lib.train_seconds(model_dir)}


def _plot(rows: list[dict], root: str) -> None:
  for study in ablation.STUDIES:
    study_rows = sorted((r for r in rows if r["study"] == study), key=lambda r: r["x"])
    if len(study_rows) < 2:
      continue
    ours = {"kNN": [r["knn_top1"] and 100 * r["knn_top1"] for r in study_rows],
            "linear": [r["linear_top1"] and 100 * r["linear_top1"] for r in study_rows]}
    paper = {"paper kNN": [r["paper_knn"] for r in study_rows], "paper linear": [r["paper_linear"] for r in study_rows]}
    paper = {k: v for k, v in paper.items() if any(x is not None for x in v)} or None
    plots.ablation_curve(os.path.join(root, f"{study}.png"), xs=list(range(len(study_rows))), ours=ours, paper=paper,
                         xlabel=study, x_ticklabels=[r["setting"] for r in study_rows],
                         title=f"Ablation: {study} (ours: {FLAGS.base_flagfile and os.path.basename(_BASE.value)}, "
                               f"{_EPOCHS.value} epochs)")
  proximal = [r for r in rows if r["study"] == "proximal"]
  if proximal:
    plots.training_curves({r["setting"]: results_lib.read_epochs(os.path.join(root, r["name"])) for r in proximal},
                          os.path.join(root, "proximal_curves.png"), title="Bank momentum and the proximal term")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  root = os.path.abspath(_ROOT.value)
  table = _TABLE.value or os.path.join(root, "results.md")
  start = time.time()
  try:
    if not os.path.exists(_BASE.value):
      raise ValueError(f"--base_flagfile: {_BASE.value} does not exist")
    if any(p not in ("knn", "linear") for p in _PROTOCOLS.value):
      raise ValueError(f"--protocols: expected knn and/or linear, got {','.join(_PROTOCOLS.value)}")
    try:
      fractions = tuple(float(f) for f in _FRACTIONS.value)
    except ValueError as e:
      raise ValueError(f"--fractions: expected percentages, got {','.join(_FRACTIONS.value)}") from e
    ablation.check(tuple(_STUDIES.value), fractions)
    base = ablation.base_variant(_NEGATIVES.value)
    _train(base, os.path.join(root, base.name))  # First: its image count sizes the fraction variants.
    num_train = checkpointing.read_run_identity(os.path.join(root, base.name))["num_instances"]
    plan = ablation.variants(tuple(_STUDIES.value), fractions=fractions, num_train=num_train,
                             proximal_lambda=_LAMBDA.value, num_negatives=_NEGATIVES.value)
    rows, evaluated = [], {}
    for variant in plan:  # The base run appears in several studies: trained and evaluated once.
      model_dir = os.path.join(root, variant.name)
      _train(variant, model_dir)
      if variant.name not in evaluated:
        evaluated[variant.name] = _evaluate(variant, model_dir, table)
      rows.append(_row(variant, model_dir, evaluated[variant.name]))
  except (ValueError, RuntimeError) as e:
    print(f"ablate.py: {e}", file=sys.stderr)
    return 2
  results_lib.write_json(os.path.join(root, "ablation.json"), {
      "base_flagfile": os.path.abspath(_BASE.value), "epochs": _EPOCHS.value, "train_flags": _EXTRA.value,
      "rows": rows, "seconds": time.time() - start})
  with open(os.path.join(root, "ablation.md.tmp"), "w") as f:
    f.write(ablation.markdown(rows))
  os.replace(os.path.join(root, "ablation.md.tmp"), os.path.join(root, "ablation.md"))
  _plot(rows, root)
  print(ablation.markdown(rows))
  return 0


if __name__ == "__main__":
  app.run(main)
