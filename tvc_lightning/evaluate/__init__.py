"""``python -m tvc_lightning evaluate``: a checkpoint on MathVista, MathVision or converted shards,
with PVC (and plain) decoding, resumable and split across ranks, written in the benchmarks'
official layouts. See :mod:`tvc_lightning.evaluate.cli`."""

from tvc_lightning.evaluate.run import EvalSettings, evaluate

__all__ = ["EvalSettings", "evaluate"]
