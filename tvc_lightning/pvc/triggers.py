"""When to calibrate: reflection phrases at sentence starts, model-emitted bridges, every N tokens.

Detection runs on the text of the last few generated tokens (a short window of per-token
pieces decoded once per tokenizer), and only fires on the token that completes the pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tvc_lightning.pvc.config import PVCConfig

_WINDOW = 24  # tokens of text looked at: longer than any phrase or bridge in tokens


@dataclass(frozen=True)
class Trigger:
    """A calibration to run now.

    ``rollback`` trailing tokens are removed first (the reflection phrase, which the model is
    expected to say again after seeing the image); ``bridge`` is the text appended before the
    image (None when the model has just said a bridge itself).
    """

    kind: str
    rollback: int
    bridge: str | None


def token_pieces(tokenizer: Any) -> list[str]:
    """Each token id's text, decoded once per tokenizer and kept on it.

    Joining pieces costs microseconds per step where a ``decode`` call costs tens; a character
    split across two byte-level tokens comes out as U+FFFD, which no phrase or bridge contains.
    """
    pieces = getattr(tokenizer, "_tvc_token_pieces", None)
    if pieces is None:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))],
                                        skip_special_tokens=False)
        tokenizer._tvc_token_pieces = pieces
    return pieces


class TriggerDetector:
    """Checks a row's newest token against the triggers of a :class:`PVCConfig`."""

    def __init__(self, config: PVCConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._pieces = token_pieces(tokenizer)
        phrases = sorted((re.escape(p) for p in config.reflection_phrases), key=len, reverse=True)
        self._reflection = (
            re.compile(r"(?:(?<=[.!?])[ \t]+|(?<=\n)[ \t]*)(?P<p>" + "|".join(phrases) + r")(?=\W)")
            if phrases and config.on_reflection
            else None
        )

    def _decode(self, ids: list[int]) -> str:
        pieces = self._pieces
        return "".join(pieces[i] if i < len(pieces) else "" for i in ids)

    def check(self, segment: list[int], calibrations: int,
              context: list[int] | None = None) -> Trigger | None:
        """``segment``: the tokens generated since the last calibration (or the start);
        ``context``: the tokens just before it when they are answer text (a forced answer
        prefix), read for sentence starts and spacing but never rolled back."""
        c = self.config
        if calibrations >= c.max_calibrations or len(segment) < c.min_gap:
            return None
        window = segment[-_WINDOW:]
        # A window that reaches back to the segment start begins a sentence (prompt or image),
        # unless answer text comes before it.
        lead = ""
        if len(window) == len(segment):
            lead = self._decode(context[-_WINDOW:]) if context else "\n"
        tail = lead + self._decode(window)
        before = lead + self._decode(window[:-1])  # the text before the newest token
        if c.on_bridge and self._bridge_completed(tail, before):
            return Trigger("bridge", 0, None)
        if self._reflection is not None:
            found = self._reflection_rollback(window, tail, lead)
            if found is not None:
                rollback, kept = found
                return Trigger("reflection", rollback, self._spaced(kept, c.bridges[0]))
        if c.every_n_tokens is not None and len(segment) >= c.every_n_tokens:
            return self._periodic(tail, before, self._decode(window[-1:]))
        return None

    def _bridge_completed(self, tail: str, before: str) -> bool:
        """The newest token completes a bridge, possibly with the whitespace after it: byte-level
        BPE merges a paragraph's final period with its newlines (``'.\n\n'`` is one token)."""
        text, earlier = tail.rstrip(), before.rstrip()
        return any(text.endswith(b) and not earlier.endswith(b) for b in self.config.bridges)

    def _periodic(self, tail: str, before: str, newest: str) -> Trigger | None:
        """A periodic calibration at a sentence boundary, never inside a number or a word.

        A newline ends a sentence at once. A ``.``/``!``/``?`` only does once the next token
        starts with whitespace (``4.`` may continue as ``4.5``): then that token, the start of
        the next sentence, is rolled back (it is not in the cache yet) unless it is only
        whitespace, and the image goes right after the punctuation. ``periodic_at: word`` takes
        any whitespace-led token the same way; ``token`` fires at once.
        """
        bridge = self.config.bridges[0]
        if self.config.periodic_at == "token":
            return Trigger("periodic", 0, self._spaced(tail, bridge))
        if tail.rstrip(" \t").endswith("\n") and not before.rstrip(" \t").endswith("\n"):
            return Trigger("periodic", 0, self._spaced(tail, bridge))
        at_end = self.config.periodic_at == "word" or before.endswith((".", "!", "?"))
        if at_end and before and newest[:1].isspace():
            if newest.isspace():
                return Trigger("periodic", 0, self._spaced(tail, bridge))
            return Trigger("periodic", 1, self._spaced(before, bridge))
        return None

    def _reflection_rollback(self, window: list[int], tail: str, lead: str) -> tuple[int, str] | None:
        """Tokens to drop so the text ends just before a reflection the newest token confirmed."""
        matches = list(self._reflection.finditer(tail))  # type: ignore[union-attr]
        if not matches or not self._confirmed(tail, matches[-1].start("p"), matches[-1].end("p")):
            return None
        match = matches[-1]
        before = lead + self._decode(window[:-1])  # confirmed one token earlier?
        if self._confirmed(before, match.start("p"), match.end("p")):
            return None  # confirmed at an earlier token already (and not taken then)
        for r in range(1, len(window) + 1):
            kept = lead + self._decode(window[: len(window) - r])
            if len(kept) <= match.start("p"):
                return r, kept
        return None

    def _confirmed(self, text: str, start: int, end: int) -> bool:
        """The phrase at ``text[start:end]`` is a reflection: a word boundary follows it, and the
        sentence is not (the start of) a bridge, which the bridge trigger handles instead."""
        if len(text) <= end:
            return False
        sentence = text[start:]
        return not (self.config.on_bridge and any(
            b.startswith(sentence) or sentence.startswith(b) for b in self.config.bridges))

    @staticmethod
    def _spaced(text_before: str, bridge: str) -> str:
        # Keep tokenization as in DVR training data ("... 3. Let me check ..."): one space between.
        return bridge if not text_before or text_before[-1].isspace() else " " + bridge
