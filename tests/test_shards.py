"""Tests for the shard streaming layer: skipping and counting bad input, safe decoding, splitting
across ranks and DataLoader workers, shuffling, resampling and the equal-count validation split."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from tvc_lightning.data.epochs import index_shards, scan_shard
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.shards import (
    ShardDataset,
    SkipCounter,
    SkipSample,
    iter_shard,
    load_split,
    resolve_urls,
)

NO_SKIPS = {"bad_tar": 0, "bad_json": 0, "bad_record": 0, "bad_image": 0, "too_long": 0}


# --- shard building helpers -------------------------------------------------------------------


def png(size: tuple[int, int] = (8, 8), noise: bool = False, seed: int = 0) -> bytes:
    """A PNG; ``noise=True`` makes it incompressible (a few KB) so a tar cut can land inside it."""
    if noise:
        rng = random.Random(seed)
        img = Image.frombytes(
            "RGB", size, bytes(rng.getrandbits(8) for _ in range(3 * size[0] * size[1]))
        )
    else:
        img = Image.new("RGB", size, (seed % 256, 40, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def record(sample_id: str, **override: Any) -> bytes:
    data = {"id": sample_id, "question": f"q {sample_id}?", "response": "think", "answer": "1"}
    data.update(override)
    return json.dumps(data).encode()


def good(sample_id: str, **kw: Any) -> tuple[str, dict[str, bytes]]:
    return sample_id, {"json": record(sample_id), "png": png(**kw)}


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def truncate(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def write_good_shards(directory: Path, n_shards: int, per_shard: int) -> list[str]:
    """Shards of only good samples; returns all ids."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(n_shards):
        samples = [good(f"s{s}-{i}", seed=i) for i in range(per_shard)]
        write_shard(directory / f"shard-{s:06d}.tar", samples)
        ids += [key for key, _ in samples]
    return ids


# --- encode functions (module level, so spawned workers can unpickle them) -----------------------


def encode_id(rec: SampleRecord, images: list[Image.Image], epoch: int) -> tuple[str, int, int]:
    """(id, number of images, epoch); rejects ids ending in 'long' as too_long."""
    if rec.id.endswith("long"):
        raise SkipSample("too_long", f"{rec.id} is too long")
    assert all(img.mode == "RGB" for img in images)
    return rec.id, len(images), epoch


def encode_with_worker(rec: SampleRecord, images: list[Image.Image], epoch: int) -> tuple:
    info = get_worker_info()
    return rec.id, info.id if info is not None else -1, epoch


def read_all(ds: ShardDataset, **loader_kw: Any) -> list[Any]:
    return list(DataLoader(ds, batch_size=None, **loader_kw))


# --- tests --------------------------------------------------------------------------------------


def test_skip_counter_counts_and_rejects_unknown_reasons() -> None:
    counter = SkipCounter()
    counter.add("bad_json")
    counter.add("too_long", 3)
    assert counter.as_dict() == {**NO_SKIPS, "bad_json": 1, "too_long": 3}
    assert counter.total() == 4
    with pytest.raises(ValueError, match="unknown skip reason 'nope'"):
        counter.add("nope")


