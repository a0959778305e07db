"""
The image sets textteacher.py reads by name, beside image folders: CIFAR-10, CIFAR-100 and the
paper's six fine-grained transfer sets, through torchvision's own dataset classes, and the image
loader of every folder. textteacher.image_split hands a named --data here; everything returns
what it returns: (dataset, keys, classes), dataset[i] = (PIL image, label).

    python textteacher.py --data cifar100 --data-dir data
    python textteacher.py --data flowers102 --data-dir data --init runs/NAME
    python textteacher.py --data fgvc-aircraft --split trainval --init runs/NAME/export

The transfer sets: CUB-200-2011 (200 classes), FGVC-Aircraft (100 variants), Stanford Cars
(196), Oxford-IIIT Pet (37), Flowers-102 (102), Food-101 (101), named cub200, fgvc-aircraft,
stanford-cars, oxford-pets, flowers102 and food101 (a folder of yours under another name stays
a PATH). Five are read through torchvision, from the folders it downloads to (on first use;
Stanford Cars cannot be downloaded any more: torchvision's error says so); CUB-200-2011 from
its archive, CUB_200_2011/ under --data-dir, as an image folder.

Splits (--split): `official` trains as the paper's code does (Aircraft and Flowers on `train`
alone, Pets on `trainval`, the others on `train`, which is all they have besides `test`);
`trainval` is the common protocol (Aircraft's `trainval`, Flowers' `train` + `val`).
Validation is always the `test` split. Samples are keyed by their file names, as in an image
folder, so caption and embeddings files work the same way (CUB-200-2011 has captions).

The fine-tuning recipe (TRANSFER_PRESETS) is this project's choice: the paper gives none per
set. Its official code fine-tunes with the pretraining recipe (LAMB, 5 warm-up epochs, cosine,
3-Augment, CutMix, label smoothing 0.1, 224 px) at a learning rate given per run, 3e-4 in its
examples; here that recipe at batch 256 and lr 3e-4, 300 epochs (Food-101, 75 750 images: 100).
"""
import contextlib
import os
import posixpath
import sys

import numpy as np
import PIL.features
import PIL.Image
import torch
import torchvision
import torchvision.transforms.v2.functional as TF

from cli import UserError, need

# name: (torchvision class, training split of the official code, of the common protocol)
TRANSFER = {"flowers102": ("Flowers102", "train", "train+val"),
            "fgvc-aircraft": ("FGVCAircraft", "train", "trainval"),
            "oxford-pets": ("OxfordIIITPet", "trainval", "trainval"),
            "stanford-cars": ("StanfordCars", "train", "train"),
            "food101": ("Food101", "train", "train"),
            "cub200": ("", "train", "train")}
CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py"),
         "cifar100": ("CIFAR100", "cifar-100-python")}
NAMED = {*CIFAR, *TRANSFER}
TRANSFER_PRESETS = {name: dict(data_dir="data", batch_size=256, lr=3e-4,
                               epochs=100 if name == "food101" else 300) for name in TRANSFER}


# ----------------------------------------------------------------------------
# What an image folder holds: one rule, for the trainer, the recipe's size detection, the
# captioner and the caption keys (scan below)

# The formats PIL opens (torchvision's list, and GIF; AVIF where Pillow was built with it)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp", *[".avif"] * PIL.features.check("avif"))
# Photos in formats PIL cannot read: refused, not skipped (a class would silently lose them)
UNREADABLE = {".heic": "an HEIC photo", ".heif": "an HEIF photo", ".avif": "an AVIF image",
              **{e: "a camera RAW file" for e in (".cr2", ".cr3", ".nef", ".arw", ".dng",
                                                  ".raf", ".orf", ".rw2")}}
# What systems, file managers, notebooks, sync tools and NAS boxes leave in folders, besides
# the hidden entries whose names start with a dot (.DS_Store, ._IMG_1.jpg, .ipynb_checkpoints,
# .git, .Trashes) and editors' backups (name~): skipped
SYSTEM = {"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx", "@eadir", "#recycle",
          "$recycle.bin", "system volume information", "lost+found"}


def hidden(name):
    return name.startswith(".") or name.endswith("~") or name.lower() in SYSTEM


