"""Pure parts of the evidence run (:mod:`tvc_lightning.analyze.evidence`): bootstrap intervals,
the 2x2 table, the curve summaries and the markdown of ``docs/evidence.md``.

Nothing here trains or decodes; every number it prints is passed in from the run's output files.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ARMS = ("plain", "dvr")
# pvc_keep: PVC with reset none, the original image kept visible after a calibration, as DVR
# training always shows it (pvc resets it: the method's visual cache reset).
MODES = ("plain", "pvc", "pvc_keep")
ARM_NAMES = {"plain": "plain SFT (dvr.p 0)", "dvr": "DVR (dvr.p 1)"}
MODE_NAMES = {"plain": "plain decoding", "pvc": "PVC decoding",
              "pvc_keep": "PVC, original kept (reset none)"}
READING_START = "<!-- reading: hand-written, kept when the driver rewrites this file -->"
READING_END = "<!-- /reading -->"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile-bootstrap interval, over ``n`` samples."""

    value: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def fmt(self, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.value:{sign}.3f} [{self.low:{sign}.3f}, {self.high:{sign}.3f}]"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (``q`` in [0, 1])."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(flags: Sequence[bool | float], resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Interval:
    """Accuracy of ``flags`` with a percentile-bootstrap interval (items resampled with
    replacement). Seeded, so the doc's intervals are reproducible from the same results."""
    if not flags:
        raise ValueError("bootstrap_ci needs at least one sample")
    values = [float(f) for f in flags]
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2
    return Interval(sum(values) / n, _percentile(means, tail), _percentile(means, 1 - tail), n)


def paired_diff_ci(a: Sequence[bool | float], b: Sequence[bool | float], resamples: int = 2000,
                   level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over the same items, items resampled jointly: both cells answer the same
    questions, so the pairing removes the item-difficulty variance a two-sample interval keeps."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([float(x) - float(y) for x, y in zip(a, b, strict=True)], resamples,
                        level, seed)


def pooled_rate_ci(counts: Sequence[tuple[int, int]], resamples: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """``sum(hits) / sum(totals)`` over items of ``(hits, total)`` counts (e.g. the cell reads of
    each response), items resampled: reads of one response are not independent."""
    return _item_bootstrap(len(counts), lambda idx: _pooled_rate(counts, idx), resamples, level, seed)


def paired_pooled_rate_diff_ci(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]],
                               resamples: int = 2000, level: float = 0.95,
                               seed: int = 0) -> Interval:
    """Pooled rate of ``a`` minus that of ``b`` over the same items, resampled jointly."""
    if len(a) != len(b):
        raise ValueError(f"paired counts differ in length: {len(a)} vs {len(b)}")
    return _item_bootstrap(len(a), lambda idx: _pooled_rate(a, idx) - _pooled_rate(b, idx),
                           resamples, level, seed)


def _pooled_rate(counts: Sequence[tuple[int, int]], idx: Sequence[int]) -> float:
    total = sum(counts[i][1] for i in idx)
    return sum(counts[i][0] for i in idx) / total if total else 0.0


def _item_bootstrap(n: int, stat: Callable[[Sequence[int]], float], resamples: int, level: float,
                    seed: int) -> Interval:
    """``stat`` of all ``n`` items with a percentile interval over resampled item indices."""
    if not n:
        raise ValueError("a bootstrap needs at least one item")
    rng = random.Random(seed)
    values = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return Interval(stat(range(n)), _percentile(values, tail), _percentile(values, 1 - tail), n)


