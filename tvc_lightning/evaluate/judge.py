"""An optional LLM judge for ``evaluate``: it reads each stored response and extracts the final
answer, in the spirit of MathVista's GPT extraction step.

``--judge openai:URL --judge_model NAME`` asks any OpenAI-compatible chat server (through the data
engine's :class:`~data_engine.teachers.OpenAITeacher`, with its retries and backoff) to copy the
final answer out of a response, given the question, the choices and the answer type, with a few
short in-context examples (:func:`judge_prompt`). Rule-based extraction stays the default, and it
stands in for the judge on any item where the judge fails: an error after the retries, an empty
reply, or one that is unusable (:func:`parse_reply`: no answer line, too long, not a number for a
numeric answer, no option for a multiple-choice one). Each item records which extraction was used.

The judge runs on rank 0 at scoring time, from the stored responses, with at most
``--judge_concurrency`` requests in flight. Every reply received is appended to
``OUT/judge/replies.jsonl`` (flushed and fsynced per reply) under the item's mode and id, the judge
model and a hash of the prompt, so a rerun never asks again for the same item: only requests that
got no reply at all (the server was down, say) are asked again. After :data:`GIVE_UP_AFTER`
consecutive items that got no reply (each after its retries) the judge is not asked about the
rest of the run (a wrong URL or model name would otherwise cost every item its full retries).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvc_lightning.evaluate.benchmarks import EvalItem
from tvc_lightning.extraction import _letter_of, _match_choice_text, _strip_wrapping, _to_number

GIVE_UP_AFTER = 8  # consecutive items without a reply before the judge is given up
MAX_ANSWER_CHARS = 200  # a longer "answer" is the judge rambling, not an extraction
RESPONSE_TAIL_CHARS = 12000  # the final answer is at the end; long chains keep their last part
NO_ANSWER = "NONE"

_INSTRUCTIONS = """\
You read a model's response to a math question and copy out the final answer that the response \
gives. Do not solve the question yourself and do not correct the response.
Reply with one line, "Extracted answer: X", where X is:
- for a multiple-choice question, the letter of the option the response picks;
- for a number, the number alone (no units); for a list, the list as [a, b, ...];
- otherwise the answer as briefly as the response states it.
If the response gives no final answer, reply "Extracted answer: NONE".

Question: Which shape has the larger area?
Choices: (A) the circle (B) the square
Answer type: multiple choice
Response: The circle's area is 12.57 and the square's is 16, so the square is larger.
Extracted answer: B

Question: How many apples are left?
Answer type: integer
Response: There were 7 apples and 3 were eaten. That leaves 4 apples on the table.
Extracted answer: 4

Question: How long is side AB? (Unit: cm)
Answer type: float with 2 decimal places
Response: By Pythagoras AB = sqrt(2), about 1.414, so AB is 1.41 cm.
Extracted answer: 1.41

Question: What is the value of x?
Answer type: integer
Response: The angles do not add up, so I cannot determine x from the figure.
Extracted answer: NONE

