"""``python -m tvc_lightning evaluate``: official output layouts, scores recomputed independently,
resume after SIGKILL, two ranks equal one, checkpoints of every kind, missing images.

The benchmark tests use ``../shared`` (MathVision's 304 records with real images, MathVista's
testmini JSON, for which stand-in images are drawn here) and skip without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tvc_lightning.cli import main
from tvc_lightning.evaluate.benchmarks import load_benchmark
from tvc_lightning.evaluate.formats import write_outputs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MATHVISION = SHARED / "mathvision" / "testmini.jsonl"
MATHVISTA = SHARED / "mathvista" / "testmini.json"
needs_mathvision = pytest.mark.skipif(not MATHVISION.exists(),
                                      reason="../shared/data/mathvision (MathVision testmini) absent")
needs_mathvista = pytest.mark.skipif(not MATHVISTA.exists(),
                                     reason="../shared/data/mathvista (MathVista testmini) absent")

# Decoding that calibrates (every 4 tokens exactly; the random model rarely ends a sentence) and
# never stops early, so PVC answers differ from plain ones and every item costs the same.
GEN = ["--generation.max_new_tokens", "12", "--generation.min_new_tokens", "12",
       "--generation.every_n_tokens", "4", "--generation.periodic_at", "token",
       "--generation.min_gap", "2", "--generation.max_calibrations", "2"]


def _env() -> dict[str, str]:
    # One thread everywhere: results compared across processes must not depend on thread counts.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _mathvision_args(checkpoint: Path, out: Path, limit: int, batch: int = 4,
                     bar: bool = False) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--benchmark", "mathvision", "--input",
            str(MATHVISION), "--out", str(out), "--limit", str(limit), "--batch_size", str(batch),
            "--compare_plain", "true", "--progress_bar", str(bar).lower(), *GEN]


def _files(out: Path) -> dict[str, str]:
    """The official output files of a run (not progress/, run.json or timings)."""
    return {p.name: p.read_text() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("summary.json", "run.json")}


# --- MathVista's and MATH-V's scoring, re-implemented from their published scripts ---------

def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _official_prediction(entry: dict):
    extraction, choices = entry["extraction"], entry["choices"]
    if entry["question_type"] == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        found = re.findall(r"\(([a-zA-Z])\)", text)
        if found:
            text = found[0].upper()
        letters = [chr(65 + i) for i in range(len(choices))]
        if text in letters:
            return choices[letters.index(text)]
        distances = [_levenshtein(text, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if entry["answer_type"] == "integer":
            return str(int(float(extraction)))
        if entry["answer_type"] == "float":
            return str(round(float(extraction), int(entry["precision"])))
        return str(extraction)
    except (TypeError, ValueError):
        return None


def _official_mathvista_scores(results: dict) -> dict:
    rows = list(results.values())
    n = sum(bool(r["true_false"]) for r in rows)
    scores = {"average": {"accuracy": n / len(rows), "correct": n, "total": len(rows)}}
    for key in ("question_type", "answer_type", "language", "source", "category", "task",
                "context", "grade", "skills"):
        flat = [{**r, **r["metadata"]} for r in rows]
        values = sorted({v for r in flat for v in (r[key] if key == "skills" else [r[key]])})
        table = {}
        for v in values:
            group = [r for r in flat if (v in r[key] if key == "skills" else r[key] == v)]
            c = sum(bool(r["true_false"]) for r in group)
            table[v] = {"accuracy": c / len(group), "correct": c, "total": len(group)}
        scores[key] = table
    return scores


def _official_mathv_table(lines: list[dict], raw: dict[str, dict]) -> dict:
    table: dict[str, list[int]] = {}
    for line in lines:
        s, lv = raw[line["id"]]["subject"], raw[line["id"]]["level"]
        for k in ("-all", f"-level{lv}", s, f"{s}_level{lv}", f"-level{lv}_{s}"):
            table.setdefault(k, [0, 0])
            table[k][0] += bool(line["correct"])
            table[k][1] += 1
    return {k: f"{c}/{t}={round(c / max(t, 1) * 100, 2)}%" for k, (c, t) in table.items()}


def assert_mathvista_files_consistent(out: Path, mode: str) -> dict:
    results = json.loads((out / f"output_{mode}.json").read_text())
    scores = json.loads((out / f"scores_{mode}.json").read_text())
    for pid, entry in results.items():
        assert entry["pid"] == pid and {"response", "extraction", "prediction", "true_false",
                                        "metadata", "query"} <= set(entry)
        prediction = _official_prediction(entry)
        assert entry["prediction"] == prediction, pid
        assert entry["true_false"] == (prediction == entry["answer"]), pid
    assert scores == _official_mathvista_scores(results)
    for key, table in scores.items():  # highest accuracy first, as MathVista sorts them
        if key != "average":
            accuracies = [v["accuracy"] for v in table.values()]
            assert accuracies == sorted(accuracies, reverse=True), key
    return scores


def assert_mathvision_files_consistent(out: Path, mode: str) -> dict:
    lines = [json.loads(x) for x in (out / f"{mode}.jsonl").read_text().splitlines()]
    raw = {str(r["id"]): r for r in map(json.loads, MATHVISION.read_text().splitlines())}
    table = json.loads((out / f"{mode}_result.json").read_text())
    assert table == _official_mathv_table(lines, raw)
    assert list(table) == sorted(table)
    for line in lines:
        assert {"id", "model", "response", "model_answer", "correct"} <= set(line)
    return table


# --- formats, without a model --------------------------------------------------------------

@needs_mathvista
def test_mathvista_files_score_as_the_official_logic(tmp_path):
    bench = load_benchmark("mathvista", MATHVISTA, tmp_path)
    rows = {}
    for n, item in enumerate(bench.items):  # right, wrong, letters and unparsable answers mixed
        raw = item.raw
        letter = (f"({chr(65 + raw['choices'].index(raw['answer']))})"
                  if raw["question_type"] == "multi_choice" else raw["answer"])
        response = [f"So the answer is {raw['answer']}.", f"Final: {letter}", "I am not sure.",
                    "The answer is 7."][n % 4]
        rows[item.id] = {"response": response, "calibrations": [], "num_generated": 1,
                         "finish_reason": "stop"}
    write_outputs("mathvista", bench.items, rows, tmp_path, "pvc", "m")
    scores = assert_mathvista_files_consistent(tmp_path, "pvc")
    assert scores["average"]["total"] == 1000
    assert 0.3 < scores["average"]["accuracy"] < 0.8  # both right and wrong answers scored


@needs_mathvision
def test_mathvision_files_score_as_the_official_aggregation(tmp_path):
    bench = load_benchmark("mathvision", MATHVISION)
    rows = {}
    for n, item in enumerate(bench.items):
        answer = str(item.raw["answer"])
        response = f"The answer is \\boxed{{{answer}}}." if n % 3 else "It is 12345."
        rows[item.id] = {"response": response, "calibrations": [], "num_generated": 1,
                         "finish_reason": "stop"}
    write_outputs("mathvision", bench.items, rows, tmp_path, "plain", "m-plain")
    table = assert_mathvision_files_consistent(tmp_path, "plain")
    correct, total = map(int, re.match(r"(\d+)/(\d+)=", table["-all"]).groups())
    assert total == 304 and 150 < correct < 304


def test_mathvision_gives_no_credit_for_being_the_nearest_option(tmp_path):
    """MATH-V's evaluation has no nearest-choice fallback (MathVista's does): "12345" is closest
    to the right option "1234" and MathVista's rule would credit it; MathVision must not."""
    from tvc_lightning.scoring import score_record_detailed

    path = tmp_path / "mv.jsonl"
    path.write_text(json.dumps({"id": "7", "question": "Which number is on the door?",
                                "options": ["12", "1234", "5"], "answer": "B", "level": 1,
                                "subject": "arithmetic", "image": "7.png"}) + "\n")
    (item,) = load_benchmark("mathvision", path).items
    assert score_record_detailed("It is 12345.", item.record).correct  # MathVista's rule
    assert not score_record_detailed("It is 12345.", item.record, nearest_choice=False).correct
    responses = ["It is 12345.", "The answer is 1234.", "Answer: (B)", "It is 5."]
    for n, response in enumerate(responses):
        rows = {"7": {"response": response, "calibrations": [], "num_generated": 1,
                      "finish_reason": "stop"}}
        write_outputs("mathvision", [item], rows, tmp_path, f"m{n}", "m")
        write_outputs("shards", [item], rows, tmp_path, f"m{n}", "m")
        (line,) = map(json.loads, (tmp_path / f"m{n}.jsonl").read_text().splitlines())
        (shard,) = map(json.loads, (tmp_path / f"results_m{n}.jsonl").read_text().splitlines())
        assert line["correct"] is (n in (1, 2)), response  # named by its text or its letter only
        assert shard["correct"] is (n in (0, 1, 2)), response  # shards keep the project's rule


