"""Evaluation results: JSON files, the Markdown results table, and the paper's numbers to put beside ours.

The paper's numbers are restated from the paper itself (Wu et al. 2018, Tables 1-5, Figure 6). They were
measured on CIFAR-10 and ImageNet; our rows name their own dataset, so a reader sees at a glance when the two are
not the same experiment.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from typing import Any

from tf_instdisc import checkpointing

# (study, setting) -> (top-1 %, where). "kNN" and "linear" are the protocols of the paper's columns.
PAPER = {
    # Table 1: CIFAR-10, ResNet-18, 128-d; linear SVM / kNN.
    ("objective", "parametric", "linear"): (60.3, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "parametric", "knn"): (63.0, "Table 1, CIFAR-10, ResNet-18"),
    ("objective", "softmax", "linear"): (75.4, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "softmax", "knn"): (80.8, "Table 1, CIFAR-10, ResNet-18"),
    ("objective", "nce_m1", "linear"): (44.3, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "nce_m1", "knn"): (42.5, "Table 1, CIFAR-10, ResNet-18"),
    ("objective", "nce_m10", "linear"): (60.2, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "nce_m10", "knn"): (63.4, "Table 1, CIFAR-10, ResNet-18"),
    ("objective", "nce_m512", "linear"): (64.3, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "nce_m512", "knn"): (78.4, "Table 1, CIFAR-10, ResNet-18"),
    ("objective", "nce_m4096", "linear"): (70.2, "Table 1, CIFAR-10, ResNet-18, SVM"),
    ("objective", "nce_m4096", "knn"): (80.4, "Table 1, CIFAR-10, ResNet-18"),
    # Table 4: embedding size, ResNet-18, ImageNet kNN.
    ("embedding", "32", "knn"): (34.0, "Table 4, ImageNet, ResNet-18"),
    ("embedding", "64", "knn"): (38.8, "Table 4, ImageNet, ResNet-18"),
    ("embedding", "128", "knn"): (40.5, "Table 4, ImageNet, ResNet-18"),
    ("embedding", "256", "knn"): (40.1, "Table 4, ImageNet, ResNet-18"),
    # Table 5: training-set fraction, ResNet-18, ImageNet kNN.
    ("fraction", "0.1%", "knn"): (3.9, "Table 5, ImageNet, ResNet-18"),
    ("fraction", "1%", "knn"): (10.7, "Table 5, ImageNet, ResNet-18"),
    ("fraction", "10%", "knn"): (23.1, "Table 5, ImageNet, ResNet-18"),
    ("fraction", "30%", "knn"): (31.7, "Table 5, ImageNet, ResNet-18"),
    ("fraction", "100%", "knn"): (40.5, "Table 5, ImageNet, ResNet-18"),
    # Table 2: ImageNet, linear classifiers on each stage, ResNet-18 / ResNet-50 (and kNN on the output).
    ("layers", "resnet18:conv1", "linear"): (16.0, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet18:conv2", "linear"): (19.9, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet18:conv3", "linear"): (26.3, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet18:conv4", "linear"): (35.7, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet18:conv5", "linear"): (42.1, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet18:embedding", "knn"): (40.5, "Table 2, ImageNet, ResNet-18"),
    ("layers", "resnet50:conv1", "linear"): (15.3, "Table 2, ImageNet, ResNet-50"),
    ("layers", "resnet50:conv2", "linear"): (18.8, "Table 2, ImageNet, ResNet-50"),
    ("layers", "resnet50:conv3", "linear"): (24.4, "Table 2, ImageNet, ResNet-50"),
    ("layers", "resnet50:conv4", "linear"): (35.3, "Table 2, ImageNet, ResNet-50"),
    ("layers", "resnet50:conv5", "linear"): (43.9, "Table 2, ImageNet, ResNet-50"),
    ("layers", "resnet50:embedding", "knn"): (42.5, "Table 2, ImageNet, ResNet-50"),
    # Table 3: Places, features trained on ImageNet, no fine-tuning.
    ("transfer", "resnet50:conv5", "linear"): (42.1, "Table 3, ImageNet->Places, ResNet-50"),
    ("transfer", "resnet50:embedding", "knn"): (38.7, "Table 3, ImageNet->Places, ResNet-50"),
    ("transfer", "resnet18:conv5", "linear"): (41.3, "Table 3, ImageNet->Places, ResNet-18"),
    ("transfer", "resnet18:embedding", "knn"): (36.7, "Table 3, ImageNet->Places, ResNet-18"),
}
# Figure 6 gives curves, not a table: at 1% of ImageNet's labels, fine-tuning beats scratch by about 10 points of
# top-5. That is the only number the text states.
PAPER_SEMI_SUPERVISED_NOTE = "Fig. 6, ImageNet: about +10 top-5 points over scratch at 1% labels"

TABLE_COLUMNS = ("run", "dataset", "arch", "objective", "epochs", "protocol", "setting", "top-1", "top-5",
                 "paper top-1", "paper setting", "wall time", "date", "train time")
METRICS_FILE, FINAL_METRICS_FILE = "metrics.jsonl", "final_metrics.json"  # A train.py run's (train_lib writes them).


def paper_number(study: str, setting: str, protocol: str) -> tuple[float, str] | None:
  """The paper's (top-1 %, where) for a study row, or None when the paper has no such number."""
  return PAPER.get((study, setting, protocol))


