"""
TextTeacher: train a ViT classifier with one extra loss that aligns it with language.

A linear text head maps the ViT's post-norm CLS feature into the embedding space of a
frozen text encoder, and a symmetric contrastive loss pulls each image's projection
toward the embedding of its own caption (Nauen et al., 2026, "What Can Language Teach
About Images?"). The captions are written and embedded once, offline, by caption_embed.py.
At inference the text head is dropped: the exported model is a plain ViT.

Commands (see README.md for where the embeddings come from):

  # CPU demo, offline, a few minutes (README.md: Measured): the built-in captioned "shapes" set
  python caption_embed.py --data shapes --out shapes_text.pt
  python textteacher.py --data shapes --text shapes_text.pt

  # the baseline: no --text (or --text-loss-lambda 0) builds no text head at all
  python textteacher.py --data shapes

  # one GPU, and eight GPUs (--batch-size is always the global batch, as in the paper)
  python textteacher.py --data imagenet --data-dir /data/imagenet --text in1k_coca_bert.pt
  torchrun --nproc_per_node=8 textteacher.py --data imagenet --data-dir /data/imagenet --text in1k_coca_bert.pt

  # continue a run that stopped, and export a finished checkpoint on its own
  python textteacher.py --resume runs/NAME
  python textteacher.py --export runs/NAME/checkpoint.pt

  # what the text objective costs: baseline and TextTeacher steps on synthetic batches (no data)
  python textteacher.py --benchmark --model tiny --img-size 32 --patch-size 4 --batch-size 128 --optimizer adamw

The file reads top to bottom: configuration, data, text targets, model, losses,
optimiser and schedules, checkpoints and export, evaluation, the benchmark, the training loop.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.flop_counter import FlopCounterMode


class UserError(Exception):
    """A mistake in the input (a path, a file, a flag): reported in one line, exit code 2."""
    code = 2


class Diverged(UserError):
    """The loss became NaN or infinite: reported in one line, exit code 1."""
    code = 1


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stops with the shell's code for SIGINT."""
    code = 130


