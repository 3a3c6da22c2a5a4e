"""The paper's ablation studies as lists of train.py variants, and their summary (ablate.py runs them).

Studies (all variants start from one base flagfile; NCE variants use m = 4096 unless they vary m):
  objective  Table 1: parametric softmax, the exact non-parametric softmax, NCE with m in {1, 10, 512, 4096}.
  embedding  Table 4: embedding size D in {32, 64, 128, 256} (NCE m = 4096).
  fraction   Table 5: the first p% of the training images (NCE m = 4096; evaluated against all train labels).
  proximal   Figure 3: bank momentum 0.5 (the official code), no momentum, no momentum + proximal term.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tf_instdisc import results

STUDIES = ("objective", "embedding", "fraction", "proximal")
PAPER_NEGATIVES = 4096  # The paper's m; smaller only for collections with fewer images (tests).


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # The run's directory under the ablation root.
  study: str
  setting: str  # The study's x: "nce_m512", "64", "10%", ...; also the paper-table key (results.PAPER).
  flags: tuple[str, ...]  # train.py flags on top of the base flagfile.
  x: float  # Position on the study's plot.


def _nce(num_negatives: int) -> tuple[str, ...]:
  return ("--objective=nce", f"--num_negatives={num_negatives}")


def base_variant(num_negatives: int = PAPER_NEGATIVES) -> Variant:
  """The run every study shares: NCE with m noise samples, the base flagfile's other settings."""
  return Variant(f"nce_m{num_negatives}", "objective", f"nce_m{num_negatives}", _nce(num_negatives), num_negatives)


def check(studies: tuple[str, ...], fractions: tuple[float, ...]) -> None:
  """Raises ValueError naming --studies or --fractions (before anything is trained)."""
  unknown = [s for s in studies if s not in STUDIES]
  if unknown or not studies:
    raise ValueError(f"--studies: unknown {', '.join(unknown)}; expected some of {', '.join(STUDIES)}")
  if any(not 0 < f < 100 for f in fractions):
    raise ValueError(f"--fractions: percentages in (0, 100) expected, got {fractions}")


def variants(studies: tuple[str, ...], *, fractions: tuple[float, ...] = (10.0, 30.0),
             num_train: int | None = None, proximal_lambda: float = 30.0,
             num_negatives: int = PAPER_NEGATIVES) -> list[Variant]:
  """The variants of the chosen studies (fraction variants need num_train, the base run's image count).

  The base run (`base_variant(num_negatives)`) appears in every study it belongs to, under one name: it is
  trained once. The objective study's NCE rows are m in {1, 10, 512} below num_negatives.

  Raises:
    ValueError: naming --studies or --fractions.
  """
  check(studies, fractions)
  base = base_variant(num_negatives)
  nce = _nce(num_negatives)
  out = []
  if "objective" in studies:
    out += [base,
            Variant("softmax", "objective", "softmax", ("--objective=softmax",), 0),
            Variant("parametric", "objective", "parametric", ("--objective=parametric",), -1)]
    out += [Variant(f"nce_m{m}", "objective", f"nce_m{m}", _nce(m), m) for m in (1, 10, 512) if m < num_negatives]
  if "embedding" in studies:
    out += [Variant(f"dim{d}", "embedding", str(d), (*nce, f"--embedding_dim={d}"), d) for d in (32, 64, 256)]
    out.append(dataclasses.replace(base, study="embedding", setting="128", x=128))
  if "fraction" in studies:
    if num_train is None:
      raise ValueError("the fraction study needs the base run's number of training images")
    for percent in fractions:
      count = int(round(percent / 100 * num_train))
      if count <= num_negatives:
        raise ValueError(f"--fractions: {percent:g}% is {count} images, not more than the {num_negatives} NCE "
                         "noise samples (--num_negatives)")
      out.append(Variant(f"frac{percent:g}", "fraction", f"{percent:g}%", (*nce, f"--max_train_examples={count}"),
                         percent))
    out.append(dataclasses.replace(base, study="fraction", setting="100%", x=100.0))
  if "proximal" in studies:
    out += [dataclasses.replace(base, study="proximal", setting="momentum 0.5", x=0),
            Variant("no_momentum", "proximal", "no momentum", (*nce, "--bank_momentum=0"), 1),
            Variant(f"proximal{proximal_lambda:g}", "proximal", f"proximal lambda={proximal_lambda:g}",
                    (*nce, "--bank_momentum=0", f"--proximal_lambda={proximal_lambda:g}"), 2)]
  return out


def markdown(rows: list[dict[str, Any]]) -> str:
  """Per-study Markdown tables of ablation rows {study, setting, x, knn_top1, knn_top5, linear_top1, paper_knn,
  paper_linear, paper_where, train_seconds, epochs} (accuracies in [0, 1], paper numbers in %), rows in x order."""
  def percent(value):
    return "" if value is None else f"{100 * value:.2f}"
  lines = []
  for study in STUDIES:
    study_rows = sorted((r for r in rows if r["study"] == study), key=lambda r: r.get("x", 0))
    if not study_rows:
      continue
    lines += [f"### {study}", "",
              "| setting | kNN top-1 | kNN top-5 | linear top-1 | paper kNN | paper linear | paper setting | epochs | "
              "train time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in study_rows:
      lines.append(f"| {r['setting']} | {percent(r['knn_top1'])} | {percent(r['knn_top5'])} | "
                   f"{percent(r['linear_top1'])} | {r['paper_knn'] or ''} | {r['paper_linear'] or ''} | "
                   f"{r['paper_where'] or ''} | {r['epochs']} | {results.format_seconds(r['train_seconds'])} |")
    lines.append("")
  return "\n".join(lines)