def skipped_kind(name):
    """Why a file of an image folder is not an image to read ("hidden or system", "not an
    image"), or None for an image; a photo PIL cannot read is a one-line refusal."""
    if hidden(name):
        return "hidden or system"
    ext = os.path.splitext(name)[1].lower()
    need(ext in IMAGE_EXTENSIONS or ext not in UNREADABLE, f"{name} is {UNREADABLE.get(ext)}, "
         "which PIL cannot read: convert it to JPEG or PNG, or move it out of the folder")
    return None if ext in IMAGE_EXTENSIONS else "not an image"


def scan(root):
    """(samples [(path, class index)], classes) of an image folder root/CLASS/...: the classes
    are the sub-folders of root in sorted order, the samples every image below each (in
    sub-folders too, in ImageFolder's order); hidden, system and other files are skipped and
    counted in one line; a link that loops back, a broken link and an empty image file are
    refused in one line naming them, as is a class folder without an image."""
    skipped, samples = {}, []
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not hidden(e.name)]
    for e in entries:
        if e.name not in classes:
            kind = "hidden or system" if hidden(e.name) else "not a folder"
            skipped.setdefault(kind, []).append(e.path)
    for c, name in enumerate(classes):
        found, open_dirs = [], set()

        def walk(folder):
            real = os.path.realpath(folder)
            need(real not in open_dirs, f"{folder} is a link to a folder that holds it (a "
                 "loop): remove the link")
            open_dirs.add(real)
            for e in sorted(os.scandir(folder), key=lambda e: e.name):
                need(not e.is_symlink() or os.path.exists(e.path), f"{e.path} is a broken "
                     "link: remove it")  # is_symlink: from the listing, no call per entry
                kind = ("hidden or system" if hidden(e.name) else None) if e.is_dir() else (
                    skipped_kind(e.name))
                if kind:
                    skipped.setdefault(kind, []).append(e.path)
                elif e.is_dir():
                    walk(e.path)
                else:
                    need(e.stat().st_size > 0, undecodable(e.path, "empty: 0 bytes"))
                    found.append(e.path)
            open_dirs.discard(real)
        walk(os.path.join(root, name))
        need(found, f"{os.path.join(root, name)} holds no image ({', '.join(IMAGE_EXTENSIONS)}):"
             " a class needs one or more")
        # ImageFolder's order: by folder (sorted(os.walk(...))), then by name
        samples += [(p, c) for p in sorted(found, key=lambda p: os.path.split(p))]
    if skipped:
        print(f"note: {root}: skipped " + ", ".join(
            f"{len(v)} {k} ({', '.join(os.path.basename(p) for p in v[:2])})"
            for k, v in skipped.items()), file=sys.stderr)
    return samples, classes