def write_json(path: str, value: dict[str, Any]) -> None:
  """Writes a result file atomically (a crash leaves the previous file or none, never half of one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  checkpointing.write_json_atomic(path, value)


def format_seconds(seconds: float) -> str:
  """3m05s, or 1h02m03s from an hour on (progress lines, tables)."""
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def read_epochs(model_dir: str) -> list[dict[str, Any]]:
  """A train.py run's per-epoch records (metrics.jsonl; [] when it has none). A last line that a kill cut short
  (half a record: the run was killed while appending it, and not resumed since) is left out."""
  path = os.path.join(model_dir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise
  return records


def train_seconds(model_dir: str) -> float:
  """Seconds of a run's training steps plus its final kNN evaluation (metrics.jsonl, final_metrics.json): below
  the run's wall clock, which also holds the per-epoch bank kNN and the checkpoint writes."""
  seconds = sum(r.get("seconds", 0.0) for r in read_epochs(model_dir))
  final = os.path.join(model_dir, FINAL_METRICS_FILE)
  if os.path.exists(final):
    with open(final) as f:
      seconds += json.load(f).get("seconds", 0.0)
  return seconds


def table_row(*, run: str, dataset: str, arch: str, objective: str, epochs: int, protocol: str, setting: str,
              top1: float | None, top5: float | None, paper: tuple[float, str] | None, seconds: float,
              train_seconds: float | None = None) -> dict[str, str]:
  """One row of the results table; accuracies in [0, 1] are shown as percentages. "wall time" is the
  evaluation's, "train time" the training run's (empty for an untrained baseline)."""
  def percent(value):
    return "" if value is None else f"{100 * value:.2f}"
  return {"run": run, "dataset": dataset, "arch": arch, "objective": objective, "epochs": str(epochs),
          "protocol": protocol, "setting": setting, "top-1": percent(top1), "top-5": percent(top5),
          "paper top-1": "" if paper is None else f"{paper[0]:.1f}", "paper setting": "" if paper is None else paper[1],
          "wall time": format_seconds(seconds), "date": datetime.date.today().isoformat(),
          "train time": "" if not train_seconds else format_seconds(train_seconds)}


def append_rows(path: str, rows: list[dict[str, str]]) -> None:
  """Appends rows to the Markdown table at `path`, writing its header first when the file is new or empty.

  An exclusive lock on the file keeps concurrent evaluations from interleaving their lines.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0, os.SEEK_END)
    lines = []
    if f.tell() == 0:
      lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
      lines.append("|" + "---|" * len(TABLE_COLUMNS))
    for row in rows:
      lines.append("| " + " | ".join(row.get(c, "").replace("|", "/") for c in TABLE_COLUMNS) + " |")
    f.write("\n".join(lines) + "\n")


def read_table(path: str) -> list[dict[str, str]]:
  """The rows of a results table written by `append_rows` (for tests and the ablation summary)."""
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip().startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
