"""The recipe levers and the options beyond the paper, each a train.py variant at about the same wall-clock budget.

  python bench/recipe_ablation.py --root=/tmp/recipe --variants=all
  python bench/recipe_ablation.py --root=/tmp/recipe --variants=paper_recipe,two_views --output=docs/recipe_ablation

Every variant is `train.py --flagfile=fashion_mnist.flags --validation_examples=5000 --monitor_examples=1000` plus
its own flags, in ROOT/<name>, with `--train_minutes=MINUTES`: each run times its own step on this machine and
trains as many epochs as fit in --minutes of training steps, so every variant gets the same wall-clock budget here
(a cheaper step buys more epochs). A variant with `same_epochs_as` (the precision check) trains instead the epochs
that variant's run chose, and with --epochs_of=NAME every variant but NAME trains the epochs NAME's run chose
(equal epochs, for levers that leave an epoch's cost alone); a variant whose epoch costs more (two views, the exact
softmax: its `cost`) trains that many epochs divided by its cost instead (equal compute). --epochs=N makes the runs
without such a source train N epochs instead of --minutes (the same work on any host). The table shows the epochs
and the wall time each really took. Each run is then scored by `evaluate.py --protocol=knn --knn_k=10,20,50,200`
on the 5,000 held-out train images (never the test set): embedding, pooled backbone and raw pixels. A rerun skips
finished runs and evaluations. Writes OUTPUT.md (a table), OUTPUT.json and OUTPUT.png (the bank-kNN monitor against
wall minutes; against epochs when every variant but one trains its epochs: --epochs_of, or bfloat16 beside
paper_recipe).

--seeds=0,1,2 trains every variant once per seed (train.py --seed: the initialisation, bank, negatives, shuffling
and augmentation; the held-out images stay the same draw), seed 0 in ROOT/<name>, seed S in ROOT/<name>.seedS, and
a seed-S run takes its epochs from the seed-S run of its source. The table then adds each variant's mean and
sample standard deviation over its seeds: on this project's 2-core CPU three seeds of the same flags spanned up to
a point at one k (docs/recipe_ablation.md), more than most levers move, so a lever is chosen on the means.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from tf_instdisc import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (10, 20, 50, 200)
MONITOR_EXAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  lever: str  # What it changes against paper_recipe, for the table.
  flags: tuple[str, ...] = ()
  source: str = ""
  same_epochs_as: str = ""  # Train the epochs this variant's run chose, not a time budget.
  # Compute of one epoch relative to the base's, measured on this project's CPUs: a variant that trains another
  # run's epochs (--epochs_of) trains round(epochs / cost) of them, the same compute as that run.
  cost: float = 1.0


TWO_VIEWS = ("--views=2",)
# Two views: two forward-backward passes per image, 1.86x the base's seconds per epoch in the run of 2026-12-06.
TWO_VIEWS_COST = 2.0
VARIANTS = {v.name: v for v in (
    # The name is historic: this row is --base_flagfile as it stands (NCE; crops >= 80% since 1dc382b, >= 90% now), the
    # row every other variant changes; variants whose flags the base already sets (nce, crops_0.8) repeat it.
    Variant("paper_recipe", "the base flagfile as it stands (every other row changes it)"),
    Variant("two_views", "--views=2 (symmetric two-view loss)", TWO_VIEWS, "Ye et al., CVPR 2019",
            cost=TWO_VIEWS_COST),
    Variant("group", "--group_clusters=32 (CLD-style group term against the bank rows' groups, one view)",
            ("--group_clusters=32",), "after Wang et al., CVPR 2021"),
    Variant("two_views_group", "--views=2 --group_clusters=32 (CLD-style group term)",
            (*TWO_VIEWS, "--group_clusters=32"), "Wang et al., CVPR 2021", cost=TWO_VIEWS_COST),
    Variant("nce", "--objective=nce --num_negatives=4096 (faster steps, more epochs)",
            ("--objective=nce", "--num_negatives=4096", "--normalizer_momentum=0.9")),
    Variant("mild_crops", "--crop_scale_min=0.6 --blur_prob=0.3 --erasing_prob=0.3",
            ("--crop_scale_min=0.6", "--blur_prob=0.3", "--erasing_prob=0.3")),
    Variant("tau_0.1", "--temperature=0.1", ("--temperature=0.1",)),
    Variant("lr_0.1_warmup", "--learning_rate=0.1 --warmup_epochs=1",
            ("--learning_rate=0.1", "--warmup_epochs=1")),
    Variant("no_head_bn", "--nohead_batchnorm (the paper's linear head, no batch norm)",
            ("--nohead_batchnorm",), "Wu et al. 2018"),
    Variant("dim_256", "--embedding_dim=256", ("--embedding_dim=256",)),
    Variant("batch_128", "--batch_size=128 (twice the steps per epoch)", ("--batch_size=128",)),
    Variant("momentum_0", "--bank_momentum=0 (bank rows are the newest features)", ("--bank_momentum=0",)),
    Variant("crops_0.6", "--crop_scale_min=0.6 (milder crops alone)", ("--crop_scale_min=0.6",)),
    Variant("width_0.5", "--width_multiplier=0.5 (half the channels: 2.6x the images/s here, more epochs)",
            ("--width_multiplier=0.5",)),
    Variant("width_0.75", "--width_multiplier=0.75 (three quarters of the channels)", ("--width_multiplier=0.75",)),
    Variant("width_1.0", "--width_multiplier=1 (the full 32-64-128-256 channels: 4x the half width's conv work)",
            ("--width_multiplier=1",)),
    # Levers on top of the half-width net (what a recipe at --width_multiplier=0.5 would add).
    Variant("width_0.5_crops_0.6", "--width_multiplier=0.5 --crop_scale_min=0.6",
            ("--width_multiplier=0.5", "--crop_scale_min=0.6")),
    Variant("width_0.5_nce", "--width_multiplier=0.5 --objective=nce --num_negatives=4096",
            ("--width_multiplier=0.5", "--objective=nce", "--num_negatives=4096", "--normalizer_momentum=0.9")),
    Variant("width_0.5_tau_0.1", "--width_multiplier=0.5 --temperature=0.1",
            ("--width_multiplier=0.5", "--temperature=0.1")),
    # Levers on top of fashion_mnist.flags as it is now (half width, crops >= 60%).
    Variant("crops_0.8", "--crop_scale_min=0.8 (crops of 80-100% of the image)", ("--crop_scale_min=0.8",)),
    Variant("width_0.25", "--width_multiplier=0.25 (a quarter of the channels: more epochs again)",
            ("--width_multiplier=0.25",)),
    Variant("nce_crops_0.8", "--objective=nce --num_negatives=4096 --crop_scale_min=0.8 (the two together)",
            ("--objective=nce", "--num_negatives=4096", "--normalizer_momentum=0.9", "--crop_scale_min=0.8")),
    Variant("depth_resnet18", "--arch=resnet18_cifar --width_multiplier=0.25 (depth: 17 conv layers, not 6, "
            "at 16-128 channels)", ("--arch=resnet18_cifar", "--width_multiplier=0.25")),
    # Weaker augmentation on top of the NCE flagfile (crops >= 80%, jitter 0.4): the trend so far (30% -> 60% -> 80%)
    # is that Fashion-MNIST's classes need less invariance than ImageNet's.
    Variant("crops_0.9", "--crop_scale_min=0.9 (crops of 90-100% of the image)", ("--crop_scale_min=0.9",)),
    Variant("jitter_0", "--color_jitter=0 (no brightness or contrast jitter)", ("--color_jitter=0",)),
    Variant("jitter_0.8", "--color_jitter=0.8 (twice the brightness and contrast jitter)", ("--color_jitter=0.8",)),
    Variant("crops_1.0", "--crop_scale_min=1.0 (no crop: the whole image, flipped and jittered)",
            ("--crop_scale_min=1.0",)),
    Variant("tau_0.3", "--temperature=0.3", ("--temperature=0.3",)),
    # The bank's nearest rows as positives (after AND, Huang et al., ICML 2019) over the second half of training.
    Variant("neighbours_5", "--neighbours=5 (each image's 5 nearest bank rows as positives, weight 0.5, over the "
            "second half of the epochs)", ("--neighbours=5",), "after Huang et al., ICML 2019"),
    Variant("neighbours_1", "--neighbours=1 --neighbour_weight=1 (the nearest bank row as a positive, over the "
            "second half of the epochs)", ("--neighbours=1", "--neighbour_weight=1"), "after Huang et al., ICML 2019"),
    # On top of the flagfile with crops >= 90% (2026-12-06): the paper's exact softmax and the two-view option at
    # equal compute, head capacity, and the augmentations and bank settings not yet measured on this recipe.
    Variant("softmax", "--objective=softmax (the paper's exact softmax over the bank; 1.8x an NCE epoch here)",
            ("--objective=softmax",), "Wu et al. 2018", cost=1.75),
    Variant("mlp_head_512", "--head_hidden_dim=512 (an MLP projection head: Dense 512 -> BN -> ReLU first)",
            ("--head_hidden_dim=512",), "Chen et al. 2020 (SimCLR)"),
    Variant("no_flip", "--nohorizontal_flip (no left-right flips)", ("--nohorizontal_flip",)),
    Variant("momentum_0.8", "--bank_momentum=0.8 (bank rows move slower)", ("--bank_momentum=0.8",)),
    Variant("blur_0.25", "--blur_prob=0.25 (Gaussian blur, sigma 0.1-2 px, of a quarter of the crops)",
            ("--blur_prob=0.25",)),
    Variant("erasing_0.25", "--erasing_prob=0.25 (a random 2-25% rectangle erased in a quarter of the crops)",
            ("--erasing_prob=0.25",), "Zhong et al., AAAI 2020"),
    Variant("jitter_0.2", "--color_jitter=0.2 (half the brightness and contrast jitter)", ("--color_jitter=0.2",)),
    Variant("tau_0.15", "--temperature=0.15", ("--temperature=0.15",)),
    Variant("lr_0.06", "--learning_rate=0.06 (twice the base learning rate)", ("--learning_rate=0.06",)),
    Variant("lr_0.02", "--learning_rate=0.02 (two thirds of the base learning rate)", ("--learning_rate=0.02",)),
    Variant("lr_0.015", "--learning_rate=0.015 (half the base learning rate)", ("--learning_rate=0.015",)),
    Variant("pool_2", "--pool_grid=2 (the last stage averaged over a 2x2 grid, not all of it: 4x the features)",
            ("--pool_grid=2",)),
    Variant("pool_4", "--pool_grid=4 (the last stage's 4x4 cells kept, flattened: 16x the features)",
            ("--pool_grid=4",)),
    Variant("negatives_16384", "--num_negatives=16384 (four times the NCE noise samples)",
            ("--num_negatives=16384",)),
    Variant("wd_1e-4", "--weight_decay=1e-4 (a fifth of the weight decay)", ("--weight_decay=1e-4",)),
    Variant("bfloat16", "--mixed_precision=bfloat16 (same epochs as paper_recipe: a precision check, not a budget)",
            ("--mixed_precision=bfloat16",), same_epochs_as="paper_recipe"),
)}

flags.DEFINE_string("root", None, "Directory of the variants' runs.", required=True)
flags.DEFINE_list("variants", ["all"], f"Variants to run: all, or some of {', '.join(VARIANTS)}.")
flags.DEFINE_float("minutes", 8.0, "Training budget of every variant: train.py --train_minutes.")
flags.DEFINE_string("output", "", "OUTPUT.md and OUTPUT.json (default ROOT/recipe_ablation).")
flags.DEFINE_integer("epochs", 0, "If > 0: every run that takes its epochs from no other run (the --epochs_of run, "
                     "or all of them) trains this many epochs instead of --minutes: the same work on any host.")
flags.DEFINE_list("extra_flags", [], "train.py flags added to every variant (e.g. --mixed_precision=off).")
flags.DEFINE_string("base_flagfile", "fashion_mnist.flags", "The flagfile every variant starts from.")
flags.DEFINE_integer("validation_examples", 5000, "Train images held out to score the variants on.")
flags.DEFINE_list("seeds", ["0"], "train.py --seed of each variant's runs: one run per seed (seed S > 0 in "
                  "ROOT/<name>.seedS), and a mean and standard deviation per variant when more than one.")
flags.DEFINE_string("epochs_of", "", "A variant of --variants: it trains first, on --minutes, and every other one "
                    "then trains the epochs it chose (equal epochs, not equal minutes). For levers that leave the "
                    "cost of an epoch alone, so that the host's speed in one process or the next (1,000-1,500 "
                    "img/s on this project's 2-core EPYC for the same flags) does not decide how many epochs run.")
FLAGS = flags.FLAGS


def epochs_source(variant: Variant, epochs_of: str = "") -> str:
  """The variant whose run's epochs this one trains ("": it trains on --minutes)."""
  return variant.same_epochs_as or (epochs_of if variant.name != epochs_of else "")


