"""
Folders as users have them: every kind of entry that systems, editors, notebooks, sync tools and
cameras leave in an image folder, against every command that reads one (the trainer's split, the
recipe's size detection, the caption keys of a table; the captioner reads the trainer's split).
One rule decides (imagesets.scan): images are read, clutter is skipped and counted in one line,
what cannot be right is refused in one line naming it. And every image mode PIL opens arrives
as 8-bit RGB without clipping.
"""
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common import fails, write_folder
import imagesets
import textteacher as tt
from cli import UserError


def small_folder(root):
    """root/{train,val}/{a,b,c}/, 4 + 1 images of 12x12 px each."""
    return write_folder(str(root), train=4, val=1, size=(12, 12))


def png_claiming(path, width, height):
    """A PNG whose header claims width x height (its pixels are never read): PIL's guard against
    decompression bombs looks at the header alone."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = struct.pack(">II", width, height) + data[24:29]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    open(path, "wb").write(bytes(data))


# (name, how it is made in train/a/ or train/, what happens): "skip" (counted, not read),
# "read" (one more image of class a), or the refusal's words
def make(kind, root):
    a = os.path.join(root, "train", "a")
    first = os.path.join(a, sorted(os.listdir(a))[0])
    if kind == ".DS_Store":
        open(os.path.join(a, ".DS_Store"), "wb").write(b"\0\0\0\1Bud1" + b"\0" * 100)
    elif kind == "AppleDouble":
        open(os.path.join(a, "._a_train_000.png"), "wb").write(b"\0\5\26\7" + b"\0" * 80)
    elif kind == "Thumbs.db":
        open(os.path.join(a, "Thumbs.db"), "wb").write(b"\xd0\xcf\x11\xe0" + b"\0" * 100)
    elif kind == "desktop.ini":
        open(os.path.join(a, "desktop.ini"), "w").write("[.ShellClassInfo]\n")
    elif kind == "README in a class":
        open(os.path.join(a, "README.md"), "w").write("# class a\n")
    elif kind == "sidecar .xmp":
        open(first + ".xmp", "w").write("<x:xmpmeta/>")
    elif kind == "editor backup~":
        open(first + "~", "wb").write(open(first, "rb").read())
    elif kind == "partial download":
        open(first + ".part", "wb").write(b"\x89PNG")
    elif kind == "README in train/":
        open(os.path.join(root, "train", "README.txt"), "w").write("photos\n")
    elif kind == ".ipynb_checkpoints in train/":
        os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    elif kind == "__MACOSX in train/":
        os.makedirs(os.path.join(root, "train", "__MACOSX", "a"))
    elif kind == "@eaDir in a class":
        os.makedirs(os.path.join(a, "@eaDir"))
        open(os.path.join(a, "@eaDir", "SYNOFILE_THUMB_M.jpg"), "wb").write(b"x")
    elif kind == "sub-folder of images":
        os.makedirs(os.path.join(a, "more"))
        Image.open(first).save(os.path.join(a, "more", "z.png"))
    elif kind == "link to an image":
        os.symlink(first, os.path.join(a, "zz_link.png"))
    elif kind == "link loop":
        os.symlink(a, os.path.join(a, "loop"))
    elif kind == "broken link":
        os.symlink(os.path.join(root, "nowhere.png"), os.path.join(a, "gone.png"))
    elif kind == "empty image file":
        open(os.path.join(a, "zz_empty.jpg"), "wb").close()
    elif kind == "HEIC photo":
        open(os.path.join(a, "IMG_0001.HEIC"), "wb").write(b"\0\0\0\x18ftypheic")
    elif kind == "class without images":
        os.makedirs(os.path.join(root, "train", "d"))
        open(os.path.join(root, "train", "d", ".DS_Store"), "wb").write(b"\0")
    elif kind == "decompression bomb":
        png_claiming(os.path.join(a, "zz_huge.png"), 14000, 14000)
    elif kind == "GIF":
        Image.open(first).convert("P").save(os.path.join(a, "zz.gif"))
    return first


ENTRIES = {
    ".DS_Store": "skip", "AppleDouble": "skip", "Thumbs.db": "skip", "desktop.ini": "skip",
    "README in a class": "skip", "sidecar .xmp": "skip", "editor backup~": "skip",
    "partial download": "skip", "README in train/": "skip", ".ipynb_checkpoints in train/":
    "skip", "__MACOSX in train/": "skip", "@eaDir in a class": "skip",
    "sub-folder of images": "read", "link to an image": "read", "GIF": "read",
    "decompression bomb": "read",  # listed as an image: refused when decoded (below)
    "link loop": "a link to a folder that holds it", "broken link": "is a broken link",
    "empty image file": "cannot decode image", "HEIC photo": "an HEIC photo, which PIL cannot",
    "class without images": "holds no image",
}


@pytest.mark.parametrize("kind", ENTRIES)
def test_every_kind_of_entry_against_every_command_that_reads_a_folder(kind, tmp_path, capsys):
    """Each entry, against the trainer's split (keys and classes), the recipe's detection (a 12
    px folder keeps the small recipe whatever sorts first) and the caption keys of a table:
    skipped (and said once, in one line), read, or refused in one line naming it (the recipe
    of a folder refused is then beside the point)."""
    root = str(tmp_path / "d")
    keys = small_folder(root)
    make(kind, root)
    capsys.readouterr()
    expect = ENTRIES[kind]
    if expect not in ("skip", "read"):
        with pytest.raises(UserError, match=re.escape(expect)) as e:
            tt.image_split(root, "", "train")
        assert "\n" not in str(e.value)
        rows = [f"train/{k[0]}/{k}" for k in keys]
        with pytest.raises(UserError, match=re.escape(expect)):  # the caption keys: one rule
            imagesets.match_table(root, rows, ["x"] * len(rows), "t.tsv")
        return
    assert imagesets.recipe_of(root) == "small"  # never the ImageNet recipe by a stray file
    dataset, got, classes = tt.image_split(root, "", "train")
    assert classes == ["a", "b", "c"]
    err = capsys.readouterr().err.strip().splitlines()
    if expect == "skip":
        assert got == keys
        assert len(err) == 1 and err[0].startswith(f"note: {root}/train: skipped 1 ")
    else:
        assert len(got) == len(keys) + 1 and set(keys) < set(got) and err == []
    rows = [f"train/{os.path.relpath(p, os.path.join(root, 'train'))}" for p, _ in
            dataset.samples]
    matched = imagesets.match_table(root, rows, rows, "t.tsv")["train"]
    assert matched[0] == got  # every image's caption found under the trainer's key


@pytest.mark.parametrize("mode, pixels, want", [
    ("I;16", np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16), [[0, 100], [255, 7]]),
    ("F", np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), [[0, 127], [255, 63]]),
    ("F", np.array([[0.0, 100.0], [255.0, 7.0]], np.float32), [[0, 100], [255, 7]]),
    ("F", np.array([[0.0, 500.0], [1000.0, 250.0]], np.float32), [[0, 127], [255, 63]]),
    ("RGBA", None, None), ("P", None, None), ("CMYK", None, None), ("1", None, None),
    ("LA", None, None),
], ids=["16-bit", "float-unit", "float-255", "float-wide", "rgba", "palette", "cmyk", "bilevel",
        "grey-alpha"])
def test_every_image_mode_arrives_as_8_bit_rgb_unclipped(mode, pixels, want, tmp_path):
    path = str(tmp_path / ("x.tif" if mode in ("F", "CMYK") else "x.png"))
    if pixels is not None:
        Image.fromarray(pixels).save(path)
        assert Image.open(path).mode == mode
    else:
        Image.new("RGB", (2, 2), (200, 40, 90)).convert(mode).save(path)
    out = imagesets.rgb(path)
    assert out.mode == "RGB" and out.size == (2, 2)
    if want is not None:
        assert np.array(out)[..., 0].tolist() == want


def test_a_decompression_bomb_is_one_line_in_the_trainer(tmp_path, capsys):
    root = str(tmp_path / "d")
    small_folder(root)
    png_claiming(os.path.join(root, "train", "a", "zz_huge.png"), 14000, 14000)
    line = fails(capsys, ["--data", root, "--batch-size", "4", "--epochs", "1", "--threads",
                          "1", "--out-dir", str(tmp_path), "--name", "r"])
    assert "zz_huge.png is too large to decode safely" in line and "downscale it" in line
    assert not os.path.exists(tmp_path / "r")


def test_the_shapes_set_is_drawn_where_it_is_missing(tmp_path, monkeypatch):
    """--data shapes on a fresh clone: the set is drawn (with its captions' embeddings, written
    last) by experiments/shapes.py, once; a set cut short before its embeddings is drawn again
    over itself (--force, its own folder), and a whole one is read as it is."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "experiments"))
    import shapes
    calls, out = [], str(tmp_path / "shapes")

    def draw(argv):  # what shapes.main leaves: its marker and the images, text.pt last
        calls.append(argv)
        small_folder(out)
        open(os.path.join(out, shapes.MARKER), "w").close()
        open(os.path.join(out, "text.pt"), "wb").close()
    monkeypatch.setattr(shapes, "main", draw)
    keys = tt.image_split("shapes", out, "train")[1]
    assert calls == [["--out", out]] and len(keys) == 12
    tt.image_split("shapes", out, "val")
    assert len(calls) == 1  # drawn once
    os.remove(os.path.join(out, "text.pt"))  # cut short before its embeddings
    tt.image_split("shapes", out, "train")
    assert calls[-1] == ["--out", out, "--force"]