def test_resolve_urls(tmp_path: Path) -> None:
    write_good_shards(tmp_path / "d", 3, 1)
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    paths = [str(tmp_path / "d" / f"shard-{i:06d}.tar") for i in range(3)]
    assert resolve_urls(tmp_path / "d") == paths
    assert resolve_urls(str(tmp_path / "d" / "shard-{000000..000002}.tar")) == paths
    assert resolve_urls(str(tmp_path / "d" / "*.tar")) == paths
    assert resolve_urls([paths[2], paths[0]]) == [paths[2], paths[0]]
    assert resolve_urls("s3://bucket/x-{0..1}.tar") == [
        "s3://bucket/x-0.tar",
        "s3://bucket/x-1.tar",
    ]
    assert resolve_urls("pipe:cat a.tar") == ["pipe:cat a.tar"]
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        resolve_urls(str(tmp_path / "d" / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"7 shard\(s\) of .*shard-000003.tar, .*, \.\.\."):
        resolve_urls(str(tmp_path / "d" / "shard-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_urls(tmp_path / "empty")


def test_bad_input_is_skipped_and_counted(tmp_path: Path) -> None:
    big = (100, 100)  # over the max_image_pixels used below: a decompression-bomb stand-in
    write_shard(
        tmp_path / "a.tar",
        [
            good("a0"),
            good("a1"),
            ("a2", {"json": b'{"id": "a2", "question": ', "png": png()}),  # malformed JSON
            (
                "a3",
                {
                    "json": json.dumps({"id": "a3", "response": "r", "answer": "1"}).encode(),
                    "png": png(),
                },
            ),  # missing field
            ("a4", {"json": record("a4", precision="3"), "png": png()}),  # wrong type
            ("a5", {"json": record("a5")}),  # no image
            ("a6", {"json": record("a6"), "png": random.Random(0).randbytes(300)}),  # undecodable
            ("a7long", {"json": record("a7long"), "png": png()}),  # encoder says too_long
            good("a8"),
            ("a9", {"json": record("a9"), "0.png": png(), "1.PNG": png(seed=3)}),  # two images
            ("a10", {"json": record("a10"), "png": png(size=big)}),  # too many pixels
            ("a11", {"png": png()}),  # image without a record
        ],
    )
    # b: cut inside a member's data -> tarfile raises; b0, b1 survive.
    b = write_shard(tmp_path / "b.tar", [good(f"b{i}", noise=True, seed=i) for i in range(4)])
    info = member(b, "b2.png")
    truncate(b, info.offset_data + info.size // 2)
    # c: cut exactly at a header, which tarfile's stream mode would take as a clean end; c1 is the
    # last sample before the cut and cannot be known complete, so only c0 survives.
    c = write_shard(tmp_path / "c.tar", [good(f"c{i}", noise=True, seed=i) for i in range(4)])
    truncate(c, member(c, "c2.json").offset)
    # d: not a tar at all.
    (tmp_path / "d.tar").write_bytes(random.Random(1).randbytes(5000))

    counter = SkipCounter()
    ds = ShardDataset(tmp_path, encode_id, counter, max_image_pixels=64 * 64, shuffle_shards=False)
    out = list(ds)
    good_ids = ["a0", "a1", "a8", "a9", "b0", "b1", "c0"]
    # The index counts 15 readable samples (12 + 2 + 1 + 0); the 8 found bad when decoded are
    # replaced by repeats of the reader's first good ones, so the epoch has its announced length.
    assert ds.split(1).per_reader == 15
    assert [i for i, _, _ in out] == good_ids + good_ids + ["a0"]
    assert ds.padded.as_dict() == {"padded": 8}
    assert dict((i, n) for i, n, _ in out)["a9"] == 2
    assert counter.as_dict() == {
        "bad_tar": 3,  # b, c, d
        "bad_json": 1,  # a2
        "bad_record": 4,  # a3, a4, a5, a11
        "bad_image": 2,  # a6, a10
        "too_long": 1,  # a7long
    }


def test_a_truncated_only_shard_is_read_up_to_the_damage(tmp_path: Path) -> None:
    """32 samples, cut at the 20th one's header: 18 are readable (the 19th cannot be known
    complete), and they make the whole epoch."""
    write_good_shards(tmp_path, 1, 32)
    shard = tmp_path / "shard-000000.tar"
    truncate(shard, member(shard, "s0-19.json").offset)
    counter = SkipCounter()
    ds = ShardDataset(tmp_path, encode_id, counter)
    assert ds.index is not None and ds.index.sizes == (18,)
    assert ds.index.damaged == (str(shard),)
    assert counter.as_dict() == {**NO_SKIPS, "bad_tar": 1}  # counted once, when indexed
    got = [i for i, _, _ in ds]
    assert sorted(got) == sorted(f"s0-{i}" for i in range(18))
    assert ds.padded.as_dict() == {"padded": 0}
    assert counter.as_dict() == {**NO_SKIPS, "bad_tar": 1}  # the reader stops before the damage


def test_the_index_counts_what_the_reader_yields_wherever_a_shard_is_cut(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "x.tar", [good(f"x{i}", noise=True, seed=i) for i in range(4)])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cuts = {len(data), len(data) - 512, len(data) - 1024, 0, 100, 512}
    for m in members:  # at a header, inside it, inside the data, at the end of the data
        cuts |= {m.offset, m.offset + 100, m.offset_data + m.size // 2, m.offset_data + m.size}
    for at in sorted(cuts):
        path.write_bytes(data[:at])
        read = len(list(iter_shard(str(path), SkipCounter())))
        # Cutting only end-of-archive zero blocks loses nothing, and is no damage.
        assert scan_shard(str(path)) == (read, read < 4), at
    # A duplicate member stops webdataset's reader: the sample holding it is lost, and the rest.
    dup = write_shard(tmp_path / "dup.tar", [good("d0"), good("d1"), ("d1", {"json": record("d1")}),
                                             good("d2")])
    assert scan_shard(str(dup)) == (len(list(iter_shard(str(dup), SkipCounter()))), True) == (1, True)
    assert index_shards([str(path)]).total == 4


def test_compressed_shards(tmp_path: Path) -> None:
    """A gzipped shard has no zero tail; it must not look truncated, but a cut one must count."""
    ok = write_shard(tmp_path / "ok.tar.gz", [good(f"g{i}") for i in range(3)], mode="w:gz")
    cut = write_shard(
        tmp_path / "cut.tar.gz", [good(f"h{i}", noise=True, seed=i) for i in range(3)], mode="w:gz"
    )
    truncate(cut, cut.stat().st_size // 2)
    counter = SkipCounter()
    got = [i for i, _, _ in ShardDataset([ok, cut], encode_id, counter, shuffle_shards=False)]
    assert got[:3] == ["g0", "g1", "g2"]
    assert set(got[3:]) <= {"h0", "h1"}  # whatever came before the cut, minus the last sample
    assert counter.as_dict() == {**NO_SKIPS, "bad_tar": 1}


def test_pickle_members_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return builtins.open, (str(marker), "w")

    payload = pickle.dumps(Evil())
    write_shard(
        tmp_path / "p.tar",
        [
            (
                "p0",
                {
                    "json": record("p0"),
                    "png": png(),
                    "pickle": payload,
                    "pyd": payload,
                    "cls": payload,
                    "npy": payload,
                },
            )
        ],
    )
    raw = list(iter_shard(str(tmp_path / "p.tar"), SkipCounter()))
    # Only the members we decode are even read from the tar.
    assert [sorted(k for k in s if not k.startswith("__")) for s in raw] == [["json", "png"]]
    counter = SkipCounter()
    assert [i for i, _, _ in ShardDataset(tmp_path / "p.tar", encode_id, counter)] == ["p0"]
    assert counter.as_dict() == NO_SKIPS
    assert not marker.exists()
    pickle.loads(payload).close()  # the payload is live: loading it would have created the file
    assert marker.exists()


def _read_as_ranks(
    monkeypatch: pytest.MonkeyPatch, urls: Path, counter: SkipCounter, world: int, workers: int
) -> tuple[dict[tuple[int, int], list[str]], int]:
    """ids read by each (rank, worker), one real multi-worker DataLoader per simulated rank, and
    the samples padded with repeats on all ranks together."""
    by_reader: dict[tuple[int, int], list[str]] = {}
    padded = 0
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ds = ShardDataset(urls, encode_with_worker, counter, shuffle_buffer=3, seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the shared-shards warning is tested on its own
            for sample_id, worker, _ in read_all(ds, num_workers=workers):
                by_reader.setdefault((rank, worker), []).append(sample_id)
        padded += ds.padded.as_dict()["padded"]
    return by_reader, padded


@pytest.mark.parametrize(("n_shards", "per_shard"), [(5, 6), (2, 8)],
                         ids=["more-shards-than-readers", "fewer-shards-than-readers"])
def test_ranks_and_workers_read_disjoint_samples_covering_the_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_shards: int, per_shard: int
) -> None:
    ids = write_good_shards(tmp_path / "d", n_shards, per_shard)
    # One bad JSON record per run, counted by whichever worker owns it, seen in the main process.
    write_shard(tmp_path / "d" / "shard-000000.tar",
                [good("s0-0"), ("bad", {"json": b"{", "png": png()}), good("s0-1"), good("s0-2")])
    ids = [i for i in ids if not i.startswith("s0-") or i in ("s0-0", "s0-1", "s0-2")]
    total = len(ids) + 1  # a multiple of the 4 readers: nothing is dropped
    counter = SkipCounter()
    by_reader, padded = _read_as_ranks(monkeypatch, tmp_path / "d", counter, world=2, workers=2)
    assert sorted(by_reader) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {len(got) for got in by_reader.values()} == {total // 4}  # equal shares
    everything = [i for got in by_reader.values() for i in got]
    assert sorted(set(everything)) == sorted(ids)  # together they cover the split
    # The bad record's place is taken by one repeat: no other sample is read twice.
    assert len(everything) == total and padded == 1
    assert [n for n in Counter(everything).values() if n > 1] == [2]
    assert counter.as_dict() == {**NO_SKIPS, "bad_json": 1}


def test_fewer_shards_than_readers_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_good_shards(tmp_path, 2, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    got = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        ds = ShardDataset(tmp_path, encode_id, SkipCounter())
        with pytest.warns(UserWarning, match="2 shards for 4 readers") if rank == 0 else (
                warnings.catch_warnings()):
            got.append([i for i, _, _ in ds])
    assert [len(g) for g in got] == [2, 2, 2, 2]
    assert len({i for g in got for i in g}) == 8


def test_bad_tar_counted_once_from_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every simulated rank indexes the truncated shard; only rank 0 counts it, and readers sharing
    the shard stop before the damage."""
    write_good_shards(tmp_path, 2, 6)
    shard = tmp_path / "shard-000001.tar"
    truncate(shard, member(shard, "s1-2.png").offset_data + 3)
    counter = SkipCounter()
    by_reader, padded = _read_as_ranks(monkeypatch, tmp_path, counter, world=2, workers=2)
    got = sorted(i for ids in by_reader.values() for i in ids)
    assert got == sorted([f"s0-{i}" for i in range(6)] + ["s1-0", "s1-1"])
    assert counter.as_dict() == {**NO_SKIPS, "bad_tar": 1} and padded == 0


def test_counter_and_epoch_shared_with_spawned_persistent_workers(tmp_path: Path) -> None:
    write_good_shards(tmp_path, 2, 3)
    write_shard(tmp_path / "shard-000002.tar", [good("x-long"), ("y", {"json": record("y")})])
    counter = SkipCounter()
    ds = ShardDataset(tmp_path, encode_id, counter)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    for epoch in (0, 3):
        ds.set_epoch(epoch)  # after the workers exist: they must see it through shared memory
        out = list(loader)
        assert len(out) == 8  # 8 indexed samples, 2 found bad and replaced by repeats
        assert len({i for i, _, _ in out}) == 6
        assert {e for _, _, e in out} == {epoch}
    # Two passes over the same bad samples, counted in workers, visible here.
    assert counter.as_dict() == {**NO_SKIPS, "too_long": 2, "bad_record": 2}
    assert ds.padded.as_dict() == {"padded": 4}


def test_shuffle_changes_order_between_epochs_not_content(tmp_path: Path) -> None:
    write_good_shards(tmp_path, 4, 10)

    def order(epoch: int, seed: int = 1) -> list[str]:
        ds = ShardDataset(tmp_path, encode_id, SkipCounter(), shuffle_buffer=8, seed=seed)
        ds.set_epoch(epoch)
        return [i for i, _, e in ds if e == epoch]

    epoch0, epoch1 = order(0), order(1)
    assert len(epoch0) == 40
    assert epoch0 != epoch1
    assert sorted(epoch0) == sorted(epoch1)
    assert order(1) == epoch1  # same seed and epoch: same order
    assert order(1, seed=2) != epoch1
    # Within a shard, the buffer reorders samples (not only the shard order changes).
    unbuffered = [i for i, _, _ in ShardDataset(tmp_path, encode_id, SkipCounter())]
    assert epoch0 != unbuffered


def test_resampled_is_infinite_and_deterministic(tmp_path: Path) -> None:
    ids = write_good_shards(tmp_path, 2, 3)

    def take(n: int) -> list[str]:
        it = iter(ShardDataset(tmp_path, encode_id, SkipCounter(), resampled=True, seed=5))
        return [next(it)[0] for _ in range(n)]

    got = take(30)  # 5x the data: only an endless stream yields this many
    assert set(got) == set(ids)
    assert max(Counter(got).values()) >= 5
    assert take(30) == got


def test_load_split_gives_equal_counts_per_rank(tmp_path: Path) -> None:
    ids = write_good_shards(tmp_path, 3, 4)[:-1]  # 11 good samples after the bad ones below
    write_shard(
        tmp_path / "shard-000002.tar",
        [good("s2-0"), ("bad", {"json": b"[]", "png": png()}), good("s2-1"), good("s2-2")],
    )
    world = 3
    splits = []
    for rank in range(world):
        counter = SkipCounter()
        with pytest.warns(UserWarning, match="dropping 2 of 11 samples"):
            split = load_split(tmp_path, counter, world_size=world, rank=rank)
        assert counter.as_dict() == {**NO_SKIPS, "bad_json": 1}
        assert all(isinstance(r, SampleRecord) and len(imgs) == 1 for r, imgs in split)
        splits.append([r.id for r, _ in split])
    assert [len(s) for s in splits] == [3, 3, 3]
    everything = [i for s in splits for i in s]
    assert len(set(everything)) == 9
    assert sorted(everything) == sorted(ids[:9])  # round-robin by index, remainder dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divides evenly: no warning
        assert [r.id for r, _ in load_split(tmp_path, SkipCounter(), 1, 0)] == ids
    assert torch.distributed.is_initialized() is False
    with pytest.raises(ValueError, match="rank"):
        load_split(tmp_path, SkipCounter(), world_size=2, rank=2)


def test_input_the_image_processor_or_json_would_choke_on_is_a_counted_skip(tmp_path: Path) -> None:
    """A 300x1 banner (Qwen2-VL's processor refuses aspect ratios over 200), a JSON integer of
    5,000 digits (Python's int limit), deeply nested JSON, and an encoder error of any other
    type: each is one counted bad sample, never an exception that kills the DataLoader worker
    (and, the stream being deterministic, every resumed run again)."""
    write_shard(tmp_path / "a.tar", [
        good("a0"),
        ("a1", {"json": record("a1"), "png": png(size=(300, 1))}),
        ("a2", {"json": b'{"id": "a2", "question": "q", "response": "r", "answer": ' + b"9" * 5000 + b"}",
                "png": png()}),
        ("a3", {"json": b"[" * 100_000 + b"]" * 100_000, "png": png()}),
        good("a4crash"),
        good("a5"),
    ])

    def encode(rec: SampleRecord, images: list[Image.Image], epoch: int) -> str:
        if rec.id.endswith("crash"):
            raise RuntimeError("an encoder bug this input triggers")
        return rec.id

    counter = SkipCounter()
    ds = ShardDataset(tmp_path, encode, counter, shuffle_shards=False)
    out = list(ds)
    assert out == ["a0", "a5", "a0", "a5", "a0", "a5"]  # 6 indexed, 4 bad -> padded with repeats
    assert counter.as_dict() == {**NO_SKIPS, "bad_image": 1, "bad_json": 2, "bad_record": 1}
