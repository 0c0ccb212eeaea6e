"""Tests for the data engine: shard writer, synthetic shapes data, and dataset conversion."""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_engine.__main__ import main
from data_engine.convert import convert_file, extract_answer
from data_engine.shards import ShardWriter, validate_key
from data_engine.synth import COLOURS, REFLECTIONS, Scene, make_sample, write_split
from tvc_lightning.data.schema import SampleRecord, image_members

SHARED = Path(__file__).resolve().parents[2] / "shared"
MATHVISION = SHARED / "data" / "mathvision"


def read_samples(shards: list[Path]) -> list[dict]:
    """All samples of ``shards`` as webdataset groups them (key -> member bytes)."""
    urls = [str(p) for p in shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def record(i: int = 0, **kw) -> SampleRecord:
    fields = dict(id=f"r{i}", question="Q?", response="Because. \\boxed{1}", answer="1")
    return SampleRecord(**{**fields, **kw})


def png_bytes(size: tuple[int, int] = (8, 6), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# --- shard writer ------------------------------------------------------------------------------


def test_shards_bounded_by_count_and_named(tmp_path):
    with ShardWriter(tmp_path, "part", maxcount=3) as w:
        for i in range(10):
            w.write(f"k{i}", record(i), [png_bytes()])
    assert [p.name for p in w.shards] == [f"part-{i:06d}.tar" for i in range(4)]
    assert sorted(tmp_path.iterdir()) == w.shards  # nothing else, no .tmp
    per_shard = [len(read_samples([p])) for p in w.shards]
    assert per_shard == [3, 3, 3, 1]
    samples = read_samples(w.shards)
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(10)]
    assert SampleRecord.from_json(samples[4]["json"]) == record(4)


def test_shards_bounded_by_bytes(tmp_path):
    maxsize = 40 * 1024
    with ShardWriter(tmp_path, "big", maxsize=maxsize) as w:
        for i in range(12):
            noise = Image.frombytes("RGB", (64, 64), random.Random(i).randbytes(64 * 64 * 3))
            w.write(f"k{i}", record(i), [noise])  # ~12 KiB: random pixels do not compress
    assert len(w.shards) > 2
    assert all(p.stat().st_size <= maxsize for p in w.shards)
    assert len(read_samples(w.shards)) == 12


def test_multiple_images_and_formats(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (5, 5), "red").save(jpg, format="JPEG")
    gif = io.BytesIO()
    Image.new("P", (4, 4)).save(gif, format="GIF")
    with ShardWriter(tmp_path, "multi") as w:
        w.write("two", record(), [jpg.getvalue(), Image.new("RGBA", (3, 3))])
        w.write("one", record(1), [gif.getvalue()])  # non-JPEG/PNG bytes become PNG
    with tarfile.open(w.shards[0]) as tar:
        names = tar.getnames()
    assert names == ["two.json", "two.0.jpg", "two.1.png", "one.json", "one.png"]
    two, one = read_samples(w.shards)
    assert image_members(two) == ["0.jpg", "1.png"]
    assert Image.open(io.BytesIO(one["png"])).size == (4, 4)


@pytest.mark.parametrize("key", ["a.b", "", "x/y", "sp ace", "k" * 81])
def test_bad_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="sample key"):
        validate_key(key)
    with ShardWriter(tmp_path, "p") as w, pytest.raises(ValueError, match="no dots"):
        w.write(key, record())


def test_duplicate_key_and_abort_leave_no_partial_shard(tmp_path):
    with pytest.raises(ValueError, match="duplicate"), ShardWriter(tmp_path, "d", maxcount=2) as w:
        for i in range(3):
            w.write(f"k{i}", record(i))
        w.write("k2", record(2))
    # The finished shard stays; the half-written one is gone, no .tmp is left.
    assert [p.name for p in tmp_path.iterdir()] == ["d-000000.tar"]


def test_existing_shards_need_overwrite(tmp_path):
    with ShardWriter(tmp_path, "s", maxcount=1) as w:
        for i in range(3):
            w.write(f"k{i}", record(i))
    with pytest.raises(FileExistsError, match="--overwrite"):
        ShardWriter(tmp_path, "s")
    with ShardWriter(tmp_path, "s", maxcount=1, overwrite=True) as w:
        w.write("only", record())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]  # stale ones removed
    assert [s["__key__"] for s in read_samples(w.shards)] == ["only"]


