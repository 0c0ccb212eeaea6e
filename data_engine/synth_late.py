"""Synthetic ``late_lookup`` task: the answer needs the image only after a long detour.

Each sample is a grid of coloured cells (rows and columns numbered in the image) and a question
that names the cell to read only through arithmetic: start from ``x0``, apply ``x -> (x * m + c)
mod p`` a number of times, and turn the result into a row and a column. The chain of thought
works the arithmetic out step by step (hundreds of tokens, now and then double-checking a
product), names the cell, and only then looks at the image: "The cell in row 3, column 2 is
teal." So the decisive visual read comes late in the response, where visual forgetting
(method.md §1) bites.

The answer cannot be guessed from text alone: every cell's colour is drawn uniformly and
independently from :data:`PALETTE` (10 colours), the question and the chain before the lookup
sentence name no colour except the fixed list of allowed answers, and the queried cell depends on
the arithmetic only. The text-only majority baseline is therefore about 1/10.

``detour="copy"`` is the variant whose detour a small model can learn: the question names the
cell directly and lists words that the chain copies out one by one before the lookup ("Item 7 is
square."). The grid is a fixed 3 x 3 with no margin, so at the evidence run's 168 px each cell is
exactly 2 x 2 merged visual tokens, i.e. one token of a copy pooled with kernel 2: the pooled copy
still shows every cell. Its one reflection sentence, "Let me check that cell in the image.", opens the
lookup, so DVR's injection and PVC's reflection trigger both put the copy right before it.

``detour="repeat"`` keeps every text dependency short: the question names the cell and a number
N, and the chain restates the target N times, each sentence copying it from the one before and
counting on ("Check 7 of 32: row 2, column 3."), then looks it up on the same aligned 3 x 3 grid
with the same reflection sentence. The only long-range dependency left is the image itself.
``detour="survey"`` is ``repeat`` whose lookup reads every cell in order ("The cell in row 1,
column 1 is red. ...") before naming the target's colour: nine visual reads per sample instead of
one, for a model that has to learn reading the image from a few thousand samples.
``detour="uniform"`` is ``repeat`` (same question, chain and lengths) on a grid whose nine cells
share one colour: reading the target needs no position in the image, only a look at it, so the
one thing left to learn late in the chain is to look back at the image.

Every sample comes from its own generator seeded by ``(seed, split, index)`` (deterministic,
independent of how many are generated); images are PNG, drawn with PIL without anti-aliasing
inside the cells, so every cell pixel has exactly its palette colour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_engine.shards import ShardWriter, encode_image
from tvc_lightning.data.schema import SampleRecord

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (130, 50, 180),
    "pink": (245, 150, 200),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}
BACKGROUND = (255, 255, 255)
LINE = (150, 150, 150)
LOOKUP = "The cell in row {row}, column {col} is {colour}."
CHECKS = (
    "Wait, let me double-check that multiplication.",
    "Hmm, let me verify that product.",
)
MODULI = (97, 101, 103, 107, 109, 113, 127)
DETOURS = ("arithmetic", "copy", "repeat", "survey", "uniform")
# Words the copy detour lists: no colour, each a word of the tiny tokenizer's corpus.
WORDS = ("circle", "square", "triangle", "bar", "angle", "side", "segment", "area", "point",
         "label", "count", "total", "left", "right", "top", "bottom", "shape", "step")


@dataclass(frozen=True)
class Grid:
    """``colours[r][c]`` of a ``rows`` x ``cols`` grid (0-based); cells are ``cell`` px squares
    whose top-left corner is ``(left + c * cell, top + r * cell)``."""

    rows: int
    cols: int
    cell: int
    left: int
    top: int
    colours: tuple[tuple[str, ...], ...]

    def centre(self, row: int, col: int) -> tuple[int, int]:
        """The pixel at the centre of cell ``(row, col)`` (0-based)."""
        return self.left + col * self.cell + self.cell // 2, self.top + row * self.cell + self.cell // 2


@dataclass(frozen=True)
class Detour:
    """The arithmetic that names the cell: ``x -> (x * mul + add) mod mod``, ``steps`` times."""

    x0: int
    mul: int
    add: int
    mod: int
    steps: int

    def values(self) -> list[int]:
        xs = [self.x0]
        for _ in range(self.steps):
            xs.append((xs[-1] * self.mul + self.add) % self.mod)
        return xs


def make_grid(rng: random.Random, image_size: int) -> Grid:
    """A 3-5 x 3-5 grid filling an ``image_size`` square, labels in a margin on the top and left."""
    rows, cols = rng.randint(3, 5), rng.randint(3, 5)
    margin = max(10, image_size // 12)
    cell = max(6, (image_size - margin - 2) // max(rows, cols))
    colours = tuple(tuple(rng.choice(list(PALETTE)) for _ in range(cols)) for _ in range(rows))
    return Grid(rows, cols, cell, margin, margin, colours)


def make_aligned_grid(rng: random.Random, image_size: int, uniform: bool = False) -> Grid:
    """A 3 x 3 grid filling an ``image_size`` square with no margin (no numbers drawn); with
    ``uniform`` every cell has the same (random) colour."""
    if uniform:
        colour = rng.choice(list(PALETTE))
        colours = tuple(tuple(colour for _ in range(3)) for _ in range(3))
    else:
        colours = tuple(tuple(rng.choice(list(PALETTE)) for _ in range(3)) for _ in range(3))
    return Grid(3, 3, image_size // 3, 0, 0, colours)


def render(grid: Grid) -> Image.Image:
    """Draw the grid: filled cells, grey lines between them, 1-based row/column numbers in the
    margin (when there is one)."""
    border = 2 if grid.left else 0  # an aligned grid is exactly its cells
    width = grid.left + grid.cols * grid.cell + border
    height = grid.top + grid.rows * grid.cell + border
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for r in range(grid.rows):
        for c in range(grid.cols):
            x0, y0 = grid.left + c * grid.cell, grid.top + r * grid.cell
            draw.rectangle((x0, y0, x0 + grid.cell - 1, y0 + grid.cell - 1),
                           fill=PALETTE[grid.colours[r][c]], outline=LINE)
    if not grid.left:
        return image
    for r in range(grid.rows):
        draw.text((1, grid.top + r * grid.cell + grid.cell // 2 - 5), str(r + 1), fill=(0, 0, 0),
                  font=font)
    for c in range(grid.cols):
        draw.text((grid.left + c * grid.cell + grid.cell // 2 - 3, 0), str(c + 1), fill=(0, 0, 0),
                  font=font)
    return image


def make_detour(rng: random.Random, steps: int) -> Detour:
    low = max(1, steps - steps // 4)
    return Detour(x0=rng.randint(2, 96), mul=rng.randint(12, 89), add=rng.randint(3, 60),
                  mod=rng.choice(MODULI), steps=rng.randint(low, steps + steps // 4))


def cell_of(detour: Detour, grid: Grid) -> tuple[int, int]:
    """The queried cell, 0-based: row ``x mod rows``, column ``(x div rows) mod cols``."""
    x = detour.values()[-1]
    return x % grid.rows, (x // grid.rows) % grid.cols


def question_text(detour: Detour, grid: Grid) -> str:
    answers = ", ".join(PALETTE)
    return (
        f"The image shows a grid of coloured cells with {grid.rows} rows, numbered 1 to "
        f"{grid.rows} from the top, and {grid.cols} columns, numbered 1 to {grid.cols} from the "
        f"left. Start with x = {detour.x0}. Repeat {detour.steps} times: multiply x by "
        f"{detour.mul}, add {detour.add}, and replace x by the remainder of the result divided by "
        f"{detour.mod}. Then the row is (x mod {grid.rows}) + 1 and the column is "
        f"((x div {grid.rows}) mod {grid.cols}) + 1, where div is whole-number division. What "
        f"colour is the cell in that row and column? Answer with one of: {answers}."
    )


def _times(x: int, m: int) -> str:
    """A multiplication written out by tens and units, as a careful chain would."""
    tens, units = m - m % 10, m % 10
    if not units:
        return f"{x} times {m} is {x * m}."
    return (f"{x} times {tens} is {x * tens}, and {x} times {units} is {x * units}, so {x} times "
            f"{m} is {x * tens} plus {x * units}, which is {x * m}.")


def make_response(detour: Detour, grid: Grid, rng: random.Random) -> str:
    """The chain: arithmetic first (no colour named), the lookup and the answer last."""
    out = [
        "I need the colour of one cell of the grid, but the question names the cell only through "
        "the arithmetic, so I will work that out first and read the image at the end.",
        f"I start with x = {detour.x0}.",
    ]
    xs = detour.values()
    for k, (x, nxt) in enumerate(zip(xs, xs[1:], strict=False), start=1):
        product, total = x * detour.mul, x * detour.mul + detour.add
        out.append(f"Step {k}: {_times(x, detour.mul)}")
        if rng.random() < 0.15:
            out.append(f"{rng.choice(CHECKS)} {x} times {detour.mul} is indeed {product}.")
        out.append(f"Adding {detour.add} gives {total}. Dividing {total} by {detour.mod} gives "
                   f"{total // detour.mod} with remainder {nxt}, so x is now {nxt}.")
    x = xs[-1]
    row, col = cell_of(detour, grid)
    out.append(
        f"After {detour.steps} steps, x = {x}. The row is ({x} mod {grid.rows}) + 1 = "
        f"{x % grid.rows} + 1 = {row + 1}. Whole-number division gives {x} div {grid.rows} = "
        f"{x // grid.rows}, and ({x // grid.rows} mod {grid.cols}) + 1 = {col + 1}, so the column "
        f"is {col + 1}."
    )
    out.append(f"So I need the cell in row {row + 1}, column {col + 1}. Let me look at the image "
               "again to read that cell.")
    colour = grid.colours[row][col]
    out.append(LOOKUP.format(row=row + 1, col=col + 1, colour=colour))
    out.append(f"The final answer is \\boxed{{{colour}}}.")
    return " ".join(out)


def copy_question(words: list[str], grid: Grid, row: int, col: int) -> str:
    answers = ", ".join(PALETTE)
    return (
        f"The image shows a grid of coloured cells with {grid.rows} rows, numbered 1 to "
        f"{grid.rows} from the top, and {grid.cols} columns, numbered 1 to {grid.cols} from the "
        f"left. Here is a list of {len(words)} words: {', '.join(words)}. First write the list out "
        f"as numbered items, then tell me the colour of the cell in row {row + 1}, column "
        f"{col + 1}. Answer with one of: {answers}."
    )


def copy_response(words: list[str], grid: Grid, row: int, col: int) -> str:
    """The chain: the list copied item by item (no colour named), the lookup and answer last."""
    out = ["I will first write the list out, then read the cell from the image."]
    out += [f"Item {k} is {w}." for k, w in enumerate(words, start=1)]
    colour = grid.colours[row][col]
    out += [f"That is the whole list. So I need the cell in row {row + 1}, column {col + 1}.",
            "Let me check that cell in the image.", LOOKUP.format(row=row + 1, col=col + 1, colour=colour),
            f"The final answer is \\boxed{{{colour}}}."]
    return " ".join(out)


def repeat_question(checks: int, grid: Grid, row: int, col: int) -> str:
    answers = ", ".join(PALETTE)
    return (
        f"The image shows a grid of coloured cells with {grid.rows} rows, numbered 1 to "
        f"{grid.rows} from the top, and {grid.cols} columns, numbered 1 to {grid.cols} from the "
        f"left. The target is the cell in row {row + 1}, column {col + 1}. Restate the target "
        f"{checks} times, then tell me the colour of the target cell. Answer with one of: "
        f"{answers}."
    )


def repeat_response(checks: int, grid: Grid, row: int, col: int, survey: bool = False) -> str:
    """The chain: the target restated ``checks`` times (no colour named), the lookup last (with
    ``survey``: every cell read in order, then the target's colour)."""
    target = f"row {row + 1}, column {col + 1}"
    out = [f"I will restate the target {checks} times, then read the cell from the image."]
    out += [f"Check {k} of {checks}: {target}." for k in range(1, checks + 1)]
    colour = grid.colours[row][col]
    out += [f"That was the last check. So I need the cell in {target}.",
            "Let me check that cell in the image."]
    if survey:
        out += [LOOKUP.format(row=r + 1, col=c + 1, colour=grid.colours[r][c])
                for r in range(grid.rows) for c in range(grid.cols)]
        out.append(f"So the target cell, in {target}, is {colour}.")
    else:
        out.append(LOOKUP.format(row=row + 1, col=col + 1, colour=colour))
    out.append(f"The final answer is \\boxed{{{colour}}}.")
    return " ".join(out)


def make_sample(seed: int, split: str, index: int, image_size: int = 224,
                detour_steps: int = 10, detour: str = "arithmetic",
                ) -> tuple[str, SampleRecord, Image.Image, Grid, Detour | list[str]]:
    """Sample ``index`` of ``split``: ``(key, record, image, grid, detour)``; the detour is the
    arithmetic, the list of words copied (``copy``) or ``[N]`` (``repeat``, ``survey``,
    ``uniform``)."""
    if detour not in DETOURS:
        raise ValueError(f"detour must be one of {DETOURS}, got {detour!r}")
    rng = random.Random(f"late:{seed}:{split}:{index}" + ("" if detour == "arithmetic" else f":{detour}"))
    key = f"late-{split}-{index:06d}"
    if detour != "arithmetic":
        grid = make_aligned_grid(rng, image_size, uniform=detour == "uniform")
        row, col = rng.randrange(3), rng.randrange(3)
        low = max(1, detour_steps - detour_steps // 4)
        n = rng.randint(low, detour_steps + detour_steps // 4)
        if detour == "copy":
            words = [rng.choice(WORDS) for _ in range(n)]
            question, response, what = (copy_question(words, grid, row, col),
                                        copy_response(words, grid, row, col), words)
        else:
            question, response, what = (repeat_question(n, grid, row, col),
                                        repeat_response(n, grid, row, col, detour == "survey"),
                                        [str(n)])
    else:
        grid = make_grid(rng, image_size)
        arithmetic = make_detour(rng, detour_steps)
        row, col = cell_of(arithmetic, grid)
        question, response, what = (question_text(arithmetic, grid),
                                    make_response(arithmetic, grid, rng), arithmetic)
    record = SampleRecord(
        id=key,
        question=question,
        response=response,
        answer=grid.colours[row][col],
        answer_type="text",
        choices=None,
        precision=None,
        source="synth_late",
    )
    return key, record, render(grid), grid, what


def write_split(out_dir: Path, split: str, num: int, seed: int, per_shard: int, image_size: int,
                detour_steps: int = 10, overwrite: bool = False,
                detour: str = "arithmetic") -> list[Path]:
    """Generate ``num`` samples of ``split`` into ``out_dir/split/late-NNNNNN.tar``."""
    with ShardWriter(out_dir / split, "late", maxcount=per_shard, overwrite=overwrite) as w:
        for i in range(num):
            key, record, image, _, _ = make_sample(seed, split, i, image_size, detour_steps, detour)
            w.write(key, record, [encode_image(image, "png")[1]])
    return w.shards
