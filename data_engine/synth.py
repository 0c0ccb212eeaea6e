"""Synthetic visual-reasoning shards: coloured shapes, questions about them, step-by-step chains.

No downloads: each sample is a scene of circles, squares and triangles drawn with PIL, a question
whose answer depends on the picture (count a kind, count all, compare two colours, colour of the
largest shape), and a response that enumerates the shapes, keeps tallies, sometimes reflects
("Wait, let me double-check the count.") and ends with ``The final answer is \\boxed{X}.``

Every sample comes from its own generator seeded by ``(seed, split, index)``, so a sample does not
depend on how many others are generated and the output is identical for the same seed.

``--task late_lookup`` writes another task instead (:mod:`data_engine.synth_late`): a grid of
coloured cells whose queried cell the chain names only after a long arithmetic detour.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from data_engine.shards import ShardWriter, encode_image
from tvc_lightning.data.schema import SampleRecord

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (228, 228, 228),
    "cream": (250, 244, 225),
}
KINDS = ("circle", "square", "triangle")
SAME = "the same number"  # third choice of the colour-comparison question
LARGEST_MARGIN = 1.4  # the largest shape must beat the runner-up's area by this factor
REFLECTIONS = (
    "Wait, let me double-check the count.",
    "Hmm, let me verify.",
    "Let me re-examine the figure.",
    "But wait, I should make sure I did not miss anything.",
    "Let me double-check by looking at the image again.",
)
TASKS = ("shapes", "late_lookup")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


@dataclass(frozen=True)
class Shape:
    """One shape; ``(x0, y0)`` is the top-left of its ``size``×``size`` bounding box."""

    kind: str
    colour: str
    x0: int
    y0: int
    size: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1

    @property
    def area(self) -> float:
        if self.kind == "circle":
            return math.pi * self.size**2 / 4
        return self.size**2 if self.kind == "square" else self.size**2 / 2

    @property
    def probe(self) -> tuple[int, int]:
        """A pixel surely inside the drawn shape (for triangles: 2/3 down, where it is wide)."""
        cx = self.x0 + self.size // 2
        return cx, self.y0 + (2 * self.size // 3 if self.kind == "triangle" else self.size // 2)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Question:
    kind: str  # count_kind | total | compare | largest
    text: str
    answer: str
    answer_type: str
    choices: list[str] | None
    subject: tuple[str, ...]  # the kind counted, or the two colours compared


def make_scene(rng: random.Random, image_size: int = 224) -> Scene:
    """A random scene: a few shapes on a plain background, not overlapping so counts are visible."""
    lo = max(48, image_size * 2 // 7)
    width = rng.randint(lo, image_size)
    height = min(image_size, max(lo, round(width * rng.uniform(0.75, 1.33))))
    m = min(width, height)
    max_shapes = min(8, max(3, width * height // 2500))
    shapes: list[Shape] = []
    for _ in range(rng.randint(2, max_shapes)):
        for _attempt in range(40):
            size = rng.randint(max(8, m // 9), max(9, m // 3))
            x0 = rng.randint(1, width - size - 1)
            y0 = rng.randint(1, height - size - 1)
            shape = Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), x0, y0, size)
            if not any(_overlap(shape, other, gap=3) for other in shapes):
                shapes.append(shape)
                break
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), tuple(shapes))


def _overlap(a: Shape, b: Shape, gap: int) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return not (ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (no anti-aliasing, so every shape pixel has exactly its colour)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0 + s.size // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def count_kind(scene: Scene, kind: str) -> int:
    return sum(s.kind == kind for s in scene.shapes)


def count_colour(scene: Scene, colour: str) -> int:
    return sum(s.colour == colour for s in scene.shapes)


def largest_shape(scene: Scene) -> Shape | None:
    """The largest shape by area, or ``None`` if it is not clearly (``LARGEST_MARGIN``) largest."""
    ranked = sorted(scene.shapes, key=lambda s: s.area, reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0].area < LARGEST_MARGIN * ranked[1].area):
        return None
    return ranked[0]


def make_question(scene: Scene, rng: random.Random) -> Question:
    """Pick a question type the scene supports and compute its answer from the scene."""
    kinds = ["count_kind", "total", "compare"] + (["largest"] if largest_shape(scene) else [])
    qtype = rng.choice(kinds)
    if qtype == "count_kind":
        kind = rng.choice(KINDS)
        text = f"How many {kind}s are in the image?"
        return Question(qtype, text, str(count_kind(scene, kind)), "integer", None, (kind,))
    if qtype == "total":
        text = "How many shapes are there in the image in total?"
        return Question(qtype, text, str(len(scene.shapes)), "integer", None, ())
    if qtype == "compare":
        present = sorted({s.colour for s in scene.shapes})
        # Mostly compare colours that appear, so the tallies are interesting.
        pool = present if len(present) >= 2 and rng.random() < 0.8 else list(COLOURS)
        a, b = rng.sample(pool, 2)
        na, nb = count_colour(scene, a), count_colour(scene, b)
        choices = [a, b, SAME]
        answer = a if na > nb else b if nb > na else SAME
        text = (
            f"Are there more {a} shapes or {b} shapes?\n"
            f"Choices: (A) {a} (B) {b} (C) {SAME}"
        )
        return Question(qtype, text, answer, "text", choices, (a, b))
    big = largest_shape(scene)
    assert big is not None
    return Question("largest", "What colour is the largest shape?", big.colour, "text", None, ())


def _where(scene: Scene, s: Shape) -> str:
    cx, cy = s.x0 + s.size / 2, s.y0 + s.size / 2
    col = ("left", "", "right")[min(2, int(3 * cx / scene.width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / scene.height))]
    if row and col:
        return f"in the {row}-{col} corner"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "near the centre"


def _describe(scene: Scene, s: Shape) -> str:
    rel = s.size / min(scene.width, scene.height)
    adjective = "small" if rel < 0.17 else "medium-sized" if rel < 0.25 else "large"
    return f"a {adjective} {s.colour} {s.kind} {_where(scene, s)}"


def _scan_order(s: Shape) -> tuple[int, int]:
    return s.x0, s.y0  # left to right, as the chains say they scan


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tally_sentence(q: Question, s: Shape, tally: dict[str, float], best: Shape | None) -> str:
    """Update the running tally for ``q`` with shape ``s`` and say what changed."""
    if q.kind == "count_kind":
        if s.kind == q.subject[0]:
            tally["n"] += 1
            return f"That is a {s.kind}, so my count of {s.kind}s is now {int(tally['n'])}."
        return f"That is not a {q.subject[0]}, so the count stays at {int(tally['n'])}."
    if q.kind == "total":
        tally["n"] += 1
        return f"That makes {_plural(int(tally['n']), 'shape')} so far."
    if q.kind == "compare":
        a, b = q.subject
        if s.colour in (a, b):
            tally[s.colour] += 1
            counts = f"{a} {int(tally[a])}, {b} {int(tally[b])}"
            return f"It is {s.colour}, so the tally is now {counts}."
        return f"It is {s.colour}, which is neither {a} nor {b}, so the tallies do not change."
    if best is None or s.area > best.area:
        if best is None:
            return "It is the largest so far, since it is the first one."
        return f"It is bigger than the {best.colour} {best.kind}, so it is now the largest so far."
    return f"It is smaller than the {best.colour} {best.kind}, which stays the largest so far."


def _verify_sentence(scene: Scene, q: Question, again: bool = True) -> str:
    """A count that gives the answer; ``again`` phrases it as a second look confirming it."""
    ag = " again" if again else ""
    if q.kind == "count_kind":
        hits = sorted((s for s in scene.shapes if s.kind == q.subject[0]), key=_scan_order)
        if not hits:
            return f"Looking over the whole image{ag}, I do not see any {q.subject[0]}."
        listed = _join([f"the {s.colour} one {_where(scene, s)}" for s in hits])
        return f"Going over the image{ag}, the {q.subject[0]}s are {listed}; that is {len(hits)}."
    if q.kind == "total":
        parts = [_plural(count_kind(scene, k), k) for k in KINDS]
        return (
            f"Counting by type{' instead' if again else ''}, I get {parts[0]}, {parts[1]} and "
            f"{parts[2]}, "
            f"which adds up to {len(scene.shapes)}."
        )
    if q.kind == "compare":
        a, b = q.subject
        return (
            f"Counting the {a} shapes{ag} gives {count_colour(scene, a)}, "
            f"and the {b} shapes{ag} give {count_colour(scene, b)}."
        )
    ranked = sorted(scene.shapes, key=lambda s: s.area, reverse=True)
    big = ranked[0]
    if len(ranked) == 1:
        return f"There is only one shape, the {big.colour} {big.kind}, so it is the largest."
    return (
        f"The {big.colour} {big.kind} is clearly bigger than the next largest shape, "
        f"the {ranked[1].colour} {ranked[1].kind}."
    )


def _conclusion(q: Question) -> str:
    if q.kind == "count_kind":
        n = int(q.answer)
        return f"So there {'is' if n == 1 else 'are'} {_plural(n, q.subject[0])} in the image."
    if q.kind == "total":
        return f"So the image contains {_plural(int(q.answer), 'shape')} in total."
    if q.kind == "compare":
        if q.answer == SAME:
            return f"So there are equally many {q.subject[0]} and {q.subject[1]} shapes."
        return f"So there are more {q.answer} shapes."
    return f"So the largest shape is {q.answer}."


def make_response(scene: Scene, q: Question, rng: random.Random) -> str:
    """A step-by-step chain whose length varies (short, medium, long) and that may reflect."""
    style = rng.choices(("short", "medium", "long"), weights=(3, 3, 4))[0]
    order = sorted(scene.shapes, key=_scan_order)
    out: list[str] = []
    bg = scene.background
    if style == "short":
        out.append(f"I see {_plural(len(order), 'shape')} on a {bg} background.")
        out.append(_verify_sentence(scene, q, again=False))
    else:
        out.append(f"Let me look at the image carefully. It shows coloured shapes on a {bg} "
                   "background.")
        if style == "medium":
            listed = _join([_describe(scene, s) for s in order])
            out.append(f"From left to right I can see {listed}.")
        else:
            out.append("To answer this, I will go through the shapes one at a time from left to "
                       "right and keep a running tally.")
            tally: dict[str, float] = {"n": 0, **{c: 0 for c in COLOURS}}
            best: Shape | None = None
            for i, s in enumerate(order):
                ordinal = _ORDINALS[i] if i < len(_ORDINALS) else f"number {i + 1}"
                out.append(f"The {ordinal} shape is {_describe(scene, s)}.")
                out.append(_tally_sentence(q, s, tally, best))
                if best is None or s.area > best.area:
                    best = s
            out.append(f"That was the last shape, {_plural(len(order), 'shape')} in all.")
        if rng.random() < 0.7:
            out.append(rng.choice(REFLECTIONS))
        # A medium chain only listed the shapes, so this is its first count, not a re-check.
        out.append(_verify_sentence(scene, q, again=style == "long"))
        if style == "long" and rng.random() < 0.5:
            out.append(rng.choice(REFLECTIONS))
            out.append("Checking the edges and corners of the image, there are no other shapes "
                       "hidden there, so my tally stands.")
    if style == "short" and rng.random() < 0.3:
        out.insert(1, rng.choice(REFLECTIONS))
    out.append(_conclusion(q))
    out.append(f"The final answer is \\boxed{{{q.answer}}}.")
    return " ".join(out)


def make_sample(
    seed: int, split: str, index: int, image_size: int = 224
) -> tuple[str, SampleRecord, Image.Image, Scene, str]:
    """Sample ``index`` of ``split``: ``(key, record, image, scene, image_format)``."""
    rng = random.Random(f"{seed}:{split}:{index}")  # str seeds hash stably across runs
    scene = make_scene(rng, image_size)
    q = make_question(scene, rng)
    key = f"synth-{split}-{index:06d}"
    record = SampleRecord(
        id=key,
        question=q.text,
        response=make_response(scene, q, rng),
        answer=q.answer,
        answer_type=q.answer_type,
        choices=q.choices,
        precision=None,
        source="synth",
    )
    image_format = "jpg" if rng.random() < 0.25 else "png"  # exercise both decoders downstream
    return key, record, render(scene), scene, image_format


def write_split(
    out_dir: Path, split: str, num: int, seed: int, per_shard: int, image_size: int,
    overwrite: bool = False,
) -> list[Path]:
    """Generate ``num`` samples of ``split`` into ``out_dir/split/synth-NNNNNN.tar``."""
    with ShardWriter(out_dir / split, "synth", maxcount=per_shard, overwrite=overwrite) as w:
        for i in range(num):
            key, record, image, _, fmt = make_sample(seed, split, i, image_size)
            # Encode here so the per-sample format choice is honoured (the writer has one default).
            w.write(key, record, [encode_image(image, fmt)[1]])
    return w.shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory; shards go to OUT/train and OUT/val")
    parser.add_argument("--num-train", type=int, default=256, help="training samples")
    parser.add_argument("--num-val", type=int, default=32, help="validation samples")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--samples-per-shard", type=int, default=32, help="shard size bound")
    parser.add_argument("--image-size", type=int, default=224,
                        help="largest image side in px (the smallest is about 2/7 of it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards an earlier run left in OUT")
    parser.add_argument("--task", choices=TASKS, default="shapes",
                        help="shapes: counting/comparing coloured shapes; late_lookup: a grid "
                             "cell's colour, named only after a long arithmetic detour "
                             "(data_engine/synth_late.py)")
    parser.add_argument("--detour-steps", type=int, default=10,
                        help="late_lookup: typical number of arithmetic steps (or copied words) "
                             "before the lookup (each sample draws from about 0.75x to 1.25x of it)")
    parser.add_argument("--detour", choices=("arithmetic", "copy", "repeat", "survey", "uniform"),
                        default="arithmetic",
                        help="late_lookup: the cell is named through arithmetic; or named in the "
                             "question (a 3 x 3 grid) and preceded by copying a word list out "
                             "(copy) or by restating it N times (repeat; survey: then every cell "
                             "is read before the target's; uniform: as repeat, all cells one "
                             "colour)")


def run(args: argparse.Namespace) -> int:
    problems = [
        f"{flag} must be at least {low}"
        for flag, value, low in (
            ("--image-size", args.image_size, 48),
            ("--samples-per-shard", args.samples_per_shard, 1),
            ("--num-train", args.num_train, 0),
            ("--num-val", args.num_val, 0),
            ("--detour-steps", args.detour_steps, 1),
        )
        if value < low
    ]
    if problems:
        print(f"synth: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    counts = {}
    for split, num in (("train", args.num_train), ("val", args.num_val)):
        if args.task == "late_lookup":
            from data_engine import synth_late

            shards = synth_late.write_split(
                args.out, split, num, args.seed, args.samples_per_shard, args.image_size,
                detour_steps=args.detour_steps, overwrite=args.overwrite, detour=args.detour,
            )
        else:
            shards = write_split(
                args.out, split, num, args.seed, args.samples_per_shard, args.image_size,
                overwrite=args.overwrite,
            )
        counts[split] = (num, len(shards))
    print(
        f"synth: wrote {counts['train'][0]} train samples ({counts['train'][1]} shard(s)) and "
        f"{counts['val'][0]} val samples ({counts['val'][1]} shard(s)) to {args.out} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0