def run_name(name: str, seed: int = 0) -> str:
  """The directory (under --root) of a variant's run with this --seed: the name itself for seed 0."""
  return name if seed == 0 else f"{name}.seed{seed}"


def training_order(names: list[str], root: str, epochs_of: str = "", seeds: tuple[int, ...] = (0,)) -> list[str]:
  """names with every run whose epochs another one trains moved before it.

  Raises:
    ValueError: naming --epochs_of or the variant, when the run it needs (for every seed) is neither among names
      nor in root.
  """
  sources = []
  for name in names:
    source = epochs_source(VARIANTS[name], epochs_of)
    if not source or source in sources:
      continue
    missing = [s for s in seeds if not os.path.exists(os.path.join(root, run_name(source, s), "config.json"))]
    if source not in names and missing:
      what = f"--epochs_of={epochs_of}" if source == epochs_of else f"{name} trains the epochs of {source}, which"
      runs = f" (no {', '.join(run_name(source, s) for s in missing)})" if seeds != (0,) else ""
      raise ValueError(f"{what} is not one of --variants ({', '.join(names)}) nor a finished run in --root={root}"
                       f"{runs}")
    sources.append(source)
  first = [n for n in sources if n in names]
  return first + [n for n in names if n not in first]


def budget_flags(variant: Variant, root: str, minutes: float, epochs_of: str = "", epochs: int = 0,
                 seed: int = 0) -> list[str]:
  """The variant's train.py flags that set how long it trains: --epochs or --minutes, or the epochs another run
  (its source's run with the same seed) chose divided by the variant's cost (equal compute)."""
  source = epochs_source(variant, epochs_of)
  if not source:
    return ["--train_minutes=0", f"--epochs={epochs}"] if epochs else [f"--train_minutes={minutes:g}",
                                                                        "--lr_schedule=cosine"]
  with open(os.path.join(root, run_name(source, seed), "config.json")) as f:
    source_epochs = json.load(f)["train"]["epochs"]
  return ["--train_minutes=0", f"--epochs={max(1, round(source_epochs / variant.cost))}"]


