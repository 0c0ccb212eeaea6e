"""Validation by generation: PVC (and plain) decoding, scoring, W&B scalars/table/curve; JSONL
predictions."""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from tvc_lightning.hf import any_rank
from tvc_lightning.pvc import PVCConfig, PVCResult, pvc_generate
from tvc_lightning.pvc.attention import forgetting_curve
from tvc_lightning.scoring import AnswerAccuracy, score_record


def all_ranks_any(local: bool) -> bool:
    """True if ``local`` is true on any rank (an all-reduce MAX; just ``local`` when not
    distributed). Passed to ``pvc_generate(sync=...)`` so ranks decode in step."""
    return any_rank(local)


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (itself when not distributed); NCCL needs it on the GPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    device = tensor.device
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.to(device)


def marked_response(result: PVCResult, tokenizer: Any) -> str:
    """The response text with ``⟦PVC trigger@step⟧`` where each calibration's chunk was injected."""
    pieces, start = [], 0
    for c in result.calibrations:
        pieces.append(tokenizer.decode(result.token_ids[start:c.index], skip_special_tokens=True))
        injected = tokenizer.decode(result.token_ids[c.index:c.index + c.length],
                                    skip_special_tokens=True)
        pieces.append(f"⟦PVC {c.trigger}@{c.step}{': ' + injected.strip() if injected.strip() else ''}⟧")
        start = c.index + c.length
    pieces.append(tokenizer.decode(result.token_ids[start:], skip_special_tokens=True))
    return "".join(pieces)


