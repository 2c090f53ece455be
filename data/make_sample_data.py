"""Generate a tiny synthetic multiple-choice VQA dataset in the competition's format.

The real competition ships ``train.csv`` / ``test.csv`` / ``sample_submission.csv``
plus a folder of images.  This script writes a small stand-in with exactly the
same columns so the notebook and ``helpers.py`` can be exercised end to end on
CPU (smoke tests, CI, quick LoRA runs with a tiny random model).

Layout written under ``--out`` (default: this script's folder)::

    train.csv              id, path, question, a, b, c, d, answer, task_type, task_hint
    test.csv               same columns without ``answer``
    sample_submission.csv  id, answer (every answer is "a")
    train/TRAIN_0000.jpg   64x64 RGB JPEG (quality 90), ...
    test/TEST_0000.jpg     ...

Four task types, in roughly equal numbers:

* ``color``    - one big shape in red / green / blue / yellow; name its colour.
* ``shape``    - one big circle / square / triangle / cross in a random colour.
* ``count``    - 1 to 4 small same-coloured objects; how many are there?
* ``color_ko`` - the ``color`` task with the question and options in Korean
                 (exercises non-ASCII text in the CSVs and the tokenizer).

Design choices, and why:

* **Fixed option order per task type.**  A tiny randomly initialised model
  fine-tuned for a few minutes cannot learn to read option texts and bind them
  to letters.  Keeping e.g. ``(a) red (b) green (c) blue (d) yellow`` for every
  colour question makes the answer letter a function of (task type, image)
  alone, which is learnable from pixels; a pipeline that trains correctly
  should therefore clearly beat chance (0.25).
* **Balanced answers.**  Every task type gets each of a/b/c/d equally often
  (within one when the count does not divide by four), so always guessing one
  letter scores about 0.25 and a high validation accuracy really means the
  model looked at the image.
* **Deterministic.**  All randomness comes from ``numpy`` Generators seeded
  from ``--seed`` and the split name, and rows are written in a fixed order, so
  running the script twice gives byte-identical CSVs (and identical JPEGs with
  the same Pillow version).
* **Small and obvious images.**  64x64 pictures, plain light background, big
  saturated shapes and a little position/size jitter and pixel noise: easy for
  a tiny vision tower, while not being pixel-identical copies of each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
JPEG_QUALITY = 90
LETTERS = ("a", "b", "c", "d")

# Four colours far apart in RGB so colour is trivially separable, even after
# JPEG compression; order matches the (fixed) option order of colour tasks.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
}
COLOR_NAMES = tuple(COLORS)
COLOR_NAMES_KO = ("빨간색", "초록색", "파란색", "노란색")

SHAPE_KINDS = ("circle", "square", "triangle", "cross")
# The colour tasks use only the three shapes whose area is similar, so the
# amount of coloured pixels does not vary much with the shape kind.
COLOR_TASK_KINDS = ("circle", "square", "triangle")
COUNT_OPTIONS = ("1", "2", "3", "4")

# Per task type: question, the four options in their FIXED order, and a hint.
TASKS = {
    "color": {
        "question": "What colour is the shape in the image?",
        "options": COLOR_NAMES,
        "hint": "Look at the colour of the shape.",
    },
    "shape": {
        "question": "Which shape is shown in the image?",
        "options": SHAPE_KINDS,
        "hint": "Look at the outline of the shape, not its colour.",
    },
    "count": {
        "question": "How many objects are in the image?",
        "options": COUNT_OPTIONS,
        "hint": "Count the objects.",
    },
    "color_ko": {
        "question": "이미지 속 도형의 색깔은 무엇입니까?",
        "options": COLOR_NAMES_KO,
        "hint": "도형의 색을 보세요.",
    },
}
TASK_TYPES = tuple(TASKS)

# Each split draws from its own random stream (see make_split).
SPLIT_SEED_OFFSET = {"train": 0, "test": 1}


def make_background(rng: np.random.Generator) -> Image.Image:
    """Return a light, slightly tinted background with faint pixel noise."""
    base = rng.integers(228, 248, size=3)
    # Small noise only: enough that no two images are identical, too little to
    # hide the shapes or to make the JPEGs large.
    noise = rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    center: tuple[float, float],
    size: float,
    color: tuple[int, int, int],
) -> None:
    """Draw one filled shape of ``kind`` centred on ``center``, ``size`` px wide."""
    cx, cy = center
    half = size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon(
            [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)],
            fill=color,
        )
    elif kind == "cross":
        # A plus sign: arms a third of the size thick, so it reads as a cross
        # rather than a blob or a square at 64x64.
        arm = size / 6
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=color)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=color)
    else:
        raise ValueError(f"unknown shape kind: {kind!r}")


def draw_big_shape(rng: np.random.Generator, kind: str, color_name: str) -> Image.Image:
    """Image with one big shape, jittered a little in position and size."""
    image = make_background(rng)
    size = float(rng.uniform(34, 46))
    center = (
        IMAGE_SIZE / 2 + float(rng.uniform(-6, 6)),
        IMAGE_SIZE / 2 + float(rng.uniform(-6, 6)),
    )
    draw_shape(ImageDraw.Draw(image), kind, center, size, COLORS[color_name])
    return image


def place_small_objects(rng: np.random.Generator, count: int, size: float) -> list[tuple[float, float]]:
    """Pick ``count`` centres whose objects neither overlap nor touch.

    Uses a 4x4 grid of cells with jitter inside each cell: distinct cells plus
    a bounded jitter guarantee a gap between objects, with no retry loop.
    """
    cell = IMAGE_SIZE / 4
    cells = rng.choice(16, size=count, replace=False)
    max_jitter = (cell - size) / 2 - 1  # keeps >= 2 px between neighbours
    centers = []
    for index in cells:
        row, col = divmod(int(index), 4)
        centers.append(
            (
                (col + 0.5) * cell + float(rng.uniform(-max_jitter, max_jitter)),
                (row + 0.5) * cell + float(rng.uniform(-max_jitter, max_jitter)),
            )
        )
    return centers


def draw_small_objects(rng: np.random.Generator, count: int) -> Image.Image:
    """Image with ``count`` small same-coloured squares or dots."""
    image = make_background(rng)
    draw = ImageDraw.Draw(image)
    # One colour and one kind per image: the task is counting, so nothing else
    # should distinguish the objects.
    color = COLORS[COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]]
    kind = ("square", "circle")[int(rng.integers(2))]
    size = float(rng.uniform(8, 11))
    for center in place_small_objects(rng, count, size):
        draw_shape(draw, kind, center, size, color)
    return image


def draw_task_image(rng: np.random.Generator, task_type: str, label: int) -> Image.Image:
    """Draw the image whose correct option index is ``label`` for ``task_type``."""
    if task_type in ("color", "color_ko"):
        kind = COLOR_TASK_KINDS[int(rng.integers(len(COLOR_TASK_KINDS)))]
        return draw_big_shape(rng, kind, COLOR_NAMES[label])
    if task_type == "shape":
        color_name = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        return draw_big_shape(rng, SHAPE_KINDS[label], color_name)
    if task_type == "count":
        return draw_small_objects(rng, label + 1)
    raise ValueError(f"unknown task type: {task_type!r}")


def balanced_plan(rng: np.random.Generator, n_rows: int) -> list[tuple[str, int]]:
    """Return a shuffled list of (task_type, label) pairs.

    Task types get equal shares of ``n_rows`` (the first ones get one extra
    when it does not divide), and within each task type the labels cycle
    0, 1, 2, 3 so every answer letter appears equally often (within one).
    """
    per_task, extra = divmod(n_rows, len(TASK_TYPES))
    plan = []
    for task_index, task_type in enumerate(TASK_TYPES):
        n_task = per_task + (1 if task_index < extra else 0)
        plan.extend((task_type, i % len(LETTERS)) for i in range(n_task))
    # Shuffle so that neighbouring rows (and any head/tail split of the CSV
    # into train/validation) mix all task types and answers.
    order = rng.permutation(len(plan))
    return [plan[int(i)] for i in order]


def make_row(
    rng: np.random.Generator,
    split: str,
    index: int,
    task_type: str,
    label: int,
    out_dir: Path,
) -> dict[str, str]:
    """Draw and save one image and return its CSV row (answer always included)."""
    row_id = f"{split.upper()}_{index:04d}"
    rel_path = f"{split}/{row_id}.jpg"
    image = draw_task_image(rng, task_type, label)
    image.save(out_dir / rel_path, format="JPEG", quality=JPEG_QUALITY)
    task = TASKS[task_type]
    row = {"id": row_id, "path": rel_path, "question": task["question"]}
    row.update(zip(LETTERS, task["options"], strict=True))
    row["answer"] = LETTERS[label]
    row["task_type"] = task_type
    row["task_hint"] = task["hint"]
    return row


def make_split(out_dir: Path, split: str, n_rows: int, seed: int) -> pd.DataFrame:
    """Generate one split's images (replacing old ones) and return its rows."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    # Remove images left by an earlier run with more rows, so the folder holds
    # exactly what the CSV lists.
    for stale in image_dir.glob(f"{split.upper()}_*.jpg"):
        stale.unlink()
    # Separate streams per split: changing --n-test does not change train.
    rng = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split]])
    plan = balanced_plan(rng, n_rows)
    rows = [make_row(rng, split, index, task_type, label, out_dir) for index, (task_type, label) in enumerate(plan)]
    return pd.DataFrame(rows)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV as UTF-8 without BOM, no index, '\\n' line endings."""
    frame.to_csv(path, index=False, encoding="utf-8", lineterminator="\n")


def write_dataset(out_dir: Path, n_train: int, n_test: int, seed: int) -> None:
    """Write train.csv, test.csv, sample_submission.csv and all images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_split(out_dir, "train", n_train, seed)
    test = make_split(out_dir, "test", n_test, seed)
    write_csv(train, out_dir / "train.csv")
    # The test CSV hides the answer, like the competition's.
    write_csv(test.drop(columns=["answer"]), out_dir / "test.csv")
    submission = pd.DataFrame({"id": test["id"], "answer": "a"})
    write_csv(submission, out_dir / "sample_submission.csv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: this script's folder)",
    )
    parser.add_argument("--n-train", type=int, default=320, help="train rows")
    parser.add_argument("--n-test", type=int, default=80, help="test rows")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_dataset(args.out, args.n_train, args.n_test, args.seed)
    print(f"wrote {args.n_train} train and {args.n_test} test rows to {args.out}")


if __name__ == "__main__":
    main()