# ----------------------------------------------------------------------------
# Configuration

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data: str = opt("shapes", "shapes (built in, offline) | cifar100 | imagenet | PATH to a folder with train/ and val/ class sub-folders")
    data_dir: str = opt("data", "where CIFAR-100 is (downloaded there when missing and online), or the ImageNet root holding train/ and val/")
    text: str = opt("", "embeddings file written by caption_embed.py; empty = the plain baseline (no text head is built)")
    text_std: bool = opt(False, "divide the centred targets by their per-dimension std as well (the paper: centring only)")
    # model
    model: str = opt("small", "ViT size: micro 128/6/4 (this project's, for CPUs) | tiny 192/12/3 | small 384/12/6 | base 768/12/12 | large 1024/24/16 (width/depth/heads)")
    img_size: int = opt(224, "input resolution in pixels")
    patch_size: int = opt(16, "patch side in pixels; the sequence is (img_size / patch_size) ** 2 patch tokens plus the CLS token")
    layer_scale: float = opt(1e-4, "LayerScale init of both residual branches (DeiT III: 1e-4; near identity, for long runs)")
    drop_path: float = opt(0.05, "stochastic depth rate of the last block, increasing linearly from 0 in the first (DeiT III: 0.05 for ViT-S)")
    # the TextTeacher objective: L = lam_e * w * L_txt + (1 - lam_e) * L_cls
    text_loss_lambda: float = opt(0.5, "lam in [0, 1): the text loss weight; 0 is the baseline; the paper uses 0.5")
    lambda_schedule: str = opt("constant", "lam_e per epoch: constant | linear | cosine | fullcosine | jump-A-B-R (lam until epoch A, linearly to R*lam at epoch B)")
    adaptive_weight: bool = opt(True, "w = ||dL_cls/dF|| / ||dL_txt/dF|| at the post-norm feature F, every step; off: w = 1")
    text_loss: str = opt("clip", "clip: symmetric cross-entropy on raw dot products (the paper) | infonce: the same on cosine similarities / --temperature")
    temperature: float = opt(0.1, "temperature of --text-loss infonce (unused by clip, whose head weight norm is an implicit temperature)")
    freeze_text_head: bool = opt(False, "keep the text head at its random initialisation (an ablation of the paper)")
    # recipe
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(2048, "GLOBAL batch per optimiser step, split over GPUs and --accum; the contrastive negatives are the per-device batch = batch_size / (GPUs * accum) (the paper: 2048 global, 512 per GPU)")
    accum: int = opt(1, "gradient accumulation steps: fewer images in memory at once, but also fewer negatives in each contrastive loss")
    optimizer: str = opt("lamb", "lamb (DeiT III, the paper) | adamw")
    lr: float = opt(3e-3, "peak learning rate for --batch-size (the paper: 3e-3 at 2048; scale it linearly with the batch)")
    warmup_lr: float = opt(1e-6, "learning rate at the first step of the linear warm-up")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay")
    warmup_epochs: float = opt(5, "epochs of linear warm-up before the cosine decay")
    weight_decay: float = opt(0.02, "decoupled weight decay on weight matrices (not on biases, norms, LayerScale, position embedding or CLS token)")
    opt_eps: float = opt(1e-7, "epsilon of the optimiser's denominator")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    label_smoothing: float = opt(0.1, "label smoothing of the classification loss, applied once")
    cutmix: float = opt(1.0, "CutMix Beta(alpha, alpha); 0 = off. The text targets are mixed with the labels' lambda and partner")
    augment: str = opt("3aug", "3aug: DeiT III's 3-Augment | crop: padded random crop only | none")
    limit: int = opt(0, "use only the first N training images and N // 4 validation images (quick tries; 0 = all)")
    # experiments of the paper, and controls
    label_noise: float = opt(0.0, "replace the labels of exactly round(p * N) training images by a random other class (seeded, fixed for the run; validation and caption targets stay clean)")
    text_shuffle: bool = opt(False, "control: permute the targets across training images once (does the per-image pairing matter?)")
    text_random: bool = opt(False, "control: Gaussian targets with the per-dimension mean and std of the real ones (does the text content matter?)")
    teacher: str = opt("", "the paper's comparison arm: a frozen Hugging Face vision model (name or folder, e.g. facebook/dinov2-large) whose pooled feature of the same augmented batch replaces the text target")
    compare: bool = opt(False, "run the baseline (lambda 0) and TextTeacher (and --teacher, if given) with the same seed, data order and augmentation, and print a table of both")
    seeds: int = opt(1, "with --compare: repeat the comparison over this many seeds (seed, seed + 1, ...) and report the mean and std of the difference")
    plot: list = opt(None, "only draw validation top-1 and text loss per epoch of these run folders into --plot-out (needs matplotlib), then exit")
    plot_out: str = opt("plot.png", "the PNG written by --plot")
    # run
    name: str = opt("", "run name; results go to runs/NAME (default: data and time)")
    out_dir: str = opt("runs", "folder holding the run folders")
    seed: int = opt(0, "seed of the weights, the data order, the augmentation and CutMix")
    workers: int = opt(-1, "data loading processes per GPU (-1: min(8, CPUs per process); 0 = load in the main process)")
    device: str = opt("auto", "auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    compile: str = opt("auto", "torch.compile the model: auto (on for CUDA, off elsewhere) | on | off")
    ckpt_every: int = opt(0, "also checkpoint every K optimiser steps inside an epoch (0 = only at epoch ends)")
    log_every: int = opt(50, "read losses back from the device every N steps (progress line, NaN check)")
    resume: str = opt("", "continue the run of this checkpoint file or run folder exactly where it stopped")
    export: str = opt("", "only export this checkpoint's ViT (text parts removed) to model.safetensors, config.json and model.pt2, then exit")
    benchmark: bool = opt(False, "only time the training step of the model flags (baseline and TextTeacher) and inference on synthetic batches, print the numbers, then exit: no data read, no run folder written")


# Per-dataset presets, applied over the defaults above and under the command line.
# imagenet is the paper's recipe (DeiT III with ViT-S/16); cifar100 and shapes are this
# project's choices for small images, not the paper's.
PRESETS = {
    "imagenet": dict(),
    "cifar100": dict(img_size=32, patch_size=4, model="tiny", epochs=200, batch_size=256, optimizer="adamw",
                     lr=1e-3, weight_decay=0.05, opt_eps=1e-8, warmup_epochs=5, drop_path=0.1),
    "shapes": dict(img_size=32, patch_size=8, model="micro", epochs=15, batch_size=64, optimizer="adamw",
                   lr=1e-3, weight_decay=0.05, opt_eps=1e-8, warmup_epochs=1, drop_path=0.0, cutmix=0.0,
                   augment="none", workers=0, log_every=10),
}
MODEL_SIZES = {"micro": (128, 6, 4), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
# Fields that may differ when a run is continued: they change how, not what, is computed.
RESUME_FREE = {"workers", "device", "compile", "ckpt_every", "log_every", "resume", "export", "benchmark", "compare", "seeds", "plot", "plot_out"}


def parse_config(argv=None):
    """The command line is generated from Config, so --help lists every field with its default."""
    parser = argparse.ArgumentParser(description="TextTeacher: a ViT classifier taught by captions.",
                                     epilog="Presets by --data (applied before the flags you give): "
                                     + "; ".join(f"{k}: {v or 'the defaults above'}" for k, v in PRESETS.items()))
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is list or f.type == "list":
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="RUN", help=f.metadata["help"])
        elif f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{f.metadata['help']} (default: {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    given = vars(parser.parse_args(argv))
    cfg = Config()
    data = given.get("data", cfg.data)
    preset = PRESETS.get(data, PRESETS["imagenet"])  # any folder gets the ImageNet recipe
    for key, value in {**preset, **given}.items():
        setattr(cfg, key, value)
    return cfg, set(given)


def check_config(cfg):
    """Catch impossible settings before anything is loaded."""
    if not 0 <= cfg.text_loss_lambda < 1:
        raise UserError(f"--text-loss-lambda must be in [0, 1), got {cfg.text_loss_lambda}: 1 would switch the classification loss off")
    if cfg.model not in MODEL_SIZES:
        raise UserError(f"--model {cfg.model!r} is not one of {', '.join(MODEL_SIZES)}")
    if cfg.img_size % cfg.patch_size:
        raise UserError(f"--img-size {cfg.img_size} is not a multiple of --patch-size {cfg.patch_size}")
    if cfg.text_loss not in ("clip", "infonce"):
        raise UserError(f"--text-loss must be clip or infonce, got {cfg.text_loss!r}")
    if cfg.optimizer not in ("lamb", "adamw"):
        raise UserError(f"--optimizer must be lamb or adamw, got {cfg.optimizer!r}")
    if cfg.augment not in ("3aug", "crop", "none"):
        raise UserError(f"--augment must be 3aug, crop or none, got {cfg.augment!r}")
    if cfg.compile not in ("auto", "on", "off"):
        raise UserError(f"--compile must be auto, on or off, got {cfg.compile!r}")
    # counts that divide or step the loop: 0 would fail with a ZeroDivisionError mid-run
    for flag, value, least in (("--batch-size", cfg.batch_size, 1), ("--accum", cfg.accum, 1), ("--log-every", cfg.log_every, 1),
                               ("--ckpt-every", cfg.ckpt_every, 0), ("--limit", cfg.limit, 0), ("--workers", cfg.workers, -1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= cfg.label_noise < 1:
        raise UserError(f"--label-noise must be in [0, 1), got {cfg.label_noise}")
    if cfg.text_shuffle and cfg.text_random:
        raise UserError("--text-shuffle and --text-random are two different controls; choose one")
    if cfg.teacher and cfg.text and not cfg.compare:
        raise UserError("--teacher replaces the text targets: drop --text, or use --compare to run both arms")
    if cfg.compare and not (cfg.text or cfg.teacher):
        raise UserError("--compare needs --text (and/or --teacher): it compares the baseline with the text-taught model")
    if cfg.compare and cfg.text_loss_lambda == 0:
        raise UserError("--compare with --text-loss-lambda 0 would compare the baseline with itself")
    lambda_at(cfg, 0)  # validates the schedule's name


# ----------------------------------------------------------------------------
# Data: the built-in shapes set, CIFAR-100, image folders (ImageNet)

# shapes: 32x32 images of one of ten shapes; the kind is the class. Colour, size, place
# and background vary and each caption names them, so a caption says more than a label.
SHAPE_KINDS = ("circle", "ring", "square", "diamond", "triangle", "plus", "cross", "star", "hexagon", "heart")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "pink": (240, 120, 190), "cyan": (40, 200, 210)}
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}  # radius as a fraction of the image side
PLACES = {"top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
          "left": (0.27, 0.5), "centre": (0.5, 0.5), "right": (0.73, 0.5),
          "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73)}
TEMPLATES = ("a {size} {colour} {shape} near the {place} on a {bg} background",
             "a {bg} picture with a {size} {colour} {shape} near the {place}",
             "{size} {colour} {shape} in the {place} of a {bg} image")
SHAPES_SPLITS = {"train": (4000, 0), "val": (1000, 1)}  # split: (images, seed)


def shape_mask(kind, dx, dy):
    """Inside-test of a shape of radius 1 at offsets (dx, dy) from its centre, y pointing down."""
    d, a = np.hypot(dx, dy), np.arctan2(dy, dx)
    big = np.maximum(abs(dx), abs(dy))
    masks = {
        "circle": lambda: d <= 1,
        "ring": lambda: (d <= 1) & (d >= 0.6),
        "square": lambda: big <= 0.8,
        "diamond": lambda: abs(dx) + abs(dy) <= 1,
        "triangle": lambda: (dy >= -1) & (dy <= 0.75) & (abs(dx) <= (dy + 1) * 0.62),
        "plus": lambda: ((abs(dx) <= 0.28) | (abs(dy) <= 0.28)) & (big <= 1),
        "cross": lambda: ((abs(dx - dy) <= 0.4) | (abs(dx + dy) <= 0.4)) & (big <= 0.8),
        "star": lambda: d <= 0.5 + 0.5 * np.cos(5 * (a + np.pi / 2)).clip(0) ** 0.7,
        "hexagon": lambda: (abs(dy) <= 0.866) & (abs(dx) * 0.866 + abs(dy) * 0.5 <= 0.866),
        "heart": lambda: ((1.2 * dx) ** 2 + (0.25 - 1.2 * dy) ** 2 - 1) ** 3 - (1.2 * dx) ** 2 * (0.25 - 1.2 * dy) ** 3 <= 0,
    }
    return masks[kind]()


def make_shapes(n, seed, size=32):
    """Draw n captioned images, deterministically from the seed: (uint8 [n, size, size, 3], labels [n], captions)."""
    rng = np.random.default_rng(seed)
    s = 2 * size  # drawn at twice the resolution, then averaged down: smooth edges
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPE_KINDS), n)
    captions = []
    for i in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        bg = "dark" if rng.random() < 0.5 else "light"
        r = SIZES[size_name] * s * rng.uniform(0.9, 1.1)
        cx, cy = (np.array(PLACES[place]) + rng.uniform(-0.05, 0.05, 2)) * s
        img = np.full((s, s, 3), rng.uniform(10, 70) if bg == "dark" else rng.uniform(180, 245))
        img += rng.normal(0, 12, (s, s, 1))
        img[shape_mask(SHAPE_KINDS[labels[i]], (xx - cx) / r, (yy - cy) / r)] = np.array(COLOURS[colour]) + rng.normal(0, 15, 3)
        images[i] = img.reshape(size, 2, size, 2, 3).mean((1, 3)).clip(0, 255).round().astype(np.uint8)
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        captions.append(template.format(size=size_name, colour=colour, shape=SHAPE_KINDS[labels[i]], place=place, bg=bg))
    return images, labels.astype(np.int64), captions


_shapes_cache = {}


def shapes_split(split):
    """The fixed train (4000 images, seed 0) or val (1000 images, seed 1) split of shapes."""
    if split not in _shapes_cache:
        _shapes_cache[split] = make_shapes(*SHAPES_SPLITS[split])
    return _shapes_cache[split]


def load_cifar100(data_dir, split):
    """CIFAR-100 from torchvision's on-disk format (DIR/cifar-100-python/{train,test,meta}), downloaded if missing."""
    root = os.path.join(data_dir, "cifar-100-python")
    if not os.path.isdir(root):
        import torchvision
        try:
            torchvision.datasets.CIFAR100(data_dir, download=True)
        except Exception as e:
            raise UserError(f"CIFAR-100 is not in {root} and could not be downloaded ({type(e).__name__}); "
                            f"put torchvision's cifar-100-python folder there or pass --data-dir") from None
    try:
        with open(os.path.join(root, "train" if split == "train" else "test"), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        with open(os.path.join(root, "meta"), "rb") as f:
            names = pickle.load(f, encoding="latin1")["fine_label_names"]
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{root} is not a readable CIFAR-100 folder ({type(e).__name__}: {e}); delete it to download it again") from None
    return images, labels, list(names)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_root(data, data_dir):
    return data_dir if data == "imagenet" else data


def scan_folder(root, split):
    """The samples of root/split/CLASS/*.jpg as (paths, labels, classes), classes sorted like ImageFolder."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"no folder {split_dir}: the data folder must hold train/ and val/ with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise UserError(f"{split_dir} has no class sub-folders: put the images of each class in a folder of its own")
    paths, labels = [], []
    for label, c in enumerate(classes):
        files = sorted(os.path.join(dp, fn) for dp, _, fns in os.walk(os.path.join(split_dir, c), followlinks=True)
                       for fn in fns if fn.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"class folder {os.path.join(split_dir, c)} has no images; remove it or add its images")
        paths += files
        labels += [label] * len(files)
    return paths, np.array(labels, dtype=np.int64), classes


def class_names(data, data_dir):
    """(keys, names) of the classes in label order; keys are what class-level text files are keyed by."""
    if data == "shapes":
        return list(SHAPE_KINDS), list(SHAPE_KINDS)
    if data == "cifar100":
        names = load_cifar100(data_dir, "train")[2]
        return names, [n.replace("_", " ") for n in names]
    classes = scan_folder(folder_root(data, data_dir), "train")[2]
    return classes, classes


class ImageSet(Dataset):
    """One split as uint8 [3, H, W] tensors with labels: from memory (shapes, CIFAR) or from files (folders)."""

    def __init__(self, images=None, paths=None, labels=None, img_size=32):
        self.images, self.paths, self.labels, self.img_size = images, paths, torch.as_tensor(labels), img_size

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if self.images is not None:
            img = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # shape = [3, H, W]
            if img.shape[-1] != self.img_size:
                img = TF.resize(img, self.img_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            return img
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise UserError(f"cannot decode image {self.paths[i]} ({type(e).__name__}); delete or replace the file") from None
        # resize the short side to img_size, bicubic, as in 3-Augment and in evaluation
        return TF.pil_to_tensor(TF.resize(im, self.img_size, interpolation=TF.InterpolationMode.BICUBIC))


def build_data(cfg):
    """(train set, val set, keys of the training samples, class keys, keys of the val samples) for --data."""
    if cfg.data == "shapes":
        (ti, tl, _), (vi, vl, _) = shapes_split("train"), shapes_split("val")
        train, val = ImageSet(ti, labels=tl, img_size=cfg.img_size), ImageSet(vi, labels=vl, img_size=cfg.img_size)
        keys, classes = [str(i) for i in range(len(tl))], list(SHAPE_KINDS)
        val_keys = [str(i) for i in range(len(vl))]
    elif cfg.data == "cifar100":
        ti, tl, classes = load_cifar100(cfg.data_dir, "train")
        vi, vl, _ = load_cifar100(cfg.data_dir, "val")
        train, val = ImageSet(ti, labels=tl, img_size=cfg.img_size), ImageSet(vi, labels=vl, img_size=cfg.img_size)
        keys, val_keys = [str(i) for i in range(len(tl))], [str(i) for i in range(len(vl))]
    else:
        root = folder_root(cfg.data, cfg.data_dir)
        if not os.path.isdir(root) or not os.listdir(root):
            raise UserError(f"data folder {root} is missing or empty: pass the folder that holds train/ and val/")
        tp, tl, classes = scan_folder(root, "train")
        vp, vl, vclasses = scan_folder(root, "val")
        if vclasses != classes:
            raise UserError(f"{root}/val has other class folders than {root}/train; they must match")
        train, val = ImageSet(paths=tp, labels=tl, img_size=cfg.img_size), ImageSet(paths=vp, labels=vl, img_size=cfg.img_size)
        keys = [os.path.basename(p) for p in tp]  # the released encodings are keyed by image file name
        val_keys = [os.path.basename(p) for p in vp]
    if cfg.limit:
        train, val = Prefix(train, cfg.limit), Prefix(val, max(cfg.limit // 4, 1))
        keys, val_keys = keys[:cfg.limit], val_keys[:len(val)]
    return train, val, keys, classes, val_keys


class Prefix(Dataset):
    """The first n samples of an ImageSet (--limit)."""

    def __init__(self, base, n):
        self.base, self.labels = base, base.labels[:n]

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return self.base.load(i)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class OneOf(nn.Module):
    """Apply one of the transforms, chosen with torch's RNG (so one seed fixes all augmentation)."""

    def __init__(self, transforms):
        super().__init__()
        self.transforms = transforms

    def forward(self, x):
        return self.transforms[int(torch.randint(len(self.transforms), ()))](x)


def noisy_labels(labels, num_classes, p, seed):
    """The label-noise experiment: exactly round(p * N) training samples, chosen with the seed,
    get a new label drawn uniformly from the other classes. Returns (labels, flipped indices).

    (old + k) mod C with k uniform in 1..C-1 is uniform over the C - 1 other classes and
    never the old label, so exactly the chosen samples are wrong.
    """
    g = torch.Generator().manual_seed(seed + 12_345)
    flipped = torch.randperm(len(labels), generator=g)[:round(p * len(labels))].sort().values
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + torch.randint(1, num_classes, (len(flipped),), generator=g)) % num_classes
    return noisy, flipped


def train_transform(cfg):
    """3-Augment (DeiT III): padded random crop, flip, one of {grayscale, solarize, blur}, colour jitter."""
    if cfg.augment == "none":
        return T.Compose([T.CenterCrop(cfg.img_size)])
    crop = T.RandomCrop(cfg.img_size, padding=4, padding_mode="reflect")
    if cfg.augment == "crop":
        return crop
    return T.Compose([crop, T.RandomHorizontalFlip(),
                      OneOf([T.Grayscale(3), T.RandomSolarize(128, p=1.0), T.GaussianBlur(7, sigma=(0.2, 2.0))]),
                      T.ColorJitter(0.3, 0.3, 0.3)])


def normalize(images):
    """uint8 [B, 3, H, W] -> float, ImageNet mean and std (done on the device, after the copy)."""
    # non_blocking: a blocking copy to a GPU waits until all the work queued before it is
    # done, which would stall the training loop once per step
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).mul(255).to(images.device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).mul(255).to(images.device, non_blocking=True)
    return (images.float() - mean) / std


class TrainSet(Dataset):
    """Training samples, each augmented with a seed of its own: (uint8 image, label, sample index).

    The sampler hands out (index, seed) pairs. Seeding each sample's augmentation makes
    it independent of which worker draws it, so a run resumed mid-epoch sees exactly the
    crops the uninterrupted run would have seen.
    """

    def __init__(self, base, transform, labels):
        self.base, self.transform, self.labels = base, transform, labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index_seed):
        i, seed = index_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = self.transform(self.base.load(i))
        return img, self.labels[i], i


