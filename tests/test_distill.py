"""Tests for ``python -m data_engine distill``: teachers, rejection sampling, filters, restarts."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_engine.__main__ import build_parser, main
from data_engine.distill import distill, resolve
from data_engine.filters import (
    ChainChecker,
    FilterConfig,
    count_reflections,
    load_token_counter,
    reflection_pattern,
    words,
)
from data_engine.manifest import read_manifest
from data_engine.teachers import (
    CONTINUE_INSTRUCTION,
    LocalTeacher,
    OpenAITeacher,
    TeacherError,
    TeacherRequestError,
)
from tvc_lightning.data.dvr import DEFAULT_BRIDGES
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.shards import SkipCounter, load_split

ROOT = Path(__file__).resolve().parents[1]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (i * 7 % 256, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


def question(i: int) -> str:
    return f"How many dots are in figure {i}?"


def chain(answer: object, filler: int = 30, reflections: int = 1) -> str:
    """A well-formed chain: sentences, ``reflections`` reflection sentences, a boxed answer."""
    body = " ".join(["I count the dots one by one."] * (filler // 7 + 1))
    checks = " ".join(["Wait, let me count again."] * reflections)
    return f"{body} {checks} So the final answer is \\boxed{{{answer}}}."


def write_mathvision(dir_: Path, n: int, extra_lines: tuple[str, ...] = ()) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (dir_ / f"{i}.png").write_bytes(png(i))
        lines.append(json.dumps({"id": str(i), "question": question(i), "answer": str(i),
                                 "image": f"{i}.png"}))
    path = dir_ / "in.jsonl"
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def parse(*argv: object) -> object:
    return resolve(build_parser().parse_args(["distill", *map(str, argv)]))


def shard_records(shards: list[Path]) -> list[SampleRecord]:
    """The records of ``shards``, read with the training reader (which also decodes the images)."""
    decoded = load_split([str(p) for p in shards], SkipCounter(), world_size=1, rank=0)
    assert all(len(images) == 1 and images[0].size == (28, 28) for _, images in decoded)
    return [record for record, _ in decoded]


class FakeTeacher:
    """Predetermined answers per question and round (round 1 is the greedy call)."""

    def __init__(self, script: dict[str, list[list[str]]], continuations: dict[str, str] | None = None):
        self.script, self.continuations = script, continuations or {}
        self.calls: list[tuple[str, int, float]] = []
        self.prompts: list[tuple[str, list]] = []
        self.lock = threading.Lock()

    def generate(self, question, images, n, temperature, max_tokens, seed):
        q = question.split("\n", 1)[0]
        with self.lock:
            self.prompts.append((question, list(images)))
            if CONTINUE_INSTRUCTION in question:
                return [self.continuations[q]] * n
            rnd = sum(1 for c in self.calls if c[0] == q)
            self.calls.append((q, n, temperature))
        answers = self.script[q][min(rnd, len(self.script[q]) - 1)]
        return [answers[i % len(answers)] for i in range(n)]


# --- HTTP teacher -------------------------------------------------------------------------------


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 answering with ``respond(body) -> (status, bytes)``."""

    def __init__(self, respond):
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                status, payload = respond(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(respond):
        servers.append(ChatServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def completion(texts: list[str]) -> bytes:
    return json.dumps({"object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for i, t in enumerate(texts)]}).encode()


def test_openai_teacher_round_trip_with_tiny_model(chat_server, tiny_checkpoint):
    local = LocalTeacher(tiny_checkpoint)

    def respond(body):
        (message,) = body["messages"]
        image, text = message["content"]
        data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
        texts = local.generate(text["text"], [data], n=body["n"], temperature=body["temperature"],
                               max_tokens=body["max_tokens"], seed=body["seed"])
        return 200, completion(texts)

    server = chat_server(respond)
    remote = OpenAITeacher(server.url, model="tiny", timeout=60)
    got = remote.generate("What is shown?", [png(3)], n=2, temperature=0.0, max_tokens=6, seed=5)
    want = local.generate("What is shown?", [png(3)], n=2, temperature=0.0, max_tokens=6, seed=5)
    assert got == want and len(got) == 2 and all(got)
    ((path, body),) = server.requests
    assert path == "/v1/chat/completions"
    assert {k: body[k] for k in ("model", "n", "temperature", "max_tokens", "seed")} == {
        "model": "tiny", "n": 2, "temperature": 0.0, "max_tokens": 6, "seed": 5}
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(png(3)).decode()  # bytes unchanged
    # Sampling goes through too: the same seed gives the same draws on both sides.
    got = remote.generate("What is shown?", [png(3)], n=2, temperature=1.0, max_tokens=6, seed=9)
    assert got == local.generate("What is shown?", [png(3)], n=2, temperature=1.0, max_tokens=6, seed=9)


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://host/v1", "http:///v1", "http://h:99999/v1"])
def test_openai_teacher_bad_url(url):
    with pytest.raises(TeacherError, match="bad teacher URL"):
        OpenAITeacher(url)


def test_openai_teacher_refused_connection_after_retries():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", retries=2, backoff=0.01, timeout=5)
    with pytest.raises(TeacherError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: no reply "
                                           r"after 3 attempts: connection refused"):
        teacher.generate("q", [png(0)], n=1, temperature=0, max_tokens=4, seed=0)


def test_openai_teacher_malformed_replies_and_retries(chat_server):
    replies = iter([(200, b"<html>not json</html>"), (200, b'{"error": "nope"}'),
                    (503, b"busy"), (200, completion(["ok"])), (400, b"image too large")])
    server = chat_server(lambda body: next(replies))
    teacher = OpenAITeacher(server.url, retries=2, backoff=0.01)
    ask = lambda: teacher.generate("q", [png(0)], n=1, temperature=0, max_tokens=4, seed=0)  # noqa: E731
    with pytest.raises(TeacherError, match=re.escape(server.url) + ".*malformed reply.*not JSON"):
        ask()
    with pytest.raises(TeacherError, match="malformed reply: no 'choices'"):
        ask()
    assert ask() == ["ok"]  # the 503 was retried
    with pytest.raises(TeacherRequestError, match="HTTP 400: image too large"):
        ask()
    assert len(server.requests) == 5


def test_openai_teacher_fills_n_when_the_server_ignores_it(chat_server):
    server = chat_server(lambda body: (200, completion([f"seed {body['seed']}"])))
    teacher = OpenAITeacher(server.url)
    assert teacher.generate("q", [png(0)], n=3, temperature=1, max_tokens=4, seed=10) == [
        "seed 10", "seed 11", "seed 12"]


# --- rejection sampling and report ------------------------------------------------------------


def test_rejection_sampling_keeps_exactly_the_verified_chains(tmp_path):
    src = write_mathvision(tmp_path / "in", 6)
    long_chain = chain(4, filler=200)
    script = {
        question(0): [[chain(0)]],  # solved greedily
        question(1): [[chain(7)], [chain(8), chain(1, filler=40), chain(1)]],  # round 2, 2nd sample
        question(2): [[chain(5)], [chain(6)]],  # never right
        question(3): [["I think there are some dots."], ["Many dots."]],  # never states an answer
        question(4): [[long_chain], [chain(4)]],  # right but too long, then fine
        question(5): [[chain(5, reflections=4)], [chain(9)]],  # right but too reflective
    }
    teacher = FakeTeacher(script)
    out = tmp_path / "out"
    report = distill(parse("--format", "mathvision", "--input", src, "--out", out, "--teacher",
                           "fake:x", "--tokenizer", "words", "--min-tokens", 10, "--max-tokens", 100,
                           "--max-reflections", 3, "--best-of", 3, "--no-progress"), teacher)
    records = {r.id: r for r in shard_records(sorted(out.glob("*.tar")))}
    assert records.keys() == {"mathvision-0", "mathvision-1", "mathvision-4"}
    assert records["mathvision-1"].response == chain(1, filler=40)  # the first verified sample
    assert records["mathvision-0"].answer == "0" and records["mathvision-0"].question == question(0)
    # Solved questions are not asked again; round 1 is one greedy call, round 2 best-of-3 at T=1.
    calls = Counter(q for q, _, _ in teacher.calls)
    assert calls == {question(0): 1, question(1): 2, question(2): 2, question(3): 2, question(4): 2,
                     question(5): 2}
    assert {(n, t) for _, n, t in teacher.calls} == {(1, 0.0), (3, 1.0)}
    assert report["kept"] == 3 and report["questions"] == 6
    assert report["rejected"] == {"no_final_answer": 1, "too_many_reflections": 1, "wrong_answer": 1}
    assert report["kept"] + sum(report["rejected"].values()) == report["questions"]
    assert report["rounds_needed"] == {"1": 1, "2": 2}
    assert report["chains"] == {"kept": 3, "no_final_answer": 4, "too_long": 1,
                                "too_many_reflections": 1, "wrong_answer": 9}
    assert sum(report["token_histogram"].values()) == 3
    assert json.loads((out / "report.json").read_text())["kept"] == 3
    manifest = {e["key"]: e for e in read_manifest(out / "manifest.jsonl")}
    assert manifest["mathvision-1"]["round"] == 2 and manifest["mathvision-2"]["shard"] is None
    assert manifest["mathvision-4"]["tokens"] == len(chain(4).split())


# --- filters -----------------------------------------------------------------------------------


def sized(n_words: int, answer: str = "7") -> str:
    return " ".join(["step"] * (n_words - 1) + [f"\\boxed{{{answer}}}"])


def test_token_bounds_are_inclusive():
    record = SampleRecord(id="r", question="q", response="x", answer="7", answer_type="integer")
    checker = ChainChecker(FilterConfig(min_tokens=20, max_tokens=80), words)
    assert [checker.check(sized(n), record).reason for n in (19, 20, 80, 81)] == [
        "too_short", None, None, "too_long"]
    assert checker.check(sized(20), record).tokens == 20
    off = ChainChecker(FilterConfig(min_tokens=0, max_tokens=0), words)
    assert off.check(sized(1), record).ok and off.check(sized(500), record).ok


def test_default_token_bounds_with_a_real_tokenizer(tiny_checkpoint):
    count = load_token_counter(str(tiny_checkpoint))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    text = chain(3)
    assert count(text) == len(tok(text, add_special_tokens=False)["input_ids"]) > 10
    record = SampleRecord(id="r", question="q", response="x", answer="7", answer_type="integer")
    # Defaults: responses of 200 tokens or more; no response cap of their own: the training
    # sample's length (8192 tokens, data.max_length's default) is the upper bound.
    checker = ChainChecker(FilterConfig(), lambda t: len(t.split()))
    assert [checker.check(sized(n), record).reason for n in (199, 200, 8001)] == [
        "too_short", None, None]
    framed = ChainChecker(FilterConfig(), words, training_length=lambda r, images: words(r.response) + 192)
    assert [framed.check(sized(n), record).reason for n in (8000, 8001)] == [None, "too_long"]
    assert framed.check(sized(8000), record).length == 8192


def test_reflection_words_at_most_25():
    pattern = reflection_pattern(FilterConfig().reflection_phrases)
    text = "But wait, hmm. WAIT. Waiting is fine. Let me double-check; alternatively, hmmm."
    # But wait, hmm, WAIT, Let me double-check, alternatively; not Waiting or hmmm.
    assert count_reflections(text, pattern) == 5
    record = SampleRecord(id="r", question="q", response="x", answer="2")
    checker = ChainChecker(FilterConfig(min_tokens=0), words)
    base = "I add one and one. "

    def with_reflections(k: int) -> str:
        return base + " ".join(["Hmm, that is right."] * k) + " The answer is \\boxed{2}."

    v25, v26 = checker.check(with_reflections(25), record), checker.check(with_reflections(26), record)
    assert (v25.reason, v25.reflections) == (None, 25)
    assert (v26.reason, v26.reflections) == ("too_many_reflections", 26)
    assert ChainChecker(FilterConfig(min_tokens=0, max_reflections=-1), words).check(
        with_reflections(26), record).ok


def test_final_answer_presence_and_consistency():
    record = SampleRecord(id="r", question="q", response="x", answer="7", answer_type="integer")
    checker = ChainChecker(FilterConfig(min_tokens=0), words)
    # The scorer alone would take the last number (7) here: no stated final answer, rejected.
    assert checker.check("I count them and get 7.", record).reason == "no_final_answer"
    assert checker.check("", record).reason == "no_final_answer"
    assert checker.check("So the answer is \\boxed{8}.", record).reason == "wrong_answer"
    assert checker.check("Counting gives seven.\nAnswer: 7", record).ok
    lenient = ChainChecker(FilterConfig(min_tokens=0, require_final_answer=False), words)
    assert lenient.check("I count them and get 7.", record).ok


# --- offline DVR ---------------------------------------------------------------------------------


def test_offline_dvr_regenerates_after_the_bridge(tmp_path):
    src = write_mathvision(tmp_path / "in", 4)
    chains = {i: f"There are dots. I count {i}. Wait, let me recount them. The answer is \\boxed{{{i}}}."
              for i in range(3)}
    chains[3] = "I count 3. The answer is \\boxed{3}. Wait, let me recount them. Yes."
    teacher = FakeTeacher({question(i): [[chains[i]]] for i in range(4)},
                          continuations={question(0): "Yes, the figure shows 0 dots. \\boxed{0}",
                                         question(1): "I now see 5 dots. \\boxed{5}",
                                         question(2): "Looking again, it is \\boxed{2}.",
                                         question(3): "It looks fine."})  # no answer restated
    out = tmp_path / "out"
    report = distill(parse("--format", "mathvision", "--input", src, "--out", out, "--teacher", "x:y",
                           "--tokenizer", "words", "--min-tokens", 0, "--offline-dvr",
                           "--no-progress"), teacher)
    assert report["kept"] == 4
    assert report["dvr"]["kept"] == 2
    assert report["dvr"]["rejected"] == {"no_final_answer": 1, "wrong_answer": 1}
    dvr = {r.id: r for r in shard_records(sorted((out / "dvr").glob("*.tar")))}
    assert dvr.keys() == {"mathvision-0-dvr", "mathvision-2-dvr"}
    prefix = "There are dots. I count 0. "  # cut at the reflection sentence
    response = dvr["mathvision-0-dvr"].response
    bridge = response[len(prefix):].split(" Yes,")[0]
    assert response.startswith(prefix) and bridge in DEFAULT_BRIDGES
    assert response == f"{prefix}{bridge} Yes, the figure shows 0 dots. \\boxed{{0}}"
    # The record says where its bridge is, so training shows the image there (and only there).
    span = (len(prefix), len(prefix) + len(bridge))
    assert dvr["mathvision-0-dvr"].bridge_spans == (span,)
    assert all(r.bridge_spans is None for r in shard_records(sorted(out.glob("*.tar"))))
    (prompt, images), = [(p, im) for p, im in teacher.prompts
                         if CONTINUE_INSTRUCTION in p and p.startswith(question(0))]
    assert prompt.endswith(f"{CONTINUE_INSTRUCTION}\n{prefix}{bridge}") and images == [png(0)]
    (entry,) = [e for e in read_manifest(out / "dvr" / "manifest.jsonl") if e["key"] == "mathvision-0"]
    assert entry["offset"] == len(prefix) and entry["bridge_span"] == list(span)


# --- restarts ----------------------------------------------------------------------------------


def test_malformed_input_is_reported_not_fatal(tmp_path, capsys):
    src = write_mathvision(tmp_path / "in", 3, extra_lines=(
        '{"id": "bad", "question": "broken', json.dumps({"id": "x", "question": "q", "answer": "1",
                                                        "image": "missing.png"})))
    script = {"responses": {question(i): [[chain(i)]] for i in range(3)}}
    (tmp_path / "s.json").write_text(json.dumps(script))
    assert main(["distill", "--format", "mathvision", "--input", str(src), "--out", str(tmp_path / "o"),
                 "--teacher", f"scripted:{tmp_path / 's.json'}", "--tokenizer", "words",
                 "--min-tokens", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skip input item line 4: malformed: not JSON" in err
    assert "skip input item line 5: missing_image" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["kept"] == 3 and report["invalid_input"] == {"malformed": 1, "missing_image": 1}


def control_token_lines() -> tuple[str, ...]:
    return (json.dumps({"id": "ctl", "question": "How many <|image_pad|> dots?", "answer": "1",
                        "image": "0.png"}),)


def test_control_token_question_is_skipped_counted_and_not_fatal(tmp_path, capsys):
    src = write_mathvision(tmp_path / "in", 3, extra_lines=control_token_lines())
    script = {"responses": {question(i): [[chain(i)]] for i in range(3)},
              "default": "The answer is \\boxed{1}."}  # what the control-token item would get
    (tmp_path / "s.json").write_text(json.dumps(script))
    out = tmp_path / "o"
    assert main(["distill", "--format", "mathvision", "--input", str(src), "--out", str(out),
                 "--teacher", f"scripted:{tmp_path / 's.json'}", "--tokenizer", "words",
                 "--min-tokens", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skip input item line 4: control_token" in captured.err
    assert "invalid input: control_token 1" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["invalid_input"] == {"control_token": 1}
    assert report["kept"] == 3 and report["questions"] == 3
    assert sorted(r.id for r in shard_records(sorted(out.glob("*.tar")))) == [
        "mathvision-0", "mathvision-1", "mathvision-2"]
    assert "ctl" not in {e["key"] for e in read_manifest(out / "manifest.jsonl")}


def test_control_token_question_with_a_local_teacher_exits_0(tmp_path, tiny_checkpoint, capsys):
    # The local teacher refuses control-token text outright: the item must never reach it.
    src = write_mathvision(tmp_path / "in", 2, extra_lines=control_token_lines())
    out = tmp_path / "out"
    assert main(["distill", "--format", "mathvision", "--input", str(src), "--out", str(out),
                 "--teacher", f"local:{tiny_checkpoint}", "--max-new-tokens", "4", "--rounds", "1",
                 "--no-progress"]) == 0
    assert "skip input item line 3: control_token" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["questions"] == 2 and report["invalid_input"] == {"control_token": 1}


def test_control_token_chains_are_rejected():
    record = SampleRecord(id="r", question="q", response="x", answer="2")
    checker = ChainChecker(FilterConfig(min_tokens=0), words)
    assert checker.check("Two.<|im_end|> The answer is \\boxed{2}.", record).reason == "control_token"
    assert checker.check("Two. The answer is \\boxed{2}.", record).ok


def test_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("rounds: 3\nbest-of: 2\nout: somewhere\ninput: in.json\nteacher: scripted:f\n")
    args = parse("--config", config, "--rounds", 1)
    assert (args.rounds, args.best_of, args.out, args.max_reflections) == (1, 2, Path("somewhere"), 25)
    config.write_text("roundz: 3\n")
    assert main(["distill", "--config", str(config)]) == 2
    assert "unknown key 'roundz'" in capsys.readouterr().err
    assert main(["distill", "--input", "x", "--out", str(tmp_path), "--teacher", "openai:nohost"]) == 2
    assert "pass --tokenizer DIR" in capsys.readouterr().err  # checked before any teacher is made
    assert main(["distill", "--input", "x", "--out", str(tmp_path), "--teacher", "openai:nohost",
                 "--tokenizer", "words"]) == 2
    assert "bad teacher URL 'nohost'" in capsys.readouterr().err


def test_local_teacher_end_to_end(tmp_path, tiny_checkpoint):
    src = write_mathvision(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert main(["distill", "--format", "mathvision", "--input", str(src), "--out", str(out),
                 "--teacher", f"local:{tiny_checkpoint}", "--max-new-tokens", "4", "--rounds", "1",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    # A random tiny model states no answers: both questions are rejected, and counted.
    assert report["questions"] == 2 and report["rejected"] == {"no_final_answer": 2}
