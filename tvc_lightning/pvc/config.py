"""PVCConfig: when to calibrate, how, and how to sample."""

from __future__ import annotations

from dataclasses import dataclass, field

from tvc_lightning.data.dvr import DEFAULT_BRIDGES, DEFAULT_REFLECTION_PHRASES

RESET_MODES = ("visual", "none")
PERIODIC_BOUNDARIES = ("sentence", "word", "token")


@dataclass
class PVCConfig:
    """Periodic Visual Calibration and sampling settings for :func:`tvc_lightning.pvc.pvc_generate`.

    A calibration (1) average-pools each image's merged visual tokens with ``pool_kernel`` (once
    per image, cached), (2) with ``reset: visual`` hides the original image's K/V entries from every
    later token, and (3) appends a bridging prompt plus the pooled image tokens to the sequence.

    Args:
        pool_kernel: Pooling kernel on the merged visual-token grid (4: 16x16 -> 4x4; 1: no pooling).
        reset: ``visual`` drops the original image's K/V entries at the first calibration;
            ``none`` keeps them.
        on_reflection: Calibrate when a sentence starts with one of ``reflection_phrases``; the
            phrase's tokens are rolled back, the bridge and image appended, and decoding resumes
            (so the image comes before the reflection, as DVR trains it).
        on_bridge: Calibrate when the model itself emits one of ``bridges``: only the image is
            appended.
        every_n_tokens: Also calibrate at the first boundary (``periodic_at``) at least this many
            tokens after the last calibration (None: off).
        periodic_at: Where an ``every_n_tokens`` calibration may go: ``sentence`` (after ``.``,
            ``!`` or ``?`` followed by whitespace, or a newline; never inside a number), ``word``
            (before a token that starts with whitespace) or ``token`` (exactly every N tokens,
            for experiments that need calibrations at fixed positions).
        max_calibrations: At most this many calibrations per sample (0: plain decoding).
        min_gap: Tokens generated before the first calibration and between two calibrations.
        reflection_phrases: Sentence openings that trigger a calibration.
        bridges: Bridging prompts; the first is appended on reflection and periodic triggers.
        max_new_tokens: Generated tokens per sample at most (injected tokens not counted).
        min_new_tokens: End-of-turn tokens are suppressed before this many generated tokens.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass (1.0: off).
        top_k: Keep the k most likely tokens (0: off).
        repetition_penalty: HF-style penalty on tokens already in the sequence (TVC: 1.05).
        stop_strings: Generation ends when the text contains one of these.
        seed: Seed of the sampling generator.
    """

    pool_kernel: int = 4
    reset: str = "visual"
    on_reflection: bool = True
    on_bridge: bool = True
    every_n_tokens: int | None = None
    periodic_at: str = "sentence"
    max_calibrations: int = 4
    min_gap: int = 64
    reflection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_PHRASES))
    bridges: list[str] = field(default_factory=lambda: list(DEFAULT_BRIDGES))
    max_new_tokens: int = 8192
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reset not in RESET_MODES:
            raise ValueError(f"pvc.reset must be one of {RESET_MODES}, got {self.reset!r}")
        if self.periodic_at not in PERIODIC_BOUNDARIES:
            raise ValueError(
                f"pvc.periodic_at must be one of {PERIODIC_BOUNDARIES}, got {self.periodic_at!r}")
        if self.pool_kernel < 1:
            raise ValueError(f"pvc.pool_kernel must be >= 1, got {self.pool_kernel}")
        if self.every_n_tokens is not None and self.every_n_tokens < 1:
            raise ValueError(f"pvc.every_n_tokens must be >= 1 or null, got {self.every_n_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"pvc.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"pvc.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"pvc.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"pvc.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.bridges:
            raise ValueError("pvc.bridges must hold at least one bridging prompt")

    @property
    def triggers_on(self) -> bool:
        return self.max_calibrations > 0 and (
            self.on_reflection or self.on_bridge or self.every_n_tokens is not None
        )