class EvalSet(Dataset):
    """Validation samples: resize (done in ImageSet) and centre crop; no text."""

    def __init__(self, base, img_size):
        self.base, self.crop = base, T.CenterCrop(img_size)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.crop(self.base.load(i)), self.base.labels[i]


class EpochSampler(Sampler):
    """A seeded permutation per epoch; this rank's share of every optimiser step; can start mid-epoch.

    Step s of an epoch uses perm[s * B : (s + 1) * B] for the global batch B. Micro-batch a
    of rank r takes the slice ((a * world + r) * m, +m) of it, m = B / (world * accum).
    The incomplete last batch is dropped, as in DeiT.
    """

    def __init__(self, n, batch_size, accum, rank, world, seed):
        self.n, self.batch_size, self.accum, self.rank, self.world, self.seed = n, batch_size, accum, rank, world, seed
        self.micro = batch_size // (world * accum)
        self.steps = n // batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps - self.start) * self.accum * self.micro

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                first = s * self.batch_size + (a * self.world + self.rank) * self.micro
                for pos in range(first, first + self.micro):
                    # one seed per (run seed, epoch, position): the same sample at the same place
                    yield perm[pos], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + pos


# ----------------------------------------------------------------------------
# Text targets: one frozen embedding per training image (or per class)

class TextTargets:
    """The embeddings file of caption_embed.py, memory-mapped, matched to the training samples.

    targets(index, label) returns the centred vectors of a batch: t = E[row] - mean (and / std
    with --text-std). Centring removes the direction every caption shares (the encoder's
    common offset), which would otherwise dominate every dot product of the contrastive loss.
    """

    def __init__(self, path, train_keys, class_keys, std=False, shuffle_seed=None, random_seed=None, dataset=""):
        if not os.path.isfile(path):
            raise UserError(f"embeddings file {path} not found; write it with caption_embed.py (see README)")
        try:
            # mmap: the (N, D) matrix stays on disk and in the page cache, shared by every
            # process of the machine, instead of one private copy each (5 GB for ImageNet).
            emb = torch.load(path, mmap=True, weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable embeddings file ({type(e).__name__}); write it again with caption_embed.py") from None
        if not isinstance(emb, dict) or emb.get("format") != "textteacher-embeddings-v1":
            raise UserError(f"{path} is not an embeddings file of caption_embed.py (no 'textteacher-embeddings-v1' format tag)")
        self.path, self.level, self.encoder = path, emb["level"], emb.get("encoder", "")
        self.vectors, keys = emb["embeddings"], emb["keys"]
        self.dim = self.vectors.shape[1]
        if emb.get("split", "train") != "train":
            raise UserError(f"{path} holds the {emb['split']!r} split; TextTeacher needs the captions of the training images")
        # shapes and CIFAR-100 are both keyed "0", "1", ...: only the file's dataset tag tells them apart
        if emb.get("dataset") in PRESETS and dataset in PRESETS and emb["dataset"] != dataset:
            raise UserError(f"{path} holds the captions of {emb['dataset']}, not of --data {dataset}; "
                            f"embed the captions of {dataset} with caption_embed.py")
        self.mean, self.std = emb["mean"].float(), (emb["std"].float().clamp_min(1e-6) if std else None)
        self.check_finite(path)
        row_of = {k: r for r, k in enumerate(keys)}
        wanted = class_keys if self.level == "class" else train_keys
        rows = [row_of.get(k, -1) for k in wanted]
        missing = [k for k, r in zip(wanted, rows) if r < 0]
        if missing:
            what = "classes" if self.level == "class" else "training images"
            hint = " (no key matches: was it made for another dataset?)" if len(missing) == len(wanted) else ""
            raise UserError(f"{len(missing)} of {len(wanted)} {what} have no text target in {path}{hint}, "
                            f"e.g. {', '.join(missing[:3])}; embed their captions with caption_embed.py")
        self.rows = torch.tensor(rows, dtype=torch.long)  # sample (or class) -> row of the file
        if shuffle_seed is not None:
            # control --text-shuffle: the same targets, each given to another image (fixed for the run)
            self.rows = self.rows[torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(shuffle_seed))]
        # control --text-random: Gaussian targets with the per-dimension std of the real ones
        # (and their mean, which centring removes); drawn per row from a seed, not stored
        self.random_seed, self.file_std = random_seed, emb["std"].float()
        self.val_vectors, self.val_keys = emb.get("val_embeddings"), emb.get("val_keys")

    def check_finite(self, path):
        # Chunked through the memory map: the only private memory is one chunk's mask (64 MB
        # at D = 1024). The pages read stay in the page cache, shared by every process that
        # maps the file; RSS counts them (as it will anyway once training has drawn every row).
        for start in range(0, len(self.vectors), 65536):
            if not torch.isfinite(self.vectors[start:start + 65536]).all():
                raise UserError(f"{path} contains NaN or inf values; write it again with caption_embed.py")

    def targets(self, index, label):
        """Centred targets [B, D] for a batch, by sample index (image level) or by label (class level)."""
        rows = self.rows[label if self.level == "class" else index]
        if self.random_seed is not None:
            t = torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(self.random_seed * 1_000_003 + r))
                             for r in rows.tolist()]) * self.file_std
        else:
            t = self.vectors[rows].float() - self.mean
        return t / self.std if self.std is not None else t

    def val_pairs(self, val_keys, limit=500):
        """(indices, centred targets) of the first `limit` validation samples that have a caption
        in the file, or None: the fixed subset on which alignment is measured each epoch."""
        if self.val_vectors is None or self.level != "image":
            return None
        row_of = {k: r for r, k in enumerate(self.val_keys)}
        pairs = [(i, row_of[k]) for i, k in enumerate(val_keys) if k in row_of][:limit]
        if len(pairs) < 2:
            return None
        index, rows = zip(*pairs)
        t = self.val_vectors[list(rows)].float() - self.mean
        return list(index), (t / self.std if self.std is not None else t)


