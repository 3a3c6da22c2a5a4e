"""End to end: train.py in a subprocess on real Fashion-MNIST images (smoke.flags), kill and resume, bad input,
faults (SIGKILLs at random moments, refused starts that change nothing, unwritable model dirs)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import random
import re
import signal
import subprocess
import time
from unittest import mock

from tests import testing

import numpy as np
import tensorflow as tf
from absl.testing import absltest

from tf_instdisc import config as config_lib
from tf_instdisc import data as data_lib
from tf_instdisc import knn
from tf_instdisc import model as model_lib

from tf_instdisc.cli import train  # noqa: E402

TRAIN = os.path.join(testing.REPO_ROOT, "train.py")
SMOKE = os.path.join(testing.REPO_ROOT, "smoke.flags")
# Smaller than the smoke run: 256 images, 4 steps of 64 per epoch, a 64-image monitor; for the tests that start
# train.py many times.
TINY = ("--max_train_examples=256", "--max_eval_examples=64", "--nofinal_eval")


def _train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([testing.python(), TRAIN, f"--flagfile={SMOKE}", *args], cwd=testing.REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _metrics(model_dir: str) -> list[dict]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _summary_points(model_dir: str) -> list[tuple[str, int, float]]:
  """Every (tag, step, value) the run's TensorBoard files under train/ hold, in order of tag and step."""
  points = []
  for path in tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        points.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
  return sorted(points)


def _untrained_knn(model_dir: str) -> dict[str, float]:
  """kNN top-1/top-5 of the run's network before training: same seed, same data, same protocol."""
  with open(os.path.join(model_dir, "config.json")) as f:
    cfg = config_lib.from_dict(json.load(f))
  source = data_lib.load_source(cfg.data)
  size = data_lib.resolve_image_size(source, cfg.data.image_size)
  model = model_lib.build_embedding_model(cfg.model.arch, (size, size, source.image_shape[2]),
                                          embedding_dim=cfg.model.embedding_dim, seed=cfg.train.seed,
                                          head_batchnorm=cfg.model.head_batchnorm)
  views = {name: data_lib.make_eval_dataset(split, cfg.augment, image_size=size, batch_size=256)
           for name, split in (("train", source.train), ("eval", source.eval))}
  keys, _ = knn.compute_embeddings(model, views["train"])
  evaluator = knn.KnnEvaluator(views["eval"], data_lib.load_labels(source.train), k=cfg.eval.knn_k,
                               temperature=cfg.eval.knn_temperature, num_classes=source.num_classes)
  return dict(evaluator.run(model, tf.constant(keys)))