class Folder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, its classes and samples by scan()."""

    def find_classes(self, directory):
        samples, classes = scan(directory)
        self._scanned = samples
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        return self._scanned


def rgb(path):
    """An image file as an 8-bit RGB PIL image, whatever its mode, not clipped to an almost
    white image: integer grey levels (I;16, I) as 16-bit ones (/ 257; beyond 65535 by the
    image's maximum), float ones (F) as intensities in [0, 1] (as tifffile and OpenCV write
    them), in [0, 255], or beyond by their maximum; a palette, an alpha channel or CMYK
    converted as PIL does; the first frame of an animation. An image past PIL's guard against
    decompression bombs (about 179 million pixels) is one line."""
    try:
        with PIL.Image.open(path) as image:
            if image.mode == "F" or image.mode.startswith("I"):  # F, I, I;16, I;16B
                top = image.getextrema()[1]
                scale = ((255 if top <= 1 else 1 if top <= 255 else 255 / top) if image.mode == "F"
                         else 1 / 257 if top <= 65535 else 255 / top)
                image = image.convert("F").point(lambda v: v * scale)
            return image.convert("RGB")
    except PIL.Image.DecompressionBombError as e:
        raise UserError(f"{path} is too large to decode safely ({e}): downscale it") from None


def undecodable(name, error):
    """The line for an image that cannot be decoded, with advice that works: deleting it
    changes the training set, which --resume refuses (a new run takes it)."""
    return (f"cannot decode image {name} ({error}); replace it, or delete it and start a new "
            "run (--resume refuses a changed training set)")


def recipe_of(folder):
    """The preset an image folder gets without --preset: "small" (the CPU recipe for 32 px
    photos) when its first training image (by scan's rule) is at most 64 px on its longer
    side, else "imagenet" (the paper's recipe, 224 px); a folder that cannot be read gets the
    latter, and its error comes where the data are read."""
    def listed(where):
        return sorted(os.scandir(where), key=lambda e: e.name)
    # scan()'s rule, but not scan() itself: it would list every image (an ImageNet folder's
    # 1.28M) to open one
    with contextlib.suppress(OSError, UserError, PIL.UnidentifiedImageError, StopIteration):
        first = next(e.path for e in listed(os.path.join(folder, "train"))
                     if e.is_dir() and not hidden(e.name))  # the first class
        path = next(e.path for e in listed(first) if e.is_file() and not skipped_kind(e.name))
        with PIL.Image.open(path) as image:
            return "small" if max(image.size) <= 64 else "imagenet"
    return "imagenet"


def file_keys(dataset, where):
    """The keys of caption and embeddings files for dataset.samples: each image's file name
    (the paper's ImageNet encodings are keyed so) when no two share one; else, for a folder
    whose classes number their files alike (cat/0000.jpg, dog/0000.jpg), each image's path
    below `where`, with / between the parts (a path below a split's root is never shared)."""
    paths = [os.path.relpath(path, where).replace(os.sep, "/") for path, _ in dataset.samples]
    names = [p.rsplit("/", 1)[-1] for p in paths]
    return names if len(set(names)) == len(names) else paths


def image_split(data, data_dir, split, protocol="official"):
    """textteacher.image_split: (dataset, keys, classes) of "train" or "val" of a named set
    in data_dir, or of the image folder data_dir."""
    if data in CIFAR:  # keyed by the index of the sample
        kind, stored = CIFAR[data]
        present = os.path.isdir(os.path.join(data_dir, stored))
        try:  # torchvision checks the files' md5 sums, and downloads only what is absent
            ds = getattr(torchvision.datasets, kind)(data_dir, split == "train",
                                                     download=not present)
        except (RuntimeError, OSError) as e:
            name = kind.replace("R", "R-")  # CIFAR-10, CIFAR-100
            raise UserError(f"no readable {name} in {data_dir} ({str(e).splitlines()[0]}); pass "
                            "--data-dir, or delete the folder to download it again") from None
        return ds, [str(i) for i in range(len(ds))], ds.classes
    if data == "cub200":
        return cub(data_dir, split)
    drawn = os.path.join(data_dir, "shapes.json")  # shapes.MARKER: a set shapes.py draws
    if data == "shapes" and (not os.path.isdir(os.path.join(data_dir, "train")) or (
            os.path.isfile(drawn) and not os.path.isfile(os.path.join(data_dir, "text.pt")))):
        draw_shapes(data_dir)
    if data not in TRANSFER:  # an image folder (imagenet and shapes are folders too)
        return image_folder(os.path.join(data_dir, split))
    name, official, common = TRANSFER[data]
    kind = getattr(torchvision.datasets, name)
    # FGVC-Aircraft's 100 variants, the level the paper counts; Pets' breeds are its default
    level = dict(annotation_level="variant") if name == "FGVCAircraft" else {}
    parts = []
    for part in ("test" if split == "val" else official if protocol == "official" else common
                 ).split("+"):
        try:  # downloads only what is absent (torchvision checks)
            parts.append(kind(data_dir, split=part, download=name != "StanfordCars", **level))
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"no readable {name} in {data_dir} ({str(e).splitlines()[0]}); "
                            "pass the --data-dir that holds it") from None
    # torchvision keeps each set's file list and labels in attributes of its own
    samples = [(str(path), label) for d in parts for path, label in (
        getattr(d, "_samples", None) or zip(getattr(d, "_image_files", None) or d._images,
                                            d._labels))]
    dataset = torch.utils.data.ConcatDataset(parts)
    dataset.samples, dataset.targets = samples, [label for _, label in samples]
    return dataset, file_keys(dataset, data_dir), parts[0].classes


def draw_shapes(out):
    """The drawn shapes set, its captions and their embeddings (text.pt, written last), into
    out, by experiments/shapes.py: --data shapes works on a fresh clone (about 40 s on a CPU).
    A set of shapes.py's cut short (no text.pt) is drawn again; a folder of the user's is
    never drawn over."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
    import shapes  # the generator is a tool beside the trainer, imported only when needed
    print(f"drawing the shapes set into {out} (once)", file=sys.stderr)
    ours = os.path.isfile(os.path.join(out, shapes.MARKER))
    shapes.main(["--out", out] + ["--force"] * ours)


def image_folder(root):
    """An image folder's split: root/CLASS/IMAGE, classes in sorted order."""
    try:  # rgb: ImageFolder's loader, but 16-bit and float images scaled, not clipped
        ds = Folder(root, loader=rgb)
    except OSError as e:
        raise UserError(f"{root}: {e}; a data folder holds train/ and val/ with one sub-folder "
                        "of images per class") from None
    need(len(ds.classes) > 1, f"{root} holds one class folder: a classifier needs two or more")
    return ds, file_keys(ds, root), ds.classes


def match_table(data, keys, captions, path):
    """{split: (keys, captions)} of a table whose keys are the images' paths below the image
    folder data (train/cat/0500.jpg, as published tables list them), matched to the keys the
    trainer gives those images (file_keys), whatever the folder's layout: rows under
    val/ are the validation captions. Training images without a caption are refused (the
    trainer needs one for each); validation images without one, and captions of no image, are
    counted and named in one line, and left out."""
    row_of = {posixpath.normpath(k.replace("\\", "/")): i for i, k in enumerate(keys)}
    out, unused, lost = {"train": None, "val": ([], [])}, set(row_of), {}
    for split in ("train", "val"):
        if split == "val" and not os.path.isdir(os.path.join(data, split)):
            continue
        dataset, split_keys, _ = image_folder(os.path.join(data, split))
        paths = [os.path.relpath(p, data).replace(os.sep, "/") for p, _ in dataset.samples]
        unused -= set(paths)
        lost[split] = [p for p in paths if p not in row_of]
        have = [(k, row_of[p]) for k, p in zip(split_keys, paths) if p in row_of]
        out[split] = [k for k, _ in have], [captions[i] for _, i in have]
    say = [f"{len(v)} {s} images of {data} have no caption (e.g. {', '.join(v[:2])})"
           for s, v in lost.items() if v]
    if unused:
        say.append(f"{len(unused)} captions name no image of it (e.g. "
                   f"{', '.join(sorted(unused)[:2])}): left out")
    need(not lost["train"], f"{path}: " + "; ".join(say) + ": the trainer needs a caption per "
         "training image, keyed by its path below --data (e.g. train/CLASS/FILE)")
    if say:
        print(f"note: {path}: " + "; ".join(say), file=sys.stderr)
    return out


def cub(data_dir, split):
    """CUB-200-2011 from its archive: images/<class>/<file>.jpg, and train_test_split.txt
    (image id -> 1 for training) beside images.txt (image id -> path)."""
    root = os.path.join(data_dir, "CUB_200_2011")
    try:
        with open(f"{root}/images.txt") as names, open(f"{root}/train_test_split.txt") as flags:
            train = {path: flag == "1" for (_, path), (_, flag) in zip(
                map(str.split, names), map(str.split, flags))}
        images = os.path.join(root, "images")
        dataset = torchvision.datasets.ImageFolder(images, loader=rgb, is_valid_file=lambda p: (
            train.get(os.path.relpath(p, images)) == (split == "train")))
    except (OSError, ValueError) as e:
        raise UserError(f"no readable CUB-200-2011 in {root} ({e}); unpack CUB_200_2011.tgz "
                        "into the --data-dir") from None
    return dataset, file_keys(dataset, root), dataset.classes


# ----------------------------------------------------------------------------
# 3-Augment at under half a CPU core's time: torchvision's transforms, their random draws
# exactly, on the pixels they would touch, the colour steps batched on the GPU
# (benchmarks/loader.py measures it; tests/test_loader.py checks it)

def resize_short_side(image, size):
    """A PIL image as uint8 [3, H, W], its short side resized to `size` by torch's antialiased
    bicubic kernel on uint8 (one pass, no float copy): within a grey level or two of PIL's
    bicubic resize, without bias, which the evaluation keeps (timm's transform of the export is
    PIL's), at about 40% of its time. The sizes are torchvision's (the long side truncated)."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # shape = [3, h, w], channels last
    return TF.resize(x, size, TF.InterpolationMode.BICUBIC, antialias=True)


def reflected_window(x, start, size, dim):
    """Positions start .. start + size - 1 along dim of x padded by reflection ("reflect": -1
    reads 1, n reads n - 2), without padding x: a view of the inside, joined to flipped views of
    the few rows (or columns) that fall outside. The padded copy of the whole image that
    RandomCrop makes costs three times more."""
    n = x.shape[dim]
    parts = [x.narrow(dim, max(start, 0), min(start + size, n) - max(start, 0))]
    if start < 0:  # rows -1, -2, ... read rows 1, 2, ...
        parts.insert(0, x.narrow(dim, 1, -start).flip(dim))
    if start + size > n:  # rows n, n + 1, ... read rows n - 2, n - 3, ...
        parts.append(x.narrow(dim, 2 * n - start - size - 1, start + size - n).flip(dim))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def grey(y):
    """The luma of float RGB [..., 3, H, W] as torchvision computes it: shape = [..., H, W]."""
    return y[..., 0, :, :].mul(0.2989).add_(y[..., 1, :, :], alpha=0.587).add_(
        y[..., 2, :, :], alpha=0.114)


def gaussian_blur(y, sigma):
    """torchvision's Gaussian blur (kernel 7, reflect padding) of float [B, 3, H, W], each image
    with its own sigma [B], as two 1-D passes of adds (its grouped 2-D convolution is four
    times slower on a CPU); the float sums differ in order only: within a grey level once
    rounded."""
    w = torch.exp(-0.5 * ((torch.arange(7.0, device=y.device) - 3) / sigma[:, None]) ** 2)
    w = (w / w.sum(1, keepdim=True)).view(-1, 7, 1, 1, 1)  # tap i of image b: w[b, i]
    H, W = y.shape[-2:]
    p = torch.nn.functional.pad(y, (3, 3, 3, 3), mode="reflect")  # [B, 3, H + 6, W + 6]
    h = p[..., 3:3 + W] * w[:, 3]
    for i in range(3):  # the kernel is symmetric: taps i and 6 - i share a weight
        h += (p[..., i:i + W] + p[..., 6 - i:6 - i + W]) * w[:, i]
    v = h[..., 3:3 + H, :] * w[:, 3]
    for i in range(3):
        v += (h[..., i:i + H, :] + h[..., 6 - i:6 - i + H, :]) * w[:, i]
    return v  # shape = [B, 3, H, W]


def blend(v, f, towards):
    """ColorJitter's step of float [n, 3, S, S] by factors f [n]: torchvision's v f + (1 - f)
    towards, with its one rounding (a fused multiply-add), kept as uint8 values."""
    f = f.view(-1, 1, 1, 1)
    return torch.addcmul(v.mul(f), towards, 1 - f).clamp_(0, 255).floor_()  # = trunc, faster


def brightness(v, f):  # towards black
    return blend(v, f, torch.zeros((), device=v.device))


def contrast(v, f):  # towards the mean grey (of uint8 grey values)
    return blend(v, f, grey(v).floor_().mean((-2, -1), keepdim=True)[:, None])


def saturation(v, f):  # towards each pixel's grey
    return blend(v, f, grey(v).floor_()[:, None])


def colour(x, draws):
    """3-Augment's colour steps of uint8 [B, 3, S, S], each image by its own draws [B, 10]
    (ThreeAugment.draws): a flip, one of {grayscale, solarize, blur}, and the colour jitter in
    the drawn order. A batch at once, on the training device, where they cost next to nothing,
    so that the CPU's workers only decode, resize and crop. torchvision's operations on uint8,
    pixel for pixel but for the blur's sums (tests/test_loader.py). How many images take each
    step is read from the draws on the CPU, so nothing here waits for the device."""
    y = x.float()  # shape = [B, 3, S, S], truncated to uint8 values after every step below
    table, on = draws.tolist(), draws.to(x.device, non_blocking=True)

    def step(column, value, function, *numbers):
        """y[b] = function(y[b], numbers[b]) for the images b whose draws[b, column] is value."""
        k = sum(row[column] == value for row in table)
        if k == len(table):  # the whole batch (and the one image of a worker)
            return function(y, *(on[:, n] for n in numbers))
        if k:  # the k images that take it come first in the (stable) sort
            i = torch.argsort((on[:, column] == value).int(), descending=True, stable=True)[:k]
            y[i] = function(y[i], *(on[i, n] for n in numbers))
        return y

    y = step(0, 1, lambda v: v.flip(-1))
    y = step(1, 0, lambda v: grey(v).floor_()[:, None].repeat(1, 3, 1, 1))  # grayscale
    y = step(1, 1, lambda v: torch.minimum(v, 255 - v))  # solarize: 255 - v from 128 on
    y = step(1, 2, lambda v, sigma: gaussian_blur(v, sigma).round_(), 2)
    for j in range(4):  # each image's j-th jitter step (3, hue, is off)
        for op, function in enumerate((brightness, contrast, saturation)):
            y = step(3 + j, op, function, 7 + op)
    return y.to(torch.uint8)


class ThreeAugment:
    """DeiT III's 3-Augment of a PIL image: the short side resized to S, a random S crop of the
    image reflect-padded by 4, a horizontal flip, one of {grayscale, solarize, Gaussian blur
    (kernel 7, sigma 0.2-2)}, colour jitter 0.3; augment "crop" stops after the crop, "none"
    takes the centre crop.

    It is torchvision's Compose([RandomCrop(S, 4, padding_mode="reflect"), RandomHorizontalFlip(),
    RandomChoice([Grayscale(3), RandomSolarize(128, 1.0), GaussianBlur(7, (0.2, 2))]),
    ColorJitter(0.3, 0.3, 0.3)]) on uint8, drawing the same numbers from torch's RNG in the
    same order, and giving the same pixels, bit for bit, but for the resize and the blur
    (within a grey level or two). Where its time goes instead: the resize is one uint8 pass,
    the crop reads its window in place (no padded copy of the whole image), and the steps after
    the crop run on one float copy. With on_device (training on a GPU), the DataLoader worker
    only draws those steps and returns (uint8 [3, S, S], draws [10]), and colour() applies them
    to the whole batch on the device (on_device() below): the same pixels, and the worker's
    time per image well under half of DeiT III's pipeline's (benchmarks/loader.py)."""

    def __init__(self, size, augment="3aug", on_device=False):
        self.size, self.augment, self.on_device = size, augment, on_device

    def __call__(self, image):
        return self.of_resized(resize_short_side(image, self.size))

    def of_resized(self, x):
        """The augmentation of uint8 [3, H, W] whose short side is S (the worker's share)."""
        if self.augment == "none":
            return TF.center_crop(x, [self.size, self.size])
        x = self.crop(x)
        if self.augment == "crop":
            return x
        draws = self.draws()
        return (x, draws) if self.on_device else colour(x[None], draws[None])[0]

    def crop(self, x):
        """RandomCrop(S, padding=4, padding_mode="reflect"): the window of the padded image,
        read in place."""
        S, (H, W) = self.size, x.shape[-2:]
        top = int(torch.randint(0, H + 8 - S + 1, size=()))  # in the padded image
        left = int(torch.randint(0, W + 8 - S + 1, size=()))
        x = reflected_window(reflected_window(x, top - 4, S, 1), left - 4, S, 2)
        return x.contiguous()  # shape = [3, S, S]

    @staticmethod
    def draws():
        """The numbers torchvision's flip, choice and jitter draw, in its order: [flip (0 or 1),
        kind (0 grayscale, 1 solarize, 2 blur), sigma (0 but for the blur), the jitter's order
        (a permutation of 0-3), its brightness, contrast and saturation factors]."""
        flip = float(torch.rand(1) < 0.5)
        kind, sigma = int(torch.multinomial(torch.tensor([1 / 3] * 3), 1)), 0.0
        if kind == 1:  # RandomSolarize(p=1) still draws its coin
            torch.rand(1)
        elif kind == 2:
            sigma = torch.empty(1).uniform_(0.2, 2).item()
        order = torch.randperm(4).tolist()  # brightness, contrast, saturation, (hue: none)
        factors = [torch.empty(1).uniform_(0.7, 1.3).item() for _ in range(3)]
        return torch.tensor([flip, kind, sigma, *order, *factors])


def on_device(batch, device):
    """A training batch from the DataLoader on the device, uint8 [B, 3, S, S]: a batch from
    ThreeAugment(on_device=True) is [images, draws], and gets its colour steps there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    images, draws = batch
    return colour(images.to(device, non_blocking=True), draws)  # colour reads draws on the CPU
