"""
The shapes set: drawn 32x32 images of ten shapes, each with a caption, as an image folder and
caption files, the same path a user's own data takes. Offline, about a minute on a laptop CPU.

    python experiments/shapes.py                      # data/shapes/, then embeds the captions
    python textteacher.py --data shapes --text data/shapes/text.pt

It writes data/shapes/train/<shape>/train00042.png (3000 images) and val/ (1000), the captions
in the paper's format (captions_train.txt, captions_val.txt: lines "key:<TAB>caption", keyed
by file name) and, through caption_embed.py with the packaged MiniLM encoder, data/shapes/
text.pt. It prints what it wrote. The shape is the class; colour, size, place and background
vary, and a caption names them all, so a caption says more than a label does; what each image
shows is kept beside its caption (attributes_train.jsonl, attributes_val.jsonl: one JSON object
per image, its key and attributes), for probes of what a model learned (experiments/
features.py). shapes.json marks
the folder as this script's: --force draws again only such a folder, never one of your own.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
from PIL import Image

import caption_embed  # noqa: E402
from cli import need  # noqa: E402

KINDS = (
    "circle",
    "ring",
    "square",
    "diamond",
    "triangle",
    "plus",
    "cross",
    "star",
    "hexagon",
    "heart",
)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "pink": (240, 120, 190),
    "cyan": (40, 200, 210),
}
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}  # radius as a fraction of the side
PLACES = {
    "top left": (0.27, 0.27),
    "top": (0.5, 0.27),
    "top right": (0.73, 0.27),
    "left": (0.27, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom": (0.5, 0.73),
    "bottom right": (0.73, 0.73),
}
TEMPLATES = (
    "a {size} {colour} {shape} near the {place} on a {bg} background",
    "a {bg} picture with a {size} {colour} {shape} near the {place}",
    "{size} {colour} {shape} in the {place} of a {bg} image",
)
SPLITS = {"train": (3000, 0), "val": (1000, 1)}  # split: (images, seed)
# The file that marks a folder as this script's: --force redraws only a folder that holds it,
# never a user's own data that happens to have train/ and captions_train.txt.
MARKER = "shapes.json"


def mask(kind, dx, dy):
    """Inside-test of a shape of radius 1 at offsets (dx, dy) from its centre, y pointing down."""
    d, a, big = np.hypot(dx, dy), np.arctan2(dy, dx), np.maximum(abs(dx), abs(dy))
    return {
        "circle": lambda: d <= 1,
        "ring": lambda: (d <= 1) & (d >= 0.6),
        "square": lambda: big <= 0.8,
        "diamond": lambda: abs(dx) + abs(dy) <= 1,
        "triangle": lambda: (dy >= -1) & (dy <= 0.75) & (abs(dx) <= (dy + 1) * 0.62),
        "plus": lambda: ((abs(dx) <= 0.28) | (abs(dy) <= 0.28)) & (big <= 1),
        "cross": lambda: ((abs(dx - dy) <= 0.4) | (abs(dx + dy) <= 0.4)) & (big <= 0.8),
        "star": lambda: d <= 0.5 + 0.5 * np.cos(5 * (a + np.pi / 2)).clip(0) ** 0.7,
        "hexagon": lambda: (abs(dy) <= 0.866) & (abs(dx) * 0.866 + abs(dy) * 0.5 <= 0.866),
        "heart": lambda: (
            ((1.2 * dx) ** 2 + (0.25 - 1.2 * dy) ** 2 - 1) ** 3
            - (1.2 * dx) ** 2 * (0.25 - 1.2 * dy) ** 3
            <= 0
        ),
    }[kind]()


def draw(n, seed, size=32):
    """n images, deterministic in the seed: (uint8 [n, size, size, 3], labels [n], attributes),
    an image's attributes being its shape, colour, size, place, background and template."""
    rng = np.random.default_rng(seed)
    s = 2 * size  # drawn at twice the resolution, then averaged down: smooth edges
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    images, labels, attrs = (
        np.empty((n, size, size, 3), np.uint8),
        rng.integers(0, len(KINDS), n),
        [],
    )
    for i in range(n):
        a = dict(
            shape=KINDS[labels[i]],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            place=list(PLACES)[rng.integers(len(PLACES))],
            bg="dark" if rng.random() < 0.5 else "light",
        )
        r = SIZES[a["size"]] * s * rng.uniform(0.9, 1.1)
        cx, cy = (np.array(PLACES[a["place"]]) + rng.uniform(-0.05, 0.05, 2)) * s
        img = np.full(
            (s, s, 3), rng.uniform(10, 70) if a["bg"] == "dark" else rng.uniform(180, 245)
        )
        img += rng.normal(0, 12, (s, s, 1))
        img[mask(a["shape"], (xx - cx) / r, (yy - cy) / r)] = np.array(
            COLOURS[a["colour"]]
        ) + rng.normal(0, 15, 3)
        images[i] = (
            img.reshape(size, 2, size, 2, 3).mean((1, 3)).clip(0, 255).round().astype(np.uint8)
        )
        a["template"] = int(rng.integers(len(TEMPLATES)))
        attrs.append(a)
    return images, labels, attrs