class VisionTeacher(nn.Module):
    """The paper's comparison arm: a frozen vision model whose pooled feature of the augmented
    batch is the target, in place of the caption (same text head, same loss).

    Any Hugging Face vision model: image features where the model has a projection (CLIP),
    else its pooler output (DINOv2: the final-norm CLS token), else the CLS token. Its
    targets are not centred: there are no dataset statistics for an online target.
    """

    def __init__(self, name, device):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        try:
            config = AutoConfig.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).eval().requires_grad_(False).to(device)
        except OSError:
            raise UserError(f"vision model {name!r} is not available offline; pass the folder of a saved "
                            "model (save_pretrained) or connect to the Hugging Face Hub once") from None
        vision = getattr(config, "vision_config", config)
        self.size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        try:  # the teacher's own normalisation, if it ships an image processor configuration
            from transformers import AutoImageProcessor
            processor = AutoImageProcessor.from_pretrained(name)
            mean, std = processor.image_mean, processor.image_std
        except (OSError, ValueError, AttributeError):
            pass
        self.register_buffer("shift", ((torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1).to(device))
        self.register_buffer("scale", (torch.tensor(IMAGENET_STD) / torch.tensor(std)).view(1, 3, 1, 1).to(device))
        self.dim = self.forward(torch.zeros(1, 3, self.size, self.size, device=device)).shape[1]

    @torch.no_grad()
    def forward(self, images):
        """ImageNet-normalised images [B, 3, H, W] -> targets [B, D] in fp32."""
        x = images * self.scale + self.shift  # re-normalised with the teacher's mean and std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        if hasattr(self.model, "get_image_features"):
            return self.model.get_image_features(pixel_values=x).float()
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


# ----------------------------------------------------------------------------
# Model: a DeiT III ViT with timm's parameter names, and the text head

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # shape = [B, width, grid, grid]
        return x.flatten(2).transpose(1, 2)  # shape = [B, grid ** 2, width]


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # shape = [3, B, heads, N, C / heads]
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients at once,
        # where each index's backward would write a zero-filled copy of the whole qkv tensor
        q, k, v = qkv.unbind(0)  # shape = [B, heads, N, C / heads] each
        x = F.scaled_dot_product_attention(q, k, v)  # shape = [B, heads, N, C / heads]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # shape = [B, N, C]


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale, initialised small (1e-4) so that every block starts near identity."""

    def __init__(self, width, init=1e-4):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the kept ones."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, width, heads, mlp_ratio, drop_path, layer_scale=1e-4):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(width, eps=1e-6), Attention(width, heads), LayerScale(width, layer_scale)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(width, eps=1e-6), MLP(width, int(width * mlp_ratio)), LayerScale(width, layer_scale)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ViT(nn.Module):
    """The classifier, and the whole deployed model: no text part lives here."""

    def __init__(self, num_classes, img_size=224, patch_size=16, width=384, depth=12, heads=6, mlp_ratio=4.0, drop_path=0.0,
                 layer_scale=1e-4):
        super().__init__()
        self.width = width
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # position embedding for the patch tokens only: the CLS token has no position (DeiT III)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, width))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly increasing with depth
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, r, layer_scale) for r in rates])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        init_weights(self)

    def forward_features(self, x):
        """Images [B, 3, H, W] -> the post-norm CLS feature [B, width] that both heads read."""
        x = self.patch_embed(x) + self.pos_embed  # shape = [B, grid ** 2, width]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # shape = [B, grid ** 2 + 1, width]
        x = self.norm(self.blocks(x))
        return x[:, 0]  # shape = [B, width]

    def forward(self, x):
        return self.head(self.forward_features(x))  # shape = [B, num_classes]


def init_weights(vit):
    """DeiT III's initialisation: truncated normal (std 0.02) for linear layers and the learned
    tokens, zero biases, unit LayerNorms; the patch convolution keeps PyTorch's default;
    LayerScale starts at 1e-4 (set in LayerScale). The text head is not touched here."""
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)


class TextTeacher(nn.Module):
    """The ViT plus the text head used in training: returns (logits, z, F).

    The text head is one Linear(width -> D) with PyTorch's default initialisation,
    reading the same post-norm CLS feature F as the classifier. It exists only for the
    auxiliary loss and is thrown away at export. text_dim = 0 builds none (the baseline).
    """

    def __init__(self, vit, text_dim=0, freeze_head=False):
        super().__init__()
        self.vit = vit
        self.text_head = nn.Linear(vit.width, text_dim) if text_dim else None
        if self.text_head is not None and freeze_head:
            self.text_head.requires_grad_(False)

    def forward(self, x):
        feat = self.vit.forward_features(x)  # shape = [B, width]
        return self.heads(feat)

    @torch.compiler.disable
    def heads(self, feat):
        """(logits, z, F), the heads run outside torch.compile: adaptive_weight differentiates
        the losses at F, so F must be a node of the autograd graph between the ViT and the
        heads. Compiled into one graph with the ViT, F would be a separate output of that
        graph, which no loss depends on, and torch.autograd.grad(loss, F) would fail."""
        z = self.text_head(feat) if self.text_head is not None else None  # shape = [B, D]
        return self.vit.head(feat), z, feat


def build_model(cfg, num_classes, text_dim):
    width, depth, heads = MODEL_SIZES[cfg.model]
    vit = ViT(num_classes, cfg.img_size, cfg.patch_size, width, depth, heads, drop_path=cfg.drop_path, layer_scale=cfg.layer_scale)
    return TextTeacher(vit, text_dim, cfg.freeze_text_head)


# ----------------------------------------------------------------------------
# Losses: the alignment loss, the adaptive weight, the lambda schedule

def clip_loss(z, t):
    """The paper's alignment loss on raw dot products:

        logits = z @ t^T,   L_txt = ( CE(logits, arange(B)) + CE(logits^T, arange(B)) ) / 2

    Row i of logits scores image i against every caption of the batch, column j caption j
    against every image: the first term picks the right caption for each image, the second
    the right image for each caption. No normalisation and no temperature: the norm of the
    head's weights acts as a learned temperature. Images of the same class are negatives too.
    """
    logits = z @ t.T  # shape = [B, B]
    labels = torch.arange(len(z), device=z.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def infonce_loss(z, t, temperature):
    """Ablation: the same symmetric loss on cosine similarities divided by a temperature."""
    return clip_loss(F.normalize(z, dim=-1) / temperature, F.normalize(t, dim=-1))


def adaptive_weight(loss_cls, loss_txt, feat):
    """w = ( ||dL_cls/dF|| + 1e-7 ) / ( ||dL_txt/dF|| + 1e-7 ), Frobenius norms over the batch.

    F is the post-norm feature both heads read, so with lam = 0.5 the two losses push the
    backbone equally hard, whatever their scales. w is a number, not part of the graph
    (detached), and stays a tensor on the device: reading it would synchronise every step.
    """
    g_cls, = torch.autograd.grad(loss_cls, feat, retain_graph=True)
    g_txt, = torch.autograd.grad(loss_txt, feat, retain_graph=True)
    return ((g_cls.norm() + 1e-7) / (g_txt.norm() + 1e-7)).detach()


def step_losses(model, images, y, targets, lam, cfg, autocast=contextlib.nullcontext()):
    """The objective of one micro-batch, L = lam_e * w * L_txt + (1 - lam_e) * L_cls: (L, L_cls, L_txt, w).

    The training loop and the benchmark both call this, so the benchmark times the real
    step. targets = None is the baseline: L = L_cls, and L_txt and w are zeros. Nothing
    here reads a value back to the host, so a step never waits for the device.
    """
    with autocast:
        logits, z, feat = model(images)
    # the losses in fp32, outside autocast
    loss_cls = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if targets is None:
        zero = torch.zeros((), device=images.device)
        return loss_cls, loss_cls, zero, zero
    loss_txt = (clip_loss(z.float(), targets) if cfg.text_loss == "clip"
                else infonce_loss(z.float(), targets, cfg.temperature))
    w = adaptive_weight(loss_cls, loss_txt, feat) if cfg.adaptive_weight and lam > 0 else torch.ones((), device=images.device)
    # at lam_e = 0 the text term is kept with weight 0 so that DDP still sees a gradient
    # (of zeros) for the text head
    return lam * w * loss_txt + (1 - lam) * loss_cls, loss_cls, loss_txt, w


def lambda_at(cfg, epoch):
    """lam_e, the text loss weight of epoch e (0-based) for E epochs and lam = --text-loss-lambda:

    constant lam | linear lam * (E - e) / E | cosine lam * cos(pi e / 2E) | fullcosine
    lam / 2 * (1 + cos(pi e / E)) | jump-A-B-R: lam for e < A, then linearly down to R * lam
    at e = B, R * lam after (jump-30-50-0 switches the text loss off between 30 and 50).
    """
    lam, E, e, name = cfg.text_loss_lambda, cfg.epochs, epoch, cfg.lambda_schedule
    if name == "constant":
        return lam
    if name == "linear":
        return lam * (E - e) / E
    if name == "cosine":
        return lam * math.cos(math.pi * e / (2 * E))
    if name == "fullcosine":
        return lam / 2 * (1 + math.cos(math.pi * e / E))
    if name.startswith("jump-"):
        try:
            a, b, r = (float(v) for v in name[5:].split("-"))
        except ValueError:
            raise UserError(f"--lambda-schedule {name!r}: write jump-A-B-R, e.g. jump-30-50-0") from None
        if not a <= b:
            raise UserError(f"--lambda-schedule {name!r}: A must not be after B")
        if e < a:
            return lam
        if e >= b:
            return r * lam
        return lam * (1 - (1 - r) * (e - a) / (b - a))
    raise UserError(f"--lambda-schedule {name!r} is not constant, linear, cosine, fullcosine or jump-A-B-R")


def cutmix(images, y, t, alpha, seed):
    """CutMix with one lambda per batch and the flipped batch as partner (timm's rule).

    A box of the partner image is pasted in; lambda is corrected to the pasted area; the
    soft labels y and the text targets t are mixed with that same lambda and partner:
    t_i <- lam * t_i + (1 - lam) * t_partner(i), so the positive pair stays on the diagonal.
    Deterministic given the seed, so CutMix needs no state in a checkpoint.
    """
    rng = np.random.default_rng(seed)
    lam = rng.beta(alpha, alpha)
    H, W = images.shape[-2:]
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = rng.integers(H), rng.integers(W)
    y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
    images = images.clone()
    images[:, :, y1:y2, x1:x2] = images.flip(0)[:, :, y1:y2, x1:x2]
    lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
    y = lam * y + (1 - lam) * y.flip(0)
    t = lam * t + (1 - lam) * t.flip(0) if t is not None else None
    return images, y, t, lam


# ----------------------------------------------------------------------------
# Optimiser and learning-rate schedule

class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020), the optimiser of DeiT III's recipe. For each tensor p:

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   t = step
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p
        p = p - lr * r * u,   r = ||p|| / ||u|| (1 if either is 0)   where wd > 0, else r = 1

    The trust ratio r gives every weight matrix a step proportional to its own norm, which
    is what lets a 2048 batch train at lr 3e-3. As in timm's Lamb, tensors without weight
    decay (biases, norms) take plain Adam steps.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
            # the formula above on every tensor of the group at once: a torch._foreach_ call does
            # one operation on a list of tensors (as torch.optim's own optimisers do), where a loop
            # over the ~150 tensors of a ViT would launch a dozen small GPU kernels for each
            g = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            t = [self.state[p]["step"] for p in params]
            torch._foreach_lerp_(m, g, 1 - b1)  # m + (1 - b1) (g - m) = b1 m + (1 - b1) g
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            denom = torch._foreach_div(v, [1 - b2 ** s for s in t])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(m, [1 - b1 ** s for s in t])
            torch._foreach_div_(u, denom)
            if wd != 0:
                torch._foreach_add_(u, params, alpha=wd)
                w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(u))
                r = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)  # one trust ratio per tensor
                # (tensor times its own 0-d ratio: PyTorch runs this one as a loop over tensors inside)
                torch._foreach_mul_(u, list(r.unbind()))
            torch._foreach_add_(params, u, alpha=-lr)


def build_optimizer(cfg, model, device):
    """Weight decay on weight matrices only: biases, norms, LayerScale, pos_embed and cls_token are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, eps=cfg.opt_eps)
    # fused: one pass over all tensors instead of a dozen small operations per tensor (on a
    # 2-core CPU it halves the optimiser's share of a ViT-Ti step; on a GPU, far fewer launches)
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.opt_eps, fused=device.type in ("cuda", "cpu"))


