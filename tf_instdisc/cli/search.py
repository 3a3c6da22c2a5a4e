"""Searches an export for the images most similar to query image files (the paper's Figure 5).

  instdisc-search --export_dir=E --image=query.png [--image=...] [--k=10] [--grid=neighbours.png]
  python export/search.py ...   (the same, in a checkout)

Prints the k nearest collection images of each query with their cosine similarity, id, label and file, and with
--grid writes a picture: each query followed by its neighbours (tf_instdisc/search.py).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from tf_instdisc import cli

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export dir written by export/export.py.", required=True)
_IMAGES = flags.DEFINE_multi_string("image", None, "Query image file (JPEG, PNG, GIF, BMP); repeat for several.",
                                    required=True)
_K = flags.DEFINE_integer("k", 10, "Neighbours per query.", lower_bound=1)
_GRID = flags.DEFINE_string("grid", "", "Write a PNG of each query and its neighbours here.")
_EXACT = flags.DEFINE_bool("exact", False, "Exact search even when the export has a ScaNN index.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_tensorflow()
  from tf_instdisc import search  # After the flags parse: a bad flag is answered before TensorFlow loads.

  try:
    lines = search.search_files(_EXPORT_DIR.value, _IMAGES.value, k=_K.value, grid=_GRID.value, exact=_EXACT.value)
  except (ValueError, OSError) as e:  # OSError: e.g. a --grid path whose folder is a file.
    print(f"search.py: {e}", file=sys.stderr)
    sys.exit(1)
  print("\n".join(lines))


def run() -> None:
  """The `instdisc-search` command."""
  cli.describe_command(__doc__, __name__, flags.FLAGS)
  app.run(main)


if __name__ == "__main__":
  run()
