"""DVRTransform: injection points, fallback, determinism, probability."""

from __future__ import annotations

import pytest

from tvc_lightning.data.dvr import DVRTransform

TEXT = ("The red square is left. Wait, the circle is bigger. So there are 2. "
        "Hmm, let me verify. Waiting is not a reflection. Alternatively, count rows.\n"
        "Let me double-check the image. Done.")


def test_reflection_points_are_sentence_starts_of_listed_phrases():
    dvr = DVRTransform()
    points = dvr.reflection_points(TEXT)
    starts = [TEXT[p:p + 12] for p in points]
    assert starts == ["Wait, the ci", "Hmm, let me ", "Alternativel", "Let me doubl"]
    # "Waiting" is not "Wait"; a phrase mid-sentence is not a sentence start.
    assert DVRTransform().reflection_points("I said wait, then Waiting.") == []


def test_custom_phrase_list():
    dvr = DVRTransform(reflection_phrases=["So there"])
    assert [TEXT[p:p + 8] for p in dvr.reflection_points(TEXT)] == ["So there"]
    assert DVRTransform(reflection_phrases=[]).reflection_points(TEXT) == []


def test_midpoint_fallback_picks_sentence_start_nearest_the_middle():
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    plan = DVRTransform(reflection_phrases=[]).plan("x", text, epoch=0)
    assert [i.offset for i in plan] == [text.index("Seven")]
    assert DVRTransform.midpoint("nospaces") == len("nospaces")


def test_max_injections_and_determinism():
    dvr = DVRTransform(max_injections=2, seed=7)
    a = dvr.plan("id1", TEXT, epoch=0)
    assert len(a) == 2 and a[0].offset < a[1].offset
    assert set(i.offset for i in a) <= set(dvr.reflection_points(TEXT))
    assert a == dvr.plan("id1", TEXT, epoch=0)  # same (seed, epoch, id) -> same plan
    plans = {tuple((i.offset, i.bridge) for i in dvr.plan("id1", TEXT, epoch=e)) for e in range(20)}
    assert len(plans) > 1  # epochs draw new points/bridges
    assert all(i.bridge in dvr.bridges for i in a)


def test_probability():
    assert DVRTransform(p=0.0).plan("x", TEXT, 0) == []
    dvr = DVRTransform(p=0.5)
    applied = sum(bool(dvr.plan(f"s{i}", TEXT, 0)) for i in range(400))
    assert 150 < applied < 250


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"max_injections": 0}, {"pool_kernel": 0},
                                 {"bridges": []}])
def test_bad_settings_name_the_field(bad):
    with pytest.raises(ValueError, match=f"dvr.{next(iter(bad))}"):
        DVRTransform(**bad)


def test_stored_bridges_are_taken_points_and_count_towards_the_budget():
    text = "I count 2. Let me check the image again. Wait, it is 2. Hmm, sure. Done."
    bridge = (text.index("Let me"), text.index(" Wait"))
    dvr = DVRTransform(max_injections=2)
    assert [text[p:p + 4] for p in dvr.reflection_points(text)] == ["Let ", "Wait", "Hmm,"]
    # Inside the stored bridge and right after it (only whitespace between) the image is shown.
    assert dvr.candidates(text, [bridge]) == [text.index("Hmm")]
    assert dvr.budget([bridge]) == 1 and DVRTransform().budget([bridge]) == 0
    for epoch in range(10):
        assert [i.offset for i in dvr.plan("s", text, epoch, [bridge])] == [text.index("Hmm")]
        assert DVRTransform().plan("s", text, epoch, [bridge]) == []
    # No midpoint fallback for a response that already shows the image again.
    plain = "I count 2. Let me check the image again. It is 2. Done."
    assert DVRTransform().candidates(plain, [(11, 40)]) == []
    # Without stored bridges nothing changes.
    assert dvr.plan("s", text, 3) == dvr.plan("s", text, 3, ())
