"""Searching an export with query image files: the neighbour listing and the paper's Figure 5 grid.

`search_files` embeds query files through a loaded export (artifact.load), finds their nearest collection items and
returns the lines to print; `write_grid` draws each query followed by its neighbours. The command line is
export/search.py.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tf_instdisc import artifact


def _label_name(label: int, class_names: list[str]) -> str:
  return class_names[label] if 0 <= label < len(class_names) else str(label)


def read_queries(image_paths: list[str], *, channels: int) -> list[np.ndarray]:
  """uint8 [H, W, C] pixels of each query file.

  Raises:
    ValueError: naming --image when a file is missing or not an image.
  """
  queries = []
  for path in image_paths:
    if not os.path.isfile(path):
      raise ValueError(f"--image: {path} does not exist")
    try:
      queries.append(tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False).numpy())
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"--image: cannot decode {path} as an image") from e
  return queries


def describe(export: artifact.Export, image_paths: list[str], neighbors: artifact.Neighbors) -> list[str]:
  """The listing: a header, then per query its neighbours with rank, similarity, id, label and file."""
  lines = [f"{export.export_dir}: {export.manifest['collection']['size']} items, {export.backend} search"]
  for q, path in enumerate(image_paths):
    lines.append(f"query {path}")
    for j in range(neighbors.ids.shape[1]):
      row = int(neighbors.rows[q, j])
      label = "" if neighbors.labels is None else (
          "  label " + _label_name(int(neighbors.labels[q, j]), export.class_names))
      file_name = f"  {export.paths[row]}" if export.paths is not None else ""
      lines.append(f"  {j + 1:3d}  score {neighbors.scores[q, j]:.4f}  id {int(neighbors.ids[q, j])}{label}{file_name}")
  return lines


def write_grid(path: str, queries: list[np.ndarray], neighbors: artifact.Neighbors,
               images: dict[int, np.ndarray], class_names: list[str]) -> None:
  """One row per query: the query, then its neighbours titled with rank, similarity and label."""
  import matplotlib  # Only the grid needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  num_queries, k = neighbors.rows.shape
  figure, axes = plt.subplots(num_queries, k + 1, figsize=(1.4 * (k + 1), 1.7 * num_queries), squeeze=False)

  def show(axis, image, title, color="black"):
    axis.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
    axis.set_title(title, fontsize=7, color=color)
    axis.axis("off")

  for q in range(num_queries):
    show(axes[q, 0], queries[q], "query", "tab:blue")
    for j in range(k):
      row = int(neighbors.rows[q, j])
      label = "" if neighbors.labels is None else _label_name(int(neighbors.labels[q, j]), class_names)
      show(axes[q, j + 1], images[row], f"#{j + 1} {neighbors.scores[q, j]:.3f}\n{label}")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def search_files(export_dir: str, image_paths: list[str], *, k: int, grid: str = "", exact: bool = False
                 ) -> list[str]:
  """Searches the export for each query file; writes the grid PNG when `grid` is set; returns the listing.

  Raises:
    ValueError: naming --image or the export's file when a query or the export is missing or unreadable.
  """
  export = artifact.load(export_dir, use_scann=not exact)
  queries = read_queries(image_paths, channels=export.manifest["inputs"]["images"]["shape"][-1])
  neighbors = export.search(list(image_paths), k=k)
  lines = describe(export, image_paths, neighbors)
  if grid:
    write_grid(grid, queries, neighbors, export.collection_images(neighbors.rows), export.class_names)
    lines.append(f"wrote {grid}")
  return lines
