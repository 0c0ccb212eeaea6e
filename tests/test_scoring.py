"""Answer extraction, MathVista-official normalisation, record scoring and the accuracy metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.scoring import (
    AnswerAccuracy,
    boxed_contents,
    edit_distance,
    extract_answer,
    nearest_choice,
    normalize_extracted,
    score_mathvista,
    score_record,
)

MATHVISTA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mathvista"


@pytest.fixture(scope="module")
def mathvista_results() -> dict[str, dict]:
    path = MATHVISTA_DIR / "output_gpt4_2shot_solution.json"
    if not path.is_file():
        pytest.skip(
            "../shared/data/mathvista not present beside the checkout: "
            "MathVista regression vectors unavailable"
        )
    return json.loads(path.read_text(encoding="utf-8"))


# --- MathVista regression vectors --------------------------------------------------------------


def test_reproduces_every_stored_mathvista_flag(mathvista_results):
    assert len(mathvista_results) == 1000
    mismatched = [
        (pid, item["extraction"], item["answer"], item["true_false"])
        for pid, item in mathvista_results.items()
        if score_mathvista(item["extraction"], item) != item["true_false"]
    ]
    assert not mismatched, f"{len(mismatched)} of 1000 flags differ, first: {mismatched[:5]}"
    # Not a degenerate scorer: the file holds both outcomes.
    assert sum(item["true_false"] for item in mathvista_results.values()) == 292


def test_reproduces_every_stored_mathvista_prediction(mathvista_results):
    """The intermediate normalised prediction (None where conversion failed) matches too."""
    mismatched = []
    for pid, item in mathvista_results.items():
        choices = item["choices"] if item["question_type"] == "multi_choice" else None
        got = normalize_extracted(item["extraction"], item["answer_type"], choices, item["precision"])
        if got != item["prediction"]:
            mismatched.append((pid, item["extraction"], item["prediction"], got))
    assert not mismatched, f"{len(mismatched)} predictions differ, first: {mismatched[:5]}"


def test_results_file_agrees_with_testmini(mathvista_results):
    """The regression file's answers are testmini's, so the vectors test the real benchmark."""
    testmini = json.loads((MATHVISTA_DIR / "testmini.json").read_text(encoding="utf-8"))
    assert testmini.keys() == mathvista_results.keys()
    for pid, item in testmini.items():
        assert (item["answer"], item["choices"]) == (
            mathvista_results[pid]["answer"],
            mathvista_results[pid]["choices"],
        )


# --- extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # \boxed{}: the last one, nested and escaped braces, unclosed boxes skipped
        ("So x = 2. The final answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("First \\boxed{3}, no wait: \\boxed{ {4} }", "{4}"),
        ("\\boxed{\\{1, 2\\}} then \\boxed{5", "\\{1, 2\\}"),
        ("The answer is 9, boxed: \\boxed{7}", "7"),  # boxed outranks an earlier phrase
        # "answer is": last occurrence, to the end of the sentence, wrapping removed
        ("Unbalanced \\boxed{5 so fall back. The answer is **$7$**.", "7"),
        ("The answer is 3. Wait, no. The final answer is 12.5. Done.", "12.5"),
        ("The correct answer is: $\\sqrt{2}$", "\\sqrt{2}"),
        ("The answer is\n\n**42**", "42"),
        # "Answer:" (ranks below "answer is")
        ("Reasoning...\nAnswer: (B) 12.5.\n", "(B) 12.5"),
        ("**Final Answer:** 12 cm.", "12 cm"),
        ("Answer: 4\nThe answer is 5.", "5"),
        # the last number, thousands separators dropped
        ("Counting gives 3 cats and 1,234 ants, total -7.5 units", "-7.5"),
        ("there are 1,234 ants", "1234"),
        # nothing
        ("No final answer here.", ""),
        ("   ", ""),
    ],
)
def test_extract_answer_free_form(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Red", "Red"),  # the response is a choice verbatim (MathVista's rule)
        ("The answer is (C) 45°.", "C"),  # a leading option letter becomes the bare letter
        ("Answer: B. because it is longer", "B"),
        ("The answer is blue.", "Blue"),  # names a choice, ignoring case
        ("The answer is \\boxed{E}", "E"),  # out of range for 4 choices: kept as said
        ("(A) is wrong, (B) is wrong, so option D fits", "D"),  # last standalone letter
        ("It could be A: no. Surely C.", "C"),
        ("**B**", "B"),
        ("The final answer is $\\boxed{\\text{(B)}}$.", "B"),
        ("Point A lies on the circle", ""),  # "A " is an article, not an option letter
        ("Options E) and F) are missing; 3 is the count", "3"),  # E, F out of range -> last number
    ],
)
def test_extract_answer_multiple_choice(response, expected):
    assert extract_answer(response, ["Red", "Blue", "Green", "Yellow"]) == expected


def test_boxed_contents_order_and_nesting():
    assert boxed_contents("\\boxed{a} x \\fbox{b{c}} \\boxed {d}") == ["a", "b{c}", "d"]


# --- normalisation -----------------------------------------------------------------------------


def test_edit_distance_and_nearest_choice():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("same", "same") == 0
    assert nearest_choice("6 cm", ["5cm", "6cm", "7 m"]) == "6cm"
    assert nearest_choice("x", ["ab", "cd"]) == "ab"  # ties go to the earliest choice


@pytest.mark.parametrize(
    ("extraction", "expected"),
    [
        ("B", "20"),
        ("(c) because", "30"),  # a parenthesised letter anywhere, either case
        ("b", "10"),  # officially a bare letter must be upper case: edit distance, a tie -> first
        ("E", "10"),  # out of range: edit distance, all choices tie at 2 -> the first
        ("(E)", "10"),
        ("31", "30"),
        ("", "10"),  # even an empty extraction lands on a choice
    ],
)
def test_normalize_multiple_choice(extraction, expected):
    assert normalize_extracted(extraction, "text", ["10", "20", "30", "40"], None) == expected


@pytest.mark.parametrize(
    ("extraction", "answer_type", "precision", "expected"),
    [
        ("3.0", "integer", None, "3"),
        ("3.7", "integer", None, "3"),  # official truncation
        ("-2", "integer", None, "-2"),
        ("4.05", "float", 1, "4.0"),
        ("0.40", "float", 2, "0.4"),
        ("1.236", "float", 2, "1.24"),
        ("7", "float", 1.0, "7.0"),  # a float precision that is integral is used as an int
        ("2.5", "float", None, "2.5"),
        ("[1, 2]", "list", None, "[1, 2]"),
        ("N/A", "integer", None, None),
        ("inf", "integer", None, None),
        ("a/2", "float", 1, None),
        (None, "float", 1, None),
    ],
)
def test_normalize_free_form(extraction, answer_type, precision, expected):
    assert normalize_extracted(extraction, answer_type, None, precision) == expected


def test_score_mathvista_uses_question_type():
    item = {"answer": "2", "answer_type": "integer", "choices": ["1", "2"], "precision": None}
    assert score_mathvista("B", {**item, "question_type": "multi_choice"})
    assert not score_mathvista("B", {**item, "question_type": "free_form"})  # int("B") fails
    assert score_mathvista("2.0", {**item, "question_type": "free_form"})
    assert score_mathvista("B", item)  # no question_type: choices decide
    assert not score_mathvista("N/A", {"answer": "1.5", "answer_type": "float", "precision": 1})


# --- records -----------------------------------------------------------------------------------


def _record(answer: str, answer_type: str = "text", choices=None, precision=None) -> SampleRecord:
    return SampleRecord(
        id="t",
        question="q",
        response="r",
        answer=answer,
        answer_type=answer_type,
        choices=choices,
        precision=precision,
    )


@pytest.mark.parametrize(
    ("response", "correct"),
    [
        ("There are 7 shapes. The final answer is \\boxed{7}.", True),
        ("The answer is 7.0", True),
        ("Answer: $7$ shapes", True),
        ("The answer is 7.5", False),  # exact for integers (MathVista would truncate to 7)
        ("I count 1,007", False),
        ("The answer is 7 m/s^2.", True),
        ("The answer is x = 7", True),
        ("The answer is 7 + 1", False),  # an expression, not the number 7
        ("The answer is 7 x 10^3", False),
        ("No idea.", False),
    ],
)
def test_score_record_integer(response, correct):
    assert score_record(response, _record("7", "integer"))[1] is correct


def test_score_record_float_precision_and_tolerance():
    assert score_record("The answer is 1.23", _record("1.2", "float", precision=1)) == ("1.23", True)
    assert not score_record("The answer is 1.26", _record("1.2", "float", precision=1))[1]
    assert score_record("\\boxed{\\frac{1}{3}}", _record("0.3333333", "float"))[1]
    assert not score_record("\\boxed{0.334}", _record("0.3333333", "float"))[1]
    assert score_record("The answer is 45°", _record("45", "float"))[1]


def test_score_record_text_choices():
    record = _record("Blue", choices=["Red", "Blue", "Same"])
    assert score_record("The final answer is \\boxed{Blue}.", record) == ("Blue", True)
    assert score_record("Answer: (B)", record) == ("B", True)
    assert score_record("the answer is blue.", record) == ("Blue", True)
    assert score_record("I'd say \\boxed{Bleu}", record)[1]  # MathVista's nearest-choice rule
    assert score_record("\\boxed{Red}", record) == ("Red", False)
    assert score_record("I cannot tell.", record) == ("", False)  # empty never earns a choice


def test_score_record_mathvision_letters():
    record = _record("C", choices=["A", "B", "C", "D", "E"])
    assert score_record("... so the answer is (C).", record) == ("C", True)
    assert score_record("Hence option C", record) == ("C", True)
    assert score_record("\\boxed{C: 12 cm}", record) == ("C", True)
    assert not score_record("Answer: D", record)[1]
    assert not score_record("The answer is 12", record)[1]  # no edit-distance guess among letters
    # A letter answer over real option texts designates the choice by position.
    assert score_record("The answer is 30", _record("C", choices=["10", "20", "30"]))[1]


def test_score_record_text_and_list():
    record = _record("Quarter past")
    assert score_record("The answer is **quarter  past**.", record) == ("quarter  past", True)
    assert not score_record("The answer is half past.", record)[1]
    assert score_record("The answer is 2.50", _record("2.5"))[1]  # numbers in text compare as numbers
    assert score_record("Answer: [2014,2016]", _record("[2014, 2016]", "list"))[1]
    assert not score_record("Answer: [2014, 2015]", _record("[2014, 2016]", "list"))[1]


# --- metric ------------------------------------------------------------------------------------


def test_answer_accuracy_accumulates():
    metric = AnswerAccuracy()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0.0  # nothing scored: 0.0, documented, not NaN
    metric.update([True, False, True])
    metric.update(torch.tensor([[True], [True]]))
    metric.update([])
    assert (metric.correct.item(), metric.total.item()) == (4, 5)
    assert metric.compute().item() == pytest.approx(0.8)
    metric.reset()
    assert (metric.correct.item(), metric.total.item()) == (0, 0)


def test_answer_accuracy_state_reduces_by_sum():
    """Sync through a fake two-rank gather (the other rank scored 1 of 3): the same reduction path
    as a real all-gather, without the ~13 s of spawning a gloo process group."""
    other = {"correct": torch.tensor(1), "total": torch.tensor(3)}

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        name = "correct" if tensor is metric.correct else "total"
        return [tensor, other[name]]

    metric = AnswerAccuracy(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    metric.update([True, True])
    metric.sync(dist_sync_fn=gather)  # a manual sync() ignores the constructor's dist_sync_fn
    assert (metric.correct.item(), metric.total.item()) == (3, 5)
    metric.unsync()
    assert (metric.correct.item(), metric.total.item()) == (2, 2)  # local state is kept
    assert metric.compute().item() == pytest.approx(0.6)  # compute() syncs by itself