class PVCGenerationCallback(L.Callback):
    """At the end of validation, decode the validation samples with PVC, score and log them.

    Uses the module's ``generation`` config (a :class:`PVCConfig`) and the data module's
    validation records (equal in number on every rank). Logs ``val/pvc_accuracy`` and, with
    ``compare_plain``, ``val/plain_accuracy`` from plain decoding of the same samples in the same
    run; calibrations per sample, generated tokens and decode tokens/s; the visual-forgetting
    curve (attention share on the original image and on re-injected copies, averaged over layers
    and samples, in ``curve_bins`` bins of response position) as scalars and a W&B chart; and a
    W&B table of samples (image, question, response with calibration markers, extracted, gold,
    correct). With ``per_layer``, also the curve per layer (averaged over the samples of all
    ranks): a W&B table ``val/visual_attention_per_layer`` (mode, layer, bin, original, copy) and
    a heat map image ``val/visual_attention_heatmap`` (layer x response position, calibrations
    marked), as ``python -m tvc_lightning analyze forgetting`` draws it.

    Args:
        compare_plain: Also decode without calibrations, for the side-by-side accuracy.
        max_samples: Decode at most this many validation samples per rank (None: all).
        batch_size: Samples decoded together.
        table_rows: Rows of the W&B samples table (rank 0's samples).
        every_n_epochs: While fitting, decode after every n-th epoch (5 with 5 epochs: the last
            only); a standalone ``validate`` always decodes.
        measure_attention: Measure the visual-attention shares while decoding (hooks; small cost).
        curve_bins: Response-position bins of the visual-forgetting curve.
        per_layer: Also log the per-layer curves (a W&B table and a heat map; no scalars, so the
            number of logged keys does not grow with the model's depth). Off by default.
    """

    def __init__(self, compare_plain: bool = True, max_samples: int | None = None,
                 batch_size: int = 8, table_rows: int = 16, every_n_epochs: int = 1,
                 measure_attention: bool = True, curve_bins: int = 8,
                 per_layer: bool = False) -> None:
        self.measure_attention = measure_attention
        self.per_layer = per_layer
        self.curve_bins = curve_bins
        self.compare_plain = compare_plain
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.table_rows = table_rows
        if every_n_epochs < 1:
            raise ValueError(f"PVCGenerationCallback.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs

    def due(self, trainer: L.Trainer) -> bool:
        """Decode now? Not in the sanity check; while fitting, after every n-th epoch (epochs
        n-1, 2n-1, ... counted from 0); in a standalone ``validate``, always."""
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        datamodule = trainer.datamodule
        records = list(getattr(datamodule, "val_records", []))
        if self.max_samples is not None:
            records = records[: self.max_samples]
        config: PVCConfig = pl_module.generation
        modes = {"pvc": config}
        if self.compare_plain:
            modes["plain"] = replace(config, max_calibrations=0)
        rows: list[dict[str, Any]] = []
        curves: dict[str, torch.Tensor] = {}
        layer_curves: dict[str, torch.Tensor] = {}
        marks: dict[str, list[float]] = {}
        for name, mode_config in modes.items():
            accuracy = AnswerAccuracy().to(pl_module.device)
            generated = calibrations = 0
            elapsed = 0.0
            sample_curves = []
            layer_sums = layer_counts = None
            if self.per_layer and self.measure_attention:
                model_config = pl_module.model.config
                layers = getattr(model_config, "text_config", model_config).num_hidden_layers
                layer_sums = torch.zeros(self.curve_bins, layers, 2, device=pl_module.device)
                layer_counts = torch.zeros_like(layer_sums)
                marks[name] = []
            for start in range(0, len(records), self.batch_size):
                chunk = records[start:start + self.batch_size]
                began = time.perf_counter()
                # Under the Trainer's precision (autocast for bf16-mixed), as validation_step runs.
                with trainer.precision_plugin.forward_context():
                    results = pvc_generate(
                        pl_module.model, datamodule.processor, [r.question for r, _ in chunk],
                        [images for _, images in chunk], mode_config, chat=datamodule.encoder.chat,
                        sync=all_ranks_any, measure_attention=self.measure_attention,
                    )
                elapsed += time.perf_counter() - began
                for (record, images), result in zip(chunk, results, strict=True):
                    extracted, correct = score_record(result.text, record)
                    accuracy.update([correct])
                    generated += result.num_generated
                    calibrations += len(result.calibrations)
                    if result.attention is not None and len(result.attention):
                        # (bins, layers, 2) -> mean over layers: (bins, 2) original / copy
                        curve = forgetting_curve(result.attention, self.curve_bins)
                        sample_curves.append(curve.nanmean(dim=1))
                        if layer_sums is not None:
                            curve = curve.to(layer_sums.device)
                            layer_sums += curve.nan_to_num()
                            layer_counts += ~curve.isnan()
                            steps = len(result.attention)
                            marks[name] += [(c.decode_step - 1) / steps for c in result.calibrations
                                            if 0 < c.decode_step <= steps]
                    if name == "pvc" and len(rows) < self.table_rows:
                        rows.append({"record": record, "image": images[0], "extracted": extracted,
                                     "correct": correct, "response": marked_response(
                                         result, datamodule.processor.tokenizer)})
            n = max(1, len(records))
            # compute() has already summed over ranks; sync_dist averages identical values.
            pl_module.log(f"val/{name}_accuracy", accuracy.compute(), sync_dist=True)
            pl_module.log(f"val/{name}_generated_tokens", generated / n, sync_dist=True)
            pl_module.log(f"val/{name}_tokens_per_s", generated / max(elapsed, 1e-9), sync_dist=True)
            if name == "pvc":
                pl_module.log("val/pvc_calibrations_per_sample", calibrations / n, sync_dist=True)
            if layer_sums is not None:
                # Every rank takes part (a collective), even one that measured nothing.
                layer_sums, layer_counts = _sum_over_ranks(layer_sums), _sum_over_ranks(layer_counts)
                if bool(layer_counts.any()):
                    layer_curves[name] = (layer_sums / layer_counts).cpu()  # 0/0: NaN, no tokens
            if sample_curves:
                curves[name] = torch.stack(sample_curves).nanmean(dim=0)
                for k, (original, copy) in enumerate(curves[name].tolist()):
                    pl_module.log(f"val/visual_attention/{name}_original_bin{k}", original,
                                  sync_dist=True)
                    pl_module.log(f"val/visual_attention/{name}_copy_bin{k}", copy, sync_dist=True)
        self._log_table(trainer, rows)
        self._log_curve(trainer, curves)
        self._log_per_layer(trainer, layer_curves, marks)

    def _log_per_layer(self, trainer: L.Trainer, curves: dict[str, torch.Tensor],
                       marks: dict[str, list[float]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not curves or trainer.global_rank != 0:
            return
        import wandb

        from tvc_lightning.analyze.plots import curve_rows, figure_image, forgetting_figure, nan_to_none

        table = wandb.Table(columns=["mode", "layer", "bin", "original", "copy"],
                            data=[[m, lay, b, nan_to_none(o), nan_to_none(c)]
                                  for m, lay, b, o, c in curve_rows(curves)])
        # Calibration marks are rank 0's samples only: they locate the injections, not a mean.
        figure = forgetting_figure(curves, marks, title="Attention share on the image per layer")
        loggers[0].experiment.log({"val/visual_attention_per_layer": table,
                                   "val/visual_attention_heatmap": wandb.Image(figure_image(figure)),
                                   "trainer/global_step": trainer.global_step})

    def _log_curve(self, trainer: L.Trainer, curves: dict[str, torch.Tensor]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not curves or trainer.global_rank != 0:
            return
        import wandb

        xs = [(k + 0.5) / self.curve_bins for k in range(self.curve_bins)]
        keys, ys = [], []
        for name, curve in curves.items():
            for column, part in enumerate(("original image", "re-injected copies")):
                keys.append(f"{name}: {part}")
                ys.append([0.0 if v != v else v for v in curve[:, column].tolist()])  # NaN -> 0
        chart = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, xname="response position",
                                       title="Visual attention share over the response")
        loggers[0].experiment.log({"val/visual_attention_curve": chart,
                                   "trainer/global_step": trainer.global_step})

    def _log_table(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not rows or trainer.global_rank != 0:
            return
        import wandb

        table = wandb.Table(columns=["id", "image", "question", "response", "extracted", "gold",
                                     "correct"])
        for row in rows:
            record = row["record"]
            table.add_data(record.id, wandb.Image(row["image"]), record.question, row["response"],
                           row["extracted"], record.answer, row["correct"])
        loggers[0].experiment.log({"val/pvc_samples": table,
                                   "trainer/global_step": trainer.global_step})


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per predicted sample: id, response, extracted, correct, calibrations.

    A sample that could not be decoded (a control-token string in its question) has a line with
    ``skipped`` (the reason) instead, and the skips are counted and reported at the end.

    Args:
        output_path: The JSONL file; with several ranks each writes ``NAME.rankR.jsonl``.
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self._opened: set[Path] = set()
        self.skipped: Counter[str] = Counter()
        self.written = 0

    def _path(self, trainer: L.Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output_path
        return self.output_path.with_suffix(f".rank{trainer.global_rank}.jsonl")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.skipped.clear()
        self.written = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           prediction: Any, batch_indices: Any, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        from tvc_lightning.predict import SKIP_KEY

        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if path in self._opened else "w"  # a new run replaces an old file
        self._opened.add(path)
        with path.open(mode, encoding="utf-8") as f:
            for line in prediction:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                self.written += 1
                if SKIP_KEY in line:
                    self.skipped[str(line[SKIP_KEY]).split(":")[0]] += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.skipped:
            return
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        message = (f"predict: {sum(self.skipped.values())} of {self.written} samples skipped "
                   f"({counts}); their lines in {self._path(trainer)} carry `skipped` and no "
                   "response")
        warnings.warn(message, stacklevel=1)
