"""PVC decoding: a batched, KV-preserving decode loop that re-shows the image mid-reasoning.

The loop owns its KV cache. Every cache column has a *kind* (``-1`` hidden, ``0`` text, ``1``
original image, ``2`` re-injected copy); the attention mask is ``kind >= 0``. So a row can
roll back tokens, drop its original image (``reset: visual``) or carry padding holes without
touching other rows or re-running anything: those columns are simply hidden from later queries.
A calibration appends ``bridge + <|vision_start|> pooled pads <|vision_end|>`` as one chunk whose
M-RoPE positions continue the row's sequence, with features pooled once per image from the
vision tower's single pass. ``recompute=True`` is the naive baseline: at each calibration the
whole sequence is re-prefilled from scratch (same visibility rules, as a 4-D mask).

``hide_image_at`` (the image-removal experiment, method.md §1) reuses the ``reset: visual``
mechanism without re-injecting anything: from a given generated token on, a row's original image
columns are hidden. Answer token ``s`` is predicted by the query that feeds token ``s - 1``
(``s >= 1``) or, for ``s = 0``, by the prompt's last position in the prefill; hiding "at s" hides
the image from that query and every later one, so answer tokens ``0..s-1`` were chosen seeing the
image and tokens ``s, s+1, ...`` were not. The positions before that query keep what they computed
while the image was visible (their K/V stay): this removes the answer's *direct* attention to the
image, not what the question's and the earlier answer's hidden states already took from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from tvc_lightning.data.tokenize import ChatFormat, special_token_pattern
from tvc_lightning.families import family_of
from tvc_lightning.pvc.attention import VisualAttentionProbe, cache_keyword
from tvc_lightning.pvc.config import PVCConfig
from tvc_lightning.pvc.results import Calibration, PVCResult, RowState
from tvc_lightning.pvc.sampling import next_tokens
from tvc_lightning.pvc.triggers import Trigger, TriggerDetector
from tvc_lightning.vision import merged_grids, pool_visual_tokens, pooled_grid, segment_features

TEXT, ORIGINAL, COPY, HIDDEN = 0, 1, 2, -1
_VISIBLE = 1 << 62  # "hidden from" index of a column nobody stops seeing


class _Decoder:
    def __init__(self, model: Any, processor: Any, config: PVCConfig, chat: ChatFormat,
                 recompute: bool, triggers: Any = None,
                 sync: Callable[[bool], bool] | None = None, measure_attention: bool = False) -> None:
        self.model, self.config, self.chat, self.recompute = model, config, chat, recompute
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.family = family_of(model)
        self.lm = self.family.language_model(model)
        self.cache_kw = cache_keyword(self.lm.forward)  # `cache` since transformers 5.24
        self.embed = model.get_input_embeddings()
        self.image_token_id = int(model.config.image_token_id)
        self.vision_ids = self.tokenizer.convert_tokens_to_ids([chat.vision_start, chat.vision_end])
        # The checkpoint's generation config says what ends a turn (Qwen2-VL: <|im_end|> and
        # <|endoftext|>), as it does for HF generate.
        eos = getattr(model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.special = special_token_pattern(self.tokenizer)
        # Placeholders are filled by the processor, never a model's output: a sampled one would
        # claim image features that do not exist, so they are never picked.
        self.never = [self.image_token_id, int(model.config.video_token_id)]
        self.detector = triggers or TriggerDetector(config, self.tokenizer)
        self.sync = sync
        self.probe = VisualAttentionProbe(model) if measure_attention else None
        self.cached_steps = 0  # forwards that extended a cache: each must leave one probe record
        self.device = self.embed.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)

    # -- set-up ------------------------------------------------------------------------------

    def _rows(self, questions: list[str], images: list[list[Image.Image]],
              hide_at: list[int | None], prefixes: list[str]) -> list[RowState]:
        vision = [self.image_processor(images=imgs, return_tensors="pt") for imgs in images]
        grid_thw = torch.cat([v["image_grid_thw"] for v in vision]).to(self.device)
        pixels = torch.cat([v["pixel_values"] for v in vision]).to(self.device)
        # One tower pass for the whole batch.
        features = self.family.encode_images(self.model, pixels, grid_thw)
        grids = merged_grids(grid_thw, self.family.merge_size(self.model))
        rows, k = [], 0
        for sample, (question, imgs) in enumerate(zip(questions, images, strict=True)):
            for what, text in (("question", question), ("answer prefix", prefixes[sample])):
                if self.special.search(text):
                    raise ValueError(f"{what} {sample} contains a control-token string: {text!r}")
            n = len(imgs)
            row_grids = grids[k:k + n]
            text = self.chat.prompt(question, [h * w for h, w in row_grids]) + prefixes[sample]
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            pos = self.family.positions(ids, self.image_token_id, row_grids)
            kinds = torch.where(ids == self.image_token_id, ORIGINAL, TEXT)
            row = RowState(sample, features[k:k + n], row_grids, ids.tolist(), kinds.tolist(),
                       [tuple(p) for p in pos.T.tolist()], [_VISIBLE] * len(ids),
                       hide_at=hide_at[sample], segments=[(i, 1) for i in range(n)],
                       prefix_ids=self.tokenizer(prefixes[sample], add_special_tokens=False)["input_ids"])
            if row.hide_at == 0:
                # The first answer token is predicted at the prompt's last position: the image is
                # hidden from that query on, so the prefill runs under the 4-D visibility mask.
                self._hide_original(row, None, len(ids) - 1)
            rows.append(row)
            k += n
        return rows

    # -- model calls -------------------------------------------------------------------------

    def _prefill(self, rows: list[RowState]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run every row's clean sequence (+ pending chunk) from scratch, left-padded."""
        for r in rows:
            self._commit_pending(r, None)
        width = max(len(r.seq_ids) for r in rows)
        batch = len(rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        kinds = torch.full((batch, width), HIDDEN, dtype=torch.long)
        pos = torch.zeros((3, batch, width), dtype=torch.long)
        hidden_from = torch.full((batch, width), -1, dtype=torch.long)
        features = []
        for b, r in enumerate(rows):
            n, pad = len(r.seq_ids), width - len(r.seq_ids)
            ids[b, pad:] = torch.tensor(r.seq_ids)
            seq_kinds = torch.tensor(r.seq_kinds)
            seq_hidden = torch.tensor(r.seq_hidden_from)
            kinds[b, pad:] = torch.where(seq_hidden < _VISIBLE, HIDDEN, seq_kinds)
            pos[:, b, pad:] = torch.tensor(r.seq_pos).T
            hidden_from[b, pad:] = seq_hidden
            r.seq_cols = list(range(pad, pad + n))
            features.append(segment_features(r.images, r.grids, torch.tensor(r.segments)))
        ids, kinds, pos, hidden_from = (t.to(self.device) for t in (ids, kinds, pos, hidden_from))
        if bool((hidden_from[hidden_from >= 0] == _VISIBLE).all()):
            mask = (kinds >= 0).long()  # plain causal + padding: let HF pick its fastest kernel
        else:
            mask = self._visibility_mask(rows, hidden_from)
        cache = DynamicCache()
        if self.probe is not None:
            self.probe.set_key_kinds(kinds)
        logits = self._forward(ids, features, mask, pos, cache, torch.full((batch,), width - 1))
        return cache, kinds, logits

    def _visibility_mask(self, rows: list[RowState], hidden_from: torch.Tensor) -> torch.Tensor:
        """4-D additive mask: query i sees key j iff j <= i, j is real and i is before j's
        "hidden from" index (both in clean-sequence indices; rows are left-padded)."""
        width = hidden_from.shape[1]
        pads = torch.tensor([width - len(r.seq_ids) for r in rows], device=self.device)
        q = torch.arange(width, device=self.device)
        seq_q = q.view(1, -1, 1) - pads.view(-1, 1, 1)
        allowed = (q.view(1, 1, -1) <= q.view(1, -1, 1)) & (hidden_from.unsqueeze(1) > seq_q)
        allowed &= (hidden_from >= 0).unsqueeze(1)
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device)  # pad rows: not empty
        mask = torch.zeros(allowed.shape, dtype=self.embed.weight.dtype, device=self.device)
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min).unsqueeze(1)

    def _forward(self, ids: torch.Tensor, features: list[torch.Tensor], mask: torch.Tensor,
                 pos: torch.Tensor, cache: DynamicCache, last: torch.Tensor) -> torch.Tensor:
        embeds, visual_kwargs = self.family.embed(self.model, ids,
                                                  torch.cat(features) if features else None)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                      **visual_kwargs, **{self.cache_kw: cache})
        hidden = out.last_hidden_state[torch.arange(ids.shape[0]), last.to(self.device)]
        return self.model.lm_head(hidden).float()  # (B, V): only the positions we sample from

    def _step(self, rows: list[RowState], cache: DynamicCache, kinds: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Feed each row's pending tokens (a chunk or one token), right-padded with holes."""
        width = max(len(r.pending) for r in rows)
        start = kinds.shape[1]
        # Built as Python lists and converted once: a handful of tensor ops per step, not per row.
        ids = [r.pending + [self.pad_id] * (width - len(r.pending)) for r in rows]
        new_kinds = [r.pending_kinds + [HIDDEN] * (width - len(r.pending)) for r in rows]
        pos = [r.pending_pos + [(0, 0, 0)] * (width - len(r.pending)) for r in rows]
        last = torch.tensor([len(r.pending) - 1 for r in rows])
        features = [f for r in rows for f in r.pending_features]
        for r in rows:
            self._commit_pending(r, start)
        ids_t = torch.tensor(ids, device=self.device)
        pos_t = torch.tensor(pos, device=self.device).permute(2, 0, 1)
        kinds = torch.cat([kinds, torch.tensor(new_kinds, device=self.device)], dim=1)
        if self.probe is not None:
            self.probe.set_key_kinds(kinds)
        mask = (kinds >= 0).long()
        logits = self._forward(ids_t, features, mask, pos_t, cache, last)
        self.cached_steps += 1
        return kinds, logits

    def _commit_pending(self, r: RowState, start: int | None) -> None:
        """Move the pending tokens into the row's clean sequence (cache columns from ``start``)."""
        n = len(r.pending)
        r.seq_ids += r.pending
        r.seq_kinds += r.pending_kinds
        r.seq_pos += r.pending_pos
        r.seq_hidden_from += [_VISIBLE] * n
        if start is not None:
            r.seq_cols += list(range(start, start + n))
        r.pending, r.pending_kinds, r.pending_pos, r.pending_features = [], [], [], []

    # -- per-token logic ---------------------------------------------------------------------

    def _hide_original(self, r: RowState, kinds_row: torch.Tensor | None, at: int) -> None:
        """Hide the row's original image columns from clean-sequence index ``at`` on: from the
        cached decode steps (their kinds) and from any re-prefill (``seq_hidden_from``). A column
        hidden earlier stays hidden from where it was, so a later reset cannot reopen it."""
        if kinds_row is not None:
            kinds_row[kinds_row == ORIGINAL] = HIDDEN
        r.seq_hidden_from = [min(h, at) if k == ORIGINAL else h
                             for k, h in zip(r.seq_kinds, r.seq_hidden_from, strict=True)]
        if r.image_hidden_at is None:
            r.image_hidden_at = r.sampled

    def _accept(self, r: RowState, token: int, kinds_row: torch.Tensor) -> bool:
        """Handle a sampled token; returns True when the row's visible sequence changed beyond the
        new token this step (a calibration, or its image hidden by ``hide_image_at``)."""
        r.num_generated += 1
        r.sampled += 1
        r.generated.append(token)
        if token in self.eos_ids:
            r.finish = "eos"
            return False
        if self.config.stop_strings:
            tail = self.tokenizer.decode(r.generated[-32:])
            if any(s in tail for s in self.config.stop_strings):
                r.finish = "stop"
                return False
        if r.num_generated >= self.config.max_new_tokens:
            r.finish = "length"
            return False
        hid = r.hide_at is not None and r.image_hidden_at is None and r.num_generated >= r.hide_at
        if hid:
            # The token just sampled is fed next (at clean index len(seq_ids)) and predicts answer
            # token hide_at: the image is hidden from that query on; nothing is re-injected.
            self._hide_original(r, kinds_row, len(r.seq_ids))
        trigger = None
        if self.config.triggers_on:
            segment = r.generated[r.segment_start:]
            if r.prefix_ids and not r.calibrations:
                trigger = self.detector.check(segment, 0, context=r.prefix_ids)
            else:
                trigger = self.detector.check(segment, len(r.calibrations))
        if trigger is None:
            p = r.next_position
            r.pending, r.pending_kinds, r.pending_pos = [token], [TEXT], [(p, p, p)]
            return hid
        self._calibrate(r, trigger, token, kinds_row)
        return True

    def _calibrate(self, r: RowState, trigger: Trigger, token: int, kinds_row: torch.Tensor) -> None:
        keep_new = trigger.rollback == 0
        if not keep_new:
            # The newest token is not in the cache yet; the older rolled-back ones are: hide them.
            cached = trigger.rollback - 1
            if cached:
                kinds_row[torch.tensor(r.seq_cols[-cached:], device=kinds_row.device)] = HIDDEN
                for seq in (r.seq_ids, r.seq_kinds, r.seq_pos, r.seq_hidden_from, r.seq_cols):
                    del seq[-cached:]
            del r.generated[-trigger.rollback:]
            # Rolled-back tokens are not part of the answer: they count neither toward
            # max_new_tokens nor in the generated-token metrics.
            r.num_generated -= trigger.rollback
        if self.config.reset == "visual" and not r.calibrations:
            # Hidden from everything fed from now on: the new token and the chunk included.
            self._hide_original(r, kinds_row, len(r.seq_ids))
        chunk = [token] if keep_new else []
        if trigger.bridge:
            chunk += self.tokenizer(trigger.bridge, add_special_tokens=False)["input_ids"]
        grids, features = [], []
        for i, (h, w) in enumerate(r.grids):
            ph, pw = pooled_grid(h, w, self.config.pool_kernel)
            chunk += [self.vision_ids[0]] + [self.image_token_id] * (ph * pw) + [self.vision_ids[1]]
            grids.append((ph, pw))
            features.append(self._pooled(r, i))
            r.segments.append((i, self.config.pool_kernel))
        ids = torch.tensor(chunk)
        pos = self.family.positions(ids, self.image_token_id, grids, offset=r.next_position)
        kinds = torch.where(ids == self.image_token_id, COPY, TEXT)
        r.calibrations.append(Calibration(r.num_generated, len(r.generated),
                                          len(chunk) - int(keep_new), trigger.kind, r.sampled))
        r.generated += chunk[int(keep_new):]
        r.segment_start = len(r.generated)
        r.pending, r.pending_kinds = chunk, kinds.tolist()
        r.pending_pos, r.pending_features = [tuple(p) for p in pos.T.tolist()], features

    def _pooled(self, r: RowState, image: int) -> torch.Tensor:
        if image not in r.pooled:
            r.pooled[image] = pool_visual_tokens(r.images[image], *r.grids[image],
                                                 self.config.pool_kernel)
        return r.pooled[image]

    # -- the loop ----------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, questions: list[str], images: list[list[Image.Image]],
            hide_at: list[int | None], prefixes: list[str]) -> list[PVCResult]:
        try:
            return self._run(questions, images, hide_at, prefixes)
        finally:
            if self.probe is not None:
                self.probe.remove()

    def _run(self, questions: list[str], images: list[list[Image.Image]],
             hide_at: list[int | None], prefixes: list[str]) -> list[PVCResult]:
        rows = self._rows(questions, images, hide_at, prefixes)
        done: list[RowState] = []
        cache, kinds, logits = self._prefill(rows)
        vocab = logits.shape[-1]
        seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r.seq_ids, device=self.device).clamp(max=vocab - 1)] = True
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        # Each iteration: pick tokens, then one collective "anyone still decoding?", then exactly
        # one forward on every rank (an idle one where this rank is done), so ZeRO-3's gathers
        # line up across ranks.
        while True:
            calibrated = False
            if rows:
                if self.config.min_new_tokens:
                    young = torch.tensor([r.num_generated < self.config.min_new_tokens for r in rows],
                                         device=self.device)
                    logits[young.nonzero().unsqueeze(1), eos] = float("-inf")
                logits[:, self.never] = float("-inf")
                tokens = next_tokens(logits, seen, self.config, self.generator)
                for b, (r, t) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                    calibrated |= self._accept(r, t, kinds[b])
                seen[torch.arange(len(rows), device=self.device), tokens] = True
                if calibrated:
                    for b, r in enumerate(rows):
                        if len(r.pending) > 1:
                            # A calibrated row's sequence is its clean sequence plus the chunk: a
                            # rolled-back phrase is no longer in it and is not penalized.
                            ids = torch.tensor(r.seq_ids + r.pending, device=self.device)
                            seen[b] = False
                            seen[b, ids.clamp(max=vocab - 1)] = True
                keep = [b for b, r in enumerate(rows) if r.finish is None]
                done += [r for r in rows if r.finish is not None]
                if len(keep) < len(rows):
                    # Finished rows leave the batch: they stop costing attention and matmuls.
                    rows = [rows[b] for b in keep]
                    index = torch.tensor(keep, device=self.device, dtype=torch.long)
                    if rows:
                        cache.batch_select_indices(index)
                        kinds, seen = kinds[index], seen[index]
                        if self.probe is not None:
                            self.probe.select_rows(index)
            if not self._any_active(bool(rows)):
                break
            if not rows:
                self._idle_forward()
            elif calibrated and self.recompute:
                cache, kinds, logits = self._prefill(rows)
            else:
                kinds, logits = self._step(rows, cache, kinds)
        if self.probe is not None and self.probe.num_steps != self.cached_steps:
            raise RuntimeError(
                f"the attention probe recorded {self.probe.num_steps} of {self.cached_steps} decode steps: "
                "its hooks did not see the KV cache (a transformers change in how layers receive it?)"
            )
        return [self._result(r) for r in sorted(done, key=lambda r: r.sample)]

    def _any_active(self, local: bool) -> bool:
        return local if self.sync is None else self.sync(local)

    def _idle_forward(self) -> None:
        """A throwaway one-token forward for a rank whose rows are done while others decode:
        under ZeRO-3 every forward gathers parameters collectively, so all ranks must call it."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        pos = torch.zeros((3, 1, 1), dtype=torch.long, device=self.device)
        self._forward(ids, [], torch.ones_like(ids), pos, DynamicCache(), torch.zeros(1, dtype=torch.long))

    def _result(self, r: RowState) -> PVCResult:
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        attention = self.probe.row_records(r.sample) if self.probe is not None else None
        return PVCResult(r.generated, text, r.calibrations, r.num_generated, r.finish or "length",
                         attention, r.image_hidden_at)


def pvc_generate(
    model: Any,
    processor: Any,
    questions: list[str],
    images: list[list[Image.Image]],
    config: PVCConfig | None = None,
    chat: ChatFormat | None = None,
    recompute: bool = False,
    triggers: Any = None,
    sync: Callable[[bool], bool] | None = None,
    measure_attention: bool = False,
    hide_image_at: list[int | None] | None = None,
    answer_prefixes: list[str] | None = None,
) -> list[PVCResult]:
    """Decode answers to ``questions`` (one list of PIL images each) with PVC.

    ``config.max_calibrations = 0`` gives plain decoding (equal to HF ``generate`` greedy).
    ``recompute=True`` re-prefills the whole sequence at every calibration instead of keeping
    the KV cache: the naive baseline for tests and benchmarks, same tokens, more compute.
    ``triggers`` replaces the trigger policy: any object with ``check(segment, calibrations)``
    (and a ``context`` keyword, the prefix's tokens, with ``answer_prefixes``)
    returning a :class:`~tvc_lightning.pvc.triggers.Trigger` or None (default: the config's).
    ``sync(local_active) -> any_rank_active`` keeps distributed ranks in step: a rank whose rows
    are done runs idle forwards until every rank is done (see ``callbacks.all_ranks_any``).
    ``measure_attention`` fills each result's ``attention`` with the visual-attention shares
    (hooks on the attention layers; no switch to eager attention).
    ``hide_image_at`` (one entry per question; None: never) hides each row's original image from
    its answer token ``s`` on, without re-injecting it (the image-removal experiment): tokens
    ``0..s-1`` are predicted seeing the image, the rest not; 0 hides it from the whole answer
    (the prefill's last position included); ``s`` at or past the answer's end changes nothing.
    With ``recompute=True`` a hide re-prefills the whole sequence under the 4-D visibility mask.
    ``answer_prefixes`` (one per question) force the start of each answer: the text is appended
    to the prompt, and the result, triggers and ``min_gap`` count only what is generated after it.
    """
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} image lists")
    if hide_image_at is None:
        hide_image_at = [None] * len(questions)
    if len(hide_image_at) != len(questions):
        raise ValueError(f"hide_image_at has {len(hide_image_at)} entries for {len(questions)} questions")
    if any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0)
           for s in hide_image_at):
        raise ValueError(f"hide_image_at entries must be None or ints >= 0, got {hide_image_at}")
    if any(not imgs for imgs in images):
        raise ValueError("every question needs at least one image")
    prefixes = [""] * len(questions) if answer_prefixes is None else list(answer_prefixes)
    if len(prefixes) != len(questions):
        raise ValueError(f"answer_prefixes has {len(prefixes)} entries for {len(questions)} questions")
    chat = chat or ChatFormat.for_family(family_of(model))
    decoder = _Decoder(model, processor, config or PVCConfig(), chat, recompute,
                       triggers, sync, measure_attention)
    return decoder.run(questions, images, list(hide_image_at), prefixes)
