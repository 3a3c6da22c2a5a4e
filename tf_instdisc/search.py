"""Searches an export for the images most similar to a query image (the paper's Figure 5).

  python -m tf_instdisc.search --export_dir=E --image=query.png [--k=10] [--grid=neighbours.png]

Prints the k nearest collection images with their cosine similarity, id, label and file, and with --grid writes a
picture: each query followed by its neighbours. This is the package's one entry point (so `python -m` finds it);
nothing imports it, and it is the only module here that defines flags (STYLE.md 6.2).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export dir written by export/export.py.", required=True)
_IMAGES = flags.DEFINE_multi_string("image", None, "Query image file (JPEG, PNG, GIF, BMP); repeat for several.",
                                    required=True)
_K = flags.DEFINE_integer("k", 10, "Neighbours per query.", lower_bound=1)
_GRID = flags.DEFINE_string("grid", "", "Write a PNG of each query and its neighbours here.")
_EXACT = flags.DEFINE_bool("exact", False, "Exact search even when the export has a ScaNN index.")


def write_grid(path: str, queries: list, neighbors, images: dict[int, object], class_names: list[str]) -> None:
  """One row per query: the query, then its neighbours titled with rank, similarity and label."""
  import matplotlib

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


def _label_name(label: int, class_names: list[str]) -> str:
  return class_names[label] if 0 <= label < len(class_names) else str(label)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    run(_EXPORT_DIR.value, _IMAGES.value, k=_K.value, grid=_GRID.value, exact=_EXACT.value)
  except ValueError as e:
    print(f"search: {e}", file=sys.stderr)
    sys.exit(1)


def run(export_dir: str, image_paths: list[str], *, k: int, grid: str, exact: bool) -> None:
  import tensorflow as tf

  from tf_instdisc import artifact

  for path in image_paths:
    if not os.path.isfile(path):
      raise ValueError(f"--image: {path} does not exist")
  export = artifact.load(export_dir, use_scann=not exact)
  channels = export.manifest["inputs"]["images"]["shape"][-1]
  queries = []
  for path in image_paths:
    try:
      queries.append(tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False).numpy())
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"--image: cannot decode {path} as an image") from e
  neighbors = export.search(list(image_paths), k=k)
  print(f"{export_dir}: {export.manifest['collection']['size']} items, {export.backend} search")
  for q, path in enumerate(image_paths):
    print(f"query {path}")
    for j in range(neighbors.ids.shape[1]):
      row = int(neighbors.rows[q, j])
      label = "" if neighbors.labels is None else "  label " + _label_name(int(neighbors.labels[q, j]),
                                                                             export.class_names)
      file_name = f"  {export.paths[row]}" if export.paths is not None else ""
      print(f"  {j + 1:3d}  score {neighbors.scores[q, j]:.4f}  id {int(neighbors.ids[q, j])}{label}{file_name}")
  if grid:
    write_grid(grid, queries, neighbors, export.collection_images(neighbors.rows), export.class_names)
    print(f"wrote {grid}")


if __name__ == "__main__":
  app.run(main)
