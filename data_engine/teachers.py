"""Teachers for distillation: a local transformers model, an OpenAI-compatible server, a script.

Every teacher has one method, ``generate(question, images, n, temperature, max_tokens, seed)
-> list[str]``: ``n`` answers to one user turn made of the images then the question text;
``temperature <= 0`` means greedy decoding. :func:`make_teacher` builds one from a spec:

- ``local:MODEL_DIR`` -- :class:`LocalTeacher`, loaded by the training code
  (:func:`tvc_lightning.hf.load_model`) and decoded with :func:`tvc_lightning.pvc.pvc_generate`,
  calibrations off (plain decoding). Calls are serialized: one model, one decode at a time.
- ``openai:BASE_URL`` -- :class:`OpenAITeacher`, any server speaking OpenAI's chat completions
  (vLLM, SGLang, TGI): ``POST BASE_URL/chat/completions``, images as PNG/JPEG data URLs. Standard
  library only (``urllib``). Retries with exponential backoff on connection errors, timeouts, 5xx,
  408 and 429; another 4xx is :class:`TeacherRequestError` (that one question is rejected as
  ``teacher_error``); anything else that is wrong (a bad URL, no reply after the retries, a reply
  that is not a chat completion) is :class:`TeacherError`, naming the URL and what was wrong.
- ``scripted:FILE`` -- :class:`ScriptedTeacher`, predetermined answers from a JSON file, for tests
  and dry runs of the pipeline without a model.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from data_engine.shards import encode_image

ImageLike = bytes | Image.Image

# How an offline-DVR continuation is asked for (see data_engine.distill): chat APIs do not all
# accept an assistant prefix, so the cut chain travels in the user turn after this line.
CONTINUE_INSTRUCTION = "Continue this reasoning after looking at the image again:"


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (bad URL, server unreachable, malformed replies)."""


class TeacherRequestError(TeacherError):
    """The server refused this one request (a 4xx): the question fails, the run goes on."""


class Teacher(Protocol):
    def generate(self, question: str, images: Sequence[ImageLike], n: int, temperature: float,
                 max_tokens: int, seed: int) -> list[str]: ...


def to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


# --- local model ---------------------------------------------------------------------------------


