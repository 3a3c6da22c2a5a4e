"""One worker of the multi-worker test (run as a subprocess by distribute_test): trains a tiny run with
--strategy=multi_worker from $TF_CONFIG and saves its own copy of the memory bank and Z.

  python tests/multi_worker_worker.py MODEL_DIR OUTPUT.npz [EPOCHS]

Not a test module (no tests.testing import: that would split the CPU into two logical devices).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from tf_instdisc import config as config_lib  # noqa: E402
from tf_instdisc import data as data_lib  # noqa: E402
from tf_instdisc import distribute  # noqa: E402
from tf_instdisc import train_lib  # noqa: E402


def main(model_dir: str, output: str, epochs: str = "2") -> None:
  logging.set_verbosity(logging.INFO)  # The progress lines ("resumed at step N") on stderr, as train.py prints.
  logging.set_stderrthreshold(logging.INFO)
  rng = np.random.default_rng(0)
  labels = np.arange(64) % 4
  images = np.clip(labels[:, None, None, None] * 60 + rng.normal(0, 20, (64, 8, 8, 1)), 0, 255).astype(np.uint8)
  source = data_lib.source_from_arrays("tiny", images, labels, images[:32], labels[:32], num_classes=4)
  cfg = config_lib.Config(
      data=config_lib.DataConfig(dataset="tiny"), augment=config_lib.AugmentConfig(),
      model=config_lib.ModelConfig(arch="convnet_small", embedding_dim=16), bank=config_lib.BankConfig(),
      loss=config_lib.LossConfig(num_negatives=16), optim=config_lib.OptimConfig(),
      train=config_lib.TrainConfig(model_dir=model_dir, batch_size=16, epochs=int(epochs), steps_per_loop=1,
                                   strategy="multi_worker"),
      eval=config_lib.EvalConfig(knn_k=5, eval_batch_size=32))
  strategy = distribute.make_strategy("multi_worker")
  current = train_lib._Run(cfg, strategy, source)  # What run() does, keeping the state to inspect.
  try:
    with train_lib._peer_loss_raises_worker_lost(current):
      current.train()
      current.final_evaluation()
  except train_lib.WorkerLost as e:
    print(f"multi_worker_worker: {e}", file=sys.stderr)
    sys.exit(75)  # As train.py.
  bank = current.state.bank
  np.savez(output, bank=distribute.local_variable(bank.bank).numpy(),
           normalizer=float(distribute.local_variable(bank.normalizer).numpy()),
           replicas=strategy.num_replicas_in_sync, chief=current.chief, step=current.step)


if __name__ == "__main__":
  main(*sys.argv[1:4])
