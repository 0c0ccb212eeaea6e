"""The late_lookup synthetic task: the answer is a grid cell's colour that the chain reads only
after a long arithmetic detour, and no text-only guess beats chance."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections import Counter, defaultdict

import pytest
from PIL import Image

from data_engine.__main__ import main as data_engine_main
from data_engine.synth_late import LOOKUP, PALETTE, cell_of, make_sample
from tvc_lightning.data.shards import load_split
from tvc_lightning.data.skips import SkipCounter
from tvc_lightning.scoring import score_record

COLOUR_WORD = re.compile(r"\b(" + "|".join(PALETTE) + r")\b")
ANSWER_LIST = "Answer with one of: " + ", ".join(PALETTE) + "."


def _samples(split: str, n: int):
    return [make_sample(0, split, i, image_size=160) for i in range(n)]


def test_samples_are_deterministic_and_the_image_holds_the_answer():
    for i in range(20):
        key, record, image, grid, detour = make_sample(3, "val", i)
        again = make_sample(3, "val", i)
        assert again[1] == record and again[2].tobytes() == image.tobytes()
        row, col = cell_of(detour, grid)
        assert record.answer == grid.colours[row][col]
        assert image.getpixel(grid.centre(row, col)) == PALETTE[record.answer]
        # The arithmetic is right: the chain's final x picks that cell.
        x = detour.x0
        for _ in range(detour.steps):
            x = (x * detour.mul + detour.add) % detour.mod
        assert f"x = {x}." in record.response
        assert score_record(record.response, record) == (record.answer, True)
    assert make_sample(3, "val", 0)[1] != make_sample(4, "val", 0)[1]


def test_the_text_names_no_colour_before_the_late_lookup():
    lengths = []
    for _, record, _, grid, detour in _samples("train", 200):
        row, col = cell_of(detour, grid)
        lookup = LOOKUP.format(row=row + 1, col=col + 1, colour=record.answer)
        before, found, _ = record.response.partition(lookup)
        assert found
        assert COLOUR_WORD.search(before) is None, before
        assert COLOUR_WORD.search(record.question.replace(ANSWER_LIST, "")) is None
        assert record.question.endswith(ANSWER_LIST)  # the same list in every question
        lengths.append(len(before.split()))
    # Hundreds of tokens of other work come first (words undercount BPE tokens).
    assert min(lengths) >= 250 and sum(lengths) / len(lengths) >= 400


def test_text_only_baselines_score_near_chance():
    """10 colours: the majority answer, and the best guess per question-text feature (grid shape
    and the queried cell, learned on train and scored on val), stay near 1/10."""
    train, val = _samples("train", 500), _samples("val", 500)
    answers = Counter(s[1].answer for s in train)
    assert len(answers) == len(PALETTE)
    assert answers.most_common(1)[0][1] / len(train) <= 0.15
    assert sum(s[1].answer == answers.most_common(1)[0][0] for s in val) / len(val) <= 0.15

    def feature(sample):
        _, record, _, grid, detour = sample
        return grid.rows, grid.cols, cell_of(detour, grid)

    by_feature: dict[tuple, Counter] = defaultdict(Counter)
    for s in train:
        by_feature[feature(s)][s[1].answer] += 1
    guess = {f: c.most_common(1)[0][0] for f, c in by_feature.items()}
    hits = sum(guess.get(feature(s), answers.most_common(1)[0][0]) == s[1].answer for s in val)
    assert hits / len(val) <= 0.15
    # Variety: many distinct grids, cells and detours.
    assert len({feature(s) for s in train}) > 50
    assert len({(s[4].x0, s[4].mul, s[4].add, s[4].mod) for s in train}) == len(train)


def test_cli_writes_late_lookup_shards_that_the_trainer_reads(tmp_path):
    out = tmp_path / "late"
    assert data_engine_main(["synth", "--task", "late_lookup", "--out", str(out), "--num-train",
                             "3", "--num-val", "2", "--image-size", "96", "--detour-steps", "4"]) == 0
    val = load_split(str(out / "val"), SkipCounter(), world_size=1, rank=0)
    assert [r.id for r, _ in val] == ["late-val-000000", "late-val-000001"]
    record, (image,) = val[0]
    _, expected, expected_image, _, _ = make_sample(0, "val", 0, image_size=96, detour_steps=4)
    assert record == expected and image.tobytes() == expected_image.tobytes()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["late-000000.tar"]


def _digest(folder) -> str:
    """Records and decoded PNG pixels (JPEG bytes depend on the encoder build): what the default
    task writes, independent of the Pillow/zlib release."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.tar")):
        h.update(str(p.relative_to(folder)).encode())
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                h.update(m.name.encode())
                if m.name.endswith(".png"):
                    data = Image.open(io.BytesIO(data)).tobytes()
                elif m.name.endswith(".jpg"):
                    data = b""
                h.update(data)
    return h.hexdigest()


def test_default_task_is_unchanged(tmp_path):
    """Pinned before the late_lookup task was added: the default (shapes) output stays the same."""
    args = ["synth", "--num-train", "12", "--num-val", "5", "--seed", "7", "--samples-per-shard",
            "4", "--image-size", "96"]
    assert data_engine_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert data_engine_main(args + ["--out", str(tmp_path / "b"), "--task", "shapes"]) == 0
    pinned = "5881f411dd048420f17753d96e6f21d9d88b787968dbcb431105a74a31f55304"
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == pinned


# --- the copy detour: a list copied out, then the lookup ----------------------------------------

STEPS = {"copy": 40, "repeat": 14, "survey": 8, "uniform": 14}
REFLECTION = "Let me check that cell in the image."


