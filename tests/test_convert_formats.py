"""convert's input formats, round trips through export, streaming JSON, restarts and partitions."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_engine.__main__ import main
from data_engine.convert import convert_file
from data_engine.formats import Options
from data_engine.formats_chat import ShareGPTTags
from data_engine.json_stream import JsonItems
from data_engine.shards import ShardWriter
from tvc_lightning.data.schema import InvalidRecord, SampleRecord, Turn, image_members
from tvc_lightning.data.shards import SkipCounter, iter_shard


def png(colour: tuple[int, int, int], size: tuple[int, int] = (9, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def read(out: Path) -> list[tuple[SampleRecord, list[bytes]]]:
    """Every record and its image bytes in OUT's shards, in shard order."""
    counter = SkipCounter()
    found = []
    for shard in sorted(out.glob("*.tar")):
        for sample in iter_shard(str(shard), counter):
            found.append((SampleRecord.from_json(sample["json"]),
                          [sample[m] for m in image_members(sample)]))
    assert counter.total() == 0
    return found


LONG = "Two circles. Wait, let me look again. Let me check the image again. Still two. \\boxed{2}"
BRIDGE = LONG.index("Let me check the image again.")


def records() -> list[tuple[SampleRecord, list[bytes]]]:
    """Plain, system, several images, evaluation fields, offline-DVR bridges, a conversation."""
    conversation = (Turn("user", "<image>What is this?"), Turn("assistant", "Shapes."),
                    Turn("user", "Compare with <image>: how many circles?"),
                    Turn("assistant", LONG, dvr=True))
    return [
        (SampleRecord("p1", "How many circles?", LONG, "2", "integer", source="synth"), [png((1, 2, 3))]),
        (SampleRecord("p2", "Which?", "It is B. Answer: B", "B", choices=["A", "B"], precision=None,
                      source="mathvista", system="Answer briefly."), [jpg((200, 10, 10))]),
        (SampleRecord("p3", "Same shapes?", "Yes, they match. \\boxed{yes}", "yes"),
         [png((5, 5, 5)), png((9, 9, 9), (4, 4))]),
        (SampleRecord("p4", "Length?", "1.25 cm. \\boxed{1.25}", "1.25", "float", precision=2),
         [png((0, 90, 0))]),
        (SampleRecord("p5", "How many circles?", LONG, "2",
                      bridge_spans=((BRIDGE, BRIDGE + len("Let me check the image again.")),)),
         [png((7, 7, 70))]),
        (SampleRecord("c1", "What is this?", LONG, "2", system="You count.", turns=conversation),
         [png((1, 1, 1)), png((2, 2, 2))]),
        (SampleRecord("c2", "Describe.", "A red square.", "", turns=(
            Turn("user", "Describe. <image>"), Turn("assistant", "A red square."))),
         [png((255, 0, 0))]),
    ]


def write_shards(out: Path) -> list[tuple[SampleRecord, list[bytes]]]:
    data = records()
    with ShardWriter(out, "orig", maxcount=3) as w:
        for record, images in data:
            w.write(record.id, record, images)
    return data