def test_project_reader_reads_writer_output(tmp_path):
    reader = pytest.importorskip("tvc_lightning.data.shards")
    with ShardWriter(tmp_path, "r", maxcount=2) as w:
        for i in range(3):
            w.write(f"k{i}", record(i), [png_bytes()])
    counter = reader.SkipCounter()
    got = [s for p in w.shards for s in reader.iter_shard(str(p), counter)]
    assert len(got) == 3 and counter.total() == 0


# --- synth -------------------------------------------------------------------------------------


def test_synth_is_deterministic(tmp_path):
    a = write_split(tmp_path / "a", "train", 20, seed=3, per_shard=8, image_size=96)
    b = write_split(tmp_path / "b", "train", 20, seed=3, per_shard=8, image_size=96)
    c = write_split(tmp_path / "c", "train", 20, seed=4, per_shard=8, image_size=96)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # whole shards, byte-exact
    json_a = [s["json"] for s in read_samples(a)]
    assert json_a == [s["json"] for s in read_samples(b)]
    assert json_a != [s["json"] for s in read_samples(c)]
    # A sample depends only on (seed, split, index), not on how many are generated.
    assert make_sample(3, "train", 5, 96)[1] == SampleRecord.from_json(json_a[5])


def question_type(question: str) -> str:
    if question.startswith("How many shapes"):
        return "total"
    if question.startswith("How many"):
        return "count_kind"
    return "compare" if question.startswith("Are there more") else "largest"


def expected_answer(scene: Scene, question: str) -> str:
    """The answer recomputed from the scene description, independently of the generator."""
    shapes = scene.shapes
    if m := re.match(r"How many (circle|square|triangle)s are in the image\?", question):
        return str(sum(s.kind == m.group(1) for s in shapes))
    if question.startswith("How many shapes"):
        return str(len(shapes))
    if m := re.match(r"Are there more (\w+) shapes or (\w+) shapes\?", question):
        na, nb = (sum(s.colour == c for s in shapes) for c in m.groups())
        return m.group(1) if na > nb else m.group(2) if nb > na else "the same number"
    assert question == "What colour is the largest shape?"
    factor = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    areas = sorted(((factor[s.kind] * s.size**2, s.colour) for s in shapes), reverse=True)
    assert len(areas) == 1 or areas[0][0] > 1.3 * areas[1][0], "largest must be unambiguous"
    return areas[0][1]


def kind_from_pixels(image: Image.Image, bbox: tuple[int, int, int, int], colour) -> str:
    """Tell the drawn kind from two bounding-box corners: a square fills both, an upright
    triangle only the bottom one, a circle neither."""
    x0, y0, x1, y1 = bbox
    top = image.getpixel((x0 + 1, y0 + 1)) == colour
    bottom = image.getpixel((x0 + 1, y1 - 1)) == colour
    return "square" if top and bottom else "triangle" if bottom else "circle"


def test_synth_records_images_and_answers(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--num-train", "96", "--num-val", "8",
                 "--samples-per-shard", "32", "--seed", "7"]) == 0
    shards = sorted((tmp_path / "train").glob("*.tar"))
    assert [p.name for p in shards] == [f"synth-{i:06d}.tar" for i in range(3)]
    assert len(read_samples(sorted((tmp_path / "val").glob("*.tar")))) == 8
    assert not list(tmp_path.rglob("*.tmp"))
    kinds, formats, words, reflective = Counter(), Counter(), [], 0
    for i, sample in enumerate(read_samples(shards)):
        rec = SampleRecord.from_json(sample["json"])
        _, _, _, scene, _ = make_sample(7, "train", i, 224)
        assert rec.id == sample["__key__"] and rec.source == "synth" and rec.precision is None
        assert rec.answer == expected_answer(scene, rec.question)
        assert rec.response.endswith(f"The final answer is \\boxed{{{rec.answer}}}.")
        if rec.choices is not None:
            assert rec.answer in rec.choices and rec.answer_type == "text"
        else:
            assert rec.answer_type == ("integer" if rec.answer.isdigit() else "text")
        # The image shows the scene: background at the corner, each shape's colour inside it.
        (member,) = image_members(sample)
        formats[member] += 1
        image = Image.open(io.BytesIO(sample[member])).convert("RGB")
        assert image.size == (scene.width, scene.height)
        assert 48 <= min(image.size) and max(image.size) <= 224
        tol = 0 if member == "png" else 40
        for shape in scene.shapes:
            got = image.getpixel(shape.probe)
            assert all(abs(g - e) <= tol for g, e in zip(got, COLOURS[shape.colour], strict=True))
            if member == "png":
                assert kind_from_pixels(image, shape.bbox, COLOURS[shape.colour]) == shape.kind
        kinds[question_type(rec.question)] += 1
        words.append(len(rec.response.split()))
        reflective += any(r in rec.response for r in REFLECTIONS)
    assert set(kinds) == {"count_kind", "total", "compare", "largest"}
    assert set(formats) == {"png", "jpg"}
    assert min(words) < 45 and max(words) > 200  # short (~60 tokens) and long chains
    assert 0 < reflective < 96