def lr_at(cfg, step, steps_per_epoch):
    """Linear warm-up from warmup_lr to lr over warmup_epochs, then cosine down to min_lr, per step."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------
# Checkpoints and export

def rng_state():
    """Every RNG that decides the future of the run, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                mps=torch.mps.get_rng_state() if torch.backends.mps.is_available() else None)


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("mps") is not None and torch.backends.mps.is_available():  # absent from older checkpoints
        torch.mps.set_rng_state(state["mps"])


def save_atomic(save, path):
    """Write through a temporary file and rename it into place: a crash mid-write leaves
    the previous file intact, never a truncated one."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # same folder (so the rename is atomic), same extension
    try:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path, indent=2):
    """A JSON file, written atomically (save_atomic)."""
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=indent)
    save_atomic(write, path)


def load_checkpoint(path):
    """A checkpoint file, or the checkpoint.pt of a run folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; pass a checkpoint file or a run folder holding checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); use the run's previous checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "textteacher-checkpoint-v1":
        raise UserError(f"{path} is not a checkpoint of textteacher.py")
    return ckpt, path


def timm_config(model_args):
    """Keyword arguments that build the same network as timm's VisionTransformer."""
    a = model_args
    return dict(img_size=a["img_size"], patch_size=a["patch_size"], num_classes=a["num_classes"], embed_dim=a["width"],
                depth=a["depth"], num_heads=a["heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True, class_token=True,
                no_embed_class=True, init_values=a.get("layer_scale", 1e-4), global_pool="token")


def export(vit, model_args, classes, out_dir):
    """Write the deployable ViT: model.safetensors + config.json, and a torch.export program model.pt2.

    Nothing textual is exported: the text head lives outside the ViT (in TextTeacher) and
    is simply not part of vit.state_dict(). Both written forms are checked to give the
    logits of the training model in eval mode. Load the weights in a few lines:

        cfg = json.load(open("config.json"))
        vit = ViT(**cfg["model_args"])                      # or timm's VisionTransformer(**cfg["timm_kwargs"])
        vit.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    """
    from safetensors.torch import load_file, save_file
    vit = vit.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    leaked = [k for k in state if "text" in k]
    if leaked:
        raise RuntimeError(f"text parameters in the exported ViT: {leaked}")
    os.makedirs(out_dir, exist_ok=True)
    config = dict(model_args=model_args, timm_kwargs=timm_config(model_args), classes=list(classes),
                  input=dict(size=model_args["img_size"], mean=IMAGENET_MEAN, std=IMAGENET_STD, range="RGB in [0, 1], then normalised"))
    save_atomic(lambda p: save_file(state, p), os.path.join(out_dir, "model.safetensors"))
    save_json(config, os.path.join(out_dir, "config.json"))

    # check: a fresh ViT built from the written files gives exactly the same logits
    x = torch.randn(4, 3, model_args["img_size"], model_args["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vit.cpu()(x)
        fresh = ViT(**model_args).eval()
        fresh.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=True)
        if not torch.equal(fresh(x), reference):
            raise RuntimeError("the exported weights do not reproduce the training model's logits")
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(fresh, (x,), dynamic_shapes={"x": {0: batch}})
    save_atomic(lambda p: torch.export.save(program, p), os.path.join(out_dir, "model.pt2"))
    with torch.no_grad():
        exported = torch.export.load(os.path.join(out_dir, "model.pt2")).module()(x)
    if not torch.allclose(exported, reference, rtol=1e-5, atol=1e-5):
        raise RuntimeError("the torch.export program does not reproduce the training model's logits")
    return out_dir


def export_checkpoint(path):
    """--export CHECKPOINT: rebuild the model from the checkpoint and export its ViT beside it."""
    ckpt, path = load_checkpoint(path)
    model = TextTeacher(ViT(**ckpt["model_args"]), ckpt["text_dim"])
    model.load_state_dict(ckpt["model"])
    out = export(model.vit, ckpt["model_args"], ckpt["classes"], os.path.join(os.path.dirname(path), "export"))
    print(f"exported the ViT of {path} to {out}")


# ----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(vit, loader, device, autocast, ddp):
    """Top-1 and top-5 accuracy in %, counted over samples (not a mean of batch means) and
    summed over all ranks; each rank holds a disjoint share of the validation set."""
    vit.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # correct top-1, correct top-5, seen
    for images, labels in loader:
        images, labels = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        with autocast:
            logits = vit(images)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # shape = [B, 5]
        counts[:2] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        counts[2] += len(labels)  # a number: torch.tensor(n, device=...) is a blocking copy, which waits for the GPU
    if ddp:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


@torch.no_grad()
def alignment(model, images, targets, cfg, device):
    """How well the text head's image embeddings match the captions, on a fixed captioned
    validation subset of M images: image-to-caption retrieval top-1 (each image scores all M
    captions the way the loss does: dot products for clip, cosines for infonce), and the mean
    cosine of matching pairs (the diagonal) and of non-matching ones (the rest)."""
    model.eval()
    z = torch.cat([model(normalize(images[i:i + 256].to(device)))[1] for i in range(0, len(images), 256)]).float()
    t = targets.to(device)
    cos = F.normalize(z, dim=-1) @ F.normalize(t, dim=-1).T  # shape = [M, M]
    scores = z @ t.T if cfg.text_loss == "clip" else cos
    hits = scores.argmax(1) == torch.arange(len(z), device=device)
    M = len(z)
    return dict(retrieval_top1=100 * hits.float().mean().item(), cos_match=cos.diag().mean().item(),
                cos_other=((cos.sum() - cos.diag().sum()) / (M * (M - 1))).item())


# ----------------------------------------------------------------------------
# Benchmark: what the text objective costs, measured on synthetic batches

BENCH_TEXT_DIM = 768  # the width of the benchmark's random targets: a BERT-base text encoder's


def synchronize(device):
    """Wait for the device's queued work: a timer must stop when the work is done, not when it is queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_flops(cfg, num_classes):
    """FLOPs per image of the ViT's forward pass and of a training step (forward and backward),
    as FlopCounterMode counts them: 2 * M * N * K per matmul and per patch convolution;
    element-wise work (norms, GELU, softmax, the optimiser) is not counted.

    I build the model on the meta device: shapes only, no memory and no arithmetic. There
    SDPA takes its reference path of two batched matmuls, which the counter sees; the fused
    CPU kernel that runs for real is not in its table and would count as zero.
    """
    with torch.device("meta"):
        vit = build_model(cfg, num_classes, 0).vit
        images = torch.empty(1, 3, cfg.img_size, cfg.img_size)
        with FlopCounterMode(display=False) as forward:
            vit(images)
        with FlopCounterMode(display=False) as step:
            vit(images).sum().backward()
    return forward.get_total_flops(), step.get_total_flops()


def matmul_peak(device, dtype):
    """FLOP/s of one large square matmul: the most any model's matmuls can expect of this device."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        synchronize(device)
        t = time.perf_counter()
        a @ a
        synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:])  # the first one warms up