Now the response to extract from.
"""


@dataclass(frozen=True)
class JudgeOutcome:
    """What the judge made of one response: a usable ``answer`` (``""`` when the judge found that
    the response gives none) with its ``method`` (``judge:MODEL``), or ``failure``, why the
    rule-based extraction stands in."""

    answer: str | None
    method: str | None = None
    reply: str | None = None  # the judge's reply, when one came
    failure: str | None = None


def _answer_type_text(answer_type: str, choices: Sequence[str] | None, precision: int | None) -> str:
    if choices:
        return "multiple choice"
    if answer_type == "float" and precision is not None:
        return f"float with {precision} decimal place{'s' if precision != 1 else ''}"
    return answer_type


def judge_prompt(item: EvalItem, response: str) -> str:
    """The request for one item: instructions and examples, then its question (as the model was
    asked it), its choices, answer type and the response (its last
    :data:`RESPONSE_TAIL_CHARS` characters when longer)."""
    record = item.record
    if len(response) > RESPONSE_TAIL_CHARS:
        response = "[...] " + response[-RESPONSE_TAIL_CHARS:]
    lines = [_INSTRUCTIONS, f"Question: {item.prompt}"]
    if record.choices:
        lines.append("Choices: " + " ".join(f"({chr(ord('A') + i)}) {c}"
                                            for i, c in enumerate(record.choices)))
    lines += [f"Answer type: {_answer_type_text(record.answer_type, record.choices, record.precision)}",
              f"Response: {response}", "Extracted answer:"]
    return "\n".join(lines)


_ANSWER_LINE = re.compile(r"extracted\s+answer\s*[:：]", re.IGNORECASE)


def parse_reply(reply: str, choices: Sequence[str] | None, answer_type: str) -> tuple[str | None, str | None]:
    """``(answer, None)`` for a usable judge reply, else ``(None, why)``.

    The answer is what follows the last "Extracted answer:" (or the whole reply), up to its line's
    end, without Markdown/LaTeX wrapping; ``NONE`` becomes ``""`` (the response gives no answer,
    which scores wrong). For multiple choice the answer must name an option, by its text or letter,
    and comes back as that option's letter; for integer/float answers it must be a number.
    """
    text = reply.strip()
    if not text:
        return None, "empty reply"
    found = list(_ANSWER_LINE.finditer(text))
    if found:
        text = text[found[-1].end():]
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    answer = _strip_wrapping(line).strip("`'\"").strip()
    if not answer:
        return None, "no answer in the reply"
    if len(answer) > MAX_ANSWER_CHARS:
        return None, f"answer longer than {MAX_ANSWER_CHARS} characters"
    if answer.upper() in (NO_ANSWER, "N/A"):
        return "", None
    if choices:
        named = _match_choice_text(answer, list(choices))
        if named is not None:
            return chr(ord("A") + list(choices).index(named)), None
        letter = _letter_of(answer, len(choices))
        if letter is None:
            return None, "names none of the options"
        return letter, None
    if answer_type in ("integer", "float") and _to_number(answer) is None:
        return None, "not a number"
    return answer, None


# --- the reply cache ---------------------------------------------------------------------------

CacheKey = tuple[str, str, str, str]  # (mode, item id, judge model, prompt hash)


def prompt_hash(prompt: str, max_tokens: int) -> str:
    """Identifies a request: same prompt and reply budget, same (greedy) reply."""
    return hashlib.sha256(f"{max_tokens}\n{prompt}".encode()).hexdigest()[:20]


class ReplyCache:
    """``OUT/judge/replies.jsonl``: one line per judge reply, appended and fsynced. A line cut
    short by a kill is ignored when read and cut off before the next append. One writer (rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: dict[CacheKey, str] = {}
        if path.exists():
            data = path.read_bytes()
            for line in data.split(b"\n"):
                try:
                    row = json.loads(line)
                    key = (row["mode"], row["id"], row["model"], row["prompt"])
                    reply = row["reply"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    continue  # the torn tail of a killed run, or an empty line
                if isinstance(reply, str):
                    self.replies[key] = reply
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._file: Any = None

    def add(self, key: CacheKey, reply: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        mode, item_id, model, prompt = key
        row = {"mode": mode, "id": item_id, "model": model, "prompt": prompt, "reply": reply}
        self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.replies[key] = reply

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- the judge ---------------------------------------------------------------------------------

@dataclass
class JudgeStats:
    """One mode's judge traffic: replies taken from the cache, requests sent, failures."""

    cached: int = 0
    asked: int = 0
    failed: int = 0


class Judge:
    """Extracts answers with an OpenAI-compatible chat model; see the module docstring.

    Args:
        spec: ``openai:URL`` (``--judge``), the API root, e.g. ``openai:http://localhost:8000/v1``.
        model: the served model name (``--judge_model``); extractions are recorded as ``judge:MODEL``.
        out: the evaluation folder; replies are cached in ``OUT/judge/replies.jsonl``.
    """

    def __init__(self, spec: str, model: str, out: Path, timeout: float = 120.0, retries: int = 4,
                 concurrency: int = 8, max_tokens: int = 256, backoff: float = 2.0,
                 api_key_env: str = "OPENAI_API_KEY") -> None:
        from data_engine.teachers import OpenAITeacher, TeacherError

        kind, sep, url = spec.partition(":")
        if kind != "openai" or not sep or not url:
            raise ValueError(f"--judge {spec!r}: expected openai:URL, an OpenAI-compatible server's "
                             "API root, e.g. openai:http://localhost:8000/v1")
        try:
            self.client = OpenAITeacher(url, model=model, api_key=os.environ.get(api_key_env),
                                        timeout=timeout, retries=retries, backoff=backoff,
                                        max_concurrency=concurrency)
        except TeacherError as e:
            raise ValueError(f"--judge {spec!r}: {e}") from None
        self.model, self.method = model, f"judge:{model}"
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.cache = ReplyCache(out / "judge" / "replies.jsonl")
        self.gave_up = ""  # once set (why), no request is sent for the rest of this run

    def close(self) -> None:
        self.cache.close()

    def _ask(self, prompt: str) -> str:
        return self.client.complete_text(prompt, self.max_tokens, temperature=0.0, seed=0)

    def extract(self, mode: str, items: Sequence[tuple[EvalItem, str]],
                progress: bool = False) -> tuple[dict[str, JudgeOutcome], JudgeStats]:
        """A :class:`JudgeOutcome` per item id for ``(item, response)`` pairs of one ``mode``:
        cached replies first, then the judge for the rest, concurrently."""
        from data_engine.teachers import TeacherError

        stats = JudgeStats()
        outcomes: dict[str, JudgeOutcome] = {}
        todo: list[tuple[EvalItem, str, CacheKey]] = []
        for item, response in items:
            prompt = judge_prompt(item, response)
            key = (mode, item.id, self.model, prompt_hash(prompt, self.max_tokens))
            if key in self.cache.replies:
                stats.cached += 1
                outcomes[item.id] = self._outcome(item, self.cache.replies[key])
            else:
                todo.append((item, prompt, key))
        if not todo:
            return outcomes, stats

        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), disable=not progress, desc=f"judge {mode}", unit="answer",
                   dynamic_ncols=True)
        streak = 0
        pending: dict[Future[str], tuple[EvalItem, CacheKey]] = {}
        queue = iter(todo)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            def submit() -> None:
                # Fed one at a time so that, once the judge is given up, nothing more is sent.
                while not self.gave_up and len(pending) < self.concurrency:
                    nxt = next(queue, None)
                    if nxt is None:
                        return
                    item, prompt, key = nxt
                    pending[pool.submit(self._ask, prompt)] = (item, key)

            submit()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    item, key = pending.pop(future)
                    stats.asked += 1
                    try:
                        reply = future.result()
                    except TeacherError as e:
                        outcome = JudgeOutcome(None, failure=f"judge error: {e}"[:500])
                        streak += 1
                    else:
                        self.cache.add(key, reply)
                        outcome = self._outcome(item, reply)
                        streak = 0
                    outcomes[item.id] = outcome
                    if streak >= GIVE_UP_AFTER and not self.gave_up:
                        self.gave_up = (f"not asked: the judge failed for {streak} items in a row "
                                        f"(last: {outcome.failure})")[:500]
                        print(f"evaluate: judge {self.model}: {self.gave_up}; rule-based "
                              "extraction for the rest", file=sys.stderr)
                    bar.update(1)
                submit()
        bar.close()
        for item, _, _ in todo:  # left unasked once the judge was given up
            outcomes.setdefault(item.id, JudgeOutcome(None, failure=self.gave_up))
        stats.failed = sum(o.answer is None for o in outcomes.values())
        return outcomes, stats

    def _outcome(self, item: EvalItem, reply: str) -> JudgeOutcome:
        answer, why = parse_reply(reply, item.record.choices, item.record.answer_type)
        if answer is None:
            return JudgeOutcome(None, None, reply, f"unusable reply ({why}): {reply[:200]!r}")
        return JudgeOutcome(answer, self.method, reply)
