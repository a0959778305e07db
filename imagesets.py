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

import numpy as np
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


def rgb(path):
    """ImageFolder's loader, but a 16-bit image (grey levels up to 65535) scaled to 8 bits:
    converted as it is, it would be clipped to an almost white image."""
    with PIL.Image.open(path) as image:
        wide = image.mode.startswith("I")  # I;16 (PNG) or I (32-bit)
        return (image.convert("I").point(lambda v: v / 257) if wide else image).convert("RGB")


def recipe_of(folder):
    """The preset an image folder gets without --preset: "small" (the CPU recipe for 32 px
    photos) when its first training image is at most 64 px on its longer side, else "imagenet"
    (the paper's recipe, 224 px); a folder that cannot be read gets the latter, and its error
    comes where the data are read."""
    root = os.path.join(folder, "train")
    with contextlib.suppress(OSError, ValueError):  # ValueError: min() of an empty folder
        first = os.path.join(root, min(d for d in os.listdir(root)
                                       if os.path.isdir(os.path.join(root, d))))
        with PIL.Image.open(os.path.join(first, min(os.listdir(first)))) as image:
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


def image_folder(root):
    """An image folder's split: root/CLASS/IMAGE, classes in sorted order."""
    try:  # rgb: ImageFolder's loader, but 16-bit images scaled, not clipped
        ds = torchvision.datasets.ImageFolder(root, loader=rgb)
    except OSError as e:
        raise UserError(f"{root}: {e}; a data folder holds train/ and val/ with one sub-folder "
                        "of images per class") from None
    need(len(ds.classes) > 1, f"{root} holds one class folder: a classifier needs two or more")
    return ds, file_keys(ds, root), ds.classes


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
# 3-Augment at about half the cost: torchvision's transforms, their random draws exactly, on
# the pixels they would touch (benchmarks/loader.py measures it; tests/test_loader.py checks it)

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
    """The luma of float RGB [3, H, W] as torchvision computes it: shape = [H, W]."""
    return y[0].mul(0.2989).add_(y[1], alpha=0.587).add_(y[2], alpha=0.114)


def gaussian_blur(y, sigma):
    """torchvision's Gaussian blur (kernel 7, reflect padding) of float [3, H, W], as two 1-D
    passes of in-place adds (its grouped 2-D convolution is four times slower on a CPU); the
    float sums differ in order only: within one grey level once rounded."""
    w = torch.exp(-0.5 * ((torch.arange(7.0) - 3) / sigma) ** 2)
    w = (w / w.sum()).tolist()
    H, W = y.shape[-2:]
    p = torch.nn.functional.pad(y[None], (3, 3, 3, 3), mode="reflect")[0]  # [3, H + 6, W + 6]
    h = p[:, :, 3:3 + W] * w[3]
    for i in range(3):  # the kernel is symmetric: taps i and 6 - i share a weight
        h.add_(p[:, :, i:i + W] + p[:, :, 6 - i:6 - i + W], alpha=w[i])
    v = h[:, 3:3 + H] * w[3]
    for i in range(3):
        v.add_(h[:, i:i + H] + h[:, 6 - i:6 - i + H], alpha=w[i])
    return v  # shape = [3, H, W]


class ThreeAugment:
    """DeiT III's 3-Augment of a PIL image as uint8 [3, S, S]: the short side resized to S, a
    random S crop of the image reflect-padded by 4, a horizontal flip, one of {grayscale,
    solarize, Gaussian blur (kernel 7, sigma 0.2-2)}, colour jitter 0.3; augment "crop" stops
    after the crop, "none" takes the centre crop.

    It is torchvision's Compose([RandomCrop(S, 4, padding_mode="reflect"), RandomHorizontalFlip(),
    RandomChoice([Grayscale(3), RandomSolarize(128, 1.0), GaussianBlur(7, (0.2, 2))]),
    ColorJitter(0.3, 0.3, 0.3)]) on uint8, drawing the same numbers from torch's RNG in the
    same order, and giving the same pixels, bit for bit, but for the resize and the blur
    (within a grey level or two). Where its time goes instead: the resize is one uint8 pass,
    the crop reads its window in place (no padded copy of the whole image), and the colour
    steps run on one float copy, truncated after each step as torchvision's uint8 round trips
    do."""

    def __init__(self, size, augment="3aug"):
        self.size, self.augment = size, augment

    def __call__(self, image):
        return self.augmented(resize_short_side(image, self.size))

    def augmented(self, x):
        """The augmentation of uint8 [3, H, W] whose short side is S."""
        if self.augment == "none":
            return TF.center_crop(x, [self.size, self.size])
        x = self.crop(x)
        return x if self.augment == "crop" else self.colour(x)

    def crop(self, x):
        """RandomCrop(S, padding=4, padding_mode="reflect"): the window of the padded image,
        read in place."""
        S, (H, W) = self.size, x.shape[-2:]
        top = int(torch.randint(0, H + 8 - S + 1, size=()))  # in the padded image
        left = int(torch.randint(0, W + 8 - S + 1, size=()))
        x = reflected_window(reflected_window(x, top - 4, S, 1), left - 4, S, 2)
        return x.contiguous()  # shape = [3, S, S]

    def colour(self, x):
        """The flip, one of {grayscale, solarize, blur}, and the colour jitter of uint8
        [3, S, S], on one float copy."""
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        y = x.float()  # shape = [3, S, S], this function's own: changed in place below
        kind = int(torch.multinomial(torch.tensor([1 / 3] * 3), 1))
        if kind == 0:  # grayscale, truncated to uint8 values, on all three channels
            y = grey(y).floor_().expand_as(y).clone()
        elif kind == 1:  # solarize: RandomSolarize(p=1) still draws its coin
            torch.rand(1)
            y = torch.where(y >= 128, 255 - y, y)
        else:
            y = gaussian_blur(y, torch.empty(1).uniform_(0.2, 2).item()).round_()
        order = torch.randperm(4).tolist()  # brightness, contrast, saturation, (hue: none)
        factors = [float(torch.empty(1).uniform_(0.7, 1.3).item()) for _ in range(3)]
        for op in order:
            if op == 3:
                continue
            f = factors[op]
            if op == 0:
                y.mul_(f)
            else:  # towards the mean grey (contrast) or each pixel's grey (saturation)
                g = grey(y).floor_()
                y.mul_(f).add_(g.mean() if op == 1 else g, alpha=1 - f)
            y.clamp_(0, 255).trunc_()  # the uint8 that torchvision keeps between the steps
        return y.to(torch.uint8)
