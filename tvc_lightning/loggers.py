"""Weights & Biases logging that works with no account: offline unless a key is configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_key_configured() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``wandb login`` left a key in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class TVCWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline when no API key is configured.

    ``WANDB_MODE`` (online, offline, disabled), when set, always wins. The run directory is
    ``save_dir/wandb``; sync an offline run later with ``wandb sync save_dir/wandb/offline-run-*``.

    Args:
        project: W&B project.
        name: Run name.
        save_dir: Folder that receives the ``wandb`` run directory.
        log_model: Upload checkpoints as W&B artifacts (``False``, ``True`` or ``"all"``).
        kwargs: Passed to ``lightning.pytorch.loggers.WandbLogger`` / ``wandb.init``.
    """

    def __init__(self, project: str = "tvc_lightning", name: str | None = None,
                 save_dir: str = "outputs", log_model: bool | str = False, **kwargs: Any) -> None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode == "offline" if mode else not wandb_key_configured()
        # Absolute: wandb keeps process-wide settings across runs, so a relative folder could
        # resolve against the working directory of an earlier run in the same process.
        save_dir = str(Path(save_dir).resolve())
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline,
                         log_model=log_model, **kwargs)