@pytest.mark.parametrize("fmt", ["sharegpt", "messages"])
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_round_trip_through_export_gives_identical_records(tmp_path, fmt, name, capsys):
    original = write_shards(tmp_path / "shards")
    assert main(["export", "--input", str(tmp_path / "shards"), "--format", fmt,
                 "--out", str(tmp_path / "x"), "--name", name]) == 0
    info = json.loads((tmp_path / "x" / "dataset_info.json").read_text())
    assert info[Path(name).stem]["file_name"] == name
    assert main(["convert", "--input", str(tmp_path / "x" / name), "--out", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    assert f"detected format '{fmt}'" in capsys.readouterr().err
    assert read(tmp_path / "back") == original  # records and image bytes, in order


def test_round_trip_through_parquet_with_embedded_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    original = write_shards(tmp_path / "shards")
    main(["export", "--input", str(tmp_path / "shards"), "--format", "messages",
          "--out", str(tmp_path / "x"), "--name", "d.jsonl"])
    rows = [json.loads(line) for line in (tmp_path / "x" / "d.jsonl").read_text().splitlines()]
    for row in rows:  # as Hugging Face datasets stores an Image sequence: bytes, no file to read
        row["images"] = [{"bytes": (tmp_path / "x" / p).read_bytes(), "path": None}
                         for p in row["images"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=2)
    n, skipped, _ = convert_file("auto", tmp_path / "d.parquet", tmp_path / "nowhere",
                                 tmp_path / "pq", workers=3)
    assert (n, dict(skipped)) == (len(original), {})
    assert read(tmp_path / "pq") == original


def test_llamafactory_multimodal_demo_two_rounds_converts(tmp_path):
    (tmp_path / "mllm_demo_data").mkdir()
    (tmp_path / "mllm_demo_data" / "1.jpg").write_bytes(jpg((30, 60, 90)))
    item = {"messages": [
        {"content": "<image>Who are they?", "role": "user"},
        {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
        {"content": "What are they doing?", "role": "user"},
        {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
        "images": ["mllm_demo_data/1.jpg"]}
    (tmp_path / "mllm_demo.json").write_text(json.dumps([item, item]))
    n, skipped, _ = convert_file("auto", tmp_path / "mllm_demo.json", tmp_path, tmp_path / "o")
    assert (n, dict(skipped)) == (2, {})
    (record, images), _ = read(tmp_path / "o")
    assert record.id == "msg0" and record.question == "Who are they?"
    assert [(t.role, t.content, t.dvr) for t in record.turns] == [
        (m["role"], m["content"], i == 1) for i, m in enumerate(item["messages"])]  # longest: 1
    assert record.response == item["messages"][1]["content"] and images == [jpg((30, 60, 90))]


def test_content_parts_custom_tags_system_turns_and_llava(tmp_path):
    (tmp_path / "a.png").write_bytes(png((3, 3, 3)))
    parts = {"messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": [{"type": "text", "text": "Count: "},
                                     {"type": "image", "image": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Three. \\boxed{3}"}]}]}
    (tmp_path / "parts.jsonl").write_text(json.dumps(parts) + "\n")
    n, _, _ = convert_file("messages", tmp_path / "parts.jsonl", tmp_path, tmp_path / "m")
    ((record, _),) = read(tmp_path / "m")
    assert n == 1 and record.system == "Be exact." and record.answer == "3"
    assert [t.content for t in record.turns] == ["Count: <image>", "Three. \\boxed{3}"]  # image last

    tags = {"columns": {"messages": "dialog", "images": "pics", "system": "sys"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "q",
                     "assistant_tag": "a", "system_tag": "s"}}
    custom = {"dialog": [{"speaker": "s", "text": "System turn."},
                         {"speaker": "q", "text": "<image>\nHow many?"},
                         {"speaker": "a", "text": "3 \\boxed{3}"}], "pics": ["a.png"]}
    (tmp_path / "custom.json").write_text(json.dumps([custom, {**custom, "pics": []}]))
    options = Options(tmp_path, ShareGPTTags.parse(json.dumps(tags)))
    n, skipped, _ = convert_file("sharegpt", tmp_path / "custom.json", tmp_path, tmp_path / "t",
                                 options=options)
    assert (n, dict(skipped)) == (1, {"no_image": 1})
    ((record, _),) = read(tmp_path / "t")
    assert (record.system, record.question, record.turns) == ("System turn.", "How many?", None)
    with pytest.raises(ValueError, match="--tags: unknown key"):
        ShareGPTTags.parse('{"role": "from"}')

    llava = {"id": "000000033471", "image": "a.png", "conversations": [
        {"from": "human", "value": "What are the colors?\n<image>"},
        {"from": "gpt", "value": "Grey."}, {"from": "human", "value": "Anything else?"},
        {"from": "gpt", "value": "No, nothing else is in the picture at all."}]}
    bad = {**llava, "id": "x", "conversations": llava["conversations"][:3]}
    (tmp_path / "llava.json").write_text(json.dumps([llava, bad]))
    n, skipped, _ = convert_file("auto", tmp_path / "llava.json", tmp_path, tmp_path / "l",
                                 options=Options(tmp_path, dvr_turns="last"))
    assert (n, dict(skipped)) == (1, {"unsupported_conversation": 1})
    ((record, _),) = read(tmp_path / "l")
    assert record.id == "000000033471" and record.source == "llava"
    assert [t.dvr for t in record.turns] == [False, False, False, True]
    assert record.turns[0].content == "What are the colors?\n<image>"  # image after the text


def test_placeholder_count_must_match_the_images(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png((3, 3, 3)))
    conv = [{"from": "human", "value": "<image><image> Same?"}, {"from": "gpt", "value": "Yes."}]
    items = [{"conversations": conv, "images": ["a.png"]},
             {"conversations": [conv[0], {"from": "gpt", "value": "<image> here"}],
              "images": ["a.png", "a.png", "a.png"]},
             {"conversations": conv, "images": ["a.png", "a.png"]}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    assert main(["convert", "--format", "sharegpt", "--input", str(tmp_path / "d.json"),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "1 converted, 2 skipped (image_count_mismatch 1, image_in_answer 1)" in out
    assert "item 0: image_count_mismatch: 2 <image> placeholders but 1 images" in err


def test_restart_is_exactly_once_and_partitions_cover_the_input(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png((3, 3, 3)))
    items = [{"conversations": [{"from": "human", "value": f"<image>Q{i}?"},
                                {"from": "gpt", "value": f"A{i}. \\boxed{{{i}}}"}],
              "images": ["a.png"]} for i in range(12)]
    (tmp_path / "d.json").write_text(json.dumps(items))
    import data_engine.convert as convert

    real = convert.convert_item
    calls = {"n": 0}

    def crashing(fmt, label, item, options):
        calls["n"] += 1
        if label == "7":
            raise RuntimeError("killed")
        return real(fmt, label, item, options)

    monkeypatch.setattr(convert, "convert_item", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        convert_file("sharegpt", tmp_path / "d.json", tmp_path, tmp_path / "o",
                     samples_per_shard=3, workers=1)
    assert 0 < len(read(tmp_path / "o")) < 12  # finished shards stay
    monkeypatch.setattr(convert, "convert_item", real)
    n, skipped, _ = convert_file("sharegpt", tmp_path / "d.json", tmp_path, tmp_path / "o",
                                 samples_per_shard=3)
    ids = [r.id for r, _ in read(tmp_path / "o")]
    assert n == 12 and not skipped and sorted(ids) == sorted(f"sg{i}" for i in range(12))
    # A second rerun converts nothing again; a changed setting is refused.
    assert convert_file("sharegpt", tmp_path / "d.json", tmp_path, tmp_path / "o")[0] == 12
    assert len(read(tmp_path / "o")) == 12
    with pytest.raises(ValueError, match="dvr-turns"):
        convert_file("sharegpt", tmp_path / "d.json", tmp_path, tmp_path / "o",
                     options=Options(tmp_path, dvr_turns="all"))
    parts = [convert_file("sharegpt", tmp_path / "d.json", tmp_path, tmp_path / "p",
                          shard_index=i, num_shards=3)[0] for i in range(3)]
    ids = sorted(r.id for r, _ in read(tmp_path / "p"))
    assert sum(parts) == 12 and ids == sorted(f"sg{i}" for i in range(12))


def test_auto_detection_and_whole_input_errors(tmp_path, capsys):
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    assert main(["convert", "--input", str(tmp_path / "odd.json"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "broken.json").write_text('[{"messages": []}, {"messages": [}]')
    assert main(["convert", "--format", "messages", "--input", str(tmp_path / "broken.json"),
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "broken.json: invalid JSON at character" in capsys.readouterr().err


def test_json_items_stream_arrays_objects_and_lines(tmp_path):
    values = [{"a": i, "t": "é" * (i % 7), "n": [1.5, None, True, -2e-3]} for i in range(60)]
    values += [12345, "s", 3.25e10]
    (tmp_path / "a.json").write_text(json.dumps(values, indent=1))
    (tmp_path / "o.json").write_text(json.dumps({f"k{i}": v for i, v in enumerate(values)}))
    lines = "\n".join(json.dumps(v) for v in values[:5]) + "\nnot json\n"
    (tmp_path / "l.json").write_text(lines)
    for chunk in (1, 5, 1 << 20):  # item boundaries fall everywhere, even inside numbers
        got = list(JsonItems(tmp_path / "a.json", chunk_bytes=chunk))
        assert got == [(str(i), v) for i, v in enumerate(values)]
        assert list(JsonItems(tmp_path / "o.json", chunk_bytes=chunk)) == [
            (f"k{i}", v) for i, v in enumerate(values)]
        items = JsonItems(tmp_path / "l.json", chunk_bytes=chunk)
        got = list(items)
        assert items.layout == "lines" and [v for _, v in got[:5]] == values[:5]
        assert got[5][0] == "line 6" and got[5][1].reason == "malformed"
    with pytest.raises(ValueError, match="longer than 64 characters"):
        list(JsonItems(tmp_path / "a.json", chunk_bytes=8, max_item_bytes=64))


def test_conversation_records_validate_and_old_records_keep_their_json():
    turns = (Turn("user", "<image>Q?"), Turn("assistant", "A.", dvr=True))
    record = SampleRecord("c", "Q?", "A.", "", turns=turns, system="S")
    data = json.loads(record.to_json())
    assert data["turns"] == [{"role": "user", "content": "<image>Q?"},
                             {"role": "assistant", "content": "A.", "dvr": True}]
    assert SampleRecord.from_json(record.to_json()) == record and record.image_count == 1
    plain = SampleRecord("p", "Q?", "A.", "")
    assert set(json.loads(plain.to_json())) == {"id", "question", "response", "answer",
                                                "answer_type", "choices", "precision", "source"}
    with pytest.raises(InvalidRecord, match="response differs"):
        dataclasses.replace(record, response="Another chain.")
    for bad in ([{"role": "assistant", "content": "A."}, {"role": "user", "content": "Q?"}],
                [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "<image>"}],
                [{"role": "user", "content": "Q?", "dvr": True}, {"role": "assistant", "content": "A."}]):
        with pytest.raises(InvalidRecord):
            SampleRecord.from_json({**data, "turns": bad})


def test_distill_questions_are_single_turn(tmp_path):
    from data_engine.convert import iter_converted

    (tmp_path / "a.png").write_bytes(png((3, 3, 3)))
    two = {"messages": [{"role": "user", "content": "Compare <image> and <image>."},
                        {"role": "assistant", "content": "Same."}], "images": ["a.png"] * 2}
    four = {"messages": two["messages"] + [{"role": "user", "content": "Sure?"},
                                           {"role": "assistant", "content": "Yes."}],
            "images": ["a.png"] * 2}
    (tmp_path / "d.json").write_text(json.dumps([two, four]))
    (_, first), (_, second) = iter_converted("messages", tmp_path / "d.json", tmp_path)
    record, images = first
    assert record.turns is None and record.question == "Compare  and ." and len(images) == 2
    assert second.reason == "unsupported_conversation"
