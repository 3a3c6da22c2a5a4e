"""Plots a run's training curves from its model dir: loss and kNN top-1 against epoch (paper Figure 4 style) or
against wall-clock minutes, with baselines (e.g. raw pixels) as horizontal lines.

  python tools/plot_metrics.py --model_dir=/tmp/npid_fashion [--output=curves.png]
  python tools/plot_metrics.py --model_dir=/tmp/npid_fashion --x=minutes --baselines="raw pixels=0.7914"

Reads metrics.jsonl (and final_metrics.json when present); writes a PNG, by default MODEL_DIR/curves.png.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A train.py --model_dir.", required=True)
_OUTPUT = flags.DEFINE_string("output", "", "PNG path (default: MODEL_DIR/curves.png).")
_X = flags.DEFINE_enum("x", "epoch", ["epoch", "minutes"], "x axis: epoch, or the run's wall-clock minutes.")
_BASELINES = flags.DEFINE_list("baselines", [], "NAME=TOP1 pairs (top-1 as a fraction) drawn as dashed lines.")


def load_records(model_dir: str) -> tuple[list[dict], dict | None]:
  """(per-epoch records, final metrics or None); raises ValueError naming a missing or unreadable file."""
  path = os.path.join(model_dir, "metrics.jsonl")
  try:
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--model_dir: cannot read {path}: {e}") from e
  if not records:
    raise ValueError(f"--model_dir: {path} has no epochs yet")
  final_path = os.path.join(model_dir, "final_metrics.json")
  final = None
  if os.path.exists(final_path):
    with open(final_path) as f:
      final = json.load(f)
  return records, final


def parse_baselines(pairs: list[str]) -> dict[str, float]:
  """{"NAME": top1} from NAME=TOP1 strings; raises ValueError naming --baselines."""
  baselines = {}
  for pair in pairs:
    name, _, value = pair.rpartition("=")
    try:
      baselines[name] = float(value)
    except ValueError:
      name = ""
    if not name:
      raise ValueError(f"--baselines: expected NAME=TOP1 (a fraction), got {pair!r}")
  return baselines


def _x(record: dict, x: str) -> float:
  if x == "epoch":
    return record["epoch"]
  wall = (record.get("time") or {}).get("wall_seconds")
  if wall is None:
    raise ValueError("--x=minutes: the run's records have no wall time (made before time accounting)")
  return wall / 60.0


def plot(records: list[dict], final: dict | None, output: str, *, x: str = "epoch",
         baselines: dict[str, float] | None = None) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  xs = [_x(r, x) for r in records]
  label = "epoch" if x == "epoch" else "wall time (minutes)"
  fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  loss_ax.plot(xs, [r["loss"] for r in records], marker="o", markersize=3)
  loss_ax.set(xlabel=label, ylabel="training loss", title="loss")
  knn = [(_x(r, x), 100 * r["knn_top1"]) for r in records if r.get("knn_top1") is not None]
  if knn:
    knn_ax.plot(*zip(*knn), marker="o", markersize=3, label="bank kNN top-1 (monitor)")
  if final and final.get("knn_top1") is not None:
    knn_ax.scatter([_x(final, x)], [100 * final["knn_top1"]], color="C3", zorder=3,
                   label=f"clean-feature kNN top-1: {100 * final['knn_top1']:.2f}%")
  for index, (name, value) in enumerate((baselines or {}).items()):
    knn_ax.axhline(100 * value, color="gray", linestyle=("--", ":", "-.")[index % 3], linewidth=1,
                   label=f"{name}: {100 * value:.2f}%")
  knn_ax.set(xlabel=label, ylabel="top-1 (%)", title="kNN accuracy")
  knn_ax.legend(loc="lower right", fontsize=8)
  for ax in (loss_ax, knn_ax):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(output, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> int:
  del argv
  output = _OUTPUT.value or os.path.join(_MODEL_DIR.value, "curves.png")
  try:
    records, final = load_records(_MODEL_DIR.value)
    plot(records, final, output, x=_X.value, baselines=parse_baselines(_BASELINES.value))
  except ValueError as e:
    print(f"plot_metrics.py: {e}", file=sys.stderr)
    return 2
  print(output)
  return 0


if __name__ == "__main__":
  app.run(main)
