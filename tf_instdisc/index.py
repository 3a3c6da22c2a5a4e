"""Nearest neighbours of unit-norm embeddings (cosine = dot product): a ScaNN searcher, and exact NumPy search.

`choose_settings` sizes a searcher from the collection size alone; `tune` then raises its search-time settings on
held-out queries until recall@10 reaches a target, or falls back to exact brute force.

Shapes: Q = queries, N = collection rows, D = embedding_dim, k = neighbours per query. Imports only NumPy: ScaNN
(which imports TensorFlow) is imported when a searcher is built or loaded, so exact search works without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import numbers
import os
import re
import time
from typing import Any

import numpy as np

EXACT_BELOW = 20_000  # Fewer rows than this: ScaNN brute force (exact).
RECALL_TARGET = 0.95  # tune's default: recall@10 on held-out queries.
TUNE_SECONDS = 60.0  # tune's default time budget.
TUNE_K = 10  # tune measures recall@TUNE_K.
_REORDER_STEPS = 3  # tune doubles reorder at most this many times past the heuristic's (8x).
_REORDER_MIN_GAIN = 0.002  # A reorder doubling that gains less recall than this is not the limit: search more leaves.
KINDS = ("brute_force", "tree_ah")
MANIFEST_FILE = "tf_instdisc_index.json"  # Written last by save_searcher: every ScaNN file's size and SHA-256.
_FIXED_FILES = ("scann_assets.pbtxt", "scann_config.pb")
_DOCIDS_FILE = "scann_docids.pkl"  # ScaNN unpickles it on load if present; save_searcher never writes it.


@dataclasses.dataclass(frozen=True)
class IndexSettings:
  """How a ScaNN searcher is built. Brute force uses `kind` only.

  Attributes:
    kind: "brute_force" (exact float32 dot products) or "tree_ah" (k-means tree, asymmetric hashing, reordering).
    num_leaves: k-means partitions of the collection.
    num_leaves_to_search: partitions scanned per query.
    training_sample_size: rows sampled to train the tree and the hashing codebooks.
    dimensions_per_block: dimensions per hashing sub-space (16 codes each).
    anisotropic_threshold: score-aware quantization threshold (ScaNN's noise_shaping_threshold).
    reorder: hashed candidates re-scored exactly per query; search raises it to 2.5k if that is more.
  """

  kind: str = "brute_force"
  num_leaves: int = 0
  num_leaves_to_search: int = 0
  training_sample_size: int = 0
  dimensions_per_block: int = 2
  anisotropic_threshold: float = 0.2
  reorder: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"IndexSettings.kind: got {self.kind!r}, expected one of {KINDS}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> IndexSettings:
    unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"IndexSettings: unknown fields {sorted(unknown)}")
    return cls(**values)


def choose_settings(num_rows: int, *, k: int = 200) -> IndexSettings:
  """Searcher settings for num_rows unit vectors searched for up to k neighbours: brute force below EXACT_BELOW."""
  if num_rows < EXACT_BELOW:
    return IndexSettings(kind="brute_force")
  # Measured with bench/retrieval_bench.py on 2 quiet cores (single-threaded search). ~sqrt(N) leaves is ScaNN's
  # starting point: 1,132 at 1.28M, 245 at 60k. Scanning 4% of them (at least 20) gave, at 1.28M x 128 clustered
  # (synthetic) data, 0.23 ms/query (14x exact TF) at recall@10 1.0 and recall@200 0.999; on learned
  # Fashion-MNIST embeddings (60k), recall@10 0.9997 and recall@200 0.998. Noisier clusters (top-1 cosine 0.63)
  # still gave recall@10 0.998 with 20 leaves. Uniform random vectors are the worst case: recall@10 0.30 (0.64
  # scanning 18% of the leaves). Reordering decides recall@k: 2.5k exactly re-scored candidates gave recall@200
  # 0.999 where 200 gave 0.88, and 100 gave recall@10 1.0 where 25 gave 0.86. A 250k-row training sample keeps the
  # 1.28M build near 40 s. Two dimensions per block and threshold 0.2 follow ScaNN's README for dot products.
  num_leaves = int(round(math.sqrt(num_rows)))
  return IndexSettings(kind="tree_ah", num_leaves=num_leaves, num_leaves_to_search=max(20, num_leaves // 25),
                       training_sample_size=min(num_rows, 250_000), dimensions_per_block=2,
                       anisotropic_threshold=0.2, reorder=_reorder_for(k))


def _reorder_for(k: int) -> int:
  return max(100, math.ceil(2.5 * k))


def scann_available() -> bool:
  """Whether the scann package is installed (without importing it, and so TensorFlow)."""
  try:
    return importlib.util.find_spec("scann") is not None
  except (ImportError, ValueError):  # A finder that refuses it, or a module entry set to None.
    return False


def _import_scann():
  try:
    from scann.scann_ops.py import scann_ops_pybind
  except ImportError as e:
    raise ImportError(f"building or loading a ScaNN searcher needs scann: pip install 'tf-instdisc[scann]' "
                      f"({e})") from e
  return scann_ops_pybind


def build_searcher(embeddings: np.ndarray, settings: IndexSettings, *, k: int = 10):
  """A ScaNN dot-product searcher over the collection.

  Args:
    embeddings: [N, D] float32, unit L2 norm rows; N >= 1.
    settings: from choose_settings (or tuned by hand).
    k: the searcher's default neighbours per query (search always passes its own k).

  Returns:
    A scann_ops_pybind.ScannSearcher; search it with `search`.
  """
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  if embeddings.ndim != 2 or not len(embeddings):
    raise ValueError(f"embeddings: expected a non-empty [N, D] array, got shape {embeddings.shape}")
  num_rows = len(embeddings)
  builder = _import_scann().builder(embeddings, min(k, num_rows), "dot_product")
  if settings.kind == "brute_force":
    return builder.score_brute_force().build()
  sample = min(settings.training_sample_size, num_rows)
  return (builder.tree(num_leaves=min(settings.num_leaves, num_rows),
                       num_leaves_to_search=settings.num_leaves_to_search, training_sample_size=sample)
          .score_ah(settings.dimensions_per_block, anisotropic_quantization_threshold=settings.anisotropic_threshold,
                    training_sample_size=sample)
          .reorder(settings.reorder).build())


def _config_int(config: str, field: str, default: int) -> int:
  match = re.search(rf"\b{field}: (\d+)", config)
  return int(match.group(1)) if match else default


def search(searcher, queries: np.ndarray, k: int, *, settings: IndexSettings | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest collection rows of each query, by the searcher.

  ScaNN pads a result with id 0 and score NaN when it has fewer than k candidates, so here the candidates before
  reordering are at least max(2.5k, 100) (recall@k needs that many), and queries whose searched leaves held fewer
  than k rows are searched again over every leaf: every returned id is a real neighbour.

  Args:
    searcher: from build_searcher or load_searcher.
    queries: [Q, D] float32, unit L2 norm.
    k: neighbours per query, clipped to N.
    settings: its num_leaves_to_search and reorder are used (tree_ah; they may differ from the build's, to tune
      without rebuilding); default: the searcher's own.

  Returns:
    (ids int64 [Q, k] in [0, N), scores float32 [Q, k] dot products, descending).
  """
  queries = np.ascontiguousarray(queries, np.float32)
  num_rows = searcher.size()
  k = min(int(k), num_rows)
  if queries.ndim != 2 or k < 1:
    raise ValueError(f"search: expected queries [Q, D] and k >= 1, got shape {queries.shape} and k={k}")
  if not len(queries):
    return np.zeros([0, k], np.int64), np.zeros([0, k], np.float32)
  config = searcher.config()
  is_tree = settings.kind == "tree_ah" if settings else "partitioning {" in config
  reorder = settings.reorder if settings else _config_int(config, "approx_num_neighbors", 0)
  leaves = settings.num_leaves_to_search if settings and is_tree else None
  pre_reorder = min(max(reorder, _reorder_for(k)), num_rows)
  ids, scores = (np.array(a) for a in searcher.search_batched(queries, k, pre_reorder, leaves))
  short = np.isnan(scores).any(axis=1)
  if short.any() and is_tree:
    all_leaves = _config_int(config, "num_children", 1)
    ids[short], scores[short] = searcher.search_batched(queries[short], k, pre_reorder, all_leaves)
  if np.isnan(scores).any():
    raise RuntimeError(f"search: ScaNN returned fewer than k={k} neighbours for some queries")
  return ids.astype(np.int64), scores.astype(np.float32)


def exact_search(queries: np.ndarray, keys: np.ndarray, k: int, *, chunk_size: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product in NumPy: matmul and argpartition per chunk of keys, then a merge.

  Args:
    queries: [Q, D] float32, unit L2 norm.
    keys: [N, D] float32, unit L2 norm.
    k: neighbours per query, clipped to N.
    chunk_size: keys scored at once (with up to 2^24 / chunk_size queries: ~64 MB of scores).

  Returns:
    (ids int64 [Q, k] in [0, N), scores float32 [Q, k]): by score descending, ties by id ascending.
  """
  queries, keys = np.asarray(queries, np.float32), np.asarray(keys, np.float32)
  k = min(int(k), len(keys))
  ids, scores = np.zeros([len(queries), k], np.int64), np.zeros([len(queries), k], np.float32)
  query_block = max(1, (1 << 24) // chunk_size)
  for first in range(0, len(queries), query_block):
    block = queries[first:first + query_block]
    best_ids, best_scores = np.zeros([len(block), 0], np.int64), np.zeros([len(block), 0], np.float32)
    for start in range(0, len(keys), chunk_size):
      chunk_ids, chunk_scores = _top_k_unsorted(block @ keys[start:start + chunk_size].T, k)  # [block, <= k]
      best_ids, best_scores = _top_k_unsorted(np.concatenate([best_scores, chunk_scores], 1), k,
                                              np.concatenate([best_ids, chunk_ids + start], 1))
    order = np.lexsort((best_ids, -best_scores), axis=1)
    ids[first:first + len(block)] = np.take_along_axis(best_ids, order, 1)
    scores[first:first + len(block)] = np.take_along_axis(best_scores, order, 1)
  return ids, scores


def _top_k_unsorted(scores: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids, scores) of the k best columns of each row, unordered; ids default to the column numbers."""
  columns = (np.argpartition(scores, -k, axis=1)[:, -k:] if scores.shape[1] > k
             else np.broadcast_to(np.arange(scores.shape[1]), scores.shape))
  return (columns if ids is None else np.take_along_axis(ids, columns, 1)), np.take_along_axis(scores, columns, 1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
  """Mean over queries of |found ∩ true| / k, with k = true_ids.shape[1].

  Args:
    found_ids: [Q, k'] int ids from an approximate search.
    true_ids: [Q, k] int ids of the exact top k (e.g. exact_search).
  """
  found_ids, true_ids = np.asarray(found_ids, np.int64), np.asarray(true_ids, np.int64)
  if found_ids.ndim != 2 or true_ids.ndim != 2 or len(found_ids) != len(true_ids) or not true_ids.size:
    raise ValueError(f"recall_at_k: expected [Q, k'] and [Q, k] ids, got {found_ids.shape} and {true_ids.shape}")
  # One id space over all queries (row * stride + id), so one set intersection counts every row's hits.
  stride = int(max(found_ids.max(), true_ids.max())) + 2
  rows = np.arange(len(true_ids))[:, None] * stride
  hits = np.intersect1d(rows + found_ids + 1, rows + true_ids + 1).size
  return hits / true_ids.size


def check_recall_target(value: float, name: str = "recall_target") -> float:
  """value if 0 < value <= 1, else ValueError naming `name` (a flag or an argument)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise ValueError(f"{name}: got {value!r}, expected a recall@{TUNE_K} target with 0 < target <= 1")
  return float(value)


def tune(searcher, embeddings: np.ndarray, queries: np.ndarray, settings: IndexSettings, *,
         target: float = RECALL_TARGET, seconds: float = TUNE_SECONDS) -> tuple[Any, IndexSettings, dict[str, Any]]:
  """Raises a tree_ah searcher's search-time settings until recall@10 on `queries` reaches `target`.

  Recall@10 is measured against exact_search. Starting from `settings` (the build's, e.g. choose_settings'), each
  step searches the queries once: first reorder is doubled (cheap: an exact dot product per candidate) while a
  doubling gains at least _REORDER_MIN_GAIN recall, at most _REORDER_STEPS times past the start; when it stops
  helping, num_leaves_to_search is doubled (the expensive part: every row of a leaf is scored), up to every leaf.
  Neither needs a rebuild (`search` passes both to ScaNN per call). The first setting that meets the target wins.
  If none does once every leaf is searched, or `seconds` have passed (the first measurement always runs), the
  searcher is rebuilt as exact brute force. A brute-force searcher is measured only.

  Args:
    searcher: from build_searcher(embeddings, settings).
    embeddings: [N, D] float32, the searcher's collection.
    queries: [Q, D] float32 unit-norm held-out queries; Q >= 1.
    settings: the searcher's build settings.
    target: recall@10 to reach, 0 < target <= 1.
    seconds: time budget for the settings after the first.

  Returns:
    (searcher: the given one, or a brute-force rebuild; the settings to search it with; a record: recall_target,
    recall_at_10 (of the chosen settings), fell_back (to brute force), stopped (why), tried (each setting's
    num_leaves_to_search, reorder, recall_at_10 and seconds, in order), seconds (spent tuning), budget_seconds).
  """
  target = check_recall_target(target)
  if np.ndim(queries) != 2 or not len(queries):
    raise ValueError(f"tune: expected queries [Q, D] with Q >= 1, got shape {np.shape(queries)}")
  start = time.monotonic()
  recall_k = min(TUNE_K, len(embeddings))
  true_ids, _ = exact_search(queries, embeddings, recall_k)
  tried = []

  def measure(candidate: IndexSettings, on=None) -> float:
    begin = time.monotonic()
    found, _ = search(on or searcher, queries, recall_k, settings=candidate)
    recall = round(float(recall_at_k(found, true_ids)), 4)
    tried.append({"kind": candidate.kind, "num_leaves_to_search": candidate.num_leaves_to_search,
                  "reorder": candidate.reorder, "recall_at_10": recall,
                  "seconds": round(time.monotonic() - begin, 3)})
    return recall

  def record(recall: float, stopped: str, fell_back: bool = False) -> dict[str, Any]:
    return {"recall_target": target, "recall_at_10": recall, "fell_back": fell_back, "stopped": stopped,
            "tried": tried, "seconds": round(time.monotonic() - start, 2), "budget_seconds": seconds}

  recall = measure(settings)
  if settings.kind == "brute_force":
    return searcher, settings, record(recall, "brute force: exact, nothing to tune")
  all_leaves = min(settings.num_leaves, len(embeddings))
  max_reorder = min(settings.reorder << _REORDER_STEPS, len(embeddings))
  current, reorder_helps = settings, True
  while recall < target:
    if time.monotonic() - start >= seconds:
      stopped = f"time budget of {seconds:g} s spent below the target"
      break
    if reorder_helps and current.reorder < max_reorder:
      candidate = dataclasses.replace(current, reorder=min(2 * current.reorder, max_reorder))
      candidate_recall = measure(candidate)
      reorder_helps = candidate_recall - recall >= _REORDER_MIN_GAIN
      if reorder_helps or candidate_recall >= target:
        current, recall = candidate, candidate_recall
      continue
    if current.num_leaves_to_search >= all_leaves:
      stopped = f"every leaf ({all_leaves}) searched below the target"
      break
    current = dataclasses.replace(current, num_leaves_to_search=min(max(2 * current.num_leaves_to_search, 1),
                                                                    all_leaves))
    recall, reorder_helps = measure(current), True
  else:
    return searcher, current, record(recall, "target met")
  exact = IndexSettings(kind="brute_force")
  begin = time.monotonic()
  brute_force = build_searcher(embeddings, exact, k=recall_k)
  build_seconds = round(time.monotonic() - begin, 2)
  info = record(measure(exact, brute_force), stopped, fell_back=True)
  info["fallback_build_seconds"] = build_seconds
  return brute_force, exact, info


def _file_facts(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    return {"bytes": os.path.getsize(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def save_searcher(searcher, directory: str) -> None:
  """Writes the searcher's files and then MANIFEST_FILE (their sizes and SHA-256s) into directory.

  Asset paths are stored relative to the directory, so it can be moved or copied (ScaNN's default records them
  relative to the current working directory). A save cut short leaves no manifest, so load_searcher refuses it.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST_FILE)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  searcher.serialize(directory, relative_path=True)
  with open(os.path.join(directory, _FIXED_FILES[0])) as f:
    assets = re.findall(r'asset_path: "([^"]+)"', f.read())
  files = {name: _file_facts(os.path.join(directory, name)) for name in sorted({*_FIXED_FILES, *assets})}
  with open(manifest_path + ".tmp", "w") as f:
    json.dump({"format": "tf_instdisc.index/1", "files": files}, f, indent=1)
  os.replace(manifest_path + ".tmp", manifest_path)


def _check_files(directory: str) -> None:
  """Raises ValueError unless directory holds a complete save_searcher output, byte for byte."""
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: no such index directory")
  try:
    with open(os.path.join(directory, MANIFEST_FILE)) as f:
      files = json.load(f)["files"]
    expected = {name: (int(facts["bytes"]), str(facts["sha256"])) for name, facts in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{directory}: not a complete index ({MANIFEST_FILE} missing or unreadable: {e})") from e
  if os.path.exists(os.path.join(directory, _DOCIDS_FILE)):
    raise ValueError(f"{directory}: holds {_DOCIDS_FILE}, which save_searcher never writes")
  for name, (size, digest) in expected.items():
    path = os.path.join(directory, name)
    if os.path.dirname(name) or not os.path.isfile(path):
      raise ValueError(f"{directory}: index file {name} is missing")
    # ScaNN loads a file with flipped bytes without complaint (and answers wrongly): check every byte first.
    if _file_facts(path) != {"bytes": size, "sha256": digest}:
      raise ValueError(f"{directory}: index file {name} is corrupt (size or SHA-256 differs from {MANIFEST_FILE})")


def load_searcher(directory: str):
  """Loads a searcher written by save_searcher, after checking every file against its manifest.

  Raises:
    ValueError: naming the directory when it is missing, incomplete or corrupt, or ScaNN cannot load it.
    ImportError: when scann is not installed.
  """
  directory = os.path.abspath(directory)
  _check_files(directory)
  scann_ops_pybind = _import_scann()
  try:
    # No backcompat shim: without scann_assets.pbtxt ScaNN would guess the layout and write a new file here.
    return scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
  except Exception as e:  # ScaNN raises RuntimeError, IndexError or UnicodeDecodeError for bad files.
    raise ValueError(f"{directory}: ScaNN cannot load the index: {type(e).__name__}: {e}") from e
