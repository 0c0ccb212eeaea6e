"""``predict``: PVC answers for raw samples, with samples that cannot be decoded skipped and recorded.

Shards are untrusted (as in training): a question holding a control-token string (``<|im_end|>``,
``<|image_pad|>``...) would be read as the real control token, so the decoder refuses it. Such a
sample is not decoded; its row says ``skipped`` and why, and the run goes on with the others.
"""

from __future__ import annotations

from typing import Any

from tvc_lightning.data.tokenize import special_token_pattern
from tvc_lightning.pvc import PVCConfig, pvc_generate

SKIP_KEY = "skipped"  # a row with this key holds no prediction: its value is the reason


def skip_reason(question: str, pattern: Any) -> str | None:
    """Why ``question`` cannot be decoded (``control_token: <|...|>``), or None when it can."""
    found = pattern.search(question)
    return None if found is None else f"control_token: {found.group(0)}"


def predict_rows(model: Any, datamodule: Any, config: PVCConfig,
                 batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON-ready row per non-padding item of ``batch``: the PVC response, extracted and
    scored answer and calibrations; or ``{"id", "skipped": reason, "answer"}``."""
    from tvc_lightning.callbacks import all_ranks_any
    from tvc_lightning.scoring import score_record

    processor = datamodule.processor
    pattern = special_token_pattern(processor.tokenizer)
    reasons = [skip_reason(item["record"].question, pattern) for item in batch]
    decode = [item for item, reason in zip(batch, reasons, strict=True) if reason is None]
    questions = [item["record"].question for item in decode]
    images = [item["images"] for item in decode]
    world = getattr(getattr(datamodule, "trainer", None), "world_size", 1)
    if not decode and world > 1:
        # Every rank must take part in each decoding step (sync): decode a cleaned copy of one
        # question and discard it, so this rank stays in step with the others.
        questions = [pattern.sub("", batch[0]["record"].question)]
        images = [batch[0]["images"]]
    results = (pvc_generate(model, processor, questions, images, config,
                            chat=datamodule.encoder.chat, sync=all_ranks_any) if questions else [])
    by_item = {id(item): result for item, result in zip(decode, results)}  # noqa: B905 - placeholder
    rows = []
    for item, reason in zip(batch, reasons, strict=True):
        if item["pad"]:
            continue
        record = item["record"]
        if reason is not None:
            rows.append({"id": record.id, SKIP_KEY: reason, "answer": record.answer})
            continue
        result = by_item[id(item)]
        extracted, correct = score_record(result.text, record)
        rows.append({
            "id": record.id, "response": result.text, "extracted": extracted,
            "answer": record.answer, "correct": correct,
            "calibrations": [{"step": c.step, "trigger": c.trigger} for c in result.calibrations],
            "finish_reason": result.finish_reason,
        })
    return rows
