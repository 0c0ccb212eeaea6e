"""The command line: LightningCLI over TVCModule and TVCDataModule.

``python -m tvc_lightning fit --config recipes/tiny.yaml`` (also ``validate``, ``test``,
``predict``; and ``export CKPT --out DIR`` for an HF-format model directory);
``--print_config`` shows the composed configuration, several ``--config`` files compose, and
dotted overrides (``--model.lr 1e-5``) work as in any LightningCLI.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.module import TVCModule


class TVCLightningCLI(LightningCLI):
    """LightningCLI whose data module reads the tokenizer of the model being trained."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth: the checkpoint path is set once, on the model.
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after start-up)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _StderrOnly(logging.Filter):
    """Sends a logger's records to stderr instead of its own (stdout) handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.handler = _CurrentStderr()
        self.handler.setFormatter(logging.Formatter(
            "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def _deepspeed_logs_to_stderr() -> None:
    # DeepSpeed logs to stdout, and it is imported (printing its accelerator notice) while the
    # parser reads Lightning's DeepSpeed strategy: `--print_config > run.yaml` would not be YAML.
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _StderrOnly) for f in logger.filters):
        logger.addFilter(_StderrOnly())


def main(args: list[str] | None = None) -> TVCLightningCLI | None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from tvc_lightning.export import main as export_main

        export_main(argv[1:])
        return None
    _deepspeed_logs_to_stderr()
    # The shard stream splits its work across DataLoader workers itself, so its nominal __len__ is
    # accurate; Lightning cannot know that and warns on every run.
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
    # The data module saves and restores its stream position itself (data/resume.py), which
    # Lightning's check for a stateful DataLoader does not see.
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
    # Without data.val_shards the validation loader is deliberately empty.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero.*")
    try:
        return TVCLightningCLI(
            TVCModule,
            TVCDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        # Close the W&B run (offline runs are written out then); a later main() in the same
        # process, as in tests or notebooks, must not append to this one.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


if __name__ == "__main__":
    main()