def cell_reads_markdown(reads: Mapping[tuple[str, str], Interval], diff: Interval) -> list[str]:
    """The section on per-cell reads: every "The cell in row R, column C is X." the chains wrote,
    checked against the image."""
    lines = ["## Cell reads: every colour the chains read off the grid", "",
             "Share of the chains' cell sentences (\"The cell in row R, column C is X.\") whose colour "
             "is the image's for that cell, pooled over each cell's responses, with item-bootstrap "
             "intervals (10 colours: chance is about 0.10).", "",
             "| training \\ decoding | " + " | ".join(MODE_NAMES[m] for m in MODES) + " |",
             "|---|" + "---|" * len(MODES)]
    for arm in ARMS:
        lines.append(f"| {ARM_NAMES[arm]} | "
                     + " | ".join(f"{reads[(arm, m)].fmt()} ({reads[(arm, m)].n} items)"
                                  for m in MODES) + " |")
    lines += ["", f"dvr+pvc - plain+plain, paired by item: {diff.fmt(signed=True)}.", ""]
    return lines


FORCED_ROWS = (("plain", 0), ("plain", 1), ("dvr", 0), ("dvr", 1))


def forced_reads_markdown(reads: Mapping[tuple[str, int, str], Interval],
                          diffs: Mapping[str, Interval], columns: Mapping[str, str]) -> list[str]:
    """The section on teacher-forced reads at several chain lengths (``analyze.forced``):
    ``reads[(arm, copy, column)]``, ``diffs[column]`` = DVR with its copy minus plain without."""
    scales = [c.removeprefix("x") + "x" for c in columns]
    lines = ["## Reads at longer chains (teacher-forced)", "",
             "The reference chain fed in whole (`python -m tvc_lightning.analyze.forced`), its "
             f"restated part {', '.join(scales[:-1])} and {scales[-1]} as long as in training; "
             "share of the lookup sentences' "
             "colours that the model's greedy choice gets right, with item-bootstrap intervals. "
             "\"copy\": DVR's bridge and pooled copy at the reflection point, as PVC with reset "
             "none decodes (the original image stays visible).", "",
             "| training | copy | " + " | ".join(columns.values()) + " |",
             "|---|---|" + "---|" * len(columns)]
    for arm, copy in FORCED_ROWS:
        lines.append(f"| {ARM_NAMES[arm]} | {'yes' if copy else 'no'} | "
                     + " | ".join(reads[(arm, copy, c)].fmt() for c in columns) + " |")
    lines += ["", "DVR with its copy minus plain SFT without one, paired by item: "
              + "; ".join(f"{columns[c]}: {diffs[c].fmt(signed=True)}" for c in columns) + ".", ""]
    return lines


def cut_chain_markdown(answers: Mapping[tuple[str, str, str], Interval],
                       diffs: Mapping[tuple[str, str], Interval], columns: Mapping[str, str],
                       rows: Sequence[tuple[str, str]]) -> list[str]:
    """The section on answers decoded after the reference chain cut at its reflection sentence:
    ``answers[(arm, decoding, column)]``, ``diffs[(decoding, column)]`` = DVR with that decoding
    minus plain SFT with plain decoding."""
    lines = ["## Answers decoded after a longer chain", "",
             "The same longer chains, cut just before their reflection sentence and given as the "
             "answer's start (`analyze.forced --decode`); the model writes the rest (one "
             "calibration allowed from the first generated token) and the answer is scored.", "",
             "| training | decoding | " + " | ".join(columns.values()) + " |",
             "|---|---|" + "---|" * len(columns)]
    names = {**MODE_NAMES, "pvc_keep": "PVC, original kept"}
    for arm, d in rows:
        lines.append(f"| {ARM_NAMES[arm]} | {names[d]} | "
                     + " | ".join(answers[(arm, d, c)].fmt() for c in columns) + " |")
    lines += [""] + [f"dvr+{d} - plain+plain, paired by item: "
                     + "; ".join(f"{columns[c]}: {diffs[(d, c)].fmt(signed=True)}" for c in columns)
                     + "." for d in ("pvc", "pvc_keep")] + [""]
    return lines


