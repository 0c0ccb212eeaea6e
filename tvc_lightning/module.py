"""TVCModule: the LightningModule that trains a Qwen VL model with DVR samples."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from tvc_lightning.data.packing import batch_samples, language_model_inputs
from tvc_lightning.data.resume import WINDOW_LABELS_KEY
from tvc_lightning.data.tokenize import IGNORE_INDEX
from tvc_lightning.families import ModelFamily, family_of
from tvc_lightning.flops import ThroughputMeter, peak_flops
from tvc_lightning.hf import load_model, resolve_dtype
from tvc_lightning.loss import calls_head_once, chunked_cross_entropy
from tvc_lightning.pvc import PVCConfig
from tvc_lightning.schedule import cosine_with_warmup
from tvc_lightning.vision import merged_grids, segment_features

# Trainer precision -> dtype the weights are loaded in. Mixed precision keeps fp32 weights (autocast
# or DeepSpeed/FSDP do the casting); "-true" precisions load directly in the low-precision dtype.
_LOAD_DTYPE = {"bf16-true": "bfloat16", "16-true": "float16"}


class TVCModule(L.LightningModule):
    """A Qwen VL model (HF transformers: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) fine-tuned on long-CoT
    samples with DVR re-injected images.

    The vision tower runs once per distinct image; re-injected copies reuse its tokens, average-
    pooled on the merged grid, and get M-RoPE positions on their pooled grid (computed by the data
    pipeline). The loss is chunked cross-entropy over labelled positions only, so full-vocabulary
    fp32 logits of a whole sequence never exist.

    Args:
        model_name_or_path: Local HF checkpoint directory (or hub id) of a Qwen2-VL, Qwen2.5-VL or
            Qwen3-VL model; the family is read from its ``config.json``.
        freeze: Parameter-name prefixes to freeze; ``visual`` freezes the whole vision tower with
            its merger(s), as TVC did (the default). Names are those of the HF model (e.g.
            ``Qwen2VLForConditionalGeneration``), with or without the leading ``model.``.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: Fraction of the optimizer steps spent in linear warmup before cosine decay.
        min_lr_ratio: The cosine decays to ``lr * min_lr_ratio``.
        gradient_checkpointing: Recompute decoder-layer activations in backward to save memory.
        loss_chunk_size: Labelled positions per cross-entropy chunk (bounds the logits' memory).
        loss_normalization: ``tokens``: every labelled token of an optimizer step weighs the
            same (the step's loss is the sum over its micro-batches and ranks divided by their
            total label count, as HF's Trainer does); ``micro_batch``: each micro-batch's mean
            weighs the same, however many answer tokens it holds.
        attn_implementation: HF attention backend: ``sdpa``, ``eager`` or ``flash_attention_2``.
        generation: PVC decoding settings for validation by generation and ``predict``.
        max_nonfinite_losses: Training steps whose loss is NaN or inf (on any rank) that are
            tolerated, each skipped (no backward, no update), before the run stops with an
            error; 0: the first one stops it. All ranks decide on the same all-reduced count, so
            they stop together. Skipping needs one device or DDP (not DeepSpeed or FSDP2).
        peak_tflops: The device's dense bf16 peak in TFLOP/s, the denominator of the logged
            ``train/mfu``; default: looked up by GPU name (:data:`tvc_lightning.flops.PEAK_BF16_TFLOPS`),
            none on CPU.
    """

    def __init__(
        self,
        model_name_or_path: str,
        freeze: list[str] | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        loss_chunk_size: int = 1024,
        loss_normalization: Literal["tokens", "micro_batch"] = "tokens",
        attn_implementation: str = "sdpa",
        generation: PVCConfig | None = None,
        max_nonfinite_losses: int = 0,
        peak_tflops: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generation"])
        self.generation = generation if generation is not None else PVCConfig()
        self.freeze_prefixes = None if freeze is None else list(freeze)
        self.model: Any = None
        self._meter = ThroughputMeter()
        if max_nonfinite_losses < 0:
            raise ValueError(f"model.max_nonfinite_losses must be >= 0, got {max_nonfinite_losses}")
        self._nonfinite_losses = 0

    # -- model -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the HF model (once); Lightning calls this inside the strategy's init context."""
        if self.model is not None:
            return
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            # FSDP1 would load a full copy per rank, and decoding calls the embedding and lm_head
            # outside the root's forward, where FSDP1 leaves them sharded.
            raise ValueError(
                "trainer.strategy: FSDPStrategy (FSDP1) is not supported; use "
                "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2) with "
                "data_parallel_size = devices x num_nodes and tensor_parallel_size 1, as "
                "recipes/72b_fsdp.yaml does"
            )
        if isinstance(strategy, ModelParallelStrategy):
            from tvc_lightning.fsdp import data_parallel_mesh

            if self._trainer.validate_loop.inference_mode:
                # FSDP2 allocates its all-gather buffers at the first unshard: made under
                # inference_mode (validation, sanity check) they break every later training step.
                raise ValueError("trainer.inference_mode: set it to false under "
                                 "ModelParallelStrategy (FSDP2), as recipes/72b_fsdp.yaml does")

            self.load_fsdp(data_parallel_mesh(self.device_mesh), precision, strategy.root_device)
            return
        # Under DeepSpeed ZeRO-3 the checkpoint is loaded straight into partitioned parameters.
        deepspeed_config = strategy.config if isinstance(strategy, DeepSpeedStrategy) else None
        self.model = load_model(
            self.hparams.model_name_or_path,
            dtype=_LOAD_DTYPE.get(precision, "float32"),
            attn_implementation=self.hparams.attn_implementation,
            deepspeed_config=deepspeed_config,
        )
        self._prepare_model()

    def load_fsdp(self, mesh: Any, precision: str, device: torch.device) -> None:
        """FSDP2: build the model on meta, shard it per layer over ``mesh``, fill it from rank 0's
        read of the checkpoint (collective: every rank calls this)."""
        from tvc_lightning import fsdp

        dtype = resolve_dtype(_LOAD_DTYPE.get(precision, "float32"))
        self.model = fsdp.build_on_meta(self.hparams.model_name_or_path, dtype,
                                        self.hparams.attn_implementation)
        self._prepare_model()  # freezing and checkpointing flags before sharding
        fsdp.shard(self.model, mesh, fsdp.mixed_precision_policy(precision))
        fsdp.load_sharded(self.model, self.hparams.model_name_or_path, device)

    def _prepare_model(self) -> None:
        self.model.config.use_cache = False
        self.model.train()  # from_pretrained returns eval mode; Lightning switches it for validation
        self._apply_freeze()
        if self.hparams.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.2x; the older name is deprecated there
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _apply_freeze(self) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        prefixes = self.freeze_prefixes
        for prefix in self.family.vision_prefixes if prefixes is None else prefixes:
            candidates = (prefix, f"model.{prefix}")
            hits = [n for n in names if any(n == c or n.startswith(c + ".") for c in candidates)]
            if not hits:
                raise ValueError(f"model.freeze: {prefix!r} matches no parameter of the model")
            for name, param in self.model.named_parameters():
                if name in hits:
                    param.requires_grad_(False)

    @property
    def family(self) -> type[ModelFamily]:
        """The model's family adapter (from its config's ``model_type``)."""
        return family_of(self.model.config)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # -- forward ---------------------------------------------------------------------------------

    def language_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with every visual segment's features scattered into its placeholders,
        and the extra language-model arguments the family derives from them (Qwen3-VL: DeepStack)."""
        family, features = self.family, None
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and pixel_values.numel() > 0:
            visual = family.vision_tower(self.model)
            frozen = not any(p.requires_grad for p in visual.parameters())
            # A frozen tower needs no activations kept for backward.
            with torch.no_grad() if frozen else contextlib.nullcontext():
                images = family.encode_images(self.model, pixel_values, batch["image_grid_thw"])
            grids = merged_grids(batch["image_grid_thw"], family.merge_size(self.model))
            features = segment_features(images, grids, batch["visual_segments"])
        try:
            return family.embed(self.model, batch["input_ids"], features)
        except ValueError as e:
            raise ValueError(f"batch: {e} (its visual segments do not match its tokens)") from None

    def input_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with every visual segment's features scattered into its placeholders."""
        return self.language_inputs(batch)[0]

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-norm hidden states ``(B, L, D)`` of the language model (packed batches: see
        :mod:`tvc_lightning.data.packing`)."""
        language_model = self.family.language_model(self.model)
        embeds, visual_kwargs = self.language_inputs(batch)
        out = language_model(
            inputs_embeds=embeds, use_cache=False, **visual_kwargs,
            **language_model_inputs(batch, language_model.config._attn_implementation),
        )
        return out.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full logits ``(B, L, V)``: for tests and short inputs; training never builds them."""
        return self.model.lm_head(self.hidden_states(batch))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over the micro-batch's labelled positions, and their number."""
        loss_sum, n_tokens = self.summed_loss(batch)
        return loss_sum / n_tokens.clamp(min=1), n_tokens

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over the micro-batch's labelled positions, and their number."""
        hidden = self.hidden_states(batch)
        labels = batch["labels"][:, 1:]
        chunk = self.hparams.loss_chunk_size
        chunks = 1
        if _is_sharded(self.model.lm_head.weight) and not calls_head_once(self.model.lm_head):
            # Every lm_head call then gathers its weight collectively: all ranks must make as many
            # calls as the rank with the most labelled tokens. The fused loss calls the head once
            # whatever the count, so it needs neither this all-reduce nor its host sync.
            chunks = max(1, -(-int((labels != IGNORE_INDEX).sum()) // chunk))
            count = torch.tensor([chunks], device=hidden.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            chunks = int(count.item())
        return chunked_cross_entropy(
            hidden[:, :-1], self.model.lm_head, labels, chunk_size=chunk, min_chunks=chunks,
        )

    # -- steps -----------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._meter.start()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            # Read before the step: after it, Lightning has already moved the scheduler on.
            self.log("train/lr", schedulers.get_last_lr()[0])

    def on_validation_start(self) -> None:
        self._meter.pause()  # validation time is not training throughput

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss_sum, n_tokens = self.summed_loss(batch)
        if self._nonfinite(loss_sum, batch_idx):
            return None  # a tolerated bad step: Lightning skips its backward and update
        mean = loss_sum / n_tokens.clamp(min=1)
        size = batch_samples(batch)
        self.log("train/loss", mean.detach(), prog_bar=True, batch_size=size)
        self.log("train/dvr_injections_per_sample", batch["num_injections"].float().mean(),
                 batch_size=size)
        trainer = self.trainer
        # Lightning divides what this returns by the accumulation, DeepSpeed's engine once more.
        acc = trainer.accumulate_grad_batches
        divided = acc * acc if trainer.strategy.handles_gradient_accumulation else acc
        if self.hparams.loss_normalization == "micro_batch":
            return mean * (divided / acc)  # the mean of the micro-batch means
        window = batch.get(WINDOW_LABELS_KEY)
        if window is None:
            raise ValueError("model.loss_normalization=tokens needs the train loader's window label "
                             "counts (TVCDataModule provides them); set it to micro_batch otherwise")
        total = trainer.strategy.reduce(window.to(loss_sum.device, torch.float32), reduce_op="sum")
        return step_loss(loss_sum, total, divided, trainer.world_size)

    def _nonfinite(self, loss_sum: torch.Tensor, batch_idx: int) -> bool:
        """Is this step's loss NaN/inf on any rank? Raises once more such steps than
        ``max_nonfinite_losses`` allows were seen; every rank reaches the same verdict."""
        bad = (~torch.isfinite(loss_sum.detach())).to(torch.float32).reshape(1)
        ranks = int(self.trainer.strategy.reduce(bad, reduce_op="sum").item())
        if not ranks:
            return False
        self._nonfinite_losses += 1
        allowed = self.hparams.max_nonfinite_losses
        where = (f"training step {self.trainer.global_step} (batch {batch_idx} of epoch "
                 f"{self.current_epoch}): the loss is {float(loss_sum.detach())} on this rank, not finite "
                 f"on {ranks} of {self.trainer.world_size} rank(s)")
        if self._nonfinite_losses > allowed:
            raise FloatingPointError(
                f"{where}; {self._nonfinite_losses} such step(s), model.max_nonfinite_losses="
                f"{allowed} allows {allowed}. Stopping: a NaN update would ruin every weight. Check "
                f"the weights at model.model_name_or_path={self.hparams.model_name_or_path!r} and "
                "the data, or lower model.lr."
            )
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{where}; skipped ({self._nonfinite_losses} of model.max_nonfinite_losses="
                       f"{allowed} used)")
        self.log("train/nonfinite_losses", float(self._nonfinite_losses))
        return True

    def _check_step_windows(self) -> None:
        trainer = self.trainer
        acc = trainer.accumulate_grad_batches
        if (self.hparams.loss_normalization == "tokens" and trainer.strategy.handles_gradient_accumulation
                and acc > 1 and math.isfinite(trainer.num_training_batches)
                and int(trainer.num_training_batches) % acc):
            # DeepSpeed's steps would straddle epochs, mixing two windows' label counts.
            raise ValueError(
                f"model.loss_normalization=tokens under DeepSpeed needs the batches per epoch per "
                f"rank ({int(trainer.num_training_batches)}) to be a multiple of "
                f"trainer.accumulate_grad_batches ({acc}): adjust data.train_samples, or set "
                "model.loss_normalization=micro_batch"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_dict(self._meter.step(self.model, batch))
        self._log_skipped()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_samples(batch))
        return loss

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """PVC-decode a batch of raw samples; one JSON-ready dict per (non-padding) sample, a
        ``skipped`` one for a sample that cannot be decoded (see :mod:`tvc_lightning.predict`)."""
        from tvc_lightning.predict import predict_rows

        return predict_rows(self.model, self.trainer.datamodule, self.generation, batch)

    def _log_skipped(self) -> None:
        counter = getattr(getattr(self.trainer, "datamodule", None), "skip_counter", None)
        if counter is None:
            return
        counts = {f"data/skipped_{reason}": n for reason, n in counter.as_dict().items()}
        # Bad samples replaced by repeats to keep the shares equal (exact epochs): a shard gone bad
        # shows here as a rising count, not only as a smaller set of distinct samples.
        padded = getattr(getattr(self.trainer.datamodule, "train_dataset", None), "padded", None)
        if padded is not None:
            counts["data/padded"] = padded.as_dict()["padded"]
        for key, n in counts.items():
            self.log(key, float(n), reduce_fx="sum", sync_dist=True)

    # -- exact resume: global RNG states ---------------------------------------------------------
    # Lightning checkpoints no RNG state. Training draws none today (Qwen2-VL has no dropout; data
    # randomness is seeded by (seed, epoch, ...)), but a resumed run should continue the same
    # random streams if something ever does. The checkpoint holds rank 0's states; with
    # seed_everything every rank starts from, and symmetric training keeps, the same states.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from tvc_lightning.data.resume import rng_state

        checkpoint["rng_states"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied in on_train_start, just before training goes on: Lightning's setup in between
        # (a sanity-check validation, say) may still draw from the global RNGs.
        self._resume_rng = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        from tvc_lightning.data.resume import set_rng_state

        states, self._resume_rng = getattr(self, "_resume_rng", None), None
        if states is not None:
            set_rng_state(states)
        self._check_step_windows()
        peak = self.hparams.peak_tflops
        self._meter.peak_flops = peak * 1e12 if peak else peak_flops(self.device)
        if self.hparams.max_nonfinite_losses and isinstance(
                self.trainer.strategy, DeepSpeedStrategy | ModelParallelStrategy):
            raise ValueError("model.max_nonfinite_losses > 0 skips steps, which DeepSpeed and "
                             "FSDP2 (ModelParallelStrategy) cannot: set it to 0")
        if self.hparams.max_nonfinite_losses and self.trainer.accumulate_grad_batches > 1:
            # A skipped micro-batch mid-window would still let the window's other gradients
            # update the weights (under DDP: each rank its own, unsynchronised ones).
            raise ValueError("model.max_nonfinite_losses > 0 needs trainer.accumulate_grad_batches "
                             "= 1: a skipped micro-batch cannot skip its window's update")

    # -- optimization ----------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model.freeze froze every parameter: nothing to train")
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs a known number of steps: set trainer.max_steps "
                "(or data.train_samples for an unsized shard stream)"
            )
        schedule = cosine_with_warmup(int(total), self.hparams.warmup_ratio,
                                      self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def step_loss(loss_sum: torch.Tensor, total_labels: torch.Tensor, divided: int,
              world_size: int) -> torch.Tensor:
    """What ``training_step`` returns for a token-normalized step: ``loss_sum`` scaled so that,
    after the framework divides by ``divided`` and data parallelism averages over
    ``world_size`` ranks, the step's gradient is that of (sum of its token losses over every
    micro-batch and rank) / ``total_labels``."""
    return loss_sum * (divided * world_size / total_labels.clamp(min=1))


def _is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter or an FSDP2 shard: using it is a collective call."""
    from torch.distributed.tensor import DTensor

    return hasattr(param, "ds_id") or isinstance(param, DTensor)
