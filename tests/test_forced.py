"""Teacher-forced reads (tvc_lightning/analyze/forced.py) on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from data_engine.synth_late import LOOKUP, PALETTE, make_sample
from tvc_lightning.analyze.forced import forced_reads, greedy_choices, main, read_spans, word_ids
from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.tokenize import SampleEncoder
from tvc_lightning.module import TVCModule
from tvc_lightning.testing import build_tiny_processor


def _samples(detour: str, n: int, steps: int = 8):
    """``(record, [image])`` pairs, as the shard loader gives them."""
    return [(s[1], [s[2]]) for s in (make_sample(0, "val", i, 168, steps, detour) for i in range(n))]


def _encoder(copy: bool) -> SampleEncoder:
    processor = build_tiny_processor(max_pixels=168 * 168)
    return SampleEncoder(processor, dvr=DVRTransform(p=float(copy), max_injections=1, pool_kernel=2))


@pytest.mark.parametrize("copy", [False, True])
def test_read_spans_are_the_lookup_colours(copy):
    """survey's chain states ten colours after " is" (nine cells, then the target): each span
    decodes to exactly that colour, none falls in the question, and DVR's copy moves none."""
    encoder = _encoder(copy)
    tok = encoder.tokenizer
    (is_id,) = tok(" is", add_special_tokens=False)["input_ids"]
    for (record, images), grid in zip(_samples("survey", 3),
                                     [make_sample(0, "val", i, 168, 8, "survey")[3] for i in range(3)],
                                     strict=True):
        enc = encoder(record, images)
        assert enc["num_injections"] == int(copy)
        spans = read_spans(enc["input_ids"], enc["labels"], is_id, word_ids(tok, list(PALETTE)))
        words = [tok.decode(enc["input_ids"][a:b]).strip() for a, b in spans]
        cells = [grid.colours[r][c] for r in range(3) for c in range(3)]
        assert words == cells + [record.answer]
        assert all(f" is {w}." in record.response for w in words)
        assert LOOKUP.format(row=1, col=1, colour=cells[0]) in record.response


@pytest.mark.parametrize("copy", [False, True])
def test_forced_reads_match_the_full_logits(tiny, copy):
    """The reads score the argmax of the LM head at the span positions only; the same scores from
    the full logits of the training forward (every token of a word must be the argmax)."""
    model, _ = tiny
    module = TVCModule("unused", freeze=[])
    module.model = model
    encoder = _encoder(copy)
    samples = _samples("survey", 4)
    got = forced_reads(module, encoder, samples, list(PALETTE))
    tok = encoder.tokenizer
    (is_id,) = tok(" is", add_special_tokens=False)["input_ids"]
    for record, images in samples:
        enc = encoder(record, images)
        batch = Collator(tok.pad_token_id)([enc])
        with torch.no_grad():
            predicted = module(batch)[0].argmax(-1)
        ids = batch["input_ids"][0]
        spans = read_spans(ids, batch["labels"][0], is_id, word_ids(tok, list(PALETTE)))
        # Per token, the choice is the full logits' argmax at the position before it.
        assert greedy_choices(module, batch, spans).tolist() == [
            int(predicted[q - 1]) for a, b in spans for q in range(a, b)]
        right = sum(all(int(predicted[q - 1]) == int(ids[q]) for q in range(a, b)) for a, b in spans)
        assert got[record.id] == (right, 10)


def test_the_command_writes_per_item_reads(tmp_path, tiny_checkpoint):
    from data_engine.synth_late import write_split

    write_split(tmp_path / "data", "val", 3, seed=0, per_shard=8, image_size=168, detour_steps=4,
                detour="uniform")
    out = tmp_path / "reads.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data" / "val"),
                 "--out", str(out), "--dvr", "1", "--max_pixels", str(168 * 168)]) == 0
    result = json.loads(out.read_text())
    assert result["total"] == 3 and len(result["reads"]) == 3  # one read per uniform chain
    assert result["right"] == sum(r for r, _ in result["reads"].values())
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--data", "x", "--out", str(out), "--dvr", "2"])


def test_cut_chain_decoding(tmp_path, tiny_checkpoint):
    """The chain is cut right before its reflection sentence (DVR's point); the decode modes map
    to PVC settings that may calibrate at once; the command scores every item."""
    from data_engine.synth_late import write_split
    from tvc_lightning.analyze.forced import cut_before_reflection, decode_config

    for record, _ in _samples("uniform", 3, steps=14):
        cut = cut_before_reflection(record.response)
        assert record.response.startswith(cut)
        assert record.response[len(cut):].lstrip().startswith("Let me check that cell in the image.")
    with pytest.raises(ValueError, match="no reflection sentence"):
        cut_before_reflection("Plain text with no second look. The answer is red.")
    assert [(c.max_calibrations, c.reset, c.min_gap) for c in
            (decode_config(d, 2, 64) for d in ("plain", "pvc", "pvc_keep"))] == [
        (0, "visual", 0), (1, "visual", 0), (1, "none", 0)]
    with pytest.raises(ValueError, match="--decode"):
        decode_config("pvc_sometimes", 2, 64)
    write_split(tmp_path / "data", "val", 3, seed=0, per_shard=8, image_size=168, detour_steps=4,
                detour="uniform")
    out = tmp_path / "answers.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data" / "val"),
                 "--out", str(out), "--decode", "pvc", "--max_new_tokens", "8",
                 "--max_pixels", str(168 * 168)]) == 0
    result = json.loads(out.read_text())
    assert result["total"] == 3 and set(result["answers"]) == {f"late-val-{i:06d}" for i in range(3)}
    assert result["right"] == sum(result["answers"].values())


class _Oracle:
    """A stand-in model whose greedy choice is the reference token everywhere except at the
    ``wrong`` positions: forced_reads must count a read right only when all its tokens are."""

    def __init__(self, vocab: int, wrong: set[int]) -> None:
        from types import SimpleNamespace

        self.vocab, self.wrong = vocab, wrong
        self.model = SimpleNamespace(lm_head=torch.nn.Identity())

    def hidden_states(self, batch):
        ids = batch["input_ids"][0]
        scores = torch.zeros(1, len(ids), self.vocab)
        target = torch.cat([ids[1:], ids[:1]])  # position q - 1 predicts token q
        for q in self.wrong:
            target[q - 1] = (int(ids[q]) + 1) % self.vocab
        scores[0, torch.arange(len(ids)), target] = 1.0
        return scores


def test_a_read_is_right_only_when_every_token_of_its_word_is():
    encoder = _encoder(False)
    tok = encoder.tokenizer
    (is_id,) = tok(" is", add_special_tokens=False)["input_ids"]
    samples = _samples("survey", 1)
    record, images = samples[0]
    enc = encoder(record, images)
    spans = read_spans(enc["input_ids"], enc["labels"], is_id, word_ids(tok, list(PALETTE)))
    long_word = next((a, b) for a, b in spans if b - a > 1)  # the tiny tokenizer splits colours
    vocab = len(tok)
    assert forced_reads(_Oracle(vocab, set()), encoder, samples, list(PALETTE)) == {record.id: (10, 10)}
    for wrong in ({long_word[0]}, {long_word[1] - 1}, {spans[0][0], spans[-1][0]}):
        right = 10 - sum(any(a <= q < b for q in wrong) for a, b in spans)
        got = forced_reads(_Oracle(vocab, wrong), encoder, samples, list(PALETTE))
        assert got == {record.id: (right, 10)} and right < 10