def _checkpoint_files(model_dir: str) -> dict[str, float]:
  directory = os.path.join(model_dir, "checkpoints")
  return {name: os.path.getmtime(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


@absltest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class SmokeTrainTest(absltest.TestCase):

  def test_smoke_run_learns_and_writes_its_records(self):
    model_dir = self.create_tempdir().full_path
    result = _train(f"--model_dir={model_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    records = _metrics(model_dir)
    self.assertEqual([r["epoch"] for r in records], list(range(1, len(records) + 1)))
    for key in ("epoch", "loss", "knn_top1", "knn_top5", "images_per_sec", "seconds"):
      self.assertIsNotNone(records[-1][key], key)
    self.assertLess(records[-1]["loss"], records[0]["loss"])
    with open(os.path.join(model_dir, "final_metrics.json")) as f:
      final = json.load(f)
    self.assertGreater(final["knn_top1"], _untrained_knn(model_dir)["knn_top1"])
    for name in ("config.json", "flags.txt", "run.json"):
      self.assertTrue(os.path.exists(os.path.join(model_dir, name)), name)
    self.assertIn("final kNN", result.stderr)
    self.assertIn("--mixed_precision=off: float32", result.stderr)  # The precision the run resolved, on the console.

  def test_killed_run_resumes_from_its_last_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    args = [testing.python(), TRAIN, f"--flagfile={SMOKE}", f"--model_dir={model_dir}", "--epochs=4",
            "--nofinal_eval"]
    process = subprocess.Popen(args, cwd=testing.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")) is None and time.time() < deadline:
      time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    self.assertIsNotNone(saved, "no checkpoint was written before the deadline")
    step = int(saved.rsplit("-", 1)[1])
    resumed = subprocess.run(args, cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn(f"resumed at step {step} ", resumed.stderr)
    records = _metrics(model_dir)
    self.assertEqual([r["epoch"] for r in records], [1, 2, 3, 4])
    self.assertTrue(all(r["loss"] == r["loss"] for r in records))  # Finite, not NaN.


  def test_two_cpu_replicas_train_as_one_device(self):
    # train.py --strategy=mirrored --cpu_devices=2 against one device, step by step. The runs agree to the
    # printed precision for the first steps, then float rounding grows in this regime (lr 0.03, 64 images):
    # one device with oneDNN on and off (TF_ENABLE_ONEDNN_OPTS) drifts apart just as fast, 7.2182 vs 7.2221 at
    # step 8. tests/train_lib_test.py holds 4 steps of a stable regime to 1e-5.
    step_losses, epoch_loss = {}, {}
    for name, flags in (("one", ["--strategy=one_device"]), ("two", ["--strategy=mirrored", "--cpu_devices=2"])):
      model_dir = self.create_tempdir().full_path
      result = _train(f"--model_dir={model_dir}", "--epochs=1", "--nofinal_eval", "--steps_per_loop=1", *flags)
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertIn(f"{'MirroredStrategy, 2' if name == 'two' else 'OneDeviceStrategy, 1'} replica(s)",
                    result.stderr)
      step_losses[name] = re.findall(r"step \d+/16 loss ([0-9.]+)", result.stderr)
      epoch_loss[name] = _metrics(model_dir)[0]["loss"]
    self.assertLen(step_losses["two"], 16)
    self.assertEqual(step_losses["two"][:3], step_losses["one"][:3])
    self.assertAlmostEqual(epoch_loss["two"], epoch_loss["one"], delta=1e-3 * epoch_loss["one"])

  def test_sigterm_saves_the_current_step_and_the_run_resumes_from_it(self):
    model_dir = self.create_tempdir().full_path
    log = os.path.join(model_dir, "stderr.txt")
    args = [testing.python(), TRAIN, f"--flagfile={SMOKE}", f"--model_dir={model_dir}", "--epochs=3",
            "--steps_per_loop=1", "--nofinal_eval"]
    with open(log, "w") as stderr:
      process = subprocess.Popen(args, cwd=testing.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
      deadline = time.time() + 240
      while "epoch 1/3 step 2/" not in open(log).read() and time.time() < deadline:
        time.sleep(0.05)
      process.send_signal(signal.SIGTERM)
      self.assertEqual(process.wait(timeout=120), 143)
    output = open(log).read()
    self.assertIn("stopped by signal 15 at step", output)
    saved = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    step = int(saved.rsplit("-", 1)[1])
    self.assertIn(f"checkpoint {saved} saved", output)
    steps_per_epoch = 1024 // 64  # smoke.flags: --max_train_examples=1024 --batch_size=64.
    self.assertGreaterEqual(step, 2)
    self.assertNotEqual(step % steps_per_epoch, 0)  # Mid-epoch: not an epoch-end checkpoint.
    resumed = subprocess.run(args, cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn(f"resumed at step {step} ", resumed.stderr)
    self.assertEqual([r["epoch"] for r in _metrics(model_dir)], [1, 2, 3])


@absltest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class BadInputTest(absltest.TestCase):

  def _assert_fails_naming(self, text: str, *args: str) -> None:
    result = _train(*args, timeout=120)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn(text, result.stderr)

  def test_unknown_dataset(self):
    self._assert_fails_naming("--dataset", f"--model_dir={self.create_tempdir().full_path}",
                              "--dataset=no_such_dataset_xyz")

  def test_too_many_negatives_are_capped_to_the_data(self):
    # Not refused any more: a recipe's 4096 on a small dataset trains with the largest power of two below its size.
    model_dir = self.create_tempdir().full_path
    result = _train(f"--model_dir={model_dir}", *TINY, "--epochs=1", "--objective=nce", "--num_negatives=4096",
                    timeout=120)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("--num_negatives: 4096 capped to 128, below the 256 training instances", result.stderr)
    with open(os.path.join(model_dir, "config.json")) as f:
      self.assertEqual(json.load(f)["loss"]["num_negatives"], 128)

  def test_empty_image_folder(self):
    root = self.create_tempdir()
    root.mkdir("train")
    self._assert_fails_naming(os.path.join(root.full_path, "train"), f"--model_dir={self.create_tempdir().full_path}",
                              "--dataset=folder", f"--data_dir={root.full_path}", "--image_size=28")

  def test_unreadable_image_is_named(self):
    root = self.create_tempdir()
    bad = root.create_file("train/cat/broken.jpg", content="not an image")
    self._assert_fails_naming(bad.full_path, f"--model_dir={self.create_tempdir().full_path}", "--dataset=folder",
                              f"--data_dir={root.full_path}", "--image_size=28")

  def test_resume_with_other_dataset_size_changes_nothing(self):
    model_dir = self.create_tempdir().full_path
    self.assertEqual(_train(f"--model_dir={model_dir}", "--epochs=1", "--nofinal_eval").returncode, 0)
    before = _checkpoint_files(model_dir)
    self._assert_fails_naming("--max_train_examples", f"--model_dir={model_dir}", "--max_train_examples=640")
    self._assert_fails_naming("--arch", f"--model_dir={model_dir}", "--arch=resnet18_cifar")
    self.assertEqual(_checkpoint_files(model_dir), before)
    self.assertLen(_metrics(model_dir), 1)


@absltest.skipUnless(testing.has_fashion_mnist(), "needs Debian's dataset-fashion-mnist")
class FaultsTest(absltest.TestCase):
  """Issue 12: a refused start changes nothing, a kill at any moment loses no epoch, OS errors name the path."""

  def test_refused_starts_change_nothing_and_flags_txt_holds_the_last_accepted_start(self):
    model_dir = self.create_tempdir().full_path
    for epochs in (1, 2):
      result = _train(f"--model_dir={model_dir}", *TINY, f"--epochs={epochs}")
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertIn(f"epoch {epochs} done", result.stderr)  # Our INFO lines stay; this start saved a checkpoint,
      self.assertNotIn("Sharding callback duration", result.stderr)  # and TensorFlow's INFO note of it is hidden.
    with open(os.path.join(model_dir, "flags.txt")) as f:
      flags_text = f.read()
    self.assertEqual(flags_text.count(f"--model_dir={model_dir}\n"), 1)
    self.assertIn("--epochs=2\n", flags_text)
    self.assertNotIn("--epochs=1\n", flags_text)
    before = testing.digest(model_dir)
    self.assertNotEmpty([name for name in before if name.startswith("train/events.out.tfevents")])
    for flag, message in (
        ("--dataset=no_such_dataset_xyz", "train.py: --dataset: unknown dataset 'no_such_dataset_xyz' ("),
        ("--objective=parametric", f"train.py: --objective: --model_dir={model_dir} holds a run with "
         "objective='softmax', this run has 'parametric'. Resume with the same settings or use a new --model_dir."),
        ("--max_train_examples=128", f"train.py: --max_train_examples: --model_dir={model_dir} holds a run with "
         "num_instances=256, this run has 128. Resume with the same settings or use a new --model_dir.")):
      with self.subTest(flag):
        result = _train(f"--model_dir={model_dir}", *TINY, "--epochs=3", flag, timeout=120)
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        self.assertNotEmpty([line for line in result.stderr.splitlines() if line.startswith(message)],
                            result.stderr[-3000:])
        self.assertEqual(testing.digest(model_dir), before)

  def test_model_dir_that_is_a_regular_file(self):
    path = self.create_tempfile(content="mine").full_path
    result = _train(f"--model_dir={path}", *TINY, timeout=120)
    self.assertEqual(result.returncode, 1)
    self.assertEqual(result.stderr.strip().splitlines()[-1],
                     f"train.py: --model_dir: {path} exists and is not a directory; pass a directory (new or a run's)")
    self.assertNotIn("Traceback", result.stderr)

  def test_full_disk_at_start_prints_one_line_naming_the_path(self):
    # In process, with open() patched: root ignores permissions, so a full disk stands in for every OSError of a
    # start's first writes (tests/train_lib_test.py has the read-only dir for other users).
    model_dir = self.create_tempdir().full_path
    train.FLAGS.unparse_flags()
    self.addCleanup(train.FLAGS.unparse_flags)
    train.FLAGS(["train.py", f"--flagfile={SMOKE}", f"--model_dir={model_dir}", *TINY, "--strategy=one_device"])
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
      if isinstance(file, str) and os.path.abspath(file).startswith(model_dir) and set(mode) & set("wax+"):
        raise OSError(errno.ENOSPC, "No space left on device", file)
      return real_open(file, mode, *args, **kwargs)

    stderr = io.StringIO()
    with mock.patch.object(builtins, "open", full_disk), contextlib.redirect_stderr(stderr):
      code = train.main(["train.py"])
    self.assertEqual(code, 1)
    self.assertIn(f"train.py: --model_dir: cannot write {model_dir}/flags.txt (No space left on device)",
                  stderr.getvalue().splitlines())
    self.assertEmpty(os.listdir(model_dir))

  def test_sigkills_at_random_moments_lose_no_epoch_and_change_no_result(self):
    # --eval_every_epochs=2: the monitor is due after epochs 2 and 4 only, the first due epoch and the last, which
    # every start monitors; after every epoch, its time share (schedules.monitor_due) would decide by the clock.
    args = [testing.python(), TRAIN, f"--flagfile={SMOKE}", *TINY, "--epochs=4", "--eval_every_epochs=2"]
    straight, killed = self.create_tempdir().full_path, self.create_tempdir().full_path
    began = time.time()
    result = subprocess.run([*args, f"--model_dir={straight}"], cwd=testing.REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    duration = time.time() - began  # Random kills land within an uninterrupted run's length.
    seed = random.SystemRandom().randrange(2**31)
    rng, checkpoints, kills = random.Random(seed), os.path.join(killed, "checkpoints"), []

    def temporary_checkpoints():
      return sorted(n for n in os.listdir(checkpoints) if n.endswith("_temp")) if os.path.isdir(checkpoints) else []

    def start_and_kill(moment: str) -> list[str] | None:
      """Starts train.py and SIGKILLs it at `moment`; the temporary checkpoints it left, None if it ended first."""
      log = os.path.join(self.create_tempdir().full_path, "stderr.txt")
      with open(log, "w") as stderr:
        process = subprocess.Popen([*args, f"--model_dir={killed}"], cwd=testing.REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        start = time.time()
        at = start + rng.uniform(3.0, max(duration, 4.0))
        while process.poll() is None and time.time() < start + 240:
          if moment == "random" and time.time() >= at:
            break
          if moment == "epoch_done" and " done: loss " in open(log).read():
            break
          if moment == "checkpoint_write" and temporary_checkpoints():
            break
          time.sleep(0.001 if moment == "checkpoint_write" else 0.02)
        if process.poll() is not None:
          process.wait()
          return None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
      left = temporary_checkpoints()
      kills.append(f"{moment} after {time.time() - start:.2f} s, left {left}")
      return left

    # In the middle of a checkpoint write (TensorFlow writes under a temporary name, then renames; tried again when
    # the write ended between our look and the kill), right after an epoch's record (its checkpoint comes next), and
    # at two random moments (start-up, training, evaluation or a save). The targeted kills come first: a random kill
    # late in the run leaves too little of it for them (a restart that finds the run complete just ends).
    for _ in range(3):
      if start_and_kill("checkpoint_write"):
        break
    start_and_kill("epoch_done")
    start_and_kill("random")
    start_and_kill("random")
    self.assertTrue(any("checkpoint_write" in kill and "_temp" in kill for kill in kills), f"seed {seed}: {kills}")
    resumed = subprocess.run([*args, f"--model_dir={killed}"], cwd=testing.REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    context = f"seed {seed}, kills {kills}"
    records, expected_records = _metrics(killed), _metrics(straight)
    self.assertEqual([r["epoch"] for r in records], [1, 2, 3, 4], context)
    for name in ("step", "loss", "lr", "knn_top1", "knn_top5"):
      self.assertEqual([r[name] for r in records], [r[name] for r in expected_records], f"{name}, {context}")
    # TensorBoard holds each epoch's points once, the same as the uninterrupted run's (speeds aside).
    points, expected_points = _summary_points(killed), _summary_points(straight)
    self.assertEqual([p[:2] for p in points], [p[:2] for p in expected_points], context)
    self.assertEqual([p for p in points if p[0] == "train/loss"], [p for p in expected_points if p[0] == "train/loss"],
                     context)
    walls = [r["time"]["wall_seconds"] for r in records]
    self.assertEqual(walls, sorted(walls), context)
    expected, actual = testing.checkpoint_values(straight), testing.checkpoint_values(killed)
    self.assertEqual(sorted(actual), sorted(expected), context)
    for name, value in expected.items():
      np.testing.assert_array_equal(actual[name], value, err_msg=f"{name}; {context}")
    self.assertEmpty([name for name in os.listdir(checkpoints) if name.endswith("_temp")], context)


if __name__ == "__main__":
  absltest.main()