# --- end to end on the tiny model ------------------------------------------------------------

@needs_mathvision
def test_evaluate_mathvision_pvc_and_plain(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    args = _mathvision_args(tiny_checkpoint, out, limit=16, batch=8)
    main(["evaluate", *_mathvision_args(tiny_checkpoint, out, limit=16, batch=8, bar=True)])
    captured = capsys.readouterr()
    assert "32/32" in captured.err and "<" in captured.err  # total and ETA on the bar
    assert "pvc   accuracy" in captured.out and "plain accuracy" in captured.out
    for mode in ("pvc", "plain"):
        assert_mathvision_files_consistent(out, mode)
    pvc = [json.loads(x) for x in (out / "pvc.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (out / "plain.jsonl").read_text().splitlines()]
    assert [x["id"] for x in pvc] == [str(r["id"]) for r in map(
        json.loads, MATHVISION.read_text().splitlines()[:16])]
    assert all(len(x["tvc"]["calibrations"]) == 2 for x in pvc)
    assert all(not x["tvc"]["calibrations"] for x in plain)
    assert [x["response"] for x in pvc] != [x["response"] for x in plain]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"]["pvc"]["total"] == 16 and summary["modes"]["pvc"]["calibrations_per_item"] == 2

    # Rerunning a finished run decodes nothing and changes nothing; other settings are refused.
    before = _files(out)
    main(["evaluate", *args])
    assert _files(out) == before
    with pytest.raises(SystemExit, match=r"generation: .*'max_new_tokens': 12.*16"):
        main(["evaluate", *args, "--generation.max_new_tokens", "16"])


def _standin_images(root: Path, pids: list[str]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n, pid in enumerate(pids):
        image = Image.new("RGB", (96 + 8 * (n % 5), 80), "white")
        ImageDraw.Draw(image).ellipse((10, 10, 40 + n % 30, 60), outline="black", width=3)
        image.save(root / "images" / f"{pid}.jpg")


@needs_mathvista
def test_evaluate_mathvista_with_standin_images(tmp_path, tiny_checkpoint):
    items = json.loads(MATHVISTA.read_text())
    pids = list(items)[:24]
    root = tmp_path / "mathvista"
    _standin_images(root, pids)
    for pid in pids[5:8]:
        (root / "images" / f"{pid}.jpg").unlink()
    (root / "images" / f"{pids[10]}.jpg").write_bytes(b"not a JPEG")  # found, but unreadable
    args = ["--checkpoint", str(tiny_checkpoint), "--benchmark", "mathvista", "--input",
            str(MATHVISTA), "--image_root", str(root), "--limit", "24", "--batch_size", "8",
            "--progress_bar", "false", "--compare_plain", "true", *GEN]
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", *args, "--out", str(tmp_path / "refused")])
    message = str(refused.value)
    assert "3 image(s) of 3 of 24 mathvista items not found under --image_root" in message
    assert f"{pids[5]}.jpg (item {pids[5]})" in message and "--allow_missing_images" in message
    assert not (tmp_path / "refused" / "progress").exists()

    out = tmp_path / "out"
    main(["evaluate", *args, "--out", str(out), "--allow_missing_images", "true"])
    for mode in ("pvc", "plain"):
        scores = assert_mathvista_files_consistent(out, mode)
        assert scores["average"]["total"] == 20
    results = json.loads((out / "output_pvc.json").read_text())
    assert list(results) == pids[:5] + pids[8:10] + pids[11:]
    first = results[pids[0]]
    assert {k: first[k] for k in items[pids[0]]} == items[pids[0]]  # the item's own fields kept
    assert first["query"].startswith("Hint: ") and "Question: " in first["query"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_images"] == 3 and summary["modes"]["pvc"]["skipped"] == 1
    bad = [r for b in map(json.loads, (out / "progress" / "rank0.jsonl").read_text().splitlines())
           for r in b["rows"] if "skipped" in r]
    assert [r["id"] for r in bad] == [pids[10]] * 2 and bad[0]["skipped"].startswith("bad_image")


# --- resume, ranks, checkpoint kinds -----------------------------------------------------------

RUN = [sys.executable, "-m", "tvc_lightning", "evaluate"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint) -> Path:
    """An uninterrupted single-process run over 16 items in batches of 4 (pvc and plain)."""
    whole = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run([*RUN, *_mathvision_args(tiny_checkpoint, whole, 16)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return whole


@needs_mathvision
@pytest.mark.parametrize("torn", [False, True], ids=["between-batches", "mid-write"])
def test_sigkill_then_restart_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint, uninterrupted,
                                                          torn):
    killed, run = tmp_path / "killed", RUN
    worker = [sys.executable, str(ROOT / "tests" / "evaluate_worker.py"), "3",
              *(["--torn"] if torn else []), "--"]
    crash = subprocess.run([*worker, *_mathvision_args(tiny_checkpoint, killed, 16)], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert crash.returncode == -9, crash.stderr[-2000:]  # SIGKILL: nothing finished cleanly
    log = killed / "progress" / "rank0.jsonl"
    data = log.read_bytes()
    assert data.count(b"\n") == 3 and data.endswith(b"\n") != torn  # 3 batches written, whole
    assert not (killed / "pvc.jsonl").exists()
    resumed = subprocess.run([*run, *_mathvision_args(tiny_checkpoint, killed, 16)], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    keys = [(b["mode"], r["id"]) for b in map(json.loads, log.read_text().splitlines())
            for r in b["rows"]]
    assert len(keys) == len(set(keys)) == 32  # every answer once: none decoded twice
    assert _files(killed) == _files(uninterrupted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_mathvision
def test_two_processes_equal_one(tmp_path, tiny_checkpoint):
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "tvc_lightning", "evaluate"]
    single = subprocess.run([*cmd, *_mathvision_args(tiny_checkpoint, one, 14, batch=3)],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    port = str(_free_port())
    procs = [subprocess.Popen([*cmd, *_mathvision_args(tiny_checkpoint, two, 14, batch=3)],
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "pvc   accuracy" in outputs[0][0] and not outputs[1][0].strip()  # rank 0 reports
    counts = [[len(json.loads(b)["rows"]) for b in
               (two / "progress" / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert counts == [[3, 3, 3, 3, 2, 2], [3, 3, 3, 3]]  # batches 0, 2, 4 and 1, 3 (x pvc, plain)
    assert _files(two) == _files(one)


@needs_mathvision
def test_lightning_checkpoint_scores_like_its_hf_directory(tmp_path, tiny_checkpoint):
    from tvc_lightning.hf import load_model

    weights = load_model(tiny_checkpoint).state_dict()  # as TVCModule's ``model`` holds them
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()},
                "hyper_parameters": {"model_name_or_path": str(tiny_checkpoint)}}, ckpt)
    for source, out in ((tiny_checkpoint, tmp_path / "hf"), (ckpt, tmp_path / "ckpt")):
        main(["evaluate", *_mathvision_args(source, out, 4), "--model_name", "tiny"])
    assert _files(tmp_path / "hf") == _files(tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="--checkpoint .*missing.ckpt: no such file"):
        main(["evaluate", *_mathvision_args(tmp_path / "missing.ckpt", tmp_path / "x", 4)])
    # The mistake recorded nothing: the corrected command runs in the same --out.
    assert not (tmp_path / "x" / "run.json").exists()
    # last.ckpt rewritten by further training is another model: its answers must not join these.
    torch.save({"state_dict": {f"model.{k}": v * 1.0001 for k, v in weights.items()},
                "hyper_parameters": {"model_name_or_path": str(tiny_checkpoint)}}, ckpt)
    with pytest.raises(SystemExit, match="checkpoint_stamp"):
        main(["evaluate", *_mathvision_args(ckpt, tmp_path / "ckpt", 4), "--model_name", "tiny"])


def test_lightning_checkpoint_stops_on_the_base_models_end_tokens(tmp_path, tiny_checkpoint):
    """A .ckpt is rebuilt from the base's config; its generation config (Qwen2-VL: two end-of-turn
    tokens) must come along, as validation and export use it."""
    from transformers import GenerationConfig

    from tvc_lightning.evaluate.run import load_for_eval
    from tvc_lightning.hf import load_model

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    config = GenerationConfig.from_pretrained(base)
    config.eos_token_id = [int(config.eos_token_id[0]) if isinstance(config.eos_token_id, list)
                           else int(config.eos_token_id), 3]
    config.save_pretrained(base)
    weights = load_model(base).state_dict()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()},
                "hyper_parameters": {"model_name_or_path": str(base)}}, ckpt)
    model, _ = load_for_eval(str(ckpt), None, "float32", "sdpa")
    assert model.generation_config.eos_token_id == config.eos_token_id


def test_evaluate_converted_shards(tmp_path, tiny_checkpoint):
    from data_engine.synth import write_split

    write_split(tmp_path / "data", "val", 6, seed=0, per_shard=3, image_size=96)
    out = tmp_path / "out"
    main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--benchmark", "shards",
          "--input", str(tmp_path / "data" / "val"), "--out", str(out), "--batch_size", "4",
          "--progress_bar", "false", "--generation.max_new_tokens", "6"])
    lines = [json.loads(x) for x in (out / "results_pvc.jsonl").read_text().splitlines()]
    scores = json.loads((out / "scores_pvc.json").read_text())
    assert len(lines) == 6 and all({"id", "answer", "response", "extraction", "correct"} <= set(x)
                                   for x in lines)
    correct = sum(x["correct"] for x in lines)
    assert scores["average"] == {"accuracy": correct / 6, "correct": correct, "total": 6}
    assert sum(v["total"] for v in scores["answer_type"].values()) == 6
    assert not (out / "results_plain.jsonl").exists()


def test_bad_benchmark_flags_name_the_flag(tmp_path, tiny_checkpoint):
    base = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--benchmark 'mmmu'"):
        main([*base, "--benchmark", "mmmu", "--input", "x.json"])
    with pytest.raises(SystemExit, match=r"--input .*nope.jsonl: no such file"):
        main([*base, "--benchmark", "mathvision", "--input", str(tmp_path / "nope.jsonl")])
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_eval_recipe_composes_with_flags():
    from tvc_lightning.evaluate.cli import settings_from_args

    s = settings_from_args(["--config", str(ROOT / "recipes" / "eval" / "tiny.yaml"),
                            "--limit", "5", "--generation.max_calibrations", "0"])
    assert (s.benchmark, s.compare_plain, s.limit, s.max_pixels) == ("mathvision", True, 5, 50176)
    assert s.generation.max_new_tokens == 96 and s.generation.max_calibrations == 0
    assert s.generation.repetition_penalty == 1.05


def test_a_parsable_last_line_without_its_newline_counts_as_torn(tmp_path):
    """A kill can stop a write right before the newline: the row must not count as done, since
    the writer cuts that line off before appending (the items would vanish from the results)."""
    from tvc_lightning.evaluate.progress import ProgressWriter, progress_dir, read_done

    folder = progress_dir(tmp_path)
    folder.mkdir(parents=True)
    first = ProgressWriter.encode("pvc", [{"id": "1", "response": "a"}])
    second = ProgressWriter.encode("pvc", [{"id": "2", "response": "b"}])
    (folder / "rank0.jsonl").write_bytes(first + second[:-1])
    assert set(read_done(tmp_path)) == {("pvc", "1")}
    ProgressWriter(tmp_path, 0)  # repairs the tail
    assert (folder / "rank0.jsonl").read_bytes() == first
