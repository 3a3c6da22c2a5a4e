"""The library as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment,
then used from a directory outside the repository (import, the console commands, a one-epoch run, the README's
notebook example), and the same without scann."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

from tests import testing

TIMEOUT_SECONDS = 600  # A hang guard: the wheel build, a one-epoch run and the README example.
COMMANDS = ("instdisc-train", "instdisc-evaluate", "instdisc-export", "instdisc-search")
# On PYTHONPATH, this makes `import scann` fail as on a machine without it (a finder that refuses the name).
NO_SCANN = textwrap.dedent("""\
    import sys

    class _NoScann:
      def find_spec(self, name, path=None, target=None):
        if name == "scann" or name.startswith("scann."):
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, _NoScann())
    """)


class InstallTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="install_test_", dir=absltest.get_default_test_tmpdir())
    dist = os.path.join(cls.root, "dist")
    # What the wheel is built from, copied out: a build in place would leave build/ and *.egg-info in the checkout.
    source = os.path.join(cls.root, "source")
    shutil.copytree(os.path.join(testing.REPO_ROOT, "tf_instdisc"), os.path.join(source, "tf_instdisc"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
      shutil.copy(os.path.join(testing.REPO_ROOT, name), source)
    # --no-build-isolation: the setuptools already here builds it (a user's `pip install .` fetches one).
    cls._check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist,
                source])
    (cls.wheel,) = glob.glob(os.path.join(dist, "tf_instdisc-*.whl"))
    # A fresh environment that sees this machine's TensorFlow (installing it again would take minutes) but not
    # the checkout: the package comes from the wheel alone.
    cls.venv = os.path.join(cls.root, "venv")
    cls._check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", cls.venv])
    cls.python = os.path.join(cls.venv, "bin", "python")
    cls._check([sys.executable, "-m", "pip", "--python", cls.python, "install", "-q", "--no-deps", "--no-index",
                cls.wheel])
    cls.outside = os.path.join(cls.root, "elsewhere")
    os.makedirs(cls.outside, exist_ok=True)

  @classmethod
  def _check(cls, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False, **kwargs)
    if result.returncode:
      raise AssertionError(f"exit {result.returncode}: {' '.join(command)}\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    return result

  def _run(self, command: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run(command, cwd=self.outside, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                          check=False, env={**clean, **(env or {})})

  def test_imports_from_the_wheel_with_its_recipes(self):
    code = ("import os, sys, tf_instdisc; from tf_instdisc import recipes; "
            "print(os.path.dirname(tf_instdisc.__file__)); print(','.join(recipes.NAMES)); "
            "print(tf_instdisc.recipe('fashion_mnist', epochs=3).train.epochs); "
            "print('tensorflow' in sys.modules)")
    lines = self._run([self.python, "-c", code]).stdout.split()
    self.assertTrue(lines[0].startswith(self.venv), lines)  # Not the checkout.
    self.assertEqual(lines[1:], ["cifar10,fashion_mnist,imagenet,smoke", "3", "False"])

  def test_every_console_command_answers_help(self):
    for command in COMMANDS:
      with self.subTest(command):
        result = self._run([os.path.join(self.venv, "bin", command), "--help"])
        self.assertIn(command, result.stdout + result.stderr)
        self.assertIn("--", result.stdout)
        self.assertNotIn("Traceback", result.stderr)

  def test_a_one_epoch_run_by_recipe_name_then_an_export_without_scann(self):
    model_dir = os.path.join(self.root, "run")
    train = self._run([os.path.join(self.venv, "bin", "instdisc-train"), "--recipe=smoke", "--epochs=1",
                       "--max_train_examples=256", "--max_eval_examples=64", f"--model_dir={model_dir}"])
    self.assertEqual(train.returncode, 0, train.stderr[-3000:])
    self.assertIn("final kNN", train.stderr)
    self.assertTrue(os.path.exists(os.path.join(model_dir, "final_metrics.json")))
    shadow = os.path.join(self.root, "no_scann")
    os.makedirs(shadow, exist_ok=True)
    with open(os.path.join(shadow, "sitecustomize.py"), "w") as f:
      f.write(NO_SCANN)
    env = {"PYTHONPATH": shadow}
    self.assertIn("False", self._run([self.python, "-c", "from tf_instdisc import index; "
                                      "print(index.scann_available())"], env=env).stdout)
    export = os.path.join(self.root, "export")
    refused = self._run([os.path.join(self.venv, "bin", "instdisc-export"), f"--model_dir={model_dir}",
                         f"--export_dir={export}"], env=env)
    self.assertNotEqual(refused.returncode, 0)
    self.assertIn("--index=scann needs the scann package (pip install 'tf-instdisc[scann]'", refused.stderr)
    self.assertFalse(os.path.exists(export))
    exported = self._run([os.path.join(self.venv, "bin", "instdisc-export"), f"--model_dir={model_dir}",
                          f"--export_dir={export}", "--index=none", "--nobackbone"], env=env)
    self.assertEqual(exported.returncode, 0, exported.stderr[-3000:])
    self.assertTrue(os.path.exists(os.path.join(export, "manifest.json")))

  def test_the_readme_notebook_example_runs_verbatim_outside_the_checkout(self):
    script = os.path.join(self.root, "readme_example.py")
    with open(script, "w") as f:
      f.write(testing.notebook_example())
    result = self._run([self.python, script])
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])


if __name__ == "__main__":
  absltest.main()