def _run(command: list[str], log_path: str) -> None:
  with open(log_path, "a") as log:
    subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)


def base_flags() -> list[str]:
  return [f"--flagfile={FLAGS.base_flagfile}", f"--validation_examples={FLAGS.validation_examples}",
          f"--monitor_examples={min(MONITOR_EXAMPLES, FLAGS.validation_examples)}"]


def train_and_score(variant: Variant, root: str, minutes: float, extra: list[str], epochs_of: str = "",
                    epochs: int = 0, seed: int = 0) -> dict:
  """Trains the variant's run with this --seed (unless finished), scores it with evaluate.py (unless scored);
  returns its row."""
  run = run_name(variant.name, seed)
  model_dir = os.path.join(root, run)
  final = os.path.join(model_dir, "final_metrics.json")
  if not os.path.exists(final):
    budget = budget_flags(variant, root, minutes, epochs_of, epochs, seed)
    print(f"training {run}: {' '.join(budget)}", flush=True)
    seed_flags = [f"--seed={seed}"] if seed else []
    _run([sys.executable, "train.py", *base_flags(), *variant.flags, *extra, *seed_flags, *budget,
          f"--model_dir={model_dir}"], os.path.join(root, f"{run}.log"))
  knn_file = os.path.join(model_dir, "eval", "knn.json")
  if not os.path.exists(knn_file) or os.path.getmtime(knn_file) < os.path.getmtime(final):
    print(f"scoring {run}", flush=True)
    _run([sys.executable, "evaluate.py", f"--model_dir={model_dir}", "--protocol=knn",
          f"--knn_k={','.join(map(str, KS))}", "--noplots"], os.path.join(root, f"{run}.log"))
  with open(final) as f:
    timing = json.load(f)["time"]
  with open(os.path.join(model_dir, "config.json")) as f:
    epochs = json.load(f)["train"]["epochs"]  # As trained (a run made before a change of --minutes keeps its own).
  with open(knn_file) as f:
    scores = json.load(f)["features"]
  return {"name": variant.name, "run": run, "seed": seed, "lever": variant.lever, "source": variant.source,
          "epochs": epochs, "flags": list(variant.flags), "time": timing,
          "top1": {kind: {k: scores[kind][f"k={k}"]["top1"] for k in KS} for kind in scores}}


