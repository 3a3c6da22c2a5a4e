"""The two drivers of one recipe, side by side: Keras `fit` (the library API) against `train.py`, same seed and epochs.

  python bench/fit_vs_train.py --root=/tmp/fit_vs_train --epochs=12
  python bench/fit_vs_train.py --root=/tmp/fvt --epochs=2 --max_train_examples=4096 --output=/tmp/fvt/table

Runs, one after the other in fresh processes:
  train   train.py --flagfile=RECIPE --epochs=N --model_dir=ROOT/train   (its own loop; no monitor, no final eval)
  fit     recipe = tf_instdisc.recipe(RECIPE, epochs=N); model = InstanceDiscrimination.from_recipe(recipe, ...);
          model.fit(tf_instdisc.training_dataset(images, recipe), epochs=N)   then saved as a model_dir (ROOT/fit)
then scores both, and the same network untrained, with `evaluate.py --protocol=knn --knn_k=10,20,50,200
--knn_features=embedding,backbone,pixels` (clean train features as keys, the recipe's eval split as queries: the test
set for fashion_mnist, only compared here, nothing is chosen on it). Times: train.py's training steps (its
metrics.jsonl `train_seconds`) against the wall time of the `fit` call. Writes OUTPUT.json and OUTPUT.md.
A rerun skips finished runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from tf_instdisc import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (10, 20, 50, 200)
KINDS = ("embedding", "backbone", "pixels")

_ROOT = flags.DEFINE_string("root", None, "Folder of the runs (ROOT/train, ROOT/fit).", required=True)
_RECIPE = flags.DEFINE_string("recipe", "fashion_mnist", "A shipped recipe or a flagfile.")
_EPOCHS = flags.DEFINE_integer("epochs", 12, "Epochs of both drivers.", lower_bound=1)
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", 0, "Train on the first N images (0: all).", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", "", "OUTPUT.json / OUTPUT.md (default ROOT/fit_vs_train).")
_SCORE = flags.DEFINE_bool("score", True, "Score both runs (and the untrained network) with evaluate.py; false: "
                           "times only (e.g. repeated short runs, interleaved, for the time ratio).")
_DRIVER = flags.DEFINE_enum("driver", "", ["", "fit"], "Internal: run one driver in this process.")


def _recipe_flags() -> list[str]:
  extra = [f"--max_train_examples={_MAX_TRAIN.value}"] if _MAX_TRAIN.value else []
  return [f"--flagfile={recipes.path(_RECIPE.value)}", f"--epochs={_EPOCHS.value}", *extra]


def _run(command: list[str], log: str) -> None:
  print("$", " ".join(command), flush=True)
  with open(log, "w") as f:
    code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
  if code:
    raise RuntimeError(f"exit {code}: {' '.join(command)} (log: {log})")


def train_driver(model_dir: str) -> float:
  """train.py's run; returns the seconds of its training steps."""
  if not os.path.exists(os.path.join(model_dir, "metrics.jsonl")) or not _finished(model_dir):
    _run([sys.executable, "train.py", *_recipe_flags(), f"--model_dir={model_dir}", "--eval_every_epochs=0",
          "--nofinal_eval"], os.path.join(os.path.dirname(model_dir), "train.log"))
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return json.loads(f.read().splitlines()[-1])["time"]["train_seconds"]


def _finished(model_dir: str) -> bool:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  return bool(lines) and json.loads(lines[-1])["epoch"] == _EPOCHS.value


def fit_driver(model_dir: str) -> None:
  """In this process: the recipe through the library API and Keras fit, saved as a train.py-style model_dir."""
  import numpy as np

  import tf_instdisc
  from tf_instdisc import checkpointing, config as config_lib, data as data_lib

  recipe = tf_instdisc.recipe(_RECIPE.value, epochs=_EPOCHS.value, max_train_examples=_MAX_TRAIN.value)
  source = data_lib.load_source(recipe.data)
  images = np.concatenate([batch["image"] for batch in source.train.make().batch(8192).as_numpy_iterator()])
  model = tf_instdisc.InstanceDiscrimination.from_recipe(recipe, len(images), images.shape[1:])
  dataset = tf_instdisc.training_dataset(images, recipe)
  start = time.time()
  model.fit(dataset, epochs=recipe.train.epochs, verbose=2)
  seconds = time.time() - start
  cfg = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, model_dir=model_dir))
  os.makedirs(model_dir, exist_ok=True)
  checkpointing.write_json_atomic(os.path.join(model_dir, checkpointing.CONFIG_FILE), config_lib.to_dict(cfg))
  checkpointing.save_run_identity(model_dir, checkpointing.run_identity(
      dataset=recipe.data.dataset, num_instances=len(images), arch=recipe.model.arch,
      embedding_dim=recipe.model.embedding_dim, objective=recipe.loss.objective, image_shape=images.shape[1:],
      bank_dtype=recipe.bank.bank_dtype))
  manager = checkpointing.make_manager(checkpointing.make_checkpoint(model=model, optimizer=model.optimizer),
                                       model_dir, max_to_keep=1)
  manager.save(checkpoint_number=int(model.step.numpy()))
  checkpointing.write_json_atomic(os.path.join(model_dir, "fit_seconds.json"), {"fit_seconds": seconds})


