"""The evidence driver's pure parts: bootstrap intervals, curve readers, the markdown writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvc_lightning.analyze.evidence_report import (
    READING_END,
    READING_START,
    Interval,
    accuracy_table,
    bootstrap_ci,
    forgetting_summary,
    kept_reading,
    paired_diff_ci,
    read_flags,
    removal_summary,
    render_doc,
)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    flags = [True] * 30 + [False] * 70
    ci = bootstrap_ci(flags, resamples=500, seed=1)
    assert ci.value == pytest.approx(0.3)
    assert ci.low < 0.3 < ci.high
    # Binomial standard error at n=100, p=0.3 is ~0.046: a 95% interval is ~0.18 wide.
    assert 0.12 < ci.high - ci.low < 0.25
    assert bootstrap_ci(flags, resamples=500, seed=1) == ci


def test_bootstrap_ci_of_a_constant_is_a_point():
    assert bootstrap_ci([True] * 10, resamples=50) == Interval(1.0, 1.0, 1.0, 10)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_difference_uses_the_pairing():
    # b is a wrong on exactly the items a gets right: the difference is always +1 per pair.
    a = [True, False] * 20
    b = [False, True] * 20
    same = paired_diff_ci(a, [x for x in a], resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    diff = paired_diff_ci(a, b, resamples=200)
    assert diff.value == 0.0 and diff.low < 0 < diff.high
    assert not diff.excludes_zero()
    assert paired_diff_ci([True] * 40, [False] * 40, resamples=50).excludes_zero()
    with pytest.raises(ValueError):
        paired_diff_ci([True], [True, False])


def test_accuracy_table_has_both_arms_and_modes():
    cells = {(arm, mode): Interval(0.25, 0.1, 0.4, 64)
             for arm in ("plain", "dvr") for mode in ("plain", "pvc", "pvc_keep")}
    table = accuracy_table(cells).splitlines()
    assert len(table) == 4 and table[0].count("|") == 5
    assert "plain decoding" in table[0] and "PVC decoding" in table[0]
    assert "PVC, original kept (reset none)" in table[0]
    assert table[2].startswith("| plain SFT") and table[3].startswith("| DVR")
    assert "0.250 [0.100, 0.400]" in table[3]


def test_readers(tmp_path):
    results = tmp_path / "results_pvc.jsonl"
    results.write_text("\n".join(json.dumps({"id": f"x{i}", "correct": i % 2 == 0})
                                 for i in range(4)) + "\n")
    assert read_flags(results) == {"x0": True, "x1": False, "x2": True, "x3": False}
    curve = tmp_path / "forgetting_curve.csv"
    curve.write_text("mode,layer,bin,original,copy,samples\n"
                     "plain,0,0,0.4,0.0,2\nplain,1,0,0.2,0.0,2\n"
                     "plain,0,1,0.2,0.0,2\nplain,1,1,0.0,0.0,2\n")
    assert forgetting_summary(curve) == {"plain": [(0, pytest.approx(0.3), 0.0),
                                                   (1, pytest.approx(0.1), 0.0)]}
    removal = tmp_path / "removal_curve.csv"
    removal.write_text("r,accuracy,samples,mean_generated,same_as_baseline\n"
                       "0.0,0.1,8,10,0.5\n1.0,0.3,8,10,1.0\nbaseline,0.3,8,10,1.0\n")
    assert removal_summary(removal) == [("0.0", 0.1, 0.5), ("1.0", 0.3, 1.0),
                                        ("baseline", 0.3, 1.0)]


def _doc(reading: str | None) -> str:
    cells = {(arm, mode): Interval(0.5 if arm == "dvr" else 0.2, 0.1, 0.6, 8)
             for arm in ("plain", "dvr") for mode in ("plain", "pvc", "pvc_keep")}
    curve = {"plain": [(0, 0.3, 0.0), (1, 0.1, 0.0)]}
    return render_doc(
        command="make evidence", date="2026-12-01", machine="2-core CPU", sizes={"model": "m"},
        cells=cells, diffs={"dvr+pvc - plain+plain": Interval(0.3, 0.05, 0.5, 8)},
        forgetting={"plain": curve, "dvr": curve},
        removal={"plain": [("0.0", 0.1, 0.5), ("baseline", 0.2, 1.0)],
                 "dvr": [("0.0", 0.2, 0.5), ("baseline", 0.5, 1.0)]},
        figures={"plain forgetting": "evidence/plain_forgetting.png"},
        timings={"fits": 120.0}, train_loss={"plain": 0.5, "dvr": 0.4}, chance=0.13,
        reading=reading, resamples=100)


def test_render_doc_and_kept_reading():
    doc = _doc(None)
    assert "2026-12-01" in doc and "2-core CPU" in doc and "fits 2.0 min" in doc
    assert "![plain forgetting](evidence/plain_forgetting.png)" in doc
    assert "+0.300 [+0.050, +0.500]; the interval excludes 0." in doc
    assert "decays along the response" in doc
    assert "| baseline |" in doc
    assert kept_reading(doc) == "(not written yet)"
    again = _doc(kept_reading(doc.replace("(not written yet)", "It does not reproduce.")))
    assert kept_reading(again) == "It does not reproduce."
    assert again.count(READING_START) == 1 and again.count(READING_END) == 1
    assert kept_reading(None) is None and kept_reading("no markers") is None


def test_pooled_rates_weigh_reads_not_items_and_pair_by_item():
    from tvc_lightning.analyze.evidence_report import paired_pooled_rate_diff_ci, pooled_rate_ci

    counts = [(9, 9), (0, 1), (0, 0)] * 10  # 90 of 100 reads right, one item with none
    ci = pooled_rate_ci(counts, resamples=300)
    assert ci.value == pytest.approx(0.9) and ci.n == 30 and ci.low <= 0.9 <= ci.high
    same = paired_pooled_rate_diff_ci(counts, counts, resamples=100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = [(0, 9), (0, 1), (0, 0)] * 10
    diff = paired_pooled_rate_diff_ci(counts, worse, resamples=100)
    assert diff.value == pytest.approx(0.9) and 0.5 < diff.low <= 0.9 <= diff.high
    with pytest.raises(ValueError):
        paired_pooled_rate_diff_ci(counts, counts[:3])


def test_cell_read_counts_check_each_sentence_against_the_regenerated_grid(tmp_path):
    from data_engine.synth_late import make_sample
    from tvc_lightning.analyze.evidence import VARIANTS, cell_read_counts

    d = VARIANTS["survey"]["data"]
    _, record, _, grid, _ = make_sample(d["seed"], "val", 3, d["image_size"], d["detour_steps"],
                                        d["detour"])
    wrong = next(c for c in ("red", "blue") if c != grid.colours[0][0])
    response = (f"The cell in row 1, column 1 is {grid.colours[0][0]}. The cell in row 1, column 1 "
                f"is {wrong}. The cell in row 7, column 1 is red. {record.response}")
    results = tmp_path / "results_pvc.jsonl"
    results.write_text(json.dumps({"id": record.id, "response": response}) + "\n")
    # The ground-truth response reads all nine cells right; the two added reads: one right.
    assert cell_read_counts(results, "survey") == {record.id: (9 + 1, 9 + 2)}


@pytest.mark.parametrize("variant", ["survey", "survey_qwen3vl", "uniform"])
def test_every_variant_shows_a_6x6_merged_grid_to_its_family(tmp_path, variant):
    """Each variant's images, read at the driver's max_pixels by its family's processor, are 6 x 6
    merged tokens: one token per cell in a copy pooled with kernel 2 (the fits get the same
    max_pixels)."""
    from data_engine.synth_late import make_sample
    from tvc_lightning.analyze.evidence import VARIANTS, family, fit_jobs, max_pixels
    from tvc_lightning.testing import build_tiny_processor

    d = VARIANTS[variant]["data"]
    image = make_sample(d["seed"], "val", 0, d["image_size"], d["detour_steps"], d["detour"])[2]
    processor = build_tiny_processor(family=family(variant), max_pixels=max_pixels(variant))
    grid_thw = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    merge = processor.image_processor.merge_size
    assert grid_thw[0, 1:].div(merge).tolist() == [6, 6]
    assert VARIANTS[variant]["generation"]["pool_kernel"] == 2
    for cmd in fit_jobs(tmp_path, Path("recipes/evidence"), variant).values():
        assert cmd[-1] == f"--data.max_pixels={max_pixels(variant)}"


def test_length_splits_hold_the_same_items_with_longer_detours(tmp_path, monkeypatch):
    """forced_jobs writes the 2x and 4x splits (same image and target per item, the restated part
    m times as long) and reads each split by both arms, with and without the copy."""
    from data_engine.synth_late import make_sample
    from tvc_lightning.analyze import evidence_lengths
    from tvc_lightning.analyze.evidence_variants import VARIANTS
    from tvc_lightning.data.shards import load_split
    from tvc_lightning.data.skips import SkipCounter

    monkeypatch.setitem(VARIANTS["uniform"]["data"], "num_val", 3)
    (tmp_path / "data" / "val").mkdir(parents=True)  # x1 is the fit's held-out split
    jobs = evidence_lengths.forced_jobs(tmp_path, "uniform")
    # Teacher-forced reads: 3 splits x 2 arms x copy or not; cut-chain decodes on the 2 longer.
    assert len([j for j in jobs if j.startswith("forced_")]) == 3 * 2 * 2
    assert sorted(j for j in jobs if j.startswith("decode_")) == sorted(
        f"decode_{arm}_x{m}_{d}" for m in (2, 4) for arm, d in evidence_lengths.DECODED)
    assert all(cmd[cmd.index("--max_pixels") + 1] == str(168 * 168) for cmd in jobs.values())
    d = VARIANTS["uniform"]["data"]
    for m in (2, 4):
        records = [r for r, _ in load_split(str(tmp_path / f"data_x{m}" / "val"), SkipCounter(),
                                             world_size=1, rank=0)]
        assert len(records) == 3
        for i, record in enumerate(records):
            base = make_sample(d["seed"], "val", i, d["image_size"], d["detour_steps"], "uniform")[1]
            assert record.answer == base.answer
            assert record.question.split(" Restate")[0] == base.question.split(" Restate")[0]
            n, n_base = (int(r.question.split("Restate the target ")[1].split()[0])
                         for r in (record, base))
            assert n > n_base and 0.75 * m * 14 - 1 <= n <= 1.25 * m * 14
    assert evidence_lengths.forced_jobs(tmp_path, "survey") == {}  # no lengths: no stage