def write_table(rows: list[dict], output: str, command: str) -> None:
  lines = [f"Command: `{command}`", "",
           f"kNN top-1 (%) on {FLAGS.validation_examples:,} train images held out of training and of the keys "
           "(t=0.07, cosine, keys: the rest of the train split), of the 128-d embedding; the pixels row is the input "
           "itself, the same for every run.", "",
           "| variant | what changes | source | epochs | train min | wall min | k=10 | k=20 | k=50 | k=200 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  pixels = rows[0]["top1"].get("pixels") if rows else None
  if pixels:
    lines.append("| pixels | raw pixels (784), no network | | | | | " +
                 " | ".join(f"{100 * pixels[k]:.2f}" for k in KS) + " |")
  for row in rows:
    embedding = row["top1"]["embedding"]
    seed = f" (seed {row['seed']})" if row.get("seed") else ""
    lines.append(f"| {row['name']}{seed} | {row['lever']} | {row['source']} | {row['epochs']} | "
                 f"{row['time']['train_seconds'] / 60:.1f} | {row['time']['wall_seconds'] / 60:.1f} | " +
                 " | ".join(f"{100 * embedding[k]:.2f}" for k in KS) + " |")
  summary = seed_summary(rows)
  for row in summary:
    lines.append(f"| **{row['name']}, mean of {len(row['seeds'])} seeds** | +/- the sample s.d. | | | | | " +
                 " | ".join(f"{100 * row['mean'][k]:.2f} +/- {100 * row['sd'][k]:.2f}" for k in KS) + " |")
  with open(f"{output}.md.tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(f"{output}.md.tmp", f"{output}.md")
  with open(f"{output}.json.tmp", "w") as f:
    json.dump({"command": command, "rows": rows, **({"seed_summary": summary} if summary else {})}, f, indent=1)
  os.replace(f"{output}.json.tmp", f"{output}.json")


def seed_summary(rows: list[dict]) -> list[dict]:
  """Each variant with runs from two or more seeds: its seeds, and the mean and sample standard deviation of its
  embedding's kNN top-1 over them at each k (in the order the variants first appear)."""
  by_name: dict[str, list[dict]] = {}
  for row in rows:
    by_name.setdefault(row["name"], []).append(row)
  summary = []
  for name, runs in by_name.items():
    if len(runs) < 2:
      continue
    scores = {k: [run["top1"]["embedding"][k] for run in runs] for k in KS}
    summary.append({"name": name, "seeds": [run.get("seed", 0) for run in runs],
                    "mean": {k: statistics.mean(v) for k, v in scores.items()},
                    "sd": {k: statistics.stdev(v) for k, v in scores.items()}})
  return summary


def write_plot(rows: list[dict], root: str, output: str, x: str = "minutes") -> None:
  """The monitor (bank kNN at the flagfile's k, first MONITOR_EXAMPLES validation images) against x: wall minutes,
  or epochs when the variants train equal epochs (--epochs_of: their minutes then say how fast the host was)."""
  runs = {}
  for row in rows:
    run = row.get("run", row["name"])
    with open(os.path.join(root, run, "metrics.jsonl")) as f:
      runs[run] = [json.loads(line) for line in f if line.strip()]
  pixels = rows[0]["top1"].get("pixels", {}).get(200) if rows else None
  title = "kNN monitor at equal wall-clock budgets" if x == "minutes" else "kNN monitor at equal epochs"
  plots.training_curves(runs, f"{output}.png", x=x, title=title,
                        baselines={"raw pixels, k=200": pixels} if pixels else None)


def plot_axis(rows: list[dict], epochs_of: str = "") -> str:
  """epoch when every row but one variant's (one per seed) trained another run's epochs (--epochs_of, or the
  precision check beside its source): equal epochs, so a host that was faster for one run does not bend the
  curves; else minutes."""
  fixed = [row for row in rows if epochs_source(VARIANTS[row["name"]], epochs_of)]
  free = {row["name"] for row in rows if row not in fixed}
  return "epoch" if fixed and len(free) <= 1 else "minutes"


def main(argv: list[str]) -> int:
  del argv
  names = list(VARIANTS) if FLAGS.variants == ["all"] else FLAGS.variants
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    print(f"recipe_ablation.py: --variants: unknown {', '.join(unknown)}; expected all or some of "
          f"{', '.join(VARIANTS)}", file=sys.stderr)
    return 2
  if FLAGS.epochs < 0:
    print(f"recipe_ablation.py: --epochs: must be >= 0 (0: train --minutes), got {FLAGS.epochs}", file=sys.stderr)
    return 2
  if FLAGS.epochs_of and FLAGS.epochs_of not in VARIANTS:
    print(f"recipe_ablation.py: --epochs_of: unknown {FLAGS.epochs_of}", file=sys.stderr)
    return 2
  try:
    seeds = tuple(int(s) for s in FLAGS.seeds)
  except ValueError:
    seeds = ()
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    print(f"recipe_ablation.py: --seeds: expected distinct integers >= 0, got {','.join(FLAGS.seeds)}",
          file=sys.stderr)
    return 2
  try:
    names = training_order(names, FLAGS.root, FLAGS.epochs_of, seeds)
  except ValueError as e:
    print(f"recipe_ablation.py: {e}", file=sys.stderr)
    return 2
  os.makedirs(FLAGS.root, exist_ok=True)
  output = FLAGS.output or os.path.join(FLAGS.root, "recipe_ablation")
  command = " ".join(["python bench/recipe_ablation.py", *sys.argv[1:]])
  rows = []
  for name in names:
    for seed in seeds:
      start = time.time()
      rows.append(train_and_score(VARIANTS[name], FLAGS.root, FLAGS.minutes, FLAGS.extra_flags, FLAGS.epochs_of,
                                  FLAGS.epochs, seed))
      print(f"{rows[-1]['run']}: k=200 {100 * rows[-1]['top1']['embedding'][200]:.2f}% "
            f"({time.time() - start:.0f} s)", flush=True)
      write_table(rows, output, command)
      write_plot(rows, FLAGS.root, output, x=plot_axis(rows, FLAGS.epochs_of))
  return 0


if __name__ == "__main__":
  app.run(main)
