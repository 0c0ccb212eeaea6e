"""Tiny random Qwen VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) built offline, for tests, the CPU
demo and benchmarks.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained in memory on a fixed
corpus, with the Qwen VL special tokens and chat template; the image processor is HF's real
``Qwen2VLImageProcessor`` with small pixel limits and the family's patching; the model is a real
HF model of the family (e.g. ``Qwen2VLForConditionalGeneration``: vision tower with the 2x2
merger, M-RoPE language model) with random weights. ``save_tiny(dir, family)`` writes all three as
a local HF checkpoint directory, which the recipes then load exactly as they would load
``Qwen/Qwen2-VL-7B-Instruct`` from disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Qwen2-VL's special tokens, in the order of their real ids (151643...). The tiny vocabulary keeps
# the order, not the ids: code must look ids up through the tokenizer, never hard-code them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template of Qwen2-VL-Instruct (system prompt, images as vision_start/pad/end, im_start
# turns). Written out here so the tiny tokenizer formats conversations exactly like the real one.
_DEFAULT_SYSTEM_TURN = ("{% if loop.first and message['role'] != 'system' %}"
                        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}" + _DEFAULT_SYSTEM_TURN +
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's template, as far as images and text go: no system turn unless one is given.
CHAT_TEMPLATE_NO_DEFAULT_SYSTEM = CHAT_TEMPLATE.replace(_DEFAULT_SYSTEM_TURN, "")

# A fixed corpus so the BPE merges (and therefore every token id) are identical on every machine.
_CORPUS = [
    "You are a helpful assistant. Please answer the question using a long-chain reasoning style "
    "and think step by step.",
    "How many circles are in the image? Which shape is larger, the red one or the blue one?",
    "Let me count the shapes. Wait, let me double-check the image. To be precise, there are 3 "
    "squares, 2 circles and 1 triangle. Hmm, let me verify. Alternatively, compare the areas.",
    "Let me check the image again. Let me look at the figure once more. But wait, the answer is",
    "Answer: A B C D E 0 1 2 3 4 5 6 7 8 9 10 11 12 red green blue yellow purple orange square "
    "circle triangle left right top bottom larger smaller same count total therefore so the",
    "Step 1: Step 2: Step 3: First, Next, Finally, The final answer is \\boxed{3}.",
]


def long_cot_corpus(paragraphs: int = 400, seed: int = 0) -> list[str]:
    """Generated long-CoT text shaped like real chains: paragraphs split by blank lines, decimals,
    reflection phrases opening sentences and bridging prompts closing paragraphs.

    Trained on it, a byte-level BPE learns the merges that a real Qwen tokenizer has and that
    character-level reasoning about text gets wrong: ``'.\n\n'`` (a paragraph's last period with
    its newlines), ``' Wait'``, ``'Wait'`` after a newline, ``'.'`` between digits.
    """
    import random

    from tvc_lightning.data.dvr import DEFAULT_BRIDGES, DEFAULT_REFLECTION_PHRASES

    rng = random.Random(seed)
    nouns = ["circle", "square", "triangle", "bar", "angle", "side", "segment", "area", "point", "label"]
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]

    def sentence() -> str:
        n, m = rng.randint(0, 99), rng.randint(0, 9)
        return rng.choice([
            f"The {rng.choice(colours)} {rng.choice(nouns)} measures {n}.{m} cm.",
            f"So there are {n} {rng.choice(nouns)}s in total.",
            f"Step {rng.randint(1, 9)}: the {rng.choice(nouns)} is {n}.{m} units long.",
            f"Therefore the answer is {n}.",
            f"Next, compare the {rng.choice(colours)} one with the {rng.choice(nouns)}.",
        ])

    text = []
    for _ in range(paragraphs):
        parts = [sentence() for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.4:
            reflection = f"{rng.choice(DEFAULT_REFLECTION_PHRASES)}, {sentence()}"
            parts.insert(rng.randint(1, len(parts)), reflection)
        if rng.random() < 0.3:
            parts.append(rng.choice(DEFAULT_BRIDGES))
        text.append(" ".join(parts))
    return ["\n\n".join(text[i:i + 8]) for i in range(0, len(text), 8)]


def build_bpe_tokenizer(vocab_size: int = 1200) -> Any:
    """The tiny tokenizer's construction trained on :func:`long_cot_corpus`: real BPE merges of
    long chains (``'.\n\n'``, ``' Wait'``), for tests of text-level logic such as PVC triggers."""
    return build_tiny_tokenizer(vocab_size, corpus=long_cot_corpus())


def build_tiny_tokenizer(vocab_size: int = 640, corpus: list[str] | None = None) -> Any:
    """A Qwen2-style byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template,
    trained on a small fixed corpus (or on ``corpus``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's pre-tokenization: split words/numbers/punctuation with its regex, then bytes.
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 224 * 224,
                         family: str = "qwen2_vl") -> Any:
    """HF's real Qwen VL image processor around the tiny tokenizer, small pixel limits, with the
    patching and normalization of ``family`` (Qwen3-VL: 16-pixel patches)."""
    from transformers import Qwen2VLImageProcessorPil

    from tvc_lightning.families import family_named
    from tvc_lightning.hf import ImageOnlyQwenVLProcessor

    adapter = family_named(family, "family")
    settings = dict(adapter.image_processor_settings)
    # Pixel limits are in units of a merged token's area: keep the same token counts per family.
    scale = (settings.get("patch_size", 14) / 14) ** 2
    tokenizer = build_tiny_tokenizer()
    template = CHAT_TEMPLATE if adapter.default_system_prompt else CHAT_TEMPLATE_NO_DEFAULT_SYSTEM
    tokenizer.chat_template = template
    image_processor = Qwen2VLImageProcessorPil(min_pixels=round(min_pixels * scale),
                                               max_pixels=round(max_pixels * scale), **settings)
    return ImageOnlyQwenVLProcessor(image_processor, tokenizer, chat_template=template,
                                     family=adapter)


