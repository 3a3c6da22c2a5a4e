"""The repository stands on its own: no tracked file points at a document or path outside it; LICENSE and
CITATION.cff are present.

Plain unittest, no TensorFlow: it reads files and runs `git ls-files`. Where there is no git checkout (e.g. Bazel's
runfiles tree) the scan of tracked files is skipped; the LICENSE and CITATION.cff checks still run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import re
import subprocess
import unittest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Design notes kept outside the repository, which users never see. Built from pieces so that this file does not
# name them itself.
_OUTSIDE_DOCUMENTS = re.compile(r"\b(?:" + "|".join(("DESIGN", "STYLE", "PAPER")) + r")\." + "md" + r"\b")
_SHARED_FOLDER = re.compile(re.escape("..") + r"[/\\]+" + "shared" + r"\b")
# A relative path that climbs (starts with parent steps, two dots and a slash): it must land in the repository.
_CLIMBING_PATH = re.compile(r"(?:\.\.[/\\])+[\w.\-/]*")
BINARY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".pdf", ".gz", ".zip", ".tar", ".h5", ".keras", ".npy", ".npz",
                     ".pb", ".so", ".whl")


def tracked_files(root: str) -> list[str]:
  """Repository-relative paths of every tracked file, from `git ls-files`.

  Raises:
    unittest.SkipTest: when `root` is not a git checkout or git cannot list it.
  """
  if not os.path.exists(os.path.join(root, ".git")):
    raise unittest.SkipTest(f"{root} is not a git checkout (no .git; e.g. a Bazel runfiles tree)")
  try:
    listing = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True, timeout=60)
  except FileNotFoundError as e:
    raise unittest.SkipTest(f"git is not installed: {e}") from e
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
    raise unittest.SkipTest(f"git ls-files failed in {root}: {e}") from e
  return [path for path in listing.stdout.decode("utf-8").split("\0") if path]


def read_text(path: str) -> str | None:
  """The file's text, or None for a binary file (by extension, a NUL byte, or bytes that are not UTF-8)."""
  if path.lower().endswith(BINARY_EXTENSIONS):
    return None
  with open(path, "rb") as f:
    data = f.read()
  if b"\0" in data[:8192]:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def _inside(root: str, path: str) -> bool:
  root = os.path.realpath(root)
  return os.path.commonpath([root, os.path.realpath(path)]) == root


def outside_references(root: str, relative_path: str, text: str) -> list[str]:
  """"file:line: what" for each mention in `text` of an outside document or a path leaving the repository.

  A climbing path (anchors and trailing punctuation dropped) is resolved against the file's own folder and
  must name an existing file or folder of the repository.
  """
  found = []
  folder = os.path.dirname(os.path.join(root, relative_path))
  for number, line in enumerate(text.splitlines(), start=1):
    where = f"{relative_path}:{number}"
    found += [f"{where}: mentions {m.group(0)!r}, a document outside the repository"
              for m in _OUTSIDE_DOCUMENTS.finditer(line)]
    found += [f"{where}: mentions {m.group(0)!r}, a folder outside the repository"
              for m in _SHARED_FOLDER.finditer(line)]
    for match in _CLIMBING_PATH.finditer(line):
      target = os.path.normpath(os.path.join(folder, match.group(0).split("#")[0].rstrip(".,;:")))
      if not (_inside(root, target) and os.path.exists(target)):
        found.append(f"{where}: path {match.group(0)!r} leads outside the repository or to nothing in it")
  return found


class SelfContainedTest(unittest.TestCase):

  def test_no_tracked_file_refers_outside_the_repository(self):
    offenders = []
    for relative_path in tracked_files(REPO_ROOT):
      path = os.path.join(REPO_ROOT, relative_path)
      if os.path.islink(path) and not _inside(REPO_ROOT, path):
        offenders.append(f"{relative_path}: symbolic link to {os.readlink(path)!r}, outside the repository")
        continue
      if not os.path.isfile(path):  # Deleted in the working tree, or a submodule.
        continue
      text = read_text(path)
      if text is not None:
        offenders += outside_references(REPO_ROOT, relative_path, text)
    self.assertEqual(offenders, [], "write what the project needs into the repository (e.g. docs/design.md):\n"
                     + "\n".join(offenders))

  def test_detector_finds_outside_references(self):
    name = "DES" + "IGN.md"
    shared = "/".join(("..", "shared", "notes.txt"))
    # A small tree of its own: under Bazel the runfiles hold links, not the repository's files.
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root)
    os.makedirs(os.path.join(root, "docs"))
    open(os.path.join(root, "README.md"), "w").close()
    found = outside_references(root, "docs/x.md", f"ok line\nsee {name}\nsee {shared}\n[r](../README.md#a)\n")
    self.assertEqual(len(found), 3, found)
    self.assertTrue(found[0].startswith("docs/x.md:2:"), found)
    self.assertTrue(all(item.startswith("docs/x.md:3:") for item in found[1:]), found)
    self.assertEqual(outside_references(root, "docs/x.md", "docs/design.md, [r](../README.md#layout).\n"), [])
    self.assertEqual(len(outside_references(root, "README.md", "see " + ".." + "/elsewhere/file.txt\n")), 1)

  def test_license_is_apache_2(self):
    path = os.path.join(REPO_ROOT, "LICENSE")
    self.assertTrue(os.path.isfile(path), "LICENSE is missing")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    self.assertTrue(text.lstrip().startswith("Apache License"), "LICENSE does not start with 'Apache License'")
    self.assertIn("Version 2.0", text)

  def test_citation_names_the_format_and_the_paper(self):
    path = os.path.join(REPO_ROOT, "CITATION.cff")
    self.assertTrue(os.path.isfile(path), "CITATION.cff is missing")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    self.assertIn("cff-version:", text)
    self.assertIn("1805.01978", text)  # The paper's arXiv id.


if __name__ == "__main__":
  unittest.main()
