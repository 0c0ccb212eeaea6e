"""Restarts and partitions of ``python -m data_engine distill``: kill -9 then rerun gives every
record exactly once, unpublished shards are redone, partitions are disjoint and cover the input, and
a restart with changed output settings is refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_engine.__main__ import main
from data_engine.distill import distill
from data_engine.manifest import ResumableOutput, read_manifest
from data_engine.shards import ShardWriter
from tests.test_distill import ROOT, FakeTeacher, chain, parse, png, question, shard_records, write_mathvision
from tvc_lightning.data.schema import SampleRecord


def test_kill_9_and_restart_gives_the_same_records(tmp_path):
    n = 24
    src = write_mathvision(tmp_path / "in", n)
    script = {"responses": {question(i): [[chain(i)]] for i in range(n)}, "delay": 0.15}
    teacher = tmp_path / "teacher.json"  # slow (killable) for the first run, fast after
    teacher.write_text(json.dumps(script))

    def argv(out: Path) -> list[str]:
        return ["distill", "--format", "mathvision", "--input", str(src), "--out", str(out),
                "--teacher", f"scripted:{teacher}", "--tokenizer", "words",
                "--min-tokens", "0", "--samples-per-shard", "3", "--concurrency", "1", "--no-progress"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_engine", *argv(killed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(killed.glob("*.tar"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the distill subprocess made no shards"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = len(read_manifest(killed / "manifest.jsonl"))
    assert 6 <= done_before < n
    teacher.write_text(json.dumps({**script, "delay": 0}))
    assert main(argv(killed)) == 0  # the restart
    assert main(argv(tmp_path / "whole")) == 0  # uninterrupted
    assert not list(killed.glob("*.tmp"))
    whole = shard_records(sorted((tmp_path / "whole").glob("*.tar")))
    again = shard_records(sorted(killed.glob("*.tar")))
    ids = [r.id for r in again]
    assert len(ids) == len(set(ids)) == n  # no duplicates, none missing
    assert sorted(again, key=lambda r: r.id) == sorted(whole, key=lambda r: r.id)
    report = json.loads((killed / "report.json").read_text())
    assert report["kept"] == n and report["questions"] == n  # the report covers both runs


def test_entries_of_an_unpublished_shard_are_redone(tmp_path, monkeypatch):
    """A crash after the manifest entries but before the rename: those questions count as not done."""
    rec = SampleRecord(id="r", question="q", response="r", answer="1")
    out = ResumableOutput(tmp_path, "t", tmp_path / "m.jsonl", maxcount=2)
    for k in "abcd":  # a, b fill shard 0 (published when c comes); c, d fill shard 1
        out.add_kept({"key": k, "outcome": "kept"}, k, rec, [png(0)])
    import data_engine.shards as shards_module

    def crash(src, dst):
        raise KeyboardInterrupt("killed between manifest and rename")

    monkeypatch.setattr(shards_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        out.add_kept({"key": "e", "outcome": "kept"}, "e", rec, [png(0)])  # publishes shard 1
    monkeypatch.undo()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"key": "x", "outc')  # a torn line
    # c's and d's entries went in before the failed rename; e's never did (added after its write).
    assert [e["key"] for e in read_manifest(tmp_path / "m.jsonl")] == ["a", "b", "c", "d"]
    again = ResumableOutput(tmp_path, "t", tmp_path / "m.jsonl", maxcount=2)
    assert sorted(again.done) == ["a", "b"] and again.run == 1
    assert not list(tmp_path.glob("*.tmp"))
    again.add_rejected({"key": "c", "outcome": "rejected", "reason": "wrong_answer"})
    again.close()
    with ResumableOutput(tmp_path, "t", tmp_path / "m.jsonl") as third:
        # Run 1 left no shard and no entry naming one, so its number is free again.
        assert sorted(third.done) == ["a", "b", "c"] and third.run == 1


# --- partitions, inputs, config ----------------------------------------------------------------


def test_partitions_are_disjoint_and_cover_the_input(tmp_path):
    n = 16
    with ShardWriter(tmp_path / "in", "src", maxcount=5) as w:  # the record format as input
        for i in range(n):
            w.write(f"s{i}", SampleRecord(id=f"q{i}", question=question(i), response="old chain.",
                                          answer=str(i), answer_type="integer"), [png(i)])
    script = {question(i): [[chain(i)]] for i in range(n)}
    out = tmp_path / "out"
    kept = []
    for index in (0, 1):
        report = distill(parse("--input", tmp_path / "in", "--out", out, "--teacher", "x:y",
                               "--tokenizer", "words", "--min-tokens", 0, "--num-shards", 2,
                               "--shard-index", index, "--no-progress"), FakeTeacher(script))
        shards = sorted(out.glob(f"distill-p{index:03d}of002-*.tar"))
        kept.append({r.id for r in shard_records(shards)})
        assert report["kept"] == len(kept[-1]) > 0
        assert (out / f"manifest-{index:03d}-of-002.jsonl").exists()
        assert (out / f"report-{index:03d}-of-002.json").exists()
    assert not kept[0] & kept[1] and kept[0] | kept[1] == {f"q{i}" for i in range(n)}
    with pytest.raises(ValueError, match="split into 2 partition"):
        distill(parse("--input", tmp_path / "in", "--out", out, "--teacher", "x:y", "--tokenizer",
                      "words"), FakeTeacher(script))


def test_a_restart_with_changed_settings_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    n = 6
    src = write_mathvision(tmp_path / "in", n)
    (tmp_path / "t.json").write_text(json.dumps({"responses": {question(i): [[chain(i)]] for i in range(n)}}))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)

    def argv(*extra: str, source: str = str(src)) -> list[str]:
        return ["distill", "--format", "mathvision", "--input", source, "--out", str(out),
                "--teacher", f"scripted:{tmp_path / 't.json'}", "--tokenizer", "words",
                "--min-tokens", "0", "--no-progress", *extra]

    # A first run that failed before distilling anything (a mistyped input) locks nothing.
    assert main(argv("--max-reflections", "3", source="in/typo.jsonl")) == 2
    assert main(argv("--max-reflections", "3")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(argv("--max-reflections", "5", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "manifest.settings.json" in err and "use another --out" in err
    assert "--max-reflections 3 -> 5" in err and "--seed 0 -> 1" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost
    # The same settings spelled otherwise (a config file's number, a relative path, the default
    # image root given explicitly), changed operational flags, and the DVR stage added later:
    # all resume.
    (tmp_path / "c.yaml").write_text("max_reflections: 3.0\nconcurrency: 2\n")
    assert main(argv("--config", "c.yaml", "--image-root", str(src.parent), "--offline-dvr",
                     source=str(src.relative_to(tmp_path)))) == 0
    assert len(shard_records(sorted(out.glob("*.tar")))) == n
