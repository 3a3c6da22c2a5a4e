"""Queries/s and recall of exact TF, exact NumPy and ScaNN search (heuristic and tuned), and the embed latency.

  python bench/retrieval_bench.py --export_dir=E       # Fashion-MNIST export E + the synthetic 1.28M collection
  python bench/retrieval_bench.py                      # the synthetic collection only (no export yet)
  python bench/retrieval_bench.py --collections=synthetic,uniform   # add the uniform-random worst case
  python bench/retrieval_bench.py --quick              # a CI smoke run (30k rows, 200 queries)

Per collection, in one process: (a) exact TF search (tf.matmul + tf.math.top_k over the whole collection in a
tf.function, --tf_batch_size queries at a time), (b) NumPy index.exact_search, which is also the ground truth, and
(c) the ScaNN searcher of index.choose_settings (build time, size on disk, load time) and (c') the same searcher
tuned by index.tune to recall@10 >= --recall_target on --tune_queries separate queries, as export/export.py does
(or brute force, when the tuning falls back). Each at k = 10 and k = 200: queries/s (median of --repeats passes;
NumPy one pass), recall against (b), and the speedup over (a). Collections:
`fashion_mnist` (E/index/embeddings.npy, queried by the Fashion-MNIST test images embedded through the export's
SavedModel), `synthetic` (clustered unit vectors, a stand-in for ImageNet embeddings) and `uniform` (random unit
vectors, the worst case). With an export, (d) the serving_default latency per batch size. TensorFlow is imported
inside functions, after the flags are checked. Results: a Markdown table on stdout and JSON in --output.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from tf_instdisc import index

COLLECTIONS = ("fashion_mnist", "synthetic", "uniform")
KS = (10, 200)
# --quick replaces these defaults (flags given on the command line still win).
QUICK_DEFAULTS = {"num_rows": 30_000, "num_queries": 200, "num_classes": 100, "fashion_queries": 500, "repeats": 1,
                  "tune_queries": 200,
                  "embed_batch_sizes": ["1", "8"], "embed_repeats": 3}

flags.DEFINE_bool("quick", False, f"CI smoke run: {QUICK_DEFAULTS} unless given explicitly.")
flags.DEFINE_list("collections", ["fashion_mnist", "synthetic"], f"Any of {', '.join(COLLECTIONS)}.")
flags.DEFINE_string("export_dir", "", "An export (E/index/embeddings.npy, E/saved_model/<version>/); empty: the "
                    "fashion_mnist collection is skipped.")
flags.DEFINE_string("fashion_images", "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
                    "IDX file of the query images for fashion_mnist (uint8 [Q, 28, 28]).")
flags.DEFINE_integer("fashion_queries", 10_000, "Test images used as fashion_mnist queries (at most the file's).")
flags.DEFINE_integer("num_rows", 1_281_167, "Rows of the synthetic and uniform collections (ImageNet's train size).")
flags.DEFINE_integer("dim", 128, "Embedding size of the synthetic and uniform collections.")
flags.DEFINE_integer("num_queries", 2_000, "Queries of the synthetic and uniform collections (not in them).")
flags.DEFINE_integer("num_classes", 1_000, "synthetic: class centres ...")
flags.DEFINE_integer("subclusters", 10, "... each with this many sub-centres ...")
flags.DEFINE_float("class_noise", 0.7, "... at this noise around the class centre ...")
flags.DEFINE_float("point_noise", 0.5, "... and rows at this noise around a sub-centre (noise / sqrt(dim) per dim).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic and uniform data.")
flags.DEFINE_integer("tf_batch_size", 256, "Queries per tf.matmul + top_k call of exact TF search.")
flags.DEFINE_integer("repeats", 3, "Timed passes over the queries for TF and ScaNN (median); NumPy runs once.")
flags.DEFINE_list("scann_overrides", [], "IndexSettings fields to override, e.g. num_leaves_to_search=40,reorder=800.")
flags.DEFINE_float("recall_target", index.RECALL_TARGET, "scann_tuned: recall@10 that index.tune must reach on the "
                   "tuning queries (0 < target <= 1).")
flags.DEFINE_float("tune_seconds", index.TUNE_SECONDS, "scann_tuned: index.tune's time budget.")
flags.DEFINE_integer("tune_queries", 1_000, "scann_tuned: queries to tune on, apart from the measured ones (synthetic "
                     "and uniform: drawn the same way; fashion_mnist: the test images after --fashion_queries, else "
                     "a seeded sample of collection rows).")
flags.DEFINE_list("embed_batch_sizes", ["1", "8", "64", "256"], "Batch sizes of the serving_default latency.")
flags.DEFINE_integer("embed_repeats", 20, "Timed serving_default calls per batch size (median).")
flags.DEFINE_string("output", "bench/results/retrieval.json", "JSON results file.")
FLAGS = flags.FLAGS


def _apply_quick_defaults() -> None:
  for name, value in QUICK_DEFAULTS.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


def parse_flags() -> tuple[list[str], dict[str, Any], list[int]]:
  """(collections, ScaNN setting overrides, embed batch sizes) from the flags; raises ValueError naming the flag."""
  collections = list(FLAGS.collections)
  if not collections or set(collections) - set(COLLECTIONS):
    raise ValueError(f"--collections: got {collections}, expected a non-empty list of {', '.join(COLLECTIONS)}")
  types = {field.name: field.type for field in dataclasses.fields(index.IndexSettings)}
  numeric, overrides = sorted(set(types) - {"kind"}), {}
  for item in FLAGS.scann_overrides:
    name, _, value = item.partition("=")
    try:
      if name not in numeric:
        raise ValueError(f"not one of {numeric}")
      overrides[name] = float(value) if types[name] in (float, "float") else int(value)
    except ValueError as e:
      raise ValueError(f"--scann_overrides: {item!r} is not field=value ({e})") from e
  try:
    batch_sizes = [int(v) for v in FLAGS.embed_batch_sizes]
  except ValueError as e:
    raise ValueError(f"--embed_batch_sizes: expected integers, got {FLAGS.embed_batch_sizes}") from e
  for name in ("num_rows", "dim", "num_queries", "fashion_queries", "num_classes", "subclusters", "tf_batch_size",
               "repeats", "embed_repeats", "tune_queries"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name}: must be >= 1")
  index.check_recall_target(FLAGS.recall_target, "--recall_target")
  if not FLAGS.tune_seconds >= 0:
    raise ValueError(f"--tune_seconds: got {FLAGS.tune_seconds}, expected seconds >= 0")
  if min(batch_sizes, default=0) < 1:
    raise ValueError("--embed_batch_sizes: must be a non-empty list of integers >= 1")
  return collections, overrides, batch_sizes


class CpuMeter:
  """CPU use of other processes while we measure: (all CPUs' busy time - ours) / wall time, in cores."""

  def __init__(self):
    self.start = self._sample()

  @staticmethod
  def _sample() -> tuple[float, float, float]:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal (not idle, iowait).
    own = os.times()
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

  def other_cores(self) -> float:
    (wall0, busy0, own0), (wall1, busy1, own1) = self.start, self._sample()
    return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9), 2)