def test_synth_cli_refuses_to_mix_runs(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2"]
    assert main(args) == 0
    assert "wrote 4 train samples" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


# --- convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("So x = 2. The final answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("First \\boxed{3}, no wait: \\boxed{ {4} }", "{4}"),
        ("Unbalanced \\boxed{5 so fall back. The answer is **$7$**.", "7"),
        ("Reasoning...\nAnswer: (B) 12.5.\n", "(B) 12.5"),
        ("No final answer here.", ""),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_convert_sharegpt(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the shaded fraction?"},
            {"from": "gpt", "value": "Half is shaded.\nWait, let me check. \\boxed{\\frac{1}{2}}"},
        ],
        "images": ["img/a.png"],
    }
    two_images = {
        "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "They are the same. Answer: same."},
        ],
        "images": ["img/a.png", "img/a.png"],
    }
    missing_conv = {"images": ["img/a.png"]}
    missing_image = {**good, "images": ["img/nope.png"]}
    bad_image = {**good, "images": ["img/bad.jpg"]}
    data = [good, two_images, missing_conv, missing_image, bad_image, "not an object"]
    (tmp_path / "sg.json").write_text(json.dumps(data))
    assert main(["convert", "--format", "sharegpt", "--input", str(tmp_path / "sg.json"),
                 "--image-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "2 converted, 4 skipped (bad_image 1, malformed 2, missing_image 1)" in out
    assert "item 2: malformed" in err and "item 3: missing_image" in err
    samples = read_samples(sorted((tmp_path / "out").glob("*.tar")))
    first, second = (SampleRecord.from_json(s["json"]) for s in samples)
    assert first.id == "sg0" and first.question == "What is the shaded fraction?"
    assert first.response == good["conversations"][1]["value"]
    assert first.answer == "\\frac{1}{2}" and first.answer_type == "text"
    assert second.question == "Compare  and ." and second.answer == "same"
    assert image_members(samples[0]) == ["png"]
    assert image_members(samples[1]) == ["0.png", "1.png"]


def test_convert_mathvista_small(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png_bytes())
    data = {
        "1": {"pid": "1", "question": "Which is bigger?", "query": "Hint: ...\nQuestion: Which?",
              "choices": ["A", "B"], "answer": "B", "answer_type": "text", "precision": None,
              "image": "images/1.png"},
        "2": {"pid": "2", "question": "Length?", "choices": None, "answer": "1.25",
              "answer_type": "float", "precision": 2, "image": "images/1.png"},
        "3": {"pid": "3", "question": "No image", "answer": "1", "image": "images/3.png"},
    }
    (tmp_path / "mv.json").write_text(json.dumps(data))
    n, skipped, shards = convert_file("mathvista", tmp_path / "mv.json", tmp_path, tmp_path / "o")
    assert n == 2 and skipped == Counter(missing_image=1)
    a, b = (SampleRecord.from_json(s["json"]) for s in read_samples(shards))
    assert (a.id, a.question, a.answer, a.choices) == ("mathvista-1", "Hint: ...\nQuestion: Which?",
                                                       "B", ["A", "B"])
    assert (b.answer_type, b.precision, b.choices) == ("float", 2, None)
    assert b.response == "The final answer is \\boxed{1.25}."


def test_convert_mathvision_testmini(tmp_path):
    if not MATHVISION.exists():
        pytest.skip(f"../shared not present: {MATHVISION} holds the MathVision testmini")
    n, skipped, shards = convert_file(
        "mathvision", MATHVISION / "testmini.jsonl", MATHVISION, tmp_path
    )
    assert (n, sum(skipped.values())) == (304, 0)
    recs = {r.id: r for r in (SampleRecord.from_json(s["json"]) for s in read_samples(shards))}
    assert len(recs) == 304
    assert recs["mathvision-4"].answer == "6" and recs["mathvision-4"].answer_type == "integer"
    assert not recs["mathvision-4"].question.endswith("<image1>")  # placeholder-only line dropped
    lettered = recs["mathvision-6"]  # options A-E drawn in the image, gold "D"
    assert lettered.choices == list("ABCDE") and lettered.answer == "D"
    texts = [r for r in recs.values() if r.choices and r.choices != list("ABCDE")]
    assert texts and all(r.answer in r.choices and "Choices: (A)" in r.question for r in texts)
