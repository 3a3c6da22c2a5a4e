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
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == "tf_instdisc":
      names |= {alias.name for alias in node.names}
  return names


class BuildTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    with open(os.path.join(testing.REPO_ROOT, "BUILD")) as f:
      self.targets = _targets(f.read())

  def test_every_module_has_a_library_whose_deps_are_its_imports(self):
    for path in sorted(glob.glob(os.path.join(testing.REPO_ROOT, "tf_instdisc", "*.py"))):
      module = os.path.basename(path)[:-3]
      if module == "__init__":
        continue
      with self.subTest(module):
        self.assertEqual(self.targets[module]["kind"], "py_library")
        self.assertEqual(self.targets[module]["srcs"], [f"tf_instdisc/{module}.py"])
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
