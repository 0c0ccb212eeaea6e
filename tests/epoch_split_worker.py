"""Exact epochs under real DDP: TVCDataModule's training loader on 2 CPU processes (gloo).

Run as ``python tests/epoch_split_worker.py SHARDS OUT`` (Lightning re-runs this script for rank
1). Samples are "encoded" as their ids, so no model or tokenizer is needed; a one-parameter model
makes every step a gradient all-reduce, so ranks with unequal step counts hang. Each rank writes
``OUT/rank{r}.json``: ``{epoch: [sample ids in the order trained]}``.

Also holds the shard-writing helpers the tests share with it.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.data.schema import SampleRecord


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_id_shards(root: Path, sizes: list[int], bad: frozenset[str] = frozenset()) -> list[str]:
    """Shards ``root/shard-NNNNNN.tar`` of ``sizes[i]`` samples with ids ``s{i}-{j}`` (tiny PNGs);
    ids in ``bad`` get an undecodable image. Returns all ids in tar order."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for s, n in enumerate(sizes):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for j in range(n):
                sid = f"s{s}-{j}"
                record = SampleRecord(id=sid, question="q?", response="r", answer="1").to_json()
                for name, data in ((f"{sid}.json", record),
                                   (f"{sid}.png", b"\x89PNG bad" if sid in bad else _png(j))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ids.append(sid)
    return ids


def cut_before(shard: Path, name: str, inside: bool = False) -> None:
    """Truncate ``shard`` (as an interrupted copy does) at the header of member ``name``, or with
    ``inside`` in the middle of its data."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(name)
    at = info.offset_data + info.size // 2 if inside else info.offset
    shard.write_bytes(shard.read_bytes()[:at])


def encode_id(record: SampleRecord, images: list[Any], epoch: int) -> dict[str, Any]:
    return {"id": record.id}


def collate_ids(samples: list[dict[str, Any]]) -> dict[str, Any]:
    # label_windows counts labels; none are ignored here.
    return {"ids": [s["id"] for s in samples], "labels": torch.zeros(len(samples), 2, dtype=torch.long)}


class IdDataModule(TVCDataModule):
    """TVCDataModule whose samples are their ids: the real split, stream and loader, no processor."""

    def setup(self, stage: str | None = None) -> None:
        self.encoder, self.collator = encode_id, collate_ids  # type: ignore[assignment]
        super().setup(stage)


def main(shards: str, out: str) -> None:
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.seen: dict[int, list[str]] = {}

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            self.seen.setdefault(self.current_epoch, []).extend(batch["ids"])
            return (self.w * len(batch["ids"])).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def on_train_end(self) -> None:
            Path(out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    data = IdDataModule("unused", shards, batch_size=2, num_workers=2, shuffle_buffer=4, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Recorder(), datamodule=data)


if __name__ == "__main__":
    main(*sys.argv[1:3])