def max_rss():
    """The most memory this process has held so far, in bytes (Linux reports KiB, macOS bytes)."""
    import resource  # Unix only, hence imported here
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def benchmark(cfg, warmup=3, steps=1, repeats=15):
    """--benchmark: time the training step of the configured model without and with the text
    objective, the text objective on its own, and inference, on synthetic batches; print the
    numbers and return them.

    Both arms run the training loop's own code (step_losses, backward, clipping, the
    optimiser) on the loop's device, precision and compilation. The arms alternate repeat
    by repeat, so that a slow phase of a shared machine hits both alike; every number is the
    median over repeats of `steps` steps, after `warmup` untimed steps (which also compile).
    """
    device, autocast, use_compile = compute_setup(cfg)  # the same device, precision and compilation as train()
    num_classes = {"shapes": len(SHAPE_KINDS), "cifar100": 100}.get(cfg.data, 1000)  # as --data would have it
    micro = cfg.batch_size // cfg.accum
    if micro < 2 or micro * cfg.accum != cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --accum {cfg.accum} with at least 2 images per micro-batch")
    torch.manual_seed(cfg.seed)
    images = torch.randn(micro, 3, cfg.img_size, cfg.img_size, device=device)
    y = F.one_hot(torch.randint(num_classes, (micro,), device=device), num_classes).float()
    targets = torch.randn(micro, BENCH_TEXT_DIM, device=device)
    lam = 0.5  # the value does not change the cost, as long as it is above 0
    where = f"{device.type}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    print(f"benchmark: ViT-{cfg.model}/{cfg.patch_size} at {cfg.img_size}px, batch {cfg.batch_size}"
          + (f" ({cfg.accum} x {micro})" if cfg.accum > 1 else "") + f", {cfg.optimizer}, {where}, "
          + ("bf16 autocast" if device.type == "cuda" else "fp32") + (", compiled" if use_compile else ", eager")
          + f"; medians of {repeats} x {steps} steps after {warmup} warm-up steps", flush=True)

    def training_step(text_dim):
        """A fresh model and optimiser, and a function doing one optimiser step of the loop with them."""
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes, text_dim).to(device)
        optimizer = build_optimizer(cfg, model, device)
        train_model = torch.compile(model) if use_compile else model

        def step():
            for _ in range(cfg.accum):
                loss = step_losses(train_model, images, y, targets if text_dim else None, lam, cfg, autocast)[0]
                (loss / cfg.accum).backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model, step

    def seconds(step):
        """Seconds per call of step, over `steps` calls."""
        synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return (time.perf_counter() - t) / steps

    # memory first, before anything else has raised the process's high-water mark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = max_rss()
    model, text_step = training_step(BENCH_TEXT_DIM)
    for _ in range(warmup):
        text_step()
    synchronize(device)
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss()) - before
    base_model, base_step = training_step(0)
    for _ in range(warmup):
        base_step()
    times = {"baseline": [], "textteacher": []}
    arms = [("baseline", base_step), ("textteacher", text_step)]
    for i in range(repeats):
        for name, step in arms if i % 2 == 0 else arms[::-1]:  # either arm goes first as often
            times[name].append(seconds(step))
    base, text = statistics.median(times["baseline"]), statistics.median(times["textteacher"])
    # the cost ratio from the two arms' times of the same repeat: a slow phase cancels out
    ratios = [t / b for b, t in zip(times["baseline"], times["textteacher"])]
    ratio = statistics.median(ratios)
    # the middle half of the per-repeat ratios: how far to trust the median on this machine
    spread = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if repeats > 1 else [ratio, ratio]

    # The text objective alone. Everything TextTeacher adds to the step happens after F (text
    # head, contrastive loss, adaptive weight, and their backward), so time that part of both
    # arms from a leaf F: the whole-step ratio above is only as precise as the machine is steady.
    feat = torch.randn(micro, model.vit.width, device=device)

    def after_f(m, t):
        def run():
            f = feat.clone().requires_grad_(True)
            step_losses(m.heads, f, y, t, lam, cfg, autocast)[0].backward()
        return run
    after = {"baseline": after_f(base_model, None), "textteacher": after_f(model, targets)}
    extra = []
    for _ in range(warmup):
        after["baseline"](), after["textteacher"]()
    for _ in range(10 * repeats):  # cheap: milliseconds each
        t_base, t_text = seconds(after["baseline"]), seconds(after["textteacher"])
        extra.append(t_text - t_base)
    extra_per_step = statistics.median(extra) * cfg.accum  # seconds per optimiser step

    vit = model.vit.eval()
    infer_model = torch.compile(vit) if use_compile else vit

    @torch.no_grad()
    def infer():
        with autocast:
            infer_model(images)
    for _ in range(warmup):
        infer()
    infer_time = statistics.median(seconds(infer) for _ in range(repeats))

    forward_flops, train_flops = count_flops(cfg, num_classes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the step's matmuls run in
    peak = matmul_peak(device, dtype)
    r = dict(parameters=sum(p.numel() for p in model.vit.parameters()),
             text_head_parameters=sum(p.numel() for p in model.text_head.parameters()),
             forward_flops=forward_flops, train_flops=train_flops,
             baseline_images_per_s=cfg.batch_size / base, textteacher_images_per_s=cfg.batch_size / text,
             textteacher_step_ratio=ratio, textteacher_step_ratio_quartiles=spread,
             text_objective_ms=extra_per_step * 1e3, text_objective_share=extra_per_step / text, inference_images_per_s=micro / infer_time,
             peak_memory_mb=memory / 2 ** 20, matmul_peak_flops=peak)
    r["train_utilisation"] = r["baseline_images_per_s"] * train_flops / peak
    r["inference_utilisation"] = r["inference_images_per_s"] * forward_flops / peak
    print(f"  parameters     {r['parameters'] / 1e6:.2f}M in the ViT; the text head adds {r['text_head_parameters'] / 1e6:.2f}M "
          f"({BENCH_TEXT_DIM}-d targets) and is dropped at export")
    print(f"  FLOPs / image  {forward_flops / 1e9:.3f} G forward, {train_flops / 1e9:.3f} G training (forward + backward), by FlopCounterMode")
    print(f"  training       baseline {r['baseline_images_per_s']:.1f} img/s, TextTeacher {r['textteacher_images_per_s']:.1f} img/s: "
          f"per repeat, TextTeacher's step took a median {ratio:.3f}x the baseline's ({ratio - 1:+.1%}; "
          f"middle half of the repeats {spread[0]:.3f}-{spread[1]:.3f}x)")
    print(f"  text objective {r['text_objective_ms']:.2f} ms per step on its own (text head, loss, adaptive weight and their "
          f"backward, timed from F): {r['text_objective_share']:.2%} of TextTeacher's step")
    print(f"  inference      {r['inference_images_per_s']:.1f} img/s")
    print(f"  peak memory    {r['peak_memory_mb']:.0f} MB ("
          + ("max allocated" if device.type == "cuda" else "rise of the max RSS") + " while training TextTeacher)")
    print(f"  matmul peak    {peak / 1e9:.0f} GFLOP/s measured ({str(dtype).removeprefix('torch.')}); model FLOPs utilisation: "
          f"training {r['train_utilisation']:.0%}, inference {r['inference_utilisation']:.0%}")
    return r


# ----------------------------------------------------------------------------
# Training

def compute_setup(cfg, local_rank=None):
    """(device, autocast, use_compile) for training and the benchmark alike: bf16 autocast on
    CUDA (no loss scaler needed, unlike fp16), fp32 elsewhere; torch.compile on CUDA unless
    --compile says otherwise. local_rank: this process's GPU under torchrun."""
    name = cfg.device if cfg.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" and local_rank is not None else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    return device, autocast, cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def train(cfg, given, stop=None):
    """Train, evaluate every epoch, checkpoint, export. stop["signal"] is set by main's signal handler."""
    stop = stop if stop is not None else {"signal": None}
    # -- setup: distributed, device, precision -------------------------------
    # One distributed path: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this
    # is a single process.
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    device, autocast, use_compile = compute_setup(cfg, local_rank if ddp else None)
    if cfg.device == "auto":
        cfg.device = device.type

    # -- resume: the checkpoint's config decides everything but how to compute -------
    ckpt = None
    if cfg.resume:
        ckpt, ckpt_path = load_checkpoint(cfg.resume)
        saved = ckpt["config"]
        clash = [k for k in sorted(given) if k not in RESUME_FREE and getattr(cfg, k) != saved.get(k, getattr(cfg, k))]
        if clash:
            raise UserError(f"--resume {ckpt_path} is a run with other settings ({', '.join(f'{k}={saved[k]!r}' for k in clash)}); "
                            "drop those flags to continue it, or start a new run")
        for k, v in saved.items():
            if k not in RESUME_FREE or k not in given:
                setattr(cfg, k, v)
        run_dir = os.path.dirname(ckpt_path)
    else:
        cfg.name = cfg.name or f"{os.path.basename(cfg.data.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = os.path.join(cfg.out_dir, cfg.name)
        taken = os.path.exists(os.path.join(run_dir, "config.json"))
        if ddp:
            # every rank stops or none, on rank 0's view: the ranks' clocks may straddle a second
            # (the default name), and a late rank could see the folder rank 0 has just created
            shared = [cfg.name, taken]
            dist.broadcast_object_list(shared, src=0)
            cfg.name, taken = shared
            run_dir = os.path.join(cfg.out_dir, cfg.name)
        if taken and not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            raise UserError(f"{run_dir} holds a run that saved no checkpoint (it failed early, or is still starting); "
                            "delete that folder or choose another --name")
        if taken:
            raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --name")

    # -- data ------------------------------------------------------------------------
    micro = cfg.batch_size // (world * cfg.accum)  # the per-device batch: also the number of contrastive candidates
    if micro * world * cfg.accum != cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes x --accum {cfg.accum}")
    use_text = bool(cfg.text) and cfg.text_loss_lambda > 0
    use_teacher = bool(cfg.teacher) and cfg.text_loss_lambda > 0
    if (use_text or use_teacher) and micro < 2:
        raise UserError(f"the per-device batch is {micro}: the contrastive loss needs at least 2 images per device; "
                        "raise --batch-size or lower --accum")
    train_base, val_base, keys, classes, val_keys = build_data(cfg)
    labels = train_base.labels
    if cfg.label_noise > 0:
        labels, flipped = noisy_labels(labels, len(classes), cfg.label_noise, cfg.seed)
    text = TextTargets(cfg.text, keys, classes, cfg.text_std, shuffle_seed=cfg.seed if cfg.text_shuffle else None,
                       random_seed=cfg.seed if cfg.text_random else None, dataset=cfg.data) if use_text else None
    teacher = VisionTeacher(cfg.teacher, device) if use_teacher else None
    target_dim = text.dim if text else teacher.dim if teacher else 0  # the text head's output size; 0: none
    if ckpt and ckpt["text_dim"] != target_dim:
        raise UserError(f"the checkpoint's text head has {ckpt['text_dim']} dimensions but {cfg.text or cfg.teacher} has "
                        f"{target_dim}; resume with the embeddings file the run started with")
    if ckpt and ckpt["classes"] != list(classes):
        raise UserError(f"the checkpoint was trained on {len(ckpt['classes'])} other classes; resume with the run's dataset")
    steps_per_epoch = len(train_base) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(train_base)} training images")
    workers = cfg.workers if cfg.workers >= 0 else min(8, (os.cpu_count() or 2) // max(world, 1))
    sampler = EpochSampler(len(train_base), cfg.batch_size, cfg.accum, rank, world, cfg.seed)
    # Loaders get a generator of their own so that creating an iterator does not draw from the
    # global RNG (which drives stochastic depth): a resumed run must see the same RNG stream.
    loader_args = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                       worker_init_fn=ignore_sigint, prefetch_factor=4 if workers > 0 else None,
                       generator=torch.Generator().manual_seed(cfg.seed))
    train_loader = DataLoader(TrainSet(train_base, train_transform(cfg), labels), batch_size=micro,
                              sampler=sampler, drop_last=False, **loader_args)
    # each rank evaluates every world-th validation image: all images once, none twice
    val_loader = DataLoader(EvalSet(val_base, cfg.img_size), batch_size=max(micro, 64),
                            sampler=list(range(rank, len(val_base), world)), **loader_args)
    # a fixed captioned validation subset, held in memory, on which rank 0 measures alignment
    align = text.val_pairs(val_keys) if text and master else None
    if align:
        align = torch.stack([EvalSet(val_base, cfg.img_size)[i][0] for i in align[0]]), align[1]

    # -- model and optimiser ---------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, len(classes), target_dim).to(device)
    width, depth, heads = MODEL_SIZES[cfg.model]
    model_args = dict(num_classes=len(classes), img_size=cfg.img_size, patch_size=cfg.patch_size,
                      width=width, depth=depth, heads=heads, mlp_ratio=4.0, layer_scale=cfg.layer_scale)
    # stochastic depth: a stream of its own per rank (other masks on every GPU), the same with
    # or without a text head (so the arms of --compare draw the same masks)
    torch.manual_seed(cfg.seed + 1 + rank)
    optimizer = build_optimizer(cfg, model, device)
    epoch, step, best, sums = 0, 0, 0.0, torch.zeros(3, device=device)  # sums of loss_cls, loss_txt, w
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, best, sums = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["sums"].to(device)
        if len(ckpt["rng"]) == world:  # one state per rank; another number of processes starts fresh streams
            set_rng_state(ckpt["rng"][rank])
    train_model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else model
    if use_compile:
        train_model = torch.compile(train_model)

    if master:
        os.makedirs(run_dir, exist_ok=True)
        save_json(dataclasses.asdict(cfg), os.path.join(run_dir, "config.json"))
        log = os.path.join(run_dir, "metrics.jsonl")
        if ckpt:
            # a process killed while saving leaves its temporary file (name.tmpPID.ext, see
            # save_atomic) next to the intact previous one: partial, of no use, and possibly large
            for entry in os.scandir(run_dir):
                if re.fullmatch(r"\w+\.tmp\d+\.(pt|json|jsonl)", entry.name):
                    os.remove(entry.path)
                    print(f"removed {entry.path}, a partial file left by a process killed while saving", flush=True)
        if ckpt and os.path.exists(log):
            # an epoch is logged just before its checkpoint is written: a run that died in
            # between logged an epoch it will now run again, so drop it (and any torn last line)
            with open(log) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["epoch"] <= epoch]
            save_atomic(lambda p: open(p, "w").writelines(kept), log)
        if cfg.label_noise > 0:  # which labels were replaced, and by what: the run can be audited
            noise = dict(p=cfg.label_noise, seed=cfg.seed, flipped=flipped.tolist(), new_labels=labels[flipped].tolist(),
                         clean_labels=train_base.labels[flipped].tolist())
            save_json(noise, os.path.join(run_dir, "label_noise.json"), indent=None)
        n_params = sum(p.numel() for p in model.vit.parameters())
        print(f"run {run_dir}: {cfg.data}, {len(train_base)} training images, {len(classes)} classes; ViT-{cfg.model}/{cfg.patch_size} "
              f"at {cfg.img_size}px ({n_params / 1e6:.2f}M parameters); "
              + (f"text targets {cfg.text} ({text.level} level, {text.dim}-d)" if text else
                 f"vision teacher {cfg.teacher} ({teacher.dim}-d)" if teacher else "baseline (no text head)")
              + (f", lambda {cfg.text_loss_lambda} {cfg.lambda_schedule}" if target_dim else "")
              + (f"; label noise {cfg.label_noise}: {len(flipped)} labels replaced" if cfg.label_noise > 0 else "")
              + f"; {world} process(es) x {cfg.accum} accum x {micro} per device = batch {cfg.batch_size}; {device}"
              + (f"; resuming at epoch {epoch + 1} step {step}" if ckpt else ""), flush=True)

    def average_sums():
        """Every rank's loss sums become the mean over ranks, so that the log is that of the whole
        batch, not of rank 0's share. A linear map: averaging mid-epoch (at a checkpoint) and again
        at the end of the epoch gives the same mean as averaging once."""
        if ddp:
            dist.all_reduce(sums)
            sums.div_(world)

    def checkpoint(epoch, step):
        """Everything that decides the rest of the run, written by rank 0 only (every rank calls it:
        the RNG states of all ranks are gathered, the loss sums averaged)."""
        average_sums()
        rngs = [rng_state()]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if not master:
            return
        state = dict(format="textteacher-checkpoint-v1", model=model.state_dict(), optimizer=optimizer.state_dict(),
                     epoch=epoch, step=step, best=best, sums=sums.cpu(), rng=rngs, config=dataclasses.asdict(cfg),
                     model_args=model_args, text_dim=target_dim, classes=list(classes))
        save_atomic(lambda p: torch.save(state, p), os.path.join(run_dir, "checkpoint.pt"))

    # -- the loop ----------------------------------------------------------------------
    num_classes = len(classes)
    top1 = None
    bad_step = torch.tensor(-1, device=device)  # first step whose loss was not finite, kept on the device
    while epoch < cfg.epochs:
        lam = lambda_at(cfg, epoch)
        sampler.set_epoch(epoch, step)
        model.train()
        batches, t0, seen = iter(train_loader), time.time(), 0
        while step < steps_per_epoch:
            global_step = epoch * steps_per_epoch + step
            lr = lr_at(cfg, global_step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for a in range(cfg.accum):
                images, labels, index = next(batches)
                # the text targets are gathered on the host from the memory-mapped file; on a GPU they
                # are staged in page-locked memory, from which the copy to the device is asynchronous
                targets = text.targets(index, labels) if text else None
                if targets is not None:
                    targets = (targets.pin_memory() if device.type == "cuda" else targets).to(device, non_blocking=True)
                images = normalize(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
                y = F.one_hot(labels, num_classes).float()
                if cfg.cutmix > 0:
                    images, y, targets, _ = cutmix(images, y, targets, cfg.cutmix, (cfg.seed, global_step, a, rank))
                if teacher is not None:
                    with autocast:  # in the student's precision; the targets come out in fp32
                        targets = teacher(images)  # the vision teacher sees the very batch the student sees
                # DDP averages gradients only on the last micro-batch of a step
                sync = contextlib.nullcontext() if not ddp or a == cfg.accum - 1 else train_model.no_sync()
                with sync:
                    loss, loss_cls, loss_txt, w = step_losses(train_model, images, y, targets, lam, cfg, autocast)
                    (loss / cfg.accum).backward()
                sums += torch.stack([loss_cls.detach(), loss_txt.detach(), w]) / cfg.accum
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + cfg.batch_size
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), global_step, bad_step)

            # reading values back from the device synchronises it: only every log_every steps
            boundary = step % cfg.log_every == 0 or step == steps_per_epoch or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if boundary:
                check_finite(bad_step, run_dir, ddp)
                if master and sys.stderr.isatty():
                    print(f"\repoch {epoch + 1} step {step}/{steps_per_epoch} loss_cls {loss_cls.item():.4f} "
                          f"loss_txt {loss_txt.item():.4f}", end="", file=sys.stderr, flush=True)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < steps_per_epoch:
                checkpoint(epoch, step)
            if stop_requested(stop, ddp, boundary):
                check_finite(bad_step, run_dir, ddp)  # never save weights that a NaN step has spoilt
                checkpoint(epoch, step)
                raise Interrupted(f"stopped by signal {stop['signal']} at epoch {epoch + 1} step {step}; "
                                  f"checkpoint saved, continue with --resume {run_dir}")

        # -- end of epoch: evaluate, log, checkpoint ---------------------------------------
        elapsed = time.time() - t0
        # the lr of the epoch's last step, for the log; set here too because a run stopped
        # right after that step resumes with no step left to run in the epoch
        lr = lr_at(cfg, (epoch + 1) * steps_per_epoch - 1, steps_per_epoch)
        top1, top5 = evaluate(model.vit, val_loader, device, autocast, ddp)
        average_sums()
        means = (sums / steps_per_epoch).tolist()
        best = max(best, top1)
        record = dict(epoch=epoch + 1, loss_cls=means[0], loss_txt=means[1] if target_dim else None,
                      w=means[2] if target_dim else None, **{"lambda": lam if target_dim else 0.0}, lr=lr,
                      images_per_s=seen / elapsed, top1=top1, top5=top5, best_top1=best, epoch_time=elapsed)
        if align:
            record.update(alignment(model, *align, cfg, device))
        if master:
            print(("\r" if sys.stderr.isatty() else "")
                  + f"epoch {epoch + 1}/{cfg.epochs} loss_cls {means[0]:.4f}"
                  + (f" loss_txt {means[1]:.4f} w {means[2]:.3f} lambda {lam:.3f}" if target_dim else "")
                  + f" lr {lr:.2e} {seen / elapsed:.0f} img/s | val top1 {top1:.2f} top5 {top5:.2f}"
                  + (f" | retrieval {record['retrieval_top1']:.1f} cos {record['cos_match']:.3f}/{record['cos_other']:.3f}"
                     if align else ""), flush=True)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        epoch, step, sums = epoch + 1, 0, torch.zeros(3, device=device)
        checkpoint(epoch, step)

    # -- export: the plain ViT --------------------------------------------------------------
    if master:
        out = export(model.vit, model_args, classes, os.path.join(run_dir, "export"))
        print(f"final top1 {top1:.2f} (best {best:.2f})" if top1 is not None else f"the run had already ended (best top1 {best:.2f})",
              f"; exported the ViT without its text head to {out}", sep="", flush=True)
    if ddp:
        dist.destroy_process_group()
    return run_dir