def caption(a, kind="full"):
    """The caption of an image with attributes a. full: its own random template of the three
    (the default); one-template: always the first; colour: the shape and its colour alone;
    word: the shape's name alone."""
    if kind == "word":
        return a["shape"]
    if kind == "colour":
        return f"a {a['colour']} {a['shape']}"
    return TEMPLATES[0 if kind == "one-template" else a["template"]].format(**a)


def keys(split, n):
    return [f"{split}{i:05d}.png" for i in range(n)]


def write(out, splits=SPLITS):
    """The image folder out/{train,val}/<shape>/<key> and the attributes of every image, with
    the marker file first: a drawing stopped half-way is still this script's to redraw."""
    os.makedirs(out, exist_ok=True)
    marker = json.dumps(dict(tool="experiments/shapes.py", splits=splits))
    cli.save_atomic(lambda f: f.write(marker.encode()), os.path.join(out, MARKER))
    attrs = {}
    for split, (n, seed) in splits.items():
        images, labels, attrs[split] = draw(n, seed)
        for kind in KINDS:
            os.makedirs(os.path.join(out, split, kind), exist_ok=True)
        for key, image, label in zip(keys(split, n), images, labels):
            path = os.path.join(out, split, KINDS[label], key)
            try:
                Image.fromarray(image).save(path)
            except OSError as e:  # a full disk: one line naming the file
                raise cli.os_error(e, path) from None
    return attrs


def write_captions(path, split, attrs, kind="full"):
    text = "".join(f"{k}:\t{caption(a, kind)}\n" for k, a in zip(keys(split, len(attrs)), attrs))
    cli.save_atomic(lambda f: f.write(text.encode()), path)


def embed(attrs, paths, out, kind="full"):
    """Caption files (paths[split]) in the paper's format, then one embeddings file with the
    validation captions too, through caption_embed.py."""
    for split, path in paths.items():
        write_captions(path, split, attrs[split], kind)
    caption_embed.main(["--captions", paths["train"], "--val-captions", paths["val"],
                        "--dataset", "shapes", "--out", out, "--force"])


def attributes_file(out, split):
    """The attributes of every image of a split, one JSON object per line in key order: shape,
    colour, size, place, bg (background) and template (which of TEMPLATES its caption uses)."""
    return os.path.join(out, f"attributes_{split}.jsonl")


@cli.releasing  # the claim on --out ends with main
def main(argv=None):
    p = caption_embed.Parser(description="Draw the shapes set with captions, and embed them.")
    p.add_argument("--out", default="data/shapes", type=cli.path("new folder"),
                   help="folder to write (default data/shapes)")
    p.add_argument("--force", action="store_true", help="draw again a shapes set this script "
                   "wrote (never another folder)")
    args = p.parse_args(argv)
    out = args.out
    cli.lock(out, "--out")  # one drawing per folder at a time
    # a folder that is not new or empty must be this script's, and is drawn again with --force
    if os.path.isdir(out) and os.listdir(out):
        need(os.path.isfile(os.path.join(out, MARKER)), f"{out} holds files that "
             "experiments/shapes.py did not write, and --force redraws only its own shapes set: "
             "choose another --out (an old shapes set, from before shapes.json: delete it)")
        need(args.force, f"{out} already holds the shapes set; pass --force to draw it again")
    attrs = write(out)
    for split, a in attrs.items():  # what each image shows, beside its caption: for probes
        text = "".join(json.dumps(dict(key=k, **x)) + "\n" for k, x in zip(keys(split, len(a)), a))
        cli.save_atomic(lambda f: f.write(text.encode()), attributes_file(out, split))
    print(f"wrote {sum(map(len, attrs.values()))} images to {out}; attributes, captions and "
          "text.pt:")
    paths = {split: os.path.join(out, f"captions_{split}.txt") for split in attrs}
    embed(attrs, paths, os.path.join(out, "text.pt"))


if __name__ == "__main__":
    cli.run(main, interrupted="run the same command with --force to draw the set again")
