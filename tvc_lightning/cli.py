"""The command line: LightningCLI over TVCModule and TVCDataModule.

``python -m tvc_lightning fit --config recipes/tiny.yaml`` (also ``validate`` and ``predict``;
``export CKPT --out DIR`` for an HF-format model directory, ``evaluate`` for benchmark scores in
their official formats, ``analyze forgetting|removal`` for visual forgetting); ``--print_config`` shows the
composed configuration, several ``--config`` files compose, and dotted overrides
(``--model.lr 1e-5``) work as in any LightningCLI.

Each ``fit`` owns its checkpoint folder (the ModelCheckpoint ``dirpath``): a new run refuses a
folder that already holds another run's checkpoints (it would write ``last-v1.ckpt`` beside
them), and the run's resolved configuration is saved there as ``config.yaml`` and logged whole to
W&B. ``validate`` and ``predict`` without ``--ckpt_path`` warn that they use the base weights.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.module import TVCModule

_NO_TEST = ("`test` is not a subcommand here: the data module has no test split. Score a "
            "checkpoint with `python -m tvc_lightning validate --config ... --ckpt_path CKPT` "
            "(data.val_shards), or write its answers with `predict`.")


def _checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders the run's ModelCheckpoint callbacks were given (``dirpath``) and will write."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def _checkpoints_in(folder: Path) -> list[str]:
    # DeepSpeed and FSDP2 checkpoints are folders named *.ckpt.
    return sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


class TVCSaveConfig(SaveConfigCallback):
    """Saves a ``fit``'s resolved configuration as ``config.yaml`` in its checkpoint folder (the
    run's own, see :class:`TVCLightningCLI`) and logs the whole of it (model, data with DVR,
    generation, trainer) as the W&B run config; ``validate``/``predict`` log it to W&B only, so
    they never replace a training run's file."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if stage == "fit":
            dirs = _checkpoint_dirs(trainer)
            folder = str(dirs[0]) if dirs else trainer.log_dir  # log_dir broadcasts: all ranks
            if trainer.is_global_zero and folder is not None:
                os.makedirs(folder, exist_ok=True)
                self.parser.save(self.config, os.path.join(folder, self.config_filename),
                                 skip_none=False, overwrite=True, multifile=self.multifile)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        # The model's own hyperparameters are a subset of the config: not logged twice, flat.
        pl_module._log_hyperparams = False
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            datamodule._log_hyperparams = False
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in loggers:
            if logger._experiment is None:
                # Given to wandb.init: the config is part of the run record, written when the run
                # starts. Starting the run here instead would start it before the Trainer does,
                # and a later config update is written whenever W&B's debounce gets to it.
                logger._wandb_init.setdefault("config", {}).update(resolved)
            else:
                logger.experiment.config.update(resolved, allow_val_change=True)


class TVCLightningCLI(LightningCLI):
    """LightningCLI whose data module reads the tokenizer of the model being trained.

    Subcommands: ``fit``, ``validate``, ``predict`` (the data has no test split).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "test"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth: the checkpoint path is set once, on the model.
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")

    def _ckpt_path(self) -> str | None:
        return self.config[self.subcommand].get("ckpt_path")

    def before_fit(self) -> None:
        """Refuse a checkpoint folder holding another run's checkpoints (resuming is fine)."""
        ckpt_path = self._ckpt_path()
        for folder in _checkpoint_dirs(self.trainer):
            found = _checkpoints_in(folder)
            resuming = ckpt_path is not None and (ckpt_path in ("last", "hpc")
                                                  or _inside(ckpt_path, folder))
            if found and not resuming:
                raise FileExistsError(
                    f"fit: {folder} already holds the checkpoints of an earlier run "
                    f"({', '.join(found)}). This run would write beside them (last-v1.ckpt), and "
                    f"`--ckpt_path {folder / 'last.ckpt'}` would still name the old model. "
                    f"Continue that run with `--ckpt_path {folder / 'last.ckpt'}`, or give this "
                    f"one its own folder: move the old one away (`mv {folder} {folder}-old`) or "
                    "set the ModelCheckpoint callback's `dirpath` (trainer.callbacks) elsewhere."
                )

    def _warn_without_checkpoint(self, verb: str) -> None:
        if self._ckpt_path() is not None:
            return
        last = [f / "last.ckpt" for f in _checkpoint_dirs(self.trainer) if (f / "last.ckpt").exists()]
        example = str(last[0]) if last else "CKPT"
        rank_zero_warn(
            f"{self.subcommand}: no --ckpt_path given, so it {verb} with the weights at "
            f"model.model_name_or_path={self.model.hparams.model_name_or_path!r} as they are "
            f"(for a recipe's base model: untrained). Pass `--ckpt_path {example}` to use a "
            "trained checkpoint."
        )

    def before_validate(self) -> None:
        self._warn_without_checkpoint("scores")

    def before_predict(self) -> None:
        self._warn_without_checkpoint("decodes")


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


# Verbs with parsers of their own, outside LightningCLI's fit/validate/predict: module -> main(argv).
_TOOLS = {
    "export": "tvc_lightning.export",
    "evaluate": "tvc_lightning.evaluate.cli",
    "analyze": "tvc_lightning.analyze.cli",
}


def main(args: list[str] | None = None) -> TVCLightningCLI | None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["test"]:
        raise SystemExit(f"python -m tvc_lightning: {_NO_TEST}")
    if argv[:1] and argv[0] in _TOOLS:
        importlib.import_module(_TOOLS[argv[0]]).main(argv[1:])
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
            save_config_callback=TVCSaveConfig,
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
