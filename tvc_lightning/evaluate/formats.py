"""Scoring decoded answers and writing them in each benchmark's official layout.

* MathVista (``output_MODE.json`` + ``scores_MODE.json``): the results file maps ``pid`` to the
  item's own fields (``query`` added when the input had none) plus ``response``, ``extraction``,
  ``prediction`` and ``true_false``, as MathVista's evaluation scripts write and read it; the scores
  file holds ``average`` and, for each of ``question_type``, ``answer_type``, ``language``,
  ``source``, ``category``, ``task``, ``context``, ``grade`` and ``skills``, ``{value: {accuracy,
  correct, total}}`` sorted by accuracy (highest first), as its ``calculate_score.py`` writes
  them. ``extraction`` is the project's rule-based one (MathVista's uses an LLM); ``prediction``
  and ``true_false`` follow MathVista's own normalisation (:func:`tvc_lightning.scoring.
  normalize_extracted`), so its scorer recomputes the same flags from the file.
* MathVision (``MODE.jsonl`` + ``MODE_result.json``): one line per item with ``id``, ``model``,
  ``response``, ``model_answer`` and ``correct``, as in the MATH-V repository's outputs; the result
  file maps ``-all``, ``-levelL``, ``SUBJECT``, ``SUBJECT_levelL`` and ``-levelL_SUBJECT`` to
  ``"correct/total=P%"`` (P rounded to 2 places), keys sorted. ``correct`` is the project's
  scorer (:func:`tvc_lightning.scoring.score_record_detailed`) without MathVista's nearest-choice
  fallback, which MATH-V's own evaluation does not have: an answer that names no option by its
  text or letter is wrong, however close it is to the right one.
* Converted shards (``results_MODE.jsonl`` + ``scores_MODE.json``): the record's fields plus the
  response, extraction and ``correct``; scores in MathVista's layout over ``source`` and
  ``answer_type``.

Every item also carries ``tvc``: the extraction method, calibrations, finish reason and generated
token count (the official scripts ignore the extra key). With an LLM judge
(:mod:`tvc_lightning.evaluate.judge`) the extraction is the judge's where it gave a usable reply
(method ``judge:MODEL``, its reply as ``judge_reply``), else the rule-based one (``rule:...``)
with ``judge_failed`` saying why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tvc_lightning.evaluate.benchmarks import EvalItem
from tvc_lightning.evaluate.judge import JudgeOutcome
from tvc_lightning.scoring import (
    RecordScore,
    _judge,
    extract_answer_with_method,
    normalize_extracted,
    score_record_detailed,
)

MATHVISTA_KEYS = ("question_type", "answer_type", "language", "source", "category", "task",
                  "context", "grade", "skills")
SHARD_KEYS = ("source", "answer_type")


def _extras(row: dict[str, Any], method: str, judged: JudgeOutcome | None) -> dict[str, Any]:
    extras: dict[str, Any] = {"extraction_method": method}
    if judged is not None:
        if judged.reply is not None:
            extras["judge_reply"] = judged.reply
        if judged.answer is None:
            extras["judge_failed"] = judged.failure
    return {**extras, "calibrations": row.get("calibrations", []),
            "finish_reason": row.get("finish_reason"), "num_generated": row.get("num_generated")}


def _extract(response: str, choices: list[str] | None, answer_type: str,
             judged: JudgeOutcome | None) -> tuple[str, str]:
    """The judge's extraction where it gave a usable one, else the rule-based one."""
    if judged is not None and judged.answer is not None and judged.method:
        return judged.answer, judged.method
    return extract_answer_with_method(response, choices, answer_type)


def _score(item: EvalItem, response: str, judged: JudgeOutcome | None,
           nearest_choice: bool) -> RecordScore:
    """The project's scorer on the judge's extraction where it gave a usable one, else on the
    rule-based extraction (see :func:`~tvc_lightning.scoring.score_record_detailed`)."""
    record = item.record
    if judged is not None and judged.answer is not None and judged.method:
        return RecordScore(judged.answer, _judge(judged.answer, judged.method, record, nearest_choice),
                           judged.method)
    return score_record_detailed(response, record, nearest_choice=nearest_choice)


# --- MathVista ---------------------------------------------------------------------------------

def mathvista_entry(item: EvalItem, row: dict[str, Any],
                    judged: JudgeOutcome | None = None) -> dict[str, Any]:
    """The results-file entry of one decoded MathVista item (``judged``: the judge's outcome
    for it, when a judge was used)."""
    response = row["response"]
    raw = item.raw
    mc = raw.get("question_type") == "multi_choice"
    choices = [str(c) for c in raw.get("choices") or []] if mc else None
    answer_type = raw.get("answer_type") or "text"
    extraction, method = _extract(response, choices, answer_type, judged)
    prediction = normalize_extracted(extraction, answer_type, choices, raw.get("precision"))
    true_false = prediction is not None and prediction == str(raw["answer"])
    return {**raw, "response": response, "extraction": extraction, "prediction": prediction,
            "true_false": true_false, "tvc": _extras(row, method, judged)}


def _group_values(entry: dict[str, Any], key: str) -> list[Any]:
    value = entry.get(key, (entry.get("metadata") or {}).get(key))
    if key == "skills":
        return list(value or [])
    return [] if value is None else [value]