def machine_facts() -> dict[str, Any]:
  import importlib.metadata

  import tensorflow as tf

  with open("/proc/cpuinfo") as f:
    models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": models[0] if models else platform.processor(),
      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
      "tensorflow": tf.__version__, "numpy": np.__version__, "scann": importlib.metadata.version("scann"),
  }


def _unit(rows: np.ndarray) -> np.ndarray:
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_synthetic(num_rows: int, num_queries: int, *, uniform: bool, tune_queries: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(collection [N, D], queries [Q, D], tuning queries [T, D], description): float32 unit rows; the queries drawn
  the same way, not in N; the tuning queries drawn after everything else (so N and Q do not depend on T)."""
  rng = np.random.default_rng(FLAGS.seed)
  dim = FLAGS.dim
  if uniform:
    rows = _unit(rng.standard_normal([num_rows + num_queries, dim], np.float32))
    tune = _unit(rng.standard_normal([tune_queries, dim], np.float32))
    return rows[:num_rows], rows[num_rows:], tune, f"uniform random unit vectors (worst case), seed {FLAGS.seed}"
  classes = _unit(rng.standard_normal([FLAGS.num_classes, dim], np.float32))
  centres = _unit(np.repeat(classes, FLAGS.subclusters, 0) + FLAGS.class_noise / np.sqrt(dim) *
                  rng.standard_normal([FLAGS.num_classes * FLAGS.subclusters, dim], np.float32))
  rows = np.empty([num_rows + num_queries, dim], np.float32)
  tune = np.empty([tune_queries, dim], np.float32)
  for part in [rows[start:start + (1 << 18)] for start in range(0, len(rows), 1 << 18)] + [tune]:
    # In slices: the noise of all rows at once would double the memory.
    part[:] = _unit(centres[rng.integers(0, len(centres), len(part))] + FLAGS.point_noise / np.sqrt(dim) *
                    rng.standard_normal(part.shape, np.float32))
  description = (f"SYNTHETIC stand-in for ImageNet embeddings (not learned): {FLAGS.num_classes:,} class centres x "
                 f"{FLAGS.subclusters} sub-centres, class noise {FLAGS.class_noise}, point noise "
                 f"{FLAGS.point_noise}, seed {FLAGS.seed}")
  return rows[:num_rows], rows[num_rows:], tune, description


def _saved_model_dir(export_dir: str) -> str:
  versions = [path for path in glob.glob(os.path.join(export_dir, "saved_model", "*")) if
              os.path.basename(path).isdigit()]
  if not versions:
    raise ValueError(f"--export_dir: no {export_dir}/saved_model/<version>/")
  return max(versions, key=lambda path: int(os.path.basename(path)))


def load_fashion(export_dir: str, batch_sizes: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str, dict[str, Any]]:
  """(collection, queries, tuning queries or None, description, embed latency) from an export and the Fashion-MNIST
  test images: the first --fashion_queries are measured, the next --tune_queries (if the file has them) tune."""
  import tensorflow as tf

  from tf_instdisc import data

  collection = np.load(os.path.join(export_dir, "index", "embeddings.npy"))
  images = data.read_idx(FLAGS.fashion_images)[:FLAGS.fashion_queries + FLAGS.tune_queries]
  images = images.astype(np.float32)[..., None]  # [Q + T, 28, 28, 1]
  saved_model = _saved_model_dir(export_dir)
  embed = tf.saved_model.load(saved_model).signatures["serving_default"]
  start = time.perf_counter()
  queries = np.concatenate([embed(images=tf.constant(images[i:i + 256]))["embeddings"].numpy()
                            for i in range(0, len(images), 256)])
  embed_seconds = time.perf_counter() - start
  queries, tune = queries[:FLAGS.fashion_queries], queries[FLAGS.fashion_queries:]
  images = images[:FLAGS.fashion_queries]
  latency = {"saved_model": saved_model, "embed_all_queries_seconds": embed_seconds,
             "embedded_images": len(queries) + len(tune), "batches": []}
  for batch_size in batch_sizes:
    batch = tf.constant(np.resize(images, [batch_size, *images.shape[1:]]))
    for _ in range(2):
      embed(images=batch)
    times = []
    for _ in range(FLAGS.embed_repeats):
      start = time.perf_counter()
      embed(images=batch)["embeddings"].numpy()
      times.append(time.perf_counter() - start)
    median_ms = 1000 * statistics.median(times)
    latency["batches"].append({"batch_size": batch_size, "median_ms_per_batch": median_ms,
                               "ms_per_image": median_ms / batch_size, "calls": len(times)})
  description = (f"learned Fashion-MNIST train embeddings from {export_dir}; queries: {len(queries):,} test images "
                 f"embedded through {saved_model} (serving_default)")
  return collection, queries, tune if len(tune) else None, description, latency


def _timed(search, queries: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
  """(ids of the last pass, median queries/s over the passes)."""
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    ids = search(queries)
    seconds.append(time.perf_counter() - start)
  return ids, len(queries) / statistics.median(seconds)


def make_tf_search(collection: np.ndarray, k: int):
  """Exact search in TF: one tf.function of matmul + top_k over the whole collection per query batch."""
  import tensorflow as tf

  keys = tf.constant(collection)

  @tf.function(input_signature=[tf.TensorSpec([None, collection.shape[1]], tf.float32)])
  def top_k(batch):
    return tf.math.top_k(tf.matmul(batch, keys, transpose_b=True), k=min(k, len(collection))).indices

  def search(queries: np.ndarray) -> np.ndarray:
    return np.concatenate([top_k(tf.constant(queries[i:i + FLAGS.tf_batch_size])).numpy()
                           for i in range(0, len(queries), FLAGS.tf_batch_size)])
  search(queries=collection[:1])  # Trace.
  return search


def measure(collection: np.ndarray, queries: np.ndarray, overrides: dict[str, Any], tune_queries: np.ndarray | None
            = None) -> dict[str, Any]:
  """The methods on one collection: per method and k, queries/s and recall against NumPy exact search.

  scann_tuned is scann after index.tune on tune_queries (default: a seeded sample of --tune_queries collection
  rows, each of which finds itself, as export/export.py does without held-out queries).
  """
  meter = CpuMeter()
  methods = {name: {} for name in ("tf_exact", "numpy_exact", "scann", "scann_tuned")}
  index.exact_search(queries[:8], collection, max(KS))  # Warm up (BLAS threads, first touch of the pages).
  for k in KS:
    methods["numpy_exact"][k] = _timed(lambda q, k=k: index.exact_search(q, collection, k)[0], queries, 1)
    methods["tf_exact"][k] = _timed(make_tf_search(collection, k), queries, FLAGS.repeats)
  truth = methods["numpy_exact"][max(KS)][0]  # [Q, 200]; its first k columns are the exact top k.
  settings = dataclasses.replace(index.choose_settings(len(collection), k=max(KS)), **overrides)
  start = time.perf_counter()
  searcher = index.build_searcher(collection, settings, k=max(KS))
  scann_facts = {"settings": settings.to_dict(), "build_seconds": time.perf_counter() - start}
  scann_facts.update(_save_and_load(searcher))
  for k in KS:
    index.search(searcher, queries[:100], k, settings=settings)  # Warm up.
    methods["scann"][k] = _timed(lambda q, k=k: index.search(searcher, q, k, settings=settings)[0], queries,
                                 FLAGS.repeats)
  tune_from = "separate queries drawn like the measured ones"
  if tune_queries is None:
    rows = np.random.default_rng(FLAGS.seed).permutation(len(collection))[:FLAGS.tune_queries]
    tune_queries, tune_from = collection[rows], "a seeded sample of collection rows (each finds itself)"
  tuned, tuned_settings, tuning = index.tune(searcher, collection, tune_queries, settings,
                                             target=FLAGS.recall_target, seconds=FLAGS.tune_seconds)
  tuned_facts = {"settings": tuned_settings.to_dict(), "tuning": tuning, "tune_queries": len(tune_queries),
                 "tune_queries_from": tune_from}
  for k in KS:
    index.search(tuned, queries[:100], k, settings=tuned_settings)  # Warm up.
    methods["scann_tuned"][k] = _timed(lambda q, k=k: index.search(tuned, q, k, settings=tuned_settings)[0],
                                       queries, FLAGS.repeats)
  rows = []
  for name, per_k in methods.items():
    row = {"method": name}
    for k in KS:
      ids, rate = per_k[k]
      row[f"k{k}"] = {"queries_per_sec": rate, "ms_per_query": 1000 / rate,
                      "recall": index.recall_at_k(ids, truth[:, :k]),
                      "speedup_vs_tf_exact": rate / methods["tf_exact"][k][1]}
    rows.append(row)
  return {"num_rows": len(collection), "dim": collection.shape[1], "num_queries": len(queries), "methods": rows,
          "scann": scann_facts, "scann_tuned": tuned_facts, "other_processes_cores": meter.other_cores()}


def _save_and_load(searcher) -> dict[str, Any]:
  directory = tempfile.mkdtemp(prefix="retrieval_bench_")
  try:
    start = time.perf_counter()
    index.save_searcher(searcher, directory)
    save_seconds = time.perf_counter() - start
    files = {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}
    start = time.perf_counter()
    index.load_searcher(directory)
    return {"save_seconds": save_seconds, "load_seconds": time.perf_counter() - start,
            "index_bytes": sum(files.values()), "files_bytes": files}
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def run_collection(name: str, overrides: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
  """One collection's row group: its data, then `measure`; or why it was skipped."""
  from absl import logging

  if name == "fashion_mnist" and not FLAGS.export_dir:
    return {"collection": name, "skipped": "no --export_dir (an export of export/export.py) given"}
  start = time.perf_counter()
  latency = None
  if name == "fashion_mnist":
    collection, queries, tune_queries, description, latency = load_fashion(FLAGS.export_dir, batch_sizes)
  else:
    collection, queries, tune_queries, description = make_synthetic(
        FLAGS.num_rows, FLAGS.num_queries, uniform=name == "uniform", tune_queries=FLAGS.tune_queries)
  logging.info("%s: %s x %d collection, %d queries (%.0f s to make)", name, f"{len(collection):,}",
               collection.shape[1], len(queries), time.perf_counter() - start)
  result = {"collection": name, "description": description,
            **measure(collection, queries, overrides, tune_queries)}
  if latency is not None:
    result["embed_latency"] = latency
  return result


def markdown(report: dict[str, Any]) -> str:
  lines = [("| collection | method | q/s k=10 | ms/query k=10 | recall@10 | q/s k=200 | recall@200 | "
            "speedup vs TF exact (k=10 / k=200) |"), "|---|---|--:|--:|--:|--:|--:|--:|"]
  notes = []
  for group in report["results"]:
    name = group["collection"]
    if "skipped" in group:
      lines.append(f"| {name} | skipped: {group['skipped']} | | | | | | |")
      continue
    if "error" in group:
      lines.append(f"| {name} | error: {group['error'][:100]} | | | | | | |")
      continue
    for row in group["methods"]:
      small, large = row["k10"], row["k200"]
      lines.append(f"| {name} {group['num_rows']:,}x{group['dim']} | {row['method']} | "
                   f"{small['queries_per_sec']:,.0f} | {small['ms_per_query']:.3f} | {small['recall']:.4f} | "
                   f"{large['queries_per_sec']:,.0f} | {large['recall']:.4f} | "
                   f"{small['speedup_vs_tf_exact']:.1f}x / {large['speedup_vs_tf_exact']:.1f}x |")
    scann = group["scann"]
    notes.append(f"{name}: {group['description']}; {group['num_queries']:,} queries. ScaNN {scann['settings']}: "
                 f"built in {scann['build_seconds']:.1f} s, {scann['index_bytes'] / 2**20:.1f} MiB on disk "
                 f"(saved in {scann['save_seconds']:.1f} s, loaded in {scann['load_seconds']:.1f} s). Other "
                 f"processes used {group['other_processes_cores']:.2f} cores on average meanwhile.")
    tuned = group.get("scann_tuned")
    if tuned:
      tuning, chosen = tuned["tuning"], tuned["settings"]
      what = ("brute force (fell back: " + tuning["stopped"] + ")" if tuning["fell_back"] else
              f"{chosen['num_leaves_to_search']} of {chosen['num_leaves']} leaves, reorder {chosen['reorder']}"
              if chosen["kind"] == "tree_ah" else chosen["kind"])
      tried = len(tuning["tried"])
      notes.append(f"{name} scann_tuned: recall@10 target {tuning['recall_target']} on {tuned['tune_queries']:,} "
                   f"{tuned['tune_queries_from']}: {what}, recall@10 {tuning['recall_at_10']:.4f} there after "
                   f"{tried} setting{'s' if tried != 1 else ''} in {tuning['seconds']:.1f} s.")
    if "embed_latency" in group:
      notes.append("serving_default latency (" + group["embed_latency"]["saved_model"] + "): " + "; ".join(
          f"batch {b['batch_size']}: {b['median_ms_per_batch']:.2f} ms ({b['ms_per_image']:.3f} ms/image)"
          for b in group["embed_latency"]["batches"]))
  machine = report["machine"]
  notes.append(f"TF exact: tf.matmul + tf.math.top_k over the collection, {report['settings']['tf_batch_size']} "
               f"queries per call; NumPy exact (index.exact_search, one pass) is the ground truth; q/s are medians "
               f"of {report['settings']['repeats']} passes (single-threaded ScaNN search_batched).")
  notes.append(f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), TF {machine['tensorflow']}, ScaNN "
               f"{machine['scann']}, load average {machine['load_average_at_start'][0]:.2f} at start, "
               f"{report['load_average_at_end'][0]:.2f} at end; {machine['date']}.")
  return "\n".join(lines + [""] + notes)


