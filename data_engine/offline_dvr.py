"""Offline DVR (the paper's way): cut a kept chain, show the image again, let the teacher go on.

The chain is cut at a point :class:`tvc_lightning.data.dvr.DVRTransform` chooses (a reflection
sentence, else near the midpoint), a bridging prompt is appended, and the teacher continues from
``prefix + bridge`` with the image in front of it. The record written keeps
``prefix + bridge + continuation`` and, in ``bridge_spans``, where the bridge is: training shows
the (pooled) image right after it in every epoch, whatever ``data.dvr.p`` is, and does not inject
there again -- the stored bridge is no fresh reflection point.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from data_engine.convert import extract_answer as strict_answer
from data_engine.distill_io import Chain, Question
from data_engine.filters import ChainChecker
from data_engine.teachers import CONTINUE_INSTRUCTION, Teacher, TeacherRequestError
from tvc_lightning.data.dvr import DVRTransform

if TYPE_CHECKING:  # distill imports this module: no import cycle at run time
    from data_engine.distill import Settings


def continue_after_image(q: Question, teacher: Teacher, checker: ChainChecker, settings: Settings,
                         dvr: DVRTransform, seed: int) -> tuple[dict[str, Any], Chain | None]:
    """Offline DVR for one kept chain: ``(manifest entry, prefix + bridge + continuation or None)``.

    ``seed`` is the teacher's seed for this question (the caller mixes it from the run's).
    """
    response = q.record.response
    (injection,) = dvr.plan(q.key, response, epoch=0)
    prefix = response[: injection.offset]
    lead = prefix + ("" if not prefix or prefix[-1].isspace() else " ") + injection.bridge
    span = (len(lead) - len(injection.bridge), len(lead))
    prompt = f"{settings.prompt(q.record.question)}\n\n{CONTINUE_INSTRUCTION}\n{lead}"
    base = {"key": q.key, "label": q.label, "offset": injection.offset, "bridge": injection.bridge,
            "bridge_span": list(span)}
    try:
        (continuation,) = teacher.generate(prompt, q.images, n=1, temperature=0.0,
                                           max_tokens=settings.max_new_tokens, seed=seed)
    except TeacherRequestError as e:
        print(f"distill: dvr {q.key}: teacher refused: {e}", file=sys.stderr)
        return {**base, "outcome": "rejected", "reason": "teacher_error"}, None
    full = f"{lead} {continuation.strip()}"
    verdict = checker.check(full, q.record, q.images, bridge_spans=(span,))
    reason = verdict.reason
    if reason is None and checker.config.require_final_answer and not strict_answer(continuation):
        # The prefix may already hold the answer (a reflection after it): the regenerated part
        # must state it again, or nothing was checked.
        reason = "no_final_answer"
    if reason is not None:
        return {**base, "outcome": "rejected", "reason": reason}, None
    return {**base, "outcome": "kept", "tokens": verdict.tokens, "length": verdict.length,
            "reflections": verdict.reflections}, Chain(full, (span,))
