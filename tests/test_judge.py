"""The optional LLM judge of ``evaluate``: reply parsing, retries, the reply cache, the rule-based
fall-back, bounded concurrency, and a whole ``evaluate`` run against a fake OpenAI-compatible
server on 127.0.0.1 (no other address is ever contacted)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_engine.teachers import OpenAITeacher, TeacherError
from tvc_lightning.cli import main
from tvc_lightning.evaluate import judge as judge_module
from tvc_lightning.evaluate.benchmarks import load_benchmark
from tvc_lightning.evaluate.formats import write_outputs
from tvc_lightning.evaluate.judge import Judge, judge_prompt, parse_reply

NOT_JSON = object()  # a reply body that is not JSON at all
ITEM_PART = "Now the response to extract from."  # replies are chosen from the text after this


class FakeJudgeServer:
    """A chat-completions endpoint on 127.0.0.1 (port chosen by the OS). The reply to a request
    is ``replies[key]`` for the first key found in the item part of its prompt (else
    ``default``); ``fail_first[key]`` requests of a key get HTTP 500 first, ``always_fail`` keys
    always get 503. ``delay`` seconds are slept per request. Past ``max_requests`` every request
    gets 400 and is counted in ``overflow``, so a runaway client cannot loop unnoticed."""

    def __init__(self, replies: dict[str, object], default: str = "Extracted answer: NONE",
                 fail_first: dict[str, int] | None = None, always_fail: tuple[str, ...] = (),
                 delay: float = 0.0, max_requests: int = 200) -> None:
        self.replies, self.default, self.delay = replies, default, delay
        self.fail_first = dict(fail_first or {})
        self.always_fail, self.max_requests = always_fail, max_requests
        self.requests: list[dict] = []
        self.overflow = self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a stuck client connection cannot hold a handler thread for ever

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.respond(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def respond(self, body: dict) -> tuple[int, bytes]:
        with self._lock:
            if len(self.requests) >= self.max_requests:
                self.overflow += 1
                return 400, b'{"error": "too many requests for this test"}'
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            prompt = body["messages"][0]["content"]
            part = prompt.split(ITEM_PART, 1)[-1]
            key = next((k for k in self.replies if k in part), None)
            with self._lock:
                if key in self.always_fail:
                    return 503, b'{"error": "overloaded"}'
                if self.fail_first.get(key, 0) > 0:
                    self.fail_first[key] -= 1
                    return 500, b'{"error": "try again"}'
            reply = self.replies[key] if key is not None else self.default
            if reply is NOT_JSON:
                return 200, b"<html>502 Bad Gateway</html>"
            return 200, json.dumps({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply},
                 "finish_reason": "stop"}]}).encode()
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_judge(monkeypatch):
    # Loopback only: no proxy may be put between the client and the fake server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers: list[FakeJudgeServer] = []

    def start(*args: object, **kwargs: object) -> FakeJudgeServer:
        servers.append(FakeJudgeServer(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
        assert s.overflow == 0, f"{s.overflow} requests past the test's bound"


ITEMS = [  # MathVision's layout: an integer, letters-only options, text options, an integer
    {"id": "1", "question": "How many digits are there?\n<image1>", "options": [], "answer": "6",
     "level": 1, "subject": "counting", "image": "images/1.png"},
    {"id": "2", "question": "Which picture shows the cat?\n<image1>", "options": list("ABCDE"),
     "answer": "C", "level": 2, "subject": "logic", "image": "images/2.png"},
    {"id": "3", "question": "Which number is on the door?", "options": ["12", "1234", "5"],
     "answer": "B", "level": 3, "subject": "arithmetic", "image": "images/3.png"},
    {"id": "4", "question": "What goes in the last daisy?\n<image1>", "options": [], "answer": "61",
     "level": 2, "subject": "arithmetic", "image": "images/4.png"},
]


def _mathvision(tmp_path: Path, images: bool = False):
    path = tmp_path / "mv" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    if images:
        (path.parent / "images").mkdir(exist_ok=True)
        for n, item in enumerate(ITEMS):
            Image.new("RGB", (64 + 8 * n, 56), (40 * n, 90, 200)).save(path.parent / item["image"])
    return path


def _rows(responses: dict[str, str]) -> dict[str, dict]:
    return {i: {"response": r, "calibrations": [], "num_generated": 3, "finish_reason": "stop"}
            for i, r in responses.items()}


# --- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, choices, answer_type, want", [
    ("Extracted answer: B", ["12", "1234", "5"], "text", ("B", None)),
    ("The response picks 1234.\nExtracted answer: **1234**.", ["12", "1234", "5"], "text", ("B", None)),
    ("extracted answer: (c)", list("ABCDE"), "text", ("C", None)),
    ("Extracted answer: 61", None, "integer", ("61", None)),
    ("Extracted answer: $1{,}5$", None, "float", (None, "not a number")),
    ("Extracted answer: NONE", None, "integer", ("", None)),
    ("Extracted answer: the square", ["12", "1234", "5"], "text", (None, "names none of the options")),
    ("   ", None, "text", (None, "empty reply")),
    ("Extracted answer:", None, "text", (None, "no answer in the reply")),
    ("x" * 300, None, "text", (None, "answer longer than 200 characters")),
    ("blue", None, "text", ("blue", None)),
])
def test_parse_reply(reply, choices, answer_type, want):
    assert parse_reply(reply, choices, answer_type) == want


def test_prompt_holds_question_choices_type_and_the_response_tail(tmp_path):
    bench = load_benchmark("mathvision", _mathvision(tmp_path))
    prompt = judge_prompt(bench.items[2], "x" * 20000 + " so the answer is 1234")
    item_part = prompt.split(ITEM_PART, 1)[1]
    assert "Question: Which number is on the door?" in item_part
    assert "Choices: (A) 12 (B) 1234 (C) 5" in item_part and "Answer type: multiple choice" in item_part
    assert item_part.endswith("so the answer is 1234\nExtracted answer:") and "[...] " in item_part
    assert len(prompt) < 20000  # the long chain was cut to its tail


# --- the client helper and its retries ---------------------------------------------------------

def test_complete_text_retries_then_answers(fake_judge):
    server = fake_judge({"hello": "Extracted answer: 7"}, fail_first={"hello": 2})
    client = OpenAITeacher(server.url, model="m", retries=2, backoff=0.01, timeout=10)
    assert client.complete_text(f"{ITEM_PART} hello", max_tokens=16) == "Extracted answer: 7"
    assert len(server.requests) == 3
    body = server.requests[-1]
    assert body["messages"] == [{"role": "user", "content": f"{ITEM_PART} hello"}]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("m", 16, 0.0)

    server.fail_first["hello"] = 2
    fewer = OpenAITeacher(server.url, model="m", retries=1, backoff=0.01, timeout=10)
    with pytest.raises(TeacherError, match="no reply after 2 attempts: HTTP 500"):
        fewer.complete_text(f"{ITEM_PART} hello", max_tokens=16)


# --- the judge: cache, fall-back, concurrency ----------------------------------------------------

def _judge(server: FakeJudgeServer, out: Path, **kwargs: object) -> Judge:
    return Judge(f"openai:{server.url}", "fake-judge", out, timeout=10, backoff=0.01,
                 **{"retries": 1, "concurrency": 2, **kwargs})


def test_judge_extracts_caches_and_falls_back_to_rules(tmp_path, fake_judge):
    bench = load_benchmark("mathvision", _mathvision(tmp_path))
    responses = {"1": "<<r1>> I count six digits, maybe 5.",   # judge: 6 (rules: last number 5)
                 "2": "<<r2>> The cat is in C. Answer: (C)",    # judge: garbage -> rules: C
                 "3": "<<r3>> It is 12345.",                    # judge: not JSON -> rules
                 "4": "<<r4>> So 61 it is."}                    # judge: down -> rules: 61
    server = fake_judge({"<<r1>>": "Extracted answer: 6", "<<r2>>": "lorem ipsum " * 30,
                         "<<r3>>": NOT_JSON, "<<r4>>": "Extracted answer: 61"},
                        fail_first={"<<r1>>": 1}, always_fail=("<<r4>>",))
    pairs = [(item, responses[item.id]) for item in bench.items]
    judge = _judge(server, tmp_path / "out")
    outcomes, stats = judge.extract("pvc", pairs)
    judge.close()
    assert outcomes["1"].answer == "6" and outcomes["1"].method == "judge:fake-judge"
    assert outcomes["2"].answer is None and "unusable reply" in outcomes["2"].failure
    assert outcomes["3"].answer is None and "not JSON" in outcomes["3"].failure
    assert outcomes["4"].answer is None and "no reply after 2 attempts: HTTP 503" in outcomes["4"].failure
    assert (stats.asked, stats.cached, stats.failed) == (4, 0, 3)
    assert len(server.requests) == 1 + 1 + 1 + 1 + 2  # r1 retried once, r4 twice in vain

    rows = _rows(responses)
    write_outputs("mathvision", bench.items, rows, tmp_path / "out", "pvc", "m", outcomes)
    lines = {x["id"]: x for x in map(json.loads, (tmp_path / "out" / "pvc.jsonl").read_text().splitlines())}
    assert lines["1"]["model_answer"] == "6" and lines["1"]["correct"] is True
    assert lines["1"]["tvc"]["extraction_method"] == "judge:fake-judge"
    assert "judge_failed" not in lines["1"]["tvc"]
    assert lines["2"]["tvc"]["extraction_method"].startswith("rule:") and lines["2"]["correct"] is True
    assert lines["2"]["tvc"]["judge_failed"].startswith("unusable reply (answer longer")
    assert lines["3"]["correct"] is False  # "12345" is nearest to "1234", but MATH-V gives no credit
    assert lines["4"]["tvc"]["extraction_method"] == "rule:last_number" and lines["4"]["correct"] is True

    # A rerun takes every reply from the cache; only the requests that got none are sent again.
    before = len(server.requests)
    again = _judge(server, tmp_path / "out")
    outcomes2, stats2 = again.extract("pvc", pairs)
    again.close()
    assert (stats2.cached, stats2.asked, len(server.requests) - before) == (2, 2, 1 + 2)
    assert {k: (o.answer, o.reply) for k, o in outcomes2.items()} == \
           {k: (o.answer, o.reply) for k, o in outcomes.items()}
    cache = (tmp_path / "out" / "judge" / "replies.jsonl").read_text().splitlines()
    assert sorted((r["mode"], r["id"]) for r in map(json.loads, cache)) == [("pvc", "1"), ("pvc", "2")]

    # Another mode or another judge model is another request; a torn cache tail is dropped.
    with (tmp_path / "out" / "judge" / "replies.jsonl").open("a") as f:
        f.write('{"mode": "plain", "id": "1", "mod')
    other = Judge(f"openai:{server.url}", "other-judge", tmp_path / "out", timeout=10, retries=0,
                  backoff=0.01)
    before = len(server.requests)
    _, stats3 = other.extract("plain", pairs[:1])
    other.close()
    assert (stats3.asked, len(server.requests) - before) == (1, 1)
    assert (tmp_path / "out" / "judge" / "replies.jsonl").read_text().count("\n") == 3


def test_mathvista_files_take_the_judges_extraction(tmp_path, fake_judge):
    items = {"1": {"pid": "1", "question": "Which is larger?", "image": "images/1.png",
                   "choices": ["the circle", "the square"], "answer": "the square",
                   "question_type": "multi_choice", "answer_type": "text", "precision": None},
             "2": {"pid": "2", "question": "How long is AB?", "image": "images/2.png",
                   "choices": None, "answer": "1.4", "question_type": "free_form",
                   "answer_type": "float", "precision": 1}}
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(items))
    bench = load_benchmark("mathvista", path)
    server = fake_judge({"<<a>>": "Extracted answer: (B)", "<<b>>": "Extracted answer: 1.41"})
    responses = {"1": "<<a>> Clearly the circle... no, the square wins.", "2": "<<b>> about 1.41"}
    judge = _judge(server, tmp_path)
    outcomes, _ = judge.extract("pvc", [(i, responses[i.id]) for i in bench.items])
    judge.close()
    write_outputs("mathvista", bench.items, _rows(responses), tmp_path, "pvc", "m", outcomes)
    results = json.loads((tmp_path / "output_pvc.json").read_text())
    assert (results["1"]["extraction"], results["1"]["prediction"]) == ("B", "the square")
    assert (results["2"]["extraction"], results["2"]["prediction"]) == ("1.41", "1.4")
    assert all(r["true_false"] and r["tvc"]["extraction_method"] == "judge:fake-judge"
               for r in results.values())
    question = server.requests[0]["messages"][0]["content"].split(ITEM_PART, 1)[1]
    assert "Hint: Please answer" in question and "Choices: (A) the circle (B) the square" in question


def test_judge_requests_are_bounded_and_given_up_after_a_failing_streak(tmp_path, fake_judge,
                                                                        monkeypatch):
    bench = load_benchmark("mathvision", _mathvision(tmp_path))
    items = [(dataclasses.replace(bench.items[n % 4], id=f"x{n}"), f"<<s{n}>> response {n}")
             for n in range(8)]
    server = fake_judge({f"<<s{n}>>": "Extracted answer: 6" for n in range(8)}, delay=0.3)
    outcomes, stats = _judge(server, tmp_path / "a", concurrency=2).extract("pvc", items)
    assert stats.asked == 8 and server.max_in_flight == 2
    usable = {k for k, o in outcomes.items() if o.method == "judge:fake-judge"}
    assert usable == {"x0", "x3", "x4", "x7"}  # "6" is a number, but names none of the options

    monkeypatch.setattr(judge_module, "GIVE_UP_AFTER", 3)
    down = fake_judge({f"<<s{n}>>": "x" for n in range(8)}, always_fail=tuple(f"<<s{n}>>" for n in range(8)))
    outcomes, stats = _judge(down, tmp_path / "b", concurrency=1, retries=0).extract("pvc", items)
    assert stats.asked == 3 and len(down.requests) == 3 and stats.failed == 8
    assert all(outcomes[f"x{n}"].failure.startswith("not asked: the judge failed for 3 items in "
                                                    "a row (last: judge error: ") for n in range(3, 8))


def test_judge_flags_name_the_flag(tmp_path):
    from tvc_lightning.evaluate.cli import settings_from_args

    base = ["--checkpoint", "c", "--benchmark", "mathvision", "--input", "i", "--out", "o"]
    with pytest.raises(ValueError, match="--judge openai:http://x/v1: needs --judge_model"):
        settings_from_args([*base, "--judge", "openai:http://x/v1"])
    with pytest.raises(ValueError, match="--judge_model m: has no effect without --judge"):
        settings_from_args([*base, "--judge_model", "m"])
    with pytest.raises(ValueError, match="--judge_concurrency must be >= 1"):
        settings_from_args([*base, "--judge", "openai:http://x/v1", "--judge_model", "m",
                            "--judge_concurrency", "0"])
    with pytest.raises(ValueError, match="--judge 'vllm:x': expected openai:URL"):
        Judge("vllm:x", "m", tmp_path)
    with pytest.raises(ValueError, match="--judge 'openai:localhost:8000': bad teacher URL"):
        Judge("openai:localhost:8000", "m", tmp_path)


# --- end to end ----------------------------------------------------------------------------------

def test_evaluate_with_a_judge_rescoring_and_cache(tmp_path, tiny_checkpoint, fake_judge, capsys):
    data = _mathvision(tmp_path, images=True)
    server = fake_judge({"How many digits": "Extracted answer: 6",
                         "Which picture": "I think the response says C.\nExtracted answer: C",
                         "Which number is on the door": "lorem ipsum",
                         "last daisy": NOT_JSON})
    out = tmp_path / "out"
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--benchmark", "mathvision",
            "--input", str(data), "--out", str(out), "--batch_size", "2", "--progress_bar", "false",
            "--compare_plain", "true", "--generation.max_new_tokens", "5",
            "--judge", f"openai:{server.url}", "--judge_model", "fake-judge", "--judge_retries", "0"]
    main(args)
    captured = capsys.readouterr().out
    assert "extracted by the judge 2, by rules after a judge failure 2 (4 requests" in captured
    assert len(server.requests) == 8  # 4 items x (pvc, plain)
    for mode in ("pvc", "plain"):
        lines = {x["id"]: x for x in map(json.loads, (out / f"{mode}.jsonl").read_text().splitlines())}
        assert lines["1"]["correct"] and lines["2"]["correct"]  # whatever the random model said
        assert lines["1"]["tvc"]["extraction_method"] == "judge:fake-judge"
        assert lines["3"]["tvc"]["judge_failed"].startswith("unusable reply (names none")
        assert lines["4"]["tvc"]["judge_failed"].startswith("judge error: ")
        assert not lines["4"]["tvc"]["extraction_method"].startswith("judge:")
    run = json.loads((out / "run.json").read_text())
    assert run["judge"] == {"spec": f"openai:{server.url}", "model": "fake-judge", "max_tokens": 256}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"]["pvc"]["extraction"] == {
        "judge": 2, "rule_judge_failed": 2, "judge_replies_cached": 0, "judge_requests": 4}

    # The same command again: every reply from the cache but the two that never came.
    files = {p.name: p.read_text() for p in out.glob("*.json*") if p.name != "summary.json"}
    main(args)
    assert len(server.requests) == 8 + 2
    assert {p.name: p.read_text() for p in out.glob("*.json*") if p.name != "summary.json"} == files

    # Another judge model re-scores the stored answers (announced, recorded, nothing decoded).
    progress = (out / "progress" / "rank0.jsonl").read_text()
    main([*args[:-4], "--judge_model", "other-judge", "--judge_retries", "0"])
    err = capsys.readouterr().err
    assert "scoring settings changed since the last run (judge: " in err and "other-judge" in err
    assert len(server.requests) == 10 + 8
    assert (out / "progress" / "rank0.jsonl").read_text() == progress
    assert json.loads((out / "run.json").read_text())["judge"]["model"] == "other-judge"
    assert "judge:other-judge" in (out / "pvc.jsonl").read_text()

    # Without the judge: rule-based extraction everywhere, no request; decoding changes refused.
    main(args[:-6])
    assert len(server.requests) == 18
    lines = [json.loads(x) for x in (out / "pvc.jsonl").read_text().splitlines()]
    assert all(x["tvc"]["extraction_method"] == "none" or x["tvc"]["extraction_method"].startswith("rule:")
               for x in lines) and not any("judge_failed" in x["tvc"] for x in lines)
    assert json.loads((out / "run.json").read_text())["judge"] is None
    with pytest.raises(SystemExit, match="generation: "):
        main([*args, "--generation.max_new_tokens", "6"])