def evaluate(model_dir: str, *, untrained: bool = False) -> dict:
  output = os.path.join(model_dir, "eval_untrained" if untrained else "eval")
  path = os.path.join(output, "knn.json")
  if not os.path.exists(path):
    _run([sys.executable, "evaluate.py", f"--model_dir={model_dir}", "--protocol=knn",
          f"--knn_k={','.join(map(str, KS))}", f"--knn_features={','.join(KINDS)}", "--noplots", "--tsne_points=0",
          f"--output_dir={output}", *(["--untrained"] if untrained else [])], output + ".log")
  with open(path) as f:
    return json.load(f)


def _scores(result: dict, kind: str) -> list[float | None]:
  """Top-1 (%) per k of one feature kind in an evaluate.py knn.json."""
  rows = result["features"].get(kind, {})
  return [round(100 * rows[f"k={k}"]["top1"], 2) if f"k={k}" in rows else None for k in KS]


def main(argv: list[str]) -> None:
  del argv
  root = _ROOT.value
  if _DRIVER.value == "fit":
    fit_driver(os.path.join(root, "fit"))
    return
  os.makedirs(root, exist_ok=True)
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
  bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in lscpu]
  train_seconds = train_driver(os.path.join(root, "train"))
  fit_dir = os.path.join(root, "fit")
  if not os.path.exists(os.path.join(fit_dir, "fit_seconds.json")):
    _run([sys.executable, os.path.abspath(__file__), f"--root={root}", f"--recipe={_RECIPE.value}",
          f"--epochs={_EPOCHS.value}", f"--max_train_examples={_MAX_TRAIN.value}", "--driver=fit"],
         os.path.join(root, "fit.log"))
  with open(os.path.join(fit_dir, "fit_seconds.json")) as f:
    fit_seconds = json.load(f)["fit_seconds"]
  report = {"recipe": _RECIPE.value, "epochs": _EPOCHS.value, "max_train_examples": _MAX_TRAIN.value, "cpu": cpu,
            "bf16_units": bf16, "train_seconds": round(train_seconds, 1), "fit_seconds": round(fit_seconds, 1),
            "fit_over_train_time": round(fit_seconds / train_seconds, 3)}
  lines = [f"{_RECIPE.value}, {_EPOCHS.value} epochs, {cpu} ({', '.join(bf16) or 'no bf16 units'}): train.py "
           f"steps {train_seconds:.0f} s, fit {fit_seconds:.0f} s ({fit_seconds / train_seconds:.2f}x)"]
  if _SCORE.value:
    lines += _score(root, fit_dir, report)
  output = _OUTPUT.value or os.path.join(root, "fit_vs_train")
  with open(output + ".json", "w") as f:
    json.dump(report, f, indent=2)
  with open(output + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def _score(root: str, fit_dir: str, report: dict) -> list[str]:
  """Scores the runs into report["top1"]; returns the table's lines."""
  results = {"train": evaluate(os.path.join(root, "train")), "fit": evaluate(fit_dir),
             "untrained": evaluate(os.path.join(root, "train"), untrained=True)}
  table = {"train.py embedding": _scores(results["train"], "embedding"),
           "fit embedding": _scores(results["fit"], "embedding"),
           "train.py backbone": _scores(results["train"], "backbone"),
           "fit backbone": _scores(results["fit"], "backbone"),
           "untrained embedding": _scores(results["untrained"], "embedding"),
           "raw pixels": _scores(results["train"], "pixels")}
  report.update(ks=KS, top1=table)
  lines = ["", "| kNN top-1 (%) | " + " | ".join(f"k={k}" for k in KS) + " |", "|---" * (len(KS) + 1) + "|"]
  return lines + [f"| {name} | " + " | ".join("" if v is None else f"{v:.2f}" for v in values) + " |"
                  for name, values in table.items()]


if __name__ == "__main__":
  app.run(main)