def _copy_samples(split: str, n: int, detour: str = "copy"):
    return [make_sample(0, split, i, image_size=168, detour_steps=STEPS[detour], detour=detour)
            for i in range(n)]


@pytest.mark.parametrize("detour", ["copy", "repeat", "survey", "uniform"])
def test_copy_detour_aligns_cells_with_pooled_tokens_and_names_no_colour_early(detour):
    """168 px, 3 x 3: every 56-px cell is 2 x 2 merged tokens (28 px each), so a copy pooled with
    kernel 2 has one token per cell; the question names the cell, the chain copies the list and
    names no colour before the lookup."""
    import numpy as np

    from tvc_lightning.testing import build_tiny_processor

    processor = build_tiny_processor(max_pixels=168 * 168)
    for _, record, image, grid, words in _copy_samples("train", 30, detour):
        assert image.size == (168, 168) and (grid.rows, grid.cols, grid.cell) == (3, 3, 56)
        pixels = np.asarray(image)
        for r in range(3):
            for c in range(3):
                cell = pixels[56 * r + 1:56 * (r + 1) - 1, 56 * c + 1:56 * (c + 1) - 1]
                assert (cell == PALETTE[grid.colours[r][c]]).all()
        row, col = next((r, c) for r in range(3) for c in range(3)
                        if f"row {r + 1}, column {c + 1}." in record.question)
        target = f"row {row + 1}, column {col + 1}"
        lookup = LOOKUP.format(row=row + 1, col=col + 1, colour=record.answer)
        assert lookup in record.response and record.answer == grid.colours[row][col]
        before, found, after = record.response.partition(REFLECTION)
        assert found
        assert COLOUR_WORD.search(before) is None
        assert COLOUR_WORD.search(record.question.replace(ANSWER_LIST, "")) is None
        if detour == "copy":
            assert all(f"Item {k} is {w}." in before for k, w in enumerate(words, start=1))
            assert 30 <= len(words) <= 50
        else:  # each check restates the target and counts on from the one before
            (n,) = map(int, words)
            low, high = (6, 10) if detour == "survey" else (11, 17)
            assert low <= n <= high and f"Restate the target {n} times" in record.question
            assert all(f"Check {k} of {n}: {target}." in before for k in range(1, n + 1))
            assert f"Check {n + 1} " not in before
        if detour == "uniform":  # repeat's chain on a grid of one colour
            assert {c for row_colours in grid.colours for c in row_colours} == {record.answer}
        if detour == "survey":  # every cell read in order, then the target's colour
            reads = [LOOKUP.format(row=r + 1, col=c + 1, colour=grid.colours[r][c])
                     for r in range(3) for c in range(3)]
            assert " ".join(reads) in after
            assert f"So the target cell, in {target}, is {record.answer}." in after
        assert score_record(record.response, record) == (record.answer, True)
    grid_thw = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert grid_thw.tolist() == [[1, 12, 12]]  # 6 x 6 merged tokens
    assert make_sample(0, "val", 0, 168, STEPS[detour], detour)[1] == _copy_samples("val", 1, detour)[0][1]
    # The arithmetic variant's samples are those it always had (seeded as before).
    assert make_sample(0, "val", 0)[1] == make_sample(0, "val", 0, detour="arithmetic")[1]


@pytest.mark.parametrize("detour", ["copy", "repeat", "survey", "uniform"])
def test_copy_detour_puts_dvr_and_pvc_at_the_lookup(detour):
    """The chain's only reflection sentence opens the lookup: DVR's one candidate point is there,
    and PVC's reflection trigger fires on it (and nowhere earlier in the chain)."""
    from tvc_lightning.data.dvr import DVRTransform
    from tvc_lightning.pvc.config import PVCConfig
    from tvc_lightning.pvc.triggers import TriggerDetector
    from tvc_lightning.testing import build_tiny_tokenizer

    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=2)
    tok = build_tiny_tokenizer()
    detector = TriggerDetector(PVCConfig(max_calibrations=1, min_gap=64), tok)
    for _, record, *_ in _copy_samples("val", 5, detour):
        lookup_at = record.response.index(REFLECTION)
        assert dvr.candidates(record.response) == [lookup_at]
        ids = tok(record.response, add_special_tokens=False)["input_ids"]
        fired = [(n, t) for n in range(1, len(ids) + 1)
                 if (t := detector.check(ids[:n], 0)) is not None]
        assert fired, record.response[-200:]
        n, trigger = fired[0]
        # The reflection phrase is rolled back: the image goes in just before the lookup sentence.
        assert trigger.kind == "reflection"
        kept = tok.decode(ids[:n - trigger.rollback])
        assert kept.rstrip() == record.response[:lookup_at].rstrip()


@pytest.mark.parametrize("detour", ["copy", "repeat", "survey", "uniform"])
def test_copy_detour_text_only_baseline_is_near_chance(detour):
    train, val = _copy_samples("train", 500, detour), _copy_samples("val", 500, detour)
    answers = Counter(s[1].answer for s in train)
    best = answers.most_common(1)[0][0]
    assert sum(s[1].answer == best for s in val) / len(val) <= 0.15
    # The queried cell alone (the question's only cue) predicts no colour either.
    by_cell: dict[str, Counter] = defaultdict(Counter)
    cell = lambda s: re.search(r"row \d, column \d", s[1].question).group(0)  # noqa: E731
    for s in train:
        by_cell[cell(s)][s[1].answer] += 1
    hits = sum(by_cell[cell(s)].most_common(1)[0][0] == s[1].answer for s in val)
    assert hits / len(val) <= 0.15
