"""Figures as PNG files: a 2-D embedding map by class, ablation curves against the paper's, training curves.

Each function checks its input first (ValueError naming the problem), creates the output's directory, writes
OUTPUT.tmp.png and renames it over OUTPUT (so a reader never sees half a file), and closes its figure. matplotlib is
imported on call, with the non-interactive Agg backend, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

DPI = 120
TMP_SUFFIX = ".tmp.png"
MAX_LEGEND_CLASSES = 20  # tab20 has 20 colours; beyond that colours repeat and the map has no legend.


def _pyplot() -> Any:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  return plt


def _save(fig: Any, output: str) -> None:
  """Writes fig to output atomically (OUTPUT.tmp.png, then rename) and closes it, also on failure."""
  plt = _pyplot()
  tmp = output + TMP_SUFFIX
  try:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    os.replace(tmp, output)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def _class_colors(num_classes: int) -> list[Any]:
  """tab10 for up to 10 classes, else tab20 (cycled past 20)."""
  import matplotlib

  colors = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
  return [colors[i % len(colors)] for i in range(num_classes)]


def embedding_map(points: np.ndarray, labels: np.ndarray, output: str, *, class_names: list[str] | None = None,
                  title: str = "") -> None:
  """Scatter of a 2-D map (e.g. from tsne.tsne) coloured by class, with a legend of class names and no ticks.

  Args:
    points: [N, 2] finite coordinates, N >= 1.
    labels: [N] integer class ids. With class_names they index it (0 <= label < len(class_names)); without, the
      legend shows the ids.
    output: PNG path.
    class_names: names of classes 0, 1, ...; the legend lists the classes present, in id order.
    title: figure title.

  Raises:
    ValueError: empty input, points not [N, 2] or not finite, labels not [N] integers, or a label outside
      class_names.
  """
  points = np.asarray(points)
  labels = np.asarray(labels)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"embedding_map: points must be [N, 2], got shape {points.shape}")
  if points.shape[0] == 0:
    raise ValueError("embedding_map: no points")
  if labels.shape != (points.shape[0],):
    raise ValueError(f"embedding_map: labels must be [N] = [{points.shape[0]}] to match points, got shape "
                     f"{labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"embedding_map: labels must be integer class ids, got dtype {labels.dtype}")
  if not np.all(np.isfinite(points)):
    raise ValueError("embedding_map: points contain NaN or inf")
  classes = np.unique(labels)
  if class_names is not None and (classes[0] < 0 or classes[-1] >= len(class_names)):
    raise ValueError(f"embedding_map: labels span [{classes[0]}, {classes[-1]}] but class_names has "
                     f"{len(class_names)} names")

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 6.5))
  colors = _class_colors(len(classes))
  marker_size = float(np.clip(8000 / len(points), 3, 20))
  for color, class_id in zip(colors, classes):
    mask = labels == class_id
    name = class_names[class_id] if class_names is not None else str(class_id)
    ax.scatter(points[mask, 0], points[mask, 1], s=marker_size, color=color, label=name, linewidths=0, alpha=0.8)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_aspect("equal", adjustable="datalim")
  if len(classes) <= MAX_LEGEND_CLASSES:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=max(1.0, 6 / marker_size ** 0.5),
              frameon=False)
  if title:
    ax.set_title(title)
  _save(fig, output)


def _check_series(series: dict[str, list[float | None]], length: int, name: str) -> None:
  if not series:
    raise ValueError(f"ablation_curve: {name} has no series")
  for key, values in series.items():
    if len(values) != length:
      raise ValueError(f"ablation_curve: {name}[{key!r}] has {len(values)} values but xs has {length}")


def _present(xs: list[float], values: list[float | None]) -> tuple[list[float], list[float]]:
  """The (x, y) pairs whose y is not None, as two lists."""
  pairs = [(x, y) for x, y in zip(xs, values) if y is not None]
  return [x for x, _ in pairs], [y for _, y in pairs]


def ablation_curve(output: str, *, xs: list[float], ours: dict[str, list[float | None]],
                   paper: dict[str, list[float | None]] | None = None, xlabel: str,
                   ylabel: str = "top-1 accuracy (%)", title: str = "", log_x: bool = False,
                   x_ticklabels: list[str] | None = None) -> None:
  """Accuracy against a swept setting (e.g. embedding dimension, number of negatives): ours solid, the paper dashed.

  Args:
    output: PNG path.
    xs: the setting's values, one per point of every series.
    ours: series name (e.g. "kNN", "linear") -> values at xs, in the y axis' units (percent); None = not measured.
    paper: the paper's series on the same xs, drawn dashed and labelled "paper NAME" (so name them e.g.
      "kNN (ImageNet)"; a name already starting with "paper" is kept as it is); the i-th is drawn in the colour of
      our i-th series, so list them in the same order. Its numbers may come from another dataset: they share the y
      axis.
    xlabel: x axis label.
    ylabel: y axis label.
    title: figure title.
    log_x: logarithmic x axis (xs must then be positive).
    x_ticklabels: tick labels at xs (e.g. "1/4", "full"), one per x.

  Raises:
    ValueError: empty xs or ours, a series or x_ticklabels whose length differs from xs, no value in ours at all,
      or log_x with a non-positive x.
  """
  if not xs:
    raise ValueError("ablation_curve: xs is empty")
  _check_series(ours, len(xs), "ours")
  if paper is not None:
    _check_series(paper, len(xs), "paper")
  if x_ticklabels is not None and len(x_ticklabels) != len(xs):
    raise ValueError(f"ablation_curve: x_ticklabels has {len(x_ticklabels)} labels but xs has {len(xs)}")
  if all(value is None for values in ours.values() for value in values):
    raise ValueError("ablation_curve: every value in ours is None: nothing to plot")
  if log_x and min(xs) <= 0:
    raise ValueError(f"ablation_curve: log_x needs positive xs, got {min(xs)}")

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for index, (name, values) in enumerate(ours.items()):
    ax.plot(*_present(xs, values), linestyle="-", marker="o", markersize=5, color=f"C{index}", label=name)
  for index, (name, values) in enumerate((paper or {}).items()):
    ax.plot(*_present(xs, values), linestyle="--", marker="s", markersize=4, color=f"C{index}", alpha=0.8,
            label=name if name.lower().startswith("paper") else f"paper {name}")
  if log_x:
    ax.set_xscale("log")
  if x_ticklabels is not None:
    ax.set_xticks(xs, labels=x_ticklabels)
    ax.set_xticks([], minor=True)
  ax.set(xlabel=xlabel, ylabel=ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, output)


X_AXES = {"epoch": "epoch", "minutes": "wall time (minutes)"}


def _x_of(record: dict, x: str) -> float | None:
  if x == "epoch":
    return record.get("epoch")
  wall = (record.get("time") or {}).get("wall_seconds")
  return None if wall is None else wall / 60.0


def training_curves(runs: dict[str, list[dict]], output: str, *, title: str = "", x: str = "epoch",
                    baselines: dict[str, float] | None = None) -> None:
  """Training loss and kNN top-1 (%) against epoch or wall time, side by side, one line per run (paper Figures 3
  and 4 style).

  Args:
    runs: run name -> per-epoch records like {"epoch": 1, "loss": 7.3, "knn_top1": 0.61} (metrics.jsonl rows);
      knn_top1 is a fraction in [0, 1] and may be None or absent (epochs without a kNN evaluation are skipped), as
      may loss.
    output: PNG path.
    title: figure title.
    x: "epoch", or "minutes": the run's cumulative wall time (record["time"]["wall_seconds"], metrics.jsonl).
    baselines: label -> kNN top-1 fraction drawn as a dashed horizontal line on the kNN panel (e.g. raw pixels).

  Raises:
    ValueError: no runs, a run without records, a record without an "epoch" (or without a wall time for
    x="minutes"), or an unknown x.
  """
  if x not in X_AXES:
    raise ValueError(f"training_curves: x must be one of {', '.join(X_AXES)}, got {x!r}")
  if not runs:
    raise ValueError("training_curves: no runs")
  for name, records in runs.items():
    if not records:
      raise ValueError(f"training_curves: run {name!r} has no records")
    for position, record in enumerate(records):
      if record.get("epoch") is None or _x_of(record, x) is None:
        raise ValueError(f"training_curves: run {name!r} record {position} has no {x!r}: {record}")

  plt = _pyplot()
  fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  for index, (name, records) in enumerate(runs.items()):
    loss = [(_x_of(r, x), r["loss"]) for r in records if r.get("loss") is not None]
    knn = [(_x_of(r, x), 100 * r["knn_top1"]) for r in records if r.get("knn_top1") is not None]
    if loss:
      loss_ax.plot(*zip(*loss), marker="o", markersize=3, color=f"C{index}", label=name)
    if knn:
      knn_ax.plot(*zip(*knn), marker="o", markersize=3, color=f"C{index}", label=name)
  for index, (label, value) in enumerate((baselines or {}).items()):
    knn_ax.axhline(100 * value, color="gray", linestyle=("--", ":", "-.")[index % 3], linewidth=1, label=label)
  loss_ax.set(xlabel=X_AXES[x], ylabel="training loss", title="training loss")
  knn_ax.set(xlabel=X_AXES[x], ylabel="kNN top-1 (%)", title="kNN accuracy")
  for ax in (loss_ax, knn_ax):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, output)
