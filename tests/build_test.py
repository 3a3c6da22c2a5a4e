"""BUILD stays true to the code: one py_library per module with deps = its imports, one py_test per test file."""

from __future__ import annotations

import ast
import glob
import os
import re

from tests import testing

from absl.testing import absltest


def _targets(build_text: str) -> dict[str, dict[str, list[str]]]:
  """name -> {"kind", "srcs", "deps"} for every py_* rule (a small parser for this file's flat style)."""
  targets = {}
  for kind, body in re.findall(r"(py_library|py_binary|py_test)\((.*?)\n\)", build_text, flags=re.S):
    name = re.search(r'name = "([^"]+)"', body).group(1)
    lists = {key: re.findall(r'"([^"]+)"', (re.search(rf"{key} = \[(.*?)\]", body, re.S) or [None, ""])[1])
             for key in ("srcs", "deps")}
    targets[name] = {"kind": kind, **lists}
  return targets


def _project_imports(path: str) -> set[str]:
  """Target names of the project modules a file imports: `from tf_instdisc import x` -> x, `from
  tf_instdisc.cli import train` -> cli_train."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == "tf_instdisc":
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_instdisc."):
      package = node.module[len("tf_instdisc."):].replace(".", "_")
      names |= {f"{package}_{alias.name}" for alias in node.names}
  return names


def _module_target(path: str) -> str | None:
  """The target of a module under tf_instdisc/: x.py -> x, a subpackage's __init__.py -> its name, cli/train.py ->
  cli_train; None for the package's own __init__.py (target init)."""
  parts = os.path.relpath(path, os.path.join(testing.REPO_ROOT, "tf_instdisc"))[:-3].split(os.sep)
  if parts == ["__init__"]:
    return None
  return "_".join(parts[:-1] if parts[-1] == "__init__" else parts)


class BuildTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    with open(os.path.join(testing.REPO_ROOT, "BUILD")) as f:
      self.targets = _targets(f.read())

  def test_every_module_has_a_library_whose_deps_are_its_imports(self):
    for path in sorted(glob.glob(os.path.join(testing.REPO_ROOT, "tf_instdisc", "**", "*.py"), recursive=True)):
      module = _module_target(path)
      if module is None:
        continue
      with self.subTest(module):
        self.assertEqual(self.targets[module]["kind"], "py_library")
        self.assertEqual(self.targets[module]["srcs"], [os.path.relpath(path, testing.REPO_ROOT)])
        self.assertEqual({d.lstrip(":") for d in self.targets[module]["deps"]} - {"init"}, _project_imports(path))

  def test_every_test_file_has_a_py_test_depending_on_what_it_imports(self):
    for path in sorted(glob.glob(os.path.join(testing.REPO_ROOT, "tests", "*_test.py"))):
      name = os.path.basename(path)[:-3]
      with self.subTest(name):
        self.assertEqual(self.targets[name]["kind"], "py_test")
        self.assertEqual(self.targets[name]["srcs"], [f"tests/{name}.py"])
        self.assertContainsSubset({f":{m}" for m in _project_imports(path)}, set(self.targets[name]["deps"]))

  def test_parser_sees_rules(self):
    parsed = _targets('py_test(\n    name = "x_test",\n    srcs = ["tests/x_test.py"],\n    deps = [":a", ":b"],\n)')
    self.assertEqual(parsed, {"x_test": {"kind": "py_test", "srcs": ["tests/x_test.py"], "deps": [":a", ":b"]}})


if __name__ == "__main__":
  absltest.main()
