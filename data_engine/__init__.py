"""Data engine: build long-CoT WebDataset shards (``python -m data_engine synth|convert ...``)."""

from data_engine.shards import ShardWriter

__all__ = ["ShardWriter"]