def tiny_config(
    tokenizer: Any,
    family: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 32,
    vision_heads: int = 2,
    tie_word_embeddings: bool = False,
) -> Any:
    """A small config of ``family`` (2 layers by default) whose special-token ids match ``tokenizer``.

    Sizes are arguments so benchmarks can build real-shaped random models (e.g. Qwen2-VL-2B:
    hidden 1536, 28 layers, 12/2 heads, intermediate 8960, vocab 151936, vision 32 x 1280).
    """
    from tvc_lightning.families import family_named

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return family_named(family, "family").tiny_config(
        ids, max(vocab_size or 0, len(tokenizer)), hidden_size, num_layers, num_heads,
        num_kv_heads, intermediate_size, vision_depth, vision_dim, vision_heads,
        tie_word_embeddings)


def tiny_model(family: str = "qwen2_vl", seed: int = 0, attn_implementation: str = "sdpa",
               **sizes: Any) -> tuple[Any, Any]:
    """Build a tiny random model of ``family`` (fp32, eval mode) and its processor, offline.

    ``family`` is a ``model_type``: ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``. Returns
    ``(model, processor)``; same seed, same weights. ``sizes`` go to :func:`tiny_config`. Save
    both with :func:`save_tiny` to get a local checkpoint directory.
    """
    from tvc_lightning.families import family_named

    processor = build_tiny_processor(family=family)
    config = tiny_config(processor.tokenizer, family, **sizes)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = family_named(family, "family").model_class()(config).eval()
    tok = processor.tokenizer
    # As the Instruct checkpoints' generation_config.json: a turn ends at <|im_end|> or <|endoftext|>.
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def tiny_qwen2vl(seed: int = 0, attn_implementation: str = "sdpa", **sizes: Any) -> tuple[Any, Any]:
    """:func:`tiny_model` of Qwen2-VL."""
    return tiny_model("qwen2_vl", seed, attn_implementation, **sizes)


def save_tiny(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0, **sizes: Any) -> Path:
    """Write a tiny random checkpoint of ``family`` (weights, config, processor, tokenizer) to
    ``out_dir``.

    ``sizes`` go to :func:`tiny_config` (e.g. ``tie_word_embeddings=True``, as Qwen2-VL-2B).
    Idempotent: an existing complete checkpoint is left as it is.
    """
    out = Path(out_dir)
    marker = out / "tiny_qwen2vl.json"
    if marker.exists():
        found = json.loads(marker.read_text()).get("family", "qwen2_vl")
        if found != family:
            raise FileExistsError(f"{out} holds a tiny {found} checkpoint, not {family}: remove it "
                                  "or choose another directory")
        return out
    model, processor = tiny_model(family, seed=seed, **sizes)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    marker.write_text(json.dumps({"family": family, "seed": seed, **sizes}))
    return out


def save_tiny_qwen2vl(out_dir: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """:func:`save_tiny` of Qwen2-VL."""
    return save_tiny(out_dir, "qwen2_vl", seed, **sizes)


def main() -> None:
    import argparse

    from tvc_lightning.families import FAMILIES

    parser = argparse.ArgumentParser(description="Write a tiny random Qwen VL checkpoint directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES),
                        help="model family (config.json model_type)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny(args.out_dir, args.family, seed=args.seed))


if __name__ == "__main__":
    main()