def ignore_sigint(worker_id):
    """Data workers leave Ctrl-C to the main process, which finishes the step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_requested(stop, ddp, boundary):
    """Single process: stop at once. Many: all ranks must stop at the same step, so the flag
    is agreed on (one all-reduce) at log boundaries only."""
    if not ddp:
        return stop["signal"] is not None
    if not boundary:
        return False
    flag = torch.tensor(float(stop["signal"] or 0), device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop["signal"] = int(flag.item()) or None
    return stop["signal"] is not None


def check_finite(bad_step, run_dir, ddp=False):
    """Stop at the first step whose loss was not finite (bad_step -1: none yet). A NaN on one
    rank reaches the others' weights only through the next all-reduce, so the ranks agree
    on the earliest bad step: all of them stop at the same boundary."""
    if ddp:
        none = torch.iinfo(torch.int64).max
        first = torch.where(bad_step < 0, none, bad_step)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad_step = torch.where(first == none, -1, first)
    step = int(bad_step.item())
    if step >= 0:
        raise Diverged(f"the loss became NaN or infinite at step {step}; the last good checkpoint is in {run_dir}; "
                       "lower --lr or --clip-grad, then continue with --resume")


# ----------------------------------------------------------------------------
# Experiments: the paired comparison, and plots

def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def compare(cfg, stop):
    """--compare: the baseline (lambda = 0), TextTeacher, and the vision teacher if --teacher is
    given, from the same seed: same initial ViT, data order, augmentation, CutMix and label
    noise, so the difference is the objective's alone. Each arm is an ordinary run folder
    under runs/NAME; an arm that already finished is reused, an interrupted one continued."""
    cfg.name = cfg.name or f"compare-{os.path.basename(cfg.data.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = os.path.join(cfg.out_dir, cfg.name)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
    if os.path.exists(os.path.join(root, "config.json")):
        with open(os.path.join(root, "config.json")) as f:
            if {k: v for k, v in json.load(f).items() if k not in RESUME_FREE} != settings:
                raise UserError(f"{root} holds a comparison with other settings; choose another --name")
    os.makedirs(root, exist_ok=True)
    save_json(dataclasses.asdict(cfg), os.path.join(root, "config.json"))
    arms = {"baseline": dict(text="", teacher="", text_loss_lambda=0.0)}
    if cfg.text:
        arms["textteacher"] = dict(teacher="")
    if cfg.teacher:
        arms["teacher"] = dict(text="")
    runs = {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for arm, changes in arms.items():
            run = dataclasses.replace(cfg, compare=False, seeds=1, seed=seed, out_dir=root, name=f"seed{seed}-{arm}", **changes)
            run_dir = os.path.join(root, run.name)
            if not os.path.exists(os.path.join(run_dir, "export", "config.json")):
                if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                    run.resume = run_dir
                train(run, set(), stop)
            runs[(seed, arm)] = read_metrics(run_dir)
    summary = summarize(runs, list(arms), list(range(cfg.seed, cfg.seed + cfg.seeds)))
    save_json(summary, os.path.join(root, "compare.json"))
    print(summary["table"])
    return summary


def summarize(runs, arms, seeds):
    """The table of --compare: validation top-1 per epoch (mean over seeds), the final and best
    differences to the baseline (mean and std over seeds) and the training time per epoch."""
    def mean_std(values):
        values = np.array(values, dtype=float)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
    epochs = len(runs[(seeds[0], arms[0])])
    per_epoch = {arm: [float(np.mean([runs[(s, arm)][e]["top1"] for s in seeds])) for e in range(epochs)] for arm in arms}
    out = dict(arms=arms, seeds=seeds, top1_per_epoch=per_epoch, runs={f"seed{s}-{a}": runs[(s, a)] for s, a in runs})
    lines = [f"{'epoch':>10}" + "".join(f"{a:>14}" for a in arms)]
    lines += [f"{e + 1:>10}" + "".join(f"{per_epoch[a][e]:>14.2f}" for a in arms) for e in range(epochs)]
    time_base = float(np.mean([r["epoch_time"] for s in seeds for r in runs[(s, arms[0])]]))
    for arm in arms[1:]:
        final = mean_std([runs[(s, arm)][-1]["top1"] - runs[(s, arms[0])][-1]["top1"] for s in seeds])
        best = mean_std([runs[(s, arm)][-1]["best_top1"] - runs[(s, arms[0])][-1]["best_top1"] for s in seeds])
        seconds = float(np.mean([r["epoch_time"] for s in seeds for r in runs[(s, arm)]]))
        out[arm] = dict(final_diff=final, best_diff=best, seconds_per_epoch=seconds, overhead=seconds / time_base - 1)
        pm = f" +- {final[1]:.2f} (std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
        lines.append(f"{arm} - baseline: final top1 {final[0]:+.2f}{pm}, best top1 {best[0]:+.2f}"
                     + (f" +- {best[1]:.2f}" if len(seeds) > 1 else "")
                     + f"; {seconds:.1f} s/epoch vs {time_base:.1f} s ({100 * (seconds / time_base - 1):+.1f}%)")
    out["table"] = "\n".join(lines)
    return out


def plot_runs(paths, out):
    """--plot: validation top-1 and text loss per epoch of run folders (or of the arms inside
    a --compare folder), side by side, into one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is optional: pip install matplotlib") from None
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            runs.append(path)
        elif os.path.isdir(path):
            runs += sorted(e.path for e in os.scandir(path) if os.path.isfile(os.path.join(e.path, "metrics.jsonl")))
    if not runs:
        raise UserError(f"no run with a metrics.jsonl in {' '.join(paths)}; pass run folders such as runs/NAME")
    fig, (acc, txt) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        m = read_metrics(run)
        epochs, name = [r["epoch"] for r in m], os.path.relpath(run, os.path.commonpath(runs)) if len(runs) > 1 else run
        acc.plot(epochs, [r["top1"] for r in m], color=f"C{i}", label=name)  # one colour per run in both panels
        if m[0]["loss_txt"] is not None:
            txt.plot(epochs, [r["loss_txt"] for r in m], color=f"C{i}", label=name)
    acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy")
    txt.set(xlabel="epoch", ylabel="L_txt (training mean)", title="text loss")
    acc.legend(fontsize=8)
    acc.grid(alpha=0.3)
    txt.grid(alpha=0.3)
    fig.tight_layout()
    save_atomic(lambda p: fig.savefig(p, dpi=110), out)
    print(f"wrote {out} ({len(runs)} runs)")


def main(argv=None):
    cfg, given = parse_config(argv)
    try:
        check_config(cfg)
        if cfg.plot:
            plot_runs(cfg.plot, cfg.plot_out)
        elif cfg.export:
            export_checkpoint(cfg.export)
        elif cfg.benchmark:
            benchmark(cfg)
        else:
            # SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) end the current step,
            # save a checkpoint and stop, instead of killing the run mid-write
            stop = {"signal": None}
            previous = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                compare(cfg, stop) if cfg.compare else train(cfg, given, stop)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
    except UserError as e:
        # An error raised in a DataLoader worker arrives with the worker's traceback in its
        # text; the user needs only its last line, without the class name ("UserError: " when
        # run as a script, "textteacher.UserError: " when imported)
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}" if e.code != 130 else message, file=sys.stderr)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
