"""Recipes: the shipped flagfiles (NAME.flags beside this file) read as run configurations.

  tf_instdisc.recipe("fashion_mnist", epochs=12)    the config.Config that
  python train.py --flagfile=fashion_mnist.flags --epochs=12    builds (the same frozen sections)

A recipe is a flagfile: one `--name=value` per line (`--name` / `--noname` for booleans), `#` comments, nested
`--flagfile=PATH`; every name is a config field (train.py's flags have the same names). Later values win. One rule
settles the run's length when a recipe sets `--train_minutes` and the caller `--epochs` (or the reverse): the one
given later decides, and an `--epochs` given after a `--train_minutes` turns the time budget off
(`length_rule`). This module imports no TensorFlow, so train.py answers a bad recipe before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

from tf_instdisc import config as config_lib

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
NAMES = tuple(sorted(name[:-len(".flags")] for name in os.listdir(DIRECTORY) if name.endswith(".flags")))


def path(name_or_flagfile: str) -> str:
  """The flagfile of a shipped recipe's name (fashion_mnist, cifar10, imagenet, smoke), or the path itself.

  Raises:
    ValueError: naming the recipe and the shipped names, when it is neither.
  """
  if name_or_flagfile in NAMES:
    return os.path.join(DIRECTORY, f"{name_or_flagfile}.flags")
  if os.path.isfile(name_or_flagfile):
    return name_or_flagfile
  raise ValueError(f"--recipe: {name_or_flagfile!r} is neither a shipped recipe ({', '.join(NAMES)}) nor a "
                   "flagfile")


def read_flagfile(flagfile: str, _seen: tuple[str, ...] = ()) -> list[str]:
  """The flagfile's `--flag` lines in order, nested --flagfile lines expanded in place (as absl reads them).

  Raises:
    ValueError: naming the file, when it cannot be read, a line is not a --flag, or flagfiles nest in a cycle.
  """
  real = os.path.realpath(flagfile)
  if real in _seen:
    raise ValueError(f"--flagfile: {flagfile} includes itself")
  try:
    with open(flagfile) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ValueError(f"--flagfile: cannot read {flagfile} ({e.strerror or e})") from e
  flags = []
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith(("#", "//")):
      continue
    if not line.startswith("--"):
      raise ValueError(f"{flagfile} line {number}: expected --name=value, got {line!r}")
    if line.startswith("--flagfile="):
      flags.extend(read_flagfile(line[len("--flagfile="):], (*_seen, real)))
    else:
      flags.append(line)
  return flags


def _fields() -> dict[str, tuple[str, dataclasses.Field]]:
  """Field name -> (section name, field) over every config section."""
  return {field.name: (section, field) for section, section_type in config_lib.SECTIONS.items()
          for field in dataclasses.fields(section_type)}


def _parse(name: str, text: str | None, field: dataclasses.Field) -> Any:
  """A flag's text as the field's type (None: a bare boolean flag)."""
  default = field.default
  if isinstance(default, bool):
    if text is None:
      return True
    if text.lower() in ("true", "t", "1"):
      return True
    if text.lower() in ("false", "f", "0"):
      return False
    raise ValueError(f"--{name}: expected true or false, got {text!r}")
  if text is None:
    raise ValueError(f"--{name}: needs a value (--{name}=...)")
  try:
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, tuple):
      return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError as e:
    raise ValueError(f"--{name}: cannot read {text!r} as a {type(default).__name__}") from e
  return text


def parse_flags(flags: Iterable[str]) -> list[tuple[str, Any]]:
  """`--name=value` strings -> [(field name, typed value)] in order.

  Raises:
    ValueError: naming the flag, for an unknown name or a value of the wrong type.
  """
  fields, parsed = _fields(), []
  for flag in flags:
    name, sep, text = flag[2:].partition("=")
    value_text = text if sep else None
    if name not in fields and name.startswith("no") and name[2:] in fields and not sep:
      if not isinstance(fields[name[2:]][1].default, bool):
        raise ValueError(f"--{name}: --{name[2:]} is not a boolean flag")
      parsed.append((name[2:], False))
      continue
    if name not in fields:
      raise ValueError(f"--{name}: not a flag of train.py (a recipe sets config fields only)")
    parsed.append((name, _parse(name, value_text, fields[name][1])))
  return parsed


def length_rule(assignments: Sequence[tuple[str, Any]]) -> tuple[dict[str, Any], str]:
  """The run's length from the --epochs and --train_minutes assignments, in the order given.

  The later of the two decides: an --epochs after a positive --train_minutes sets train_minutes to 0 (the epochs
  as given); a positive --train_minutes after an --epochs measures the step and replaces the epochs.

  Returns:
    (the overrides the rule adds, {} or {"train_minutes": 0.0}; a sentence naming which flag decided, "" when
    at most one of them was given).
  """
  last: dict[str, tuple[int, Any]] = {}
  for position, (name, value) in enumerate(assignments):
    if name in ("epochs", "train_minutes"):
      last[name] = (position, value)
  if len(last) < 2 or not last["train_minutes"][1]:
    return {}, ""
  (epochs_at, epochs), (minutes_at, minutes) = last["epochs"], last["train_minutes"]
  if epochs_at > minutes_at:
    return {"train_minutes": 0.0}, (f"--epochs={epochs} given after --train_minutes={minutes:g} decides: "
                                    f"{epochs} epochs, no time budget")
  return {}, (f"--train_minutes={minutes:g} given after --epochs={epochs} decides: the epochs that fit in "
              f"{minutes:g} minutes")


def recipe(name_or_flagfile: str, **overrides: Any) -> config_lib.Config:
  """The run configuration of a recipe, as train.py builds it from `--flagfile=` and then `--name=value` flags.

  Args:
    name_or_flagfile: a shipped recipe (fashion_mnist, cifar10, imagenet, smoke) or a flagfile's path.
    **overrides: config field values set after the file, in order (e.g. epochs=12, data_dir="/data"): the same
      names as train.py's flags. epochs after a file's train_minutes sets the length in epochs (`length_rule`).

  Returns:
    A config.Config, validated as far as it goes without data (a train.py run also needs its model_dir).

  Raises:
    ValueError: naming the recipe, the file line or the field.
  """
  assignments = parse_flags(read_flagfile(path(name_or_flagfile)))
  fields = _fields()
  for name, value in overrides.items():
    if name not in fields:
      raise ValueError(f"{name}: not a recipe field; fields are the names of train.py's flags")
    default = fields[name][1].default
    if isinstance(default, tuple):
      value = tuple(value)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    assignments.append((name, value))
  rule, _ = length_rule(assignments)
  assignments.extend(rule.items())
  return from_assignments(assignments)


def from_assignments(assignments: Sequence[tuple[str, Any]]) -> config_lib.Config:
  """A validated config from defaults and (field, value) pairs applied in order (later ones win)."""
  fields = _fields()
  values: dict[str, dict[str, Any]] = {section: {} for section in config_lib.SECTIONS}
  for name, value in assignments:
    values[fields[name][0]][name] = value
  sections = {section: section_type(**values[section]) for section, section_type in config_lib.SECTIONS.items()}
  return config_lib.validate(config_lib.Config(**sections), run=False)