def mathvista_scores(results: dict[str, dict[str, Any]],
                     keys: Iterable[str] = MATHVISTA_KEYS) -> dict[str, Any]:
    """``average`` and per-value accuracies of a results file (``pid -> entry``), values in order
    of first appearance, then sorted by accuracy, highest first (ties keep that order)."""
    entries = list(results.values())
    correct = sum(bool(e["true_false"]) for e in entries)
    scores: dict[str, Any] = {"average": {"accuracy": correct / len(entries) if entries else 0.0,
                                          "correct": correct, "total": len(entries)}}
    for key in keys:
        counts: dict[Any, list[int]] = {}
        for entry in entries:
            for value in _group_values(entry, key):
                c = counts.setdefault(value, [0, 0])
                c[0] += bool(entry["true_false"])
                c[1] += 1
        if not counts:
            continue
        table = {value: {"accuracy": c / t, "correct": c, "total": t} for value, (c, t) in counts.items()}
        scores[key] = dict(sorted(table.items(), key=lambda kv: kv[1]["accuracy"], reverse=True))
    return scores


# --- MathVision --------------------------------------------------------------------------------

def mathvision_entry(item: EvalItem, row: dict[str, Any], model: str,
                     judged: JudgeOutcome | None = None) -> dict[str, Any]:
    """The output line of one decoded MathVision item, scored without the nearest-choice
    fallback (as MATH-V scores)."""
    scored = _score(item, row["response"], judged, nearest_choice=False)
    return {"id": item.id, "model": model, "response": row["response"],
            "model_answer": scored.extracted, "correct": scored.correct,
            "tvc": {**_extras(row, scored.method, judged), "answer": item.record.answer}}


def mathvision_scores(lines: list[dict[str, Any]], raw_by_id: dict[str, dict[str, Any]]) -> dict[str, str]:
    """MATH-V's accuracy table: ``"correct/total=P%"`` overall, per level, per subject and per
    subject and level (both orders), keys sorted; level and subject from ``raw_by_id``."""
    counts: dict[str, list[int]] = {}
    for line in lines:
        raw = raw_by_id[str(line["id"])]
        # A subset without MATH-V's fields still scores (under "unknown"), not a KeyError at the end.
        subject, level = raw.get("subject", "unknown"), raw.get("level", "unknown")
        for key in ("-all", f"-level{level}", f"{subject}", f"{subject}_level{level}",
                    f"-level{level}_{subject}"):
            c = counts.setdefault(key, [0, 0])
            c[0] += bool(line["correct"])
            c[1] += 1
    return {key: f"{c}/{t}={round(c / max(t, 1) * 100, 2)}%" for key, (c, t) in sorted(counts.items())}


# --- converted shards --------------------------------------------------------------------------

def shard_entry(item: EvalItem, row: dict[str, Any],
                judged: JudgeOutcome | None = None) -> dict[str, Any]:
    """The results line of one decoded shard record (the project's scorer, as in validation)."""
    scored = _score(item, row["response"], judged, nearest_choice=True)
    return {**item.raw, "response": row["response"], "extraction": scored.extracted,
            "correct": scored.correct, "tvc": _extras(row, scored.method, judged)}


# --- writing -----------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(lines: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def write_outputs(benchmark: str, items: list[EvalItem], rows: dict[str, dict[str, Any]],
                  out: Path, mode: str, model: str,
                  judged: dict[str, JudgeOutcome] | None = None) -> tuple[list[Path], float, int, int]:
    """Write ``mode``'s results and scores files for the decoded ``rows`` (by item id; items
    without a row or with a ``skipped`` row are left out). ``judged``: the LLM judge's outcome
    per item id, when one was used. Returns the paths written, the accuracy, and the correct
    and total counts."""
    decoded = [item for item in items if item.id in rows and "skipped" not in rows[item.id]]
    judged = judged or {}

    def outcome(item: EvalItem) -> JudgeOutcome | None:
        return judged.get(item.id)

    if benchmark == "mathvista":
        results = {item.id: mathvista_entry(item, rows[item.id], outcome(item))
                   for item in decoded}
        scores = mathvista_scores(results)
        paths = [out / f"output_{mode}.json", out / f"scores_{mode}.json"]
        _atomic_write(paths[0], json.dumps(results, indent=4) + "\n")  # as MathVista's save_json
        _atomic_write(paths[1], json.dumps(scores, indent=4) + "\n")
        average = scores["average"]
        return paths, average["accuracy"], average["correct"], average["total"]
    if benchmark == "mathvision":
        lines = [mathvision_entry(item, rows[item.id], model, outcome(item))
                 for item in decoded]
        table = mathvision_scores(lines, {item.id: item.raw for item in decoded})
        paths = [out / f"{mode}.jsonl", out / f"{mode}_result.json"]
        _atomic_write(paths[0], _jsonl(lines))
        _atomic_write(paths[1], json.dumps(table, indent=4, ensure_ascii=False) + "\n")
        flags = [bool(line["correct"]) for line in lines]
    else:
        lines = [shard_entry(item, rows[item.id], outcome(item)) for item in decoded]
        as_flags = {str(i): {**line, "true_false": line["correct"]} for i, line in enumerate(lines)}
        scores = mathvista_scores(as_flags, SHARD_KEYS)
        paths = [out / f"results_{mode}.jsonl", out / f"scores_{mode}.json"]
        _atomic_write(paths[0], _jsonl(lines))
        _atomic_write(paths[1], json.dumps(scores, indent=4, ensure_ascii=False) + "\n")
        flags = [bool(line["correct"]) for line in lines]
    correct = sum(flags)
    return paths, (correct / len(flags) if flags else 0.0), correct, len(flags)