class LocalTeacher:
    """A Qwen2-VL checkpoint run in this process (the tiny test model works too)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str | None = None,
                 repetition_penalty: float = 1.0) -> None:
        import torch

        from tvc_lightning.hf import load_model, load_processor

        self.model_dir = str(model_dir)
        self.model = load_model(model_dir, dtype=dtype).eval()
        if device:
            self.model.to(torch.device(device))
        self.processor = load_processor(model_dir)
        self.repetition_penalty = repetition_penalty
        self._lock = threading.Lock()  # the decode loop is not re-entrant

    def generate(self, question: str, images: Sequence[ImageLike], n: int, temperature: float,
                 max_tokens: int, seed: int) -> list[str]:
        from tvc_lightning.pvc import PVCConfig, pvc_generate

        greedy = temperature <= 0
        config = PVCConfig(
            max_calibrations=0, do_sample=not greedy, temperature=1.0 if greedy else temperature,
            max_new_tokens=max_tokens, repetition_penalty=self.repetition_penalty, seed=seed,
        )
        pil = [to_pil(im) for im in images]
        with self._lock:
            # The n answers are n rows of one batch: one prefill, n draws from one generator.
            results = pvc_generate(self.model, self.processor, [question] * n, [pil] * n, config)
        return [r.text for r in results]


# --- OpenAI-compatible server -------------------------------------------------------------------


def image_part(image: ImageLike) -> dict[str, Any]:
    """An ``image_url`` content part holding the image as a data URL (JPEG/PNG bytes unchanged)."""
    ext, data = encode_image(image, "png")
    mime = "image/jpeg" if ext == "jpg" else "image/png"
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}}


def chat_request(model: str, question: str, images: Sequence[ImageLike], n: int, temperature: float,
                 max_tokens: int, seed: int) -> dict[str, Any]:
    content = [image_part(im) for im in images] + [{"type": "text", "text": question}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "temperature": max(temperature, 0.0), "n": n, "max_tokens": max_tokens, "seed": seed}


class OpenAITeacher:
    """A chat-completions server; thread-safe, at most ``max_concurrency`` requests in flight.

    Args:
        base_url: the API root, e.g. ``http://host:8000/v1`` (``/chat/completions`` is appended).
        model: the served model name sent as ``model``.
        api_key: sent as a bearer token when given.
        timeout: seconds to wait for one reply (long chains take minutes).
        retries: further attempts after a retryable failure; waits ``backoff * 2**k`` s (+ jitter).
    """

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 4, backoff: float = 2.0,
                 max_concurrency: int = 8) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TeacherError(
                f"bad teacher URL {base_url!r}: expected http(s)://HOST[:PORT]/PATH, "
                "e.g. http://localhost:8000/v1"
            )
        try:
            parts.port  # noqa: B018 -- raises ValueError on a non-numeric or out-of-range port
        except ValueError as e:
            raise TeacherError(f"bad teacher URL {base_url!r}: {e}") from None
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff = retries, backoff
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def generate(self, question: str, images: Sequence[ImageLike], n: int, temperature: float,
                 max_tokens: int, seed: int) -> list[str]:
        texts: list[str] = []
        for attempt in range(n):  # a server that ignores ``n`` answers once per request
            body = chat_request(self.model, question, images, n - len(texts), temperature,
                                max_tokens, seed + attempt)
            texts.extend(self._choices(self._post(body)))
            if len(texts) >= n:
                break
        return texts[:n]

    def complete_text(self, prompt: str, max_tokens: int, temperature: float = 0.0,
                      seed: int = 0) -> str:
        """One text-only user turn (no images); the first choice's ``message.content``, ``""``
        when the server sent none. A reasoning split off by the server is left out: callers
        (the ``evaluate`` judge) want the reply itself. Retries and errors as :meth:`generate`."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": max(temperature, 0.0), "max_tokens": max_tokens, "seed": seed}
        reply = self._post(body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, str | None):
            raise TeacherError(f"{self.url}: malformed reply: no choices[0].message.content in "
                               f"{str(reply)[:200]}")
        return content or ""

    def _choices(self, reply: Any) -> list[str]:
        """The answer texts of a reply; a reasoning split off by the server is put back in front."""
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices:
            raise TeacherError(f"{self.url}: malformed reply: no 'choices' list in {str(reply)[:200]}")
        texts = []
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(message, dict) or not isinstance(content, str | None):
                raise TeacherError(f"{self.url}: malformed reply: choice without message.content: "
                                   f"{str(choice)[:200]}")
            # vLLM/SGLang with a reasoning parser move the chain to reasoning_content.
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            parts = [p for p in (reasoning, content) if isinstance(p, str) and p.strip()]
            texts.append("\n\n".join(parts))
        return texts

    def _post(self, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._slots, urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code >= 500 or e.code in (408, 429):
                    last = f"HTTP {e.code}: {detail}"
                    continue
                raise TeacherRequestError(f"{self.url}: HTTP {e.code}: {detail}") from None
            except urllib.error.URLError as e:
                reason = e.reason
                last = ("connection refused" if isinstance(reason, ConnectionRefusedError)
                        else f"cannot connect: {reason}")
                continue
            except (OSError, http.client.HTTPException) as e:  # timeouts, resets, torn replies
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TeacherError(
                    f"{self.url}: malformed reply (not JSON: {e}): {raw[:200]!r}"
                ) from None
        raise TeacherError(f"{self.url}: no reply after {self.retries + 1} attempts: {last}")


# --- scripted (tests, dry runs) -----------------------------------------------------------------


class ScriptedTeacher:
    """Answers read from a JSON file, for tests and dry runs of the pipeline.

    The file holds ``{"responses": {QUESTION: [CALL_1, CALL_2, ...]}, "continuations":
    {QUESTION: [...]}, "default": TEXT, "delay": SECONDS}``. A prompt belongs to the longest
    QUESTION it starts with; its k-th call returns ``CALL_k`` (a list of texts, or one text),
    repeated or cut to ``n`` items; calls past the end reuse the last entry. A prompt holding
    :data:`CONTINUE_INSTRUCTION` (an offline-DVR continuation) reads ``continuations`` instead.
    Unknown prompts get ``default``. ``delay`` seconds are slept per call.
    """

    def __init__(self, script: dict[str, Any]) -> None:
        self.responses: dict[str, list[Any]] = script.get("responses", {})
        self.continuations: dict[str, list[Any]] = script.get("continuations", {})
        self.default: str = script.get("default", "I cannot tell.")
        self.delay = float(script.get("delay", 0.0))
        self.calls: dict[tuple[str, bool], int] = defaultdict(int)
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedTeacher:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def generate(self, question: str, images: Sequence[ImageLike], n: int, temperature: float,
                 max_tokens: int, seed: int) -> list[str]:
        if self.delay:
            time.sleep(self.delay)
        continuing = CONTINUE_INSTRUCTION in question
        table = self.continuations if continuing else self.responses
        known = [q for q in table if question.startswith(q)]
        if not known:
            return [self.default] * n
        key = max(known, key=len)
        with self._lock:
            k = self.calls[key, continuing]
            self.calls[key, continuing] += 1
        entries = table[key]
        entry = entries[min(k, len(entries) - 1)]
        texts = [entry] if isinstance(entry, str) else list(entry)
        return [texts[i % len(texts)] for i in range(n)]


def make_teacher(spec: str, model: str = "default", timeout: float = 600.0, retries: int = 4,
                 concurrency: int = 8, dtype: str = "float32", device: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY") -> Teacher:
    """``local:DIR``, ``openai:URL`` or ``scripted:FILE`` (see the module docstring)."""
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise ValueError(f"--teacher {spec!r}: expected local:MODEL_DIR, openai:URL or scripted:FILE")
    if kind == "local":
        return LocalTeacher(target, dtype=dtype, device=device)
    if kind == "openai":
        return OpenAITeacher(target, model=model, api_key=os.environ.get(api_key_env),
                             timeout=timeout, retries=retries, max_concurrency=concurrency)
    if kind == "scripted":
        return ScriptedTeacher.from_file(target)
    raise ValueError(f"--teacher {spec!r}: unknown kind {kind!r} (local, openai or scripted)")