def write_json(path: str, report: dict[str, Any]) -> dict[str, Any]:
  """Atomically, after every collection, so a long run stopped midway keeps what it measured."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  from tf_instdisc import checkpointing  # Imports TensorFlow: only once measuring has begun.

  report = {**report, "load_average_at_end": list(os.getloadavg())}
  checkpointing.write_json_atomic(path, report)
  return report


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.quick:
    _apply_quick_defaults()
  try:
    collections, overrides, batch_sizes = parse_flags()
    if FLAGS.export_dir and "fashion_mnist" in collections:
      _saved_model_dir(FLAGS.export_dir)
  except ValueError as e:
    print(f"retrieval_bench.py: {e}", file=sys.stderr)
    return 2
  from absl import logging

  settings = {name: FLAGS[name].value for name in
              ("quick", "collections", "export_dir", "fashion_images", "fashion_queries", "num_rows", "dim",
               "num_queries", "num_classes", "subclusters", "class_noise", "point_noise", "seed", "tf_batch_size",
               "repeats", "scann_overrides", "recall_target", "tune_seconds", "tune_queries", "embed_batch_sizes",
               "embed_repeats")}
  report = {"benchmark": "retrieval", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": machine_facts(), "settings": settings, "ks": list(KS), "results": []}
  errors = 0
  for name in collections:
    logging.info("collection %s", name)
    try:
      report["results"].append(run_collection(name, overrides, batch_sizes))
    except Exception as e:  # noqa: BLE001 - one failed collection (e.g. out of memory) must not lose the others.
      errors += 1
      report["results"].append({"collection": name, "error": f"{type(e).__name__}: {e}"})
      logging.exception("%s failed", name)
    report = write_json(FLAGS.output, report)
  print(markdown(report))
  print(f"\nResults: {FLAGS.output}")
  return 1 if errors else 0


if __name__ == "__main__":
  app.run(main)