def accuracy_table(cells: Mapping[tuple[str, str], Interval]) -> str:
    """The accuracy table: rows are the training arms, columns the decodings."""
    lines = ["| training \\ decoding | " + " | ".join(MODE_NAMES[m] for m in MODES) + " |",
             "|---|" + "---|" * len(MODES)]
    for arm in ARMS:
        row = [cells[(arm, mode)].fmt() for mode in MODES]
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def read_flags(results_jsonl: Path) -> dict[str, bool]:
    """``id -> correct`` from an ``evaluate --benchmark shards`` ``results_MODE.jsonl``."""
    import json

    flags = {}
    for line in results_jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            flags[row["id"]] = bool(row["correct"])
    return flags


def forgetting_summary(curve_csv: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Per decoding mode, the layer-mean attention share per response-position bin:
    ``[(bin, original, copy), ...]`` from ``forgetting_curve.csv``."""
    acc: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    with curve_csv.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            copy = float(row["copy"]) if row["copy"] not in ("", "nan") else 0.0
            acc[(row["mode"], int(row["bin"]))].append((float(row["original"]), copy))
    out: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (mode, b), values in sorted(acc.items()):
        out[mode].append((b, sum(v[0] for v in values) / len(values),
                          sum(v[1] for v in values) / len(values)))
    return dict(out)


def removal_summary(curve_csv: Path) -> list[tuple[str, float, float]]:
    """``[(r, accuracy, same_as_baseline), ...]`` from ``removal_curve.csv`` (baseline row last)."""
    with curve_csv.open(encoding="utf-8") as f:
        return [(row["r"], float(row["accuracy"]), float(row["same_as_baseline"]))
                for row in csv.DictReader(f)]


def forgetting_markdown(curves: Mapping[str, Mapping[str, list[tuple[int, float, float]]]]) -> str:
    """One row per (arm, mode): the layer-mean share on the original image per position bin."""
    bins = max(len(v) for arm in curves.values() for v in arm.values())
    head = ("| model | decoding | " + " | ".join(f"bin {b}" for b in range(bins))
            + " | last / first | copies, last bin |")
    lines = [head, "|---|---|" + "---|" * (bins + 2)]
    for arm, modes in curves.items():
        for mode, rows in modes.items():
            shares = [f"{o:.4f}" for _, o, _ in rows]
            ratio = rows[-1][1] / rows[0][1] if rows and rows[0][1] > 0 else float("nan")
            lines.append(f"| {ARM_NAMES[arm]} | {mode} | " + " | ".join(shares)
                         + f" | {ratio:.2f} | {rows[-1][2]:.4f} |")
    return "\n".join(lines)


def removal_markdown(curves: Mapping[str, list[tuple[str, float, float]]]) -> str:
    """One row per arm: accuracy with the image hidden from answer token floor(rL + 0.5) on."""
    rs = [r for r, _, _ in next(iter(curves.values()))]
    lines = ["| model | " + " | ".join(f"r={r}" if r != "baseline" else "baseline" for r in rs) + " |",
             "|---|" + "---|" * len(rs)]
    for arm, rows in curves.items():
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(f"{a:.3f}" for _, a, _ in rows) + " |")
    return "\n".join(lines)


def kept_reading(existing: str | None) -> str | None:
    """The hand-written reading between the markers of an earlier ``docs/evidence.md``, if any."""
    if not existing or READING_START not in existing or READING_END not in existing:
        return None
    start = existing.index(READING_START) + len(READING_START)
    return existing[start:existing.index(READING_END)].strip("\n")


def verdicts(cells: Mapping[tuple[str, str], Interval], diffs: Mapping[str, Interval],
             forgetting: Mapping[str, Mapping[str, list[tuple[int, float, float]]]],
             chance: float) -> list[str]:
    """Mechanical statements the numbers support (the hand-written reading interprets them)."""
    out = []
    main = diffs["dvr+pvc - plain+plain"]
    out.append(
        f"DVR+PVC minus plain SFT + plain decoding: {main.fmt(signed=True)}; the interval "
        + ("excludes 0." if main.excludes_zero() else "includes 0: no difference is shown."))
    for (arm, mode), cell in sorted(cells.items()):
        above = cell.low > chance
        out.append(f"{ARM_NAMES[arm]}, {MODE_NAMES[mode]}: {cell.fmt()}, "
                   + (f"above the best constant answer's {chance:.2f}." if above else
                      f"not above the best constant answer's {chance:.2f}."))
    for arm, modes in forgetting.items():
        rows = modes.get("plain")
        if rows and rows[0][1] > 0:
            change = rows[-1][1] / rows[0][1] - 1.0
            trend = "decays" if change < 0 else "does not decay"
            out.append(f"{ARM_NAMES[arm]}, plain decoding: the layer-mean attention share on the "
                       f"image {trend} along the response ({rows[0][1]:.4f} in the first bin, "
                       f"{rows[-1][1]:.4f} in the last: {change:+.0%}).")
    return out


def render_doc(*, command: str, date: str, machine: str, sizes: Mapping[str, str],
               cells: Mapping[tuple[str, str], Interval], diffs: Mapping[str, Interval],
               forgetting: Mapping[str, Mapping[str, list[tuple[int, float, float]]]],
               removal: Mapping[str, list[tuple[str, float, float]]], figures: Mapping[str, str],
               timings: Mapping[str, float], train_loss: Mapping[str, float], chance: float,
               reading: str | None, resamples: int, cell_reads: Sequence[str] = (),
               forced_reads: Sequence[str] = ()) -> str:
    """The whole ``docs/evidence.md``."""
    n = next(iter(cells.values())).n
    parts = [
        "# Evidence: plain SFT vs DVR, plain vs PVC decoding, on `late_lookup` (CPU)",
        "",
        "Written by the driver from one run's output files; every figure below comes from that run.",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}",
        f"- Machine: {machine}",
        "- Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()),
        "",
        "## Sizes",
        "",
        *(f"- {k}: {v}" for k, v in sizes.items()),
        "",
        "## Accuracy on the held-out split (2x2, and PVC without the reset)",
        "",
        f"Accuracy over {n} held-out `val` items, with 95% percentile-bootstrap intervals "
        f"({resamples} resamples of the items). Best constant answer on these items (a text-only "
        f"guess that ignores the question and the image): {chance:.2f}.",
        "",
        accuracy_table(cells),
        "",
        "Paired differences (same items, resampled jointly):",
        "",
        "| difference | value [95% CI] |",
        "|---|---|",
        *(f"| {k} | {v.fmt(signed=True)} |" for k, v in diffs.items()),
        "",
        "Final training loss (mean of the last logged steps): "
        + ", ".join(f"{ARM_NAMES[a]} {v:.3f}" for a, v in train_loss.items()) + ".",
        "",
        "## Visual forgetting: attention share on the original image along the response",
        "",
        "Layer-mean attention share of the generated tokens on the original image's tokens, per "
        "relative response-position bin (`analyze forgetting`, `forgetting_curve.csv`).",
        "",
        forgetting_markdown(forgetting),
        "",
        *(f"![{k}]({v})" for k, v in figures.items() if "forgetting" in k),
        "",
        "## Image removal: accuracy with the image hidden from a fraction r of the answer on",
        "",
        "(`analyze removal`: r = 0 hides the image from the whole answer, r = 1 is the unmodified "
        "plain decode.)",
        "",
        removal_markdown(removal),
        "",
        *(f"![{k}]({v})" for k, v in figures.items() if "removal" in k),
        "",
        *cell_reads,
        *forced_reads,
        "## What the numbers say (computed)",
        "",
        *(f"- {s}" for s in verdicts(cells, diffs, forgetting, chance)),
        "",
        "## Reading",
        "",
        READING_START,
        reading if reading is not None else "(not written yet)",
        READING_END,
        "",
    ]
    return "\n".join(parts)
