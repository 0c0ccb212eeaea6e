"""PVC triggers on text tokenized by a byte-level BPE with real merges (``'.\n\n'``, ``' Wait'``).

The tiny model's tokenizer is trained on a few sentences and has none of the merges that decide
where a trigger can see a sentence end; these tests use one trained on generated long chains.
"""

from __future__ import annotations

import pytest

from tvc_lightning.pvc import PVCConfig
from tvc_lightning.pvc.triggers import Trigger, TriggerDetector
from tvc_lightning.testing import build_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_bpe_tokenizer()
    # The merges these tests are about must exist, or they would test nothing.
    assert ".ĊĊ" in tokenizer.tokenize("again.\n\nSo")
    assert "ĠWait" in tokenizer.tokenize("Hmm. Wait, no")
    return tokenizer


def fire(tok, config: PVCConfig, text: str) -> list[tuple[int, Trigger, str]]:
    """Every (tokens so far, trigger, text kept after its rollback) as the text is decoded."""
    detector = TriggerDetector(config, tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for n in range(1, len(ids) + 1):
        trigger = detector.check(ids[:n], 0)
        if trigger is not None:
            out.append((n, trigger, tok.decode(ids[: n - trigger.rollback])))
    return out


def test_bridge_closing_a_paragraph_fires_once(tok):
    config = PVCConfig(min_gap=1, on_reflection=False)
    text = "So there are 3 circles. Let me check the image again.\n\nThe red one is 4.5 cm."
    (hit,) = fire(tok, config, text)
    n, trigger, kept = hit
    assert trigger.kind == "bridge" and trigger.rollback == 0
    assert kept == "So there are 3 circles. Let me check the image again.\n\n"


def test_reflection_after_a_paragraph_break(tok):
    config = PVCConfig(min_gap=1)
    text = "So there are 3 circles.\n\nWait, let me recount them."
    (hit,) = fire(tok, config, text)
    _, trigger, kept = hit
    assert trigger.kind == "reflection" and kept == "So there are 3 circles.\n\n"
    assert trigger.bridge == config.bridges[0]  # after the newlines: no extra space


def test_periodic_waits_for_the_number_to_end(tok):
    config = PVCConfig(min_gap=1, every_n_tokens=3, on_reflection=False, on_bridge=False)
    text = "The bar is 4.5 cm long and 12.25 cm wide. Next, the area is 55.125 or so. Done."
    hits = fire(tok, config, text)
    # Not after "4." or "12." (the numbers go on); at the sentence end, before " Next".
    assert [kept for _, _, kept in hits][:1] == ["The bar is 4.5 cm long and 12.25 cm wide."]
    first = hits[0][1]
    assert first.kind == "periodic" and first.rollback == 1 and first.bridge == " " + config.bridges[0]
    # Every firing is at a sentence end followed by whitespace (or the end), never inside a number.
    assert len(hits) == 2  # before " Next" and before " Done"; the final "." has no next token
    for _, _, kept in hits:
        rest = text[len(kept):]
        assert kept.rstrip(" ").endswith(".") and (kept[-1] == " " or rest[:1].isspace()), (kept, rest)


def test_periodic_at_a_paragraph_break_keeps_the_newlines(tok):
    config = PVCConfig(min_gap=1, every_n_tokens=4, on_reflection=False, on_bridge=False)
    hits = fire(tok, config, "The area is 12.5 units.\n\nSo the answer is 12.5.")
    _, trigger, kept = hits[0]
    assert kept == "The area is 12.5 units.\n\n" and trigger.rollback == 0
    assert trigger.bridge == config.bridges[0]


@pytest.mark.parametrize("at", ["word", "token"])
def test_periodic_at_word_or_token(tok, at):
    config = PVCConfig(min_gap=1, every_n_tokens=4, periodic_at=at, on_reflection=False, on_bridge=False)
    text = "The bar is 4.5 cm long and 12.25 cm wide."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ((n, trigger, kept), *_) = fire(tok, config, text)
    if at == "token":  # exactly at the 4th token, whatever it is
        assert n == 4 and trigger.rollback == 0 and kept == tok.decode(ids[:4])
    else:  # at the first whitespace-led token from the 4th on: a word start, never mid-number
        assert n >= 4 and tok.decode(ids[n - 1:n])[:1].isspace()
        whitespace_token_kept = kept[-1] == " " and trigger.rollback == 0
        word_start_rolled_back = text[len(kept)] == " " and trigger.rollback == 1
        assert whitespace_token_kept or word_start_rolled_back


def test_periodic_at_is_validated():
    with pytest.raises(ValueError, match="periodic_at"):
        PVCConfig(periodic_at="paragraph")


def test_an_answer_prefix_is_context_not_a_sentence_start(tok):
    """After a forced answer prefix ending in "." the first generated reflection gets the bridge
    with its space, as DVR training spells it; the same tokens with no prefix begin the answer,
    so no space. A reflection that began inside the prefix is never rolled back into it."""
    config = PVCConfig(min_gap=0)
    detector = TriggerDetector(config, tok)
    prefix = tok("So I need the cell in row 1, column 3.", add_special_tokens=False)["input_ids"]
    ids = tok(" Wait, let me look at that cell.", add_special_tokens=False)["input_ids"]
    bare = tok("Wait, let me look at that cell.", add_special_tokens=False)["input_ids"]
    found = [(n, t) for n in range(1, len(ids) + 1)
             if (t := detector.check(ids[:n], 0, context=prefix)) is not None]
    (n, trigger), = found
    assert trigger.kind == "reflection" and trigger.rollback == n
    assert trigger.bridge == " " + config.bridges[0]
    (hit,) = [t for n in range(1, len(bare) + 1) if (t := detector.check(bare[:n], 0)) is not None]
    assert hit.bridge == config.bridges[0]
    inside = tok("So I need the cell. Wait", add_special_tokens=False)["input_ids"]
    rest = tok(", let me look.", add_special_tokens=False)["input_ids"]
    assert all(detector.check(rest[:n], 0, context=inside) is None for n in range(1, len(rest) + 1))
