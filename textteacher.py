"""
TextTeacher: a ViT classifier trained with one extra loss that aligns it with language.

A linear text head maps the ViT's post-norm CLS feature into the embedding space of a frozen
text encoder, and a symmetric contrastive loss pulls each image's projection toward the
embedding of its own caption (Nauen et al., 2026, "What Can Language Teach About Images?").
At inference the text head is dropped: the exported model is a plain ViT.

Commands (README.md says where captions and embeddings come from, and what these reach):

  # CPU demo, offline, 3.5 minutes on 2 busy cores: the captioned shapes set, half its labels
  # wrong; TextTeacher ends at 31.2% top-1, the baseline (no --text) at 12.3% (seed 0; over 3
  # seeds +14.1 +- 4.6 p.p., and -9.5 +- 3.6 with clean labels: docs/shapes-study.md)
  python experiments/shapes.py
  python textteacher.py --data shapes --text data/shapes/text.pt --label-noise 0.5
  python textteacher.py --data shapes --label-noise 0.5
  # any folder of small photos on a CPU takes the small recipe by itself (--preset small):
  # on CIFAR-10's JPEGs, 10 epochs reach 47% (class-level text +1.2 p.p.: docs/photos-study.md)
  python textteacher.py --data data/cifar10-1k --epochs 10
  # one GPU, and eight (--batch-size is always the global batch, as in the paper)
  python textteacher.py --data imagenet --data-dir /data/imagenet --text in1k_coca_bert.pt
  torchrun --nproc_per_node=8 textteacher.py --data imagenet --data-dir /data/imagenet \\
      --text in1k_coca_bert.pt
  # continue a run that stopped (--lr and --clip-grad may change)
  python textteacher.py --resume runs/NAME
  # transfer: fine-tune a trained ViT on one of the paper's six fine-grained sets
  python textteacher.py --data flowers102 --data-dir data --init runs/NAME

The file reads top to bottom: configuration, data, text targets, model, objective, optimiser,
checkpoints and export, evaluation, training. The tools that use it stand beside it:
caption_images.py and caption_embed.py make the targets, experiments/ compares, studies and
plots, benchmarks/ measures speed.
"""
import cli  # first: how every script reports errors (Ctrl-C during the imports included)
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import imagesets  # CIFAR-10/100, the paper's six transfer sets by name, and image folders
from cli import UserError, need, save_atomic
from lamb import Lamb  # LAMB (You et al., 2020), the optimiser of DeiT III's recipe


# ----------------------------------------------------------------------------
# Configuration: one flat dataclass; the command line is generated from it

MODEL_SIZES = {"micro": (128, 6, 4), "tiny": (192, 12, 3), "small": (384, 12, 6),
               "base": (768, 12, 12), "large": (1024, 24, 16)}  # width, depth, heads


def opt(default, help, allowed=None):
    """A field with its help, and what it allows: a tuple of choices, an interval such as
    "[1, 100000]" (cli.within: a parenthesis excludes its end; NaN and inf are never in one),
    or a cli.path declaration (what kind of path, checked as the flags are read)."""
    return dataclasses.field(default=default, metadata=dict(help=help, allowed=allowed))


POSITIVE, COUNT, UNIT = "(0, inf)", "[0, inf)", "[0, 1)"


# Per-dataset presets, applied over the defaults of Config (the paper's ImageNet recipe) and
# under the flags given; `--data NAME --help` lists the defaults that apply. The 32 px ones are
# this project's choices, not the paper's: cifar10/cifar100 for a GPU; RECIPES' small for a
# CPU and any folder of small photos (ViT-micro on 16 tokens: about 25 s per epoch of 10 000
# images on one core), which --data PATH takes by itself when its images are at most 64 px.
SMALL = dict(img_size=32, optimizer="adamw", lr=1e-3, weight_decay=0.05, opt_eps=1e-8)
CIFAR = dict(SMALL, data_dir="data", patch_size=4, model="tiny", epochs=200, batch_size=256,
             drop_path=0.1)
PRESETS = {
    "imagenet": dict(data_dir="data/imagenet"), "cifar10": CIFAR, "cifar100": CIFAR,
    "shapes": dict(SMALL, data_dir="data/shapes", patch_size=8, model="micro", epochs=15,
                   batch_size=64, warmup_epochs=0, drop_path=0.0, cutmix=0.0, augment="none",
                   workers=0, log_every=10),
    **imagesets.TRANSFER_PRESETS,  # the transfer sets' fine-tuning recipe
}
RECIPES = {"small": dict(SMALL, patch_size=8, model="micro", epochs=30, batch_size=128,
                         warmup_epochs=0, drop_path=0.0, cutmix=0.0, augment="crop"),
           **PRESETS}  # --preset NAME: a recipe, not a data set (a folder may be named so)


@dataclasses.dataclass
class Config:
    # data
    data: str = opt("imagenet", "a named set (imagenet, cifar10, cifar100, shapes, the transfer "
                    "sets) | PATH with train/ and val/", cli.path("folder", names=tuple(PRESETS)))
    preset: str = opt("", "the recipe of PRESETS to start from (default: --data's own; for a PATH "
                      "small if its images are at most 64 px, else imagenet)", tuple(RECIPES))
    data_dir: str = opt("data/imagenet", "root of a named --data (PATH: not used)")
    split: str = opt("official", "transfer sets' training split: official (the paper's code) | "
                     "trainval (the common protocol)", ("official", "trainval"))
    text: str = opt("", "embeddings file of caption_embed.py; none: the baseline",
                    cli.path("file", names=("",)))
    # model
    init: str = opt("", "start from trained weights (transfer): a run folder, checkpoint or "
                    "export/; the ViT's size and patch come from it",
                    cli.path("file or folder", names=("",)))
    model: str = opt("small", "ViT size (MODEL_SIZES in textteacher.py)", tuple(MODEL_SIZES))
    # 5 px at least: the padded crop reflects 4 px, which needs a side of 5 or more
    img_size: int = opt(224, "input resolution in pixels", "[5, 16384]")
    patch_size: int = opt(16, "patch side in pixels", "[1, 1024]")
    layer_scale: float = opt(1e-4, "LayerScale init of both residual branches", POSITIVE)
    drop_path: float = opt(0.05, "stochastic depth of the last block (0 in the first)", UNIT)
    # the objective: L = lam_e * w * L_txt + (1 - lam_e) * L_cls
    text_loss_lambda: float = opt(0.5, "lam, the text loss weight; 0 is the baseline", UNIT)
    lambda_schedule: str = opt("constant", "constant|linear|cosine|fullcosine|jump-A-B-R")
    adaptive_weight: bool = opt(True, "w = ||dL_cls/dF|| / ||dL_txt/dF|| (off: w = 1)")
    freeze_text_head: bool = opt(False, "keep the text head at its random init")
    label_noise: float = opt(0.0, "replace round(p N) training labels by other classes", UNIT)
    # recipe (DeiT III, as the paper runs it on ImageNet)
    epochs: int = opt(100, "training epochs", "[1, 100000]")
    batch_size: int = opt(2048, "GLOBAL batch per step (per device: the negatives)", "[1, 1e7]")
    accum: int = opt(1, "gradient accumulation steps (fewer negatives per loss)", "[1, 65536]")
    optimizer: str = opt("lamb", "lamb (the paper) | adamw", ("lamb", "adamw"))
    lr: float = opt(3e-3, "peak learning rate for --batch-size", POSITIVE)
    warmup_lr: float = opt(1e-6, "learning rate of the first warm-up epoch", POSITIVE)
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine", COUNT)
    warmup_epochs: int = opt(5, "epochs of linear warm-up", "[0, 100000]")
    weight_decay: float = opt(0.02, "decoupled weight decay of weight matrices", COUNT)
    opt_eps: float = opt(1e-7, "epsilon of the optimiser", POSITIVE)
    clip_grad: float = opt(1.0, "clip the global gradient norm (0: off)", COUNT)
    label_smoothing: float = opt(0.1, "label smoothing of the classification loss", UNIT)
    cutmix: float = opt(1.0, "CutMix Beta(a, a); the targets are mixed too (0: off)", COUNT)
    augment: str = opt("3aug", "3aug (DeiT III) | crop | none", ("3aug", "crop", "none"))
    # run
    name: str = opt("", "results go to OUT_DIR/NAME (default: data and time)")
    out_dir: str = opt("runs", "folder of the run folders", cli.path("new folder"))
    # every random draw is seeded by a mix of the seed and the position in the run, which
    # torch must accept (64 bits): so 0 .. 99999
    seed: int = opt(0, "seed of weights, data order, augmentation, CutMix, label noise",
                    "[0, 100000)")
    workers: int = opt(-1, "data loading processes per GPU (-1: up to 8)", "[-1, 256]")
    # more threads than cores crash or hang torch
    threads: int = opt(0, "CPU threads (0: half the cores)", f"[0, {os.cpu_count() or 1}]")
    device: str = opt("auto", "auto: cuda, mps or cpu", ("auto", "cpu", "cuda", "mps"))
    compile: str = opt("auto", "torch.compile (auto: on CUDA)", ("auto", "on", "off"))
    ckpt_every: int = opt(0, "also checkpoint every K steps (0: at epoch ends)", "[0, 1e12]")
    log_every: int = opt(50, "read the losses back from the device every N steps", "[1, 1e12]")
    resume: str = opt("", "continue the run of this checkpoint or run folder exactly",
                      cli.path("file or folder", names=("",)))


# What a resumed run may change: how it computes; the learning rate and clipping, which rescue
# a diverged run (the change is printed); and where its inputs are, if they are the same.
RESUME_FREE = {"workers", "threads", "device", "compile", "ckpt_every", "log_every", "resume",
               "lr", "clip_grad", "text", "data_dir"}




def parse_config(argv=None):
    """(Config, names of the flags given): the defaults, the preset of --data, then the flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", default=Config.data)
    first.add_argument("--preset", default="")
    known = first.parse_known_args(argv)[0]
    name = known.preset or (known.data if known.data in PRESETS else
                            imagesets.recipe_of(known.data))
    preset = dict(RECIPES.get(name, {}), preset=name)
    parser = cli.Parser(description="TextTeacher: a ViT classifier taught by captions.",
                    epilog=f"presets: {', '.join(PRESETS)}; see one's defaults: --data NAME -h")
    for f in dataclasses.fields(Config):
        allowed, default = f.metadata["allowed"], preset.get(f.name, f.default)
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=cli.number(f.type, allowed) if isinstance(allowed, str) else allowed
            if callable(allowed) else f.type,
            choices=allowed if isinstance(allowed, tuple) else None)
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {default})", **kind)
    given = vars(parser.parse_args(argv))
    cfg = Config(**{**preset, **given})
    need("split" not in given or cfg.data in imagesets.TRANSFER, f"--split chooses the training "
         f"split of a transfer set ({', '.join(imagesets.TRANSFER)}); {cfg.data} has no other")
    if cfg.init and not cfg.resume:  # transfer: the network is the source's, not a flag's
        a = read_source(cfg.init)[0]
        size = [n for n, s in MODEL_SIZES.items() if s == (a["width"], a["depth"], a["heads"])]
        need(size, f"--init {cfg.init} is a ViT of width {a['width']}, depth {a['depth']} and "
             f"{a['heads']} heads: none of the sizes of --model")
        if "drop_path" not in given:  # the official code fine-tunes with the source's
            cfg.drop_path = a.get("drop_path", cfg.drop_path)
        for k, v in dict(model=size[0], patch_size=a["patch_size"]).items():
            need(given.get(k, v) == v, f"--init {cfg.init} has {k.replace('_', ' ')} {v}: drop "
                 f"--{k.replace('_', '-')} {given.get(k)}")
            setattr(cfg, k, v)
    return cfg, set(given)


def check_config(cfg):
    """Impossible settings end here, in one line and before anything is loaded."""
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata["allowed"]
        need(not isinstance(allowed, str) or cli.within(value, allowed),
             f"--{f.name.replace('_', '-')} must be in {allowed}, got {value}")
    need(cfg.img_size % cfg.patch_size == 0, f"--img-size {cfg.img_size} is no multiple of "
         f"--patch-size {cfg.patch_size}")
    need(cfg.device not in ("cuda", "mps") or getattr(torch, cfg.device).is_available(),
         f"--device {cfg.device}: there is none here; use --device auto or cpu")
    # the per-device batch is also the number of candidates in each contrastive loss
    micro, split = divmod(cfg.batch_size, int(os.environ.get("WORLD_SIZE", 1)) * cfg.accum)
    need(not split and (micro > 1 or not cfg.text), f"--batch-size {cfg.batch_size} must split "
         "into batches of 2 or more images over the processes and --accum steps")
    # a step that cannot fit is refused before anything is allocated. What it holds at least:
    # per image and block, four activations of width numbers per token, kept for the backward
    # pass, in bf16 (fp32 and the MLP's 4x width hold more; flash attention keeps no scores).
    # A resumed run was checked when it started (its settings are not read yet).
    width, depth, _ = MODEL_SIZES[cfg.model]
    per_image = 2 * depth * ((cfg.img_size // cfg.patch_size) ** 2 + 1) * 4 * width
    memory = cli.memory("cpu" if cfg.device == "cpu" else "auto")
    for flag, images in (("img-size", 1), ("batch-size", max(micro, 1))):
        need(cfg.resume or per_image * images <= memory, f"--{flag} "
             f"{getattr(cfg, flag.replace('-', '_'))}: one step would hold at least "
             f"{per_image * images / 2**30:.0f} GiB, and this machine has {memory / 2**30:.0f} GiB"
             + ("; --accum splits a step" if flag == "batch-size" else ""))
    lambda_at(cfg, 0)  # a schedule it cannot read is a UserError


# ----------------------------------------------------------------------------
# Data: named sets and image folders (imagesets.py), and an exactly resumable sampler

IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # mean, std


def image_split(data, data_dir, split, protocol="official"):
    """(dataset, keys, classes) of the split "train" or "val", without transforms: dataset[i]
    is (PIL image, label). keys[i] names sample i in caption and embeddings files: its index
    for CIFAR, its file name elsewhere (the paper's ImageNet encodings are keyed so), or its
    path CLASS/FILE where file names repeat across classes (imagesets.file_keys)."""
    # a named set under data_dir (or its preset's); an image folder is PATH/train/CLASS/IMAGE
    root = data_dir or PRESETS[data].get("data_dir") if data in PRESETS else data
    return imagesets.image_split(data, root, split, protocol)


class Samples(Dataset):
    """A split's samples as (uint8 image [3, S, S], label, index); the image of a training
    sample on a GPU is (image, its colour steps' draws), which imagesets.on_device applies. A
    training sample comes with a seed of its own (from EpochSampler) that fixes its
    augmentation, whichever worker draws it: a resumed run sees exactly the same crops.
    Evaluation resizes the short side to S with PIL's bicubic filter and takes the centre crop:
    what timm's transform of the export does."""

    def __init__(self, dataset, labels, img_size, transform=None):
        self.dataset, self.labels, self.size, self.transform = dataset, labels, img_size, transform

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        try:
            image = self.dataset[i][0]
        except OSError as e:
            name = self.dataset.samples[i][0] if hasattr(self.dataset, "samples") else i
            raise UserError(imagesets.undecodable(name, e)) from None
        if self.transform is None:
            x = TF.pil_to_tensor(TF.resize(image, self.size, T.InterpolationMode.BICUBIC))
            return TF.center_crop(x, [self.size, self.size]), self.labels[i], i
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also seed every accelerator's,
            # which formats a stack trace per call (more than the image's decoding costs)
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.labels[i], i


def augmentation(cfg, device=torch.device("cpu")):
    """3-Augment (DeiT III): the short side resized to S (bicubic), a random crop S of the image
    padded by 4 (reflect), flip, one of {grayscale, solarize, blur (kernel 7, sigma 0.2-2)},
    colour jitter 0.3. No RandAugment, mixup or random erasing, as in the paper's recipe.
    imagesets.ThreeAugment is torchvision's transforms, their draws and their pixels, at under
    half a CPU core's time (the colour steps run on the GPU, batched), which decides how many
    images a core feeds a GPU."""
    return imagesets.ThreeAugment(cfg.img_size, cfg.augment, on_device=device.type != "cpu")


def normalize(images):
    """uint8 [B, 3, H, W] -> float with ImageNet's mean and std, on the device after the copy."""
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) * 255 for v in IMAGENET)
    return (images.float() - mean) / std


def noisy_labels(labels, num_classes, p, seed):
    """The label-noise experiment: exactly round(p N) training samples, chosen with the seed,
    get a new label uniform over the other classes; validation and captions stay clean.
    (old + k) mod C with k uniform in 1..C-1 is uniform over the C - 1 other classes and never
    the old one, so exactly the chosen samples are wrong. Returns (labels, flipped indices)."""
    g = torch.Generator().manual_seed(seed + 12_345)
    flipped = torch.randperm(len(labels), generator=g)[:round(p * len(labels))].sort().values
    noisy, shift = labels.clone(), torch.randint(1, num_classes, flipped.shape, generator=g)
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


class EpochSampler(Sampler):
    """A seeded permutation per epoch, this rank's share of every step, and a start mid-epoch.

    Step s uses perm[s * B : (s + 1) * B] of the global batch B; micro-batch a of rank r takes
    its slice ((a * world + r) * m, +m), m = B / (world * accum). So one process with --accum 2
    sees the images of two processes, step by step. The incomplete last batch is dropped."""

    def __init__(self, n, batch_size, accum, rank, world, seed):
        self.n, self.batch, self.accum, self.rank, self.world = n, batch_size, accum, rank, world
        self.micro, self.steps = batch_size // (world * accum), n // batch_size
        self.seed, self.epoch, self.start = seed, 0, 0  # set by train() before every epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                first = s * self.batch + (a * self.world + self.rank) * self.micro
                for pos in range(first, first + self.micro):
                    # one augmentation seed per (run seed, epoch, position in the epoch)
                    yield perm[pos], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + pos


# ----------------------------------------------------------------------------
# Text targets: one frozen caption embedding per training image (or per class)

class TextTargets:
    """The embeddings file of caption_embed.py, memory-mapped, its rows matched to the samples.

    A target source: called with a batch's sample indices, labels, images and CutMix lambda, it
    returns the centred targets [B, D], t = E[row] - mean (the paper centres only). Centring
    removes the direction every caption shares (the encoder's common offset), which would
    otherwise dominate every dot product of the contrastive loss. experiments/ hands train()
    other sources with the same call: controls, and the online vision teacher."""

    def __init__(self, path, keys, class_keys, data=""):
        try:  # mmap: the [N, D] matrix stays in the page cache, one copy shared by all ranks
            emb = torch.load(path, mmap=True, weights_only=True)
            with open(path, "rb") as f:
                self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()  # for --resume
        except Exception as e:
            raise UserError(f"cannot read embeddings file {path} ({type(e).__name__}); write it "
                            "with caption_embed.py") from None
        need(isinstance(emb, dict) and emb.get("format") == "textteacher-embeddings-v1",
             f"{path} is not an embeddings file of caption_embed.py")
        tag = emb.get("dataset") or ""  # caption_embed.py's --dataset
        need(tag == data or not {tag, data} <= set(PRESETS), f"{path} holds the text of {tag}, "
             f"not of {data}: embed {data}'s captions with caption_embed.py")
        self.level, self.encoder, self.vectors = emb["level"], emb["encoder"], emb["embeddings"]
        self.dim, self.mean = self.vectors.shape[1], emb["mean"].float()
        for s in range(0, len(self.vectors), 65536):  # chunked: a small temporary
            need(torch.isfinite(self.vectors[s:s + 65536]).all(), f"{path} contains NaN or inf")
        row_of = {k: r for r, k in enumerate(emb["keys"])}
        wanted = class_keys if self.level == "class" else keys
        missing = [k for k in wanted if k not in row_of]  # never dropped (the official code does)
        # a key CLASS/FILE: the folder repeats file names across classes, so a file keyed by
        # names alone cannot say which image a name means (imagesets.file_keys)
        need(not missing, f"{len(missing)} of {len(wanted)} {self.level} keys have no target in "
             f"{path}, e.g. {', '.join(missing[:3])}: " + ("file names repeat across the class "
             "folders, so captions are keyed CLASS/FILE (caption_images.py writes them so)"
             if any("/" in k for k in missing[:1]) else "another dataset's file?"))
        self.rows = torch.tensor([row_of[k] for k in wanted])  # sample (or class) -> file row

    def __call__(self, index, labels, images, lam):
        t = self.vectors[self.rows[labels if self.level == "class" else index]].float() - self.mean
        t = t.pin_memory() if images.is_cuda else t  # page-locked: the copy does not block
        return mix(t.to(images.device, non_blocking=True), lam)  # shape = [B, D]


# ----------------------------------------------------------------------------
# Model: a DeiT III ViT with timm's parameter names, and the text head

class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward writes the three gradients at once
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # shape = [B, heads, N, C / heads] each
        x = F.scaled_dot_product_attention(q, k, v)  # shape = [B, heads, N, C / heads]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # shape = [B, N, C]


class LayerScale(nn.Module):
    """A per-channel residual scale that starts small (1e-4): every block starts near identity,
    which is what lets DeiT III train deep ViTs from scratch."""

    def __init__(self, width, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, width, heads, drop_path, layer_scale):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        fc1, fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)  # the MLP, 4x wide
        self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(), fc2=fc2))  # timm's names
        self.ls1, self.ls2 = LayerScale(width, layer_scale), LayerScale(width, layer_scale)
        # stochastic depth: drop a residual branch for whole samples and rescale the kept ones
        # by 1 / (1 - p), which is torchvision's StochasticDepth in its "row" mode
        self.drop_path1 = torchvision.ops.StochasticDepth(drop_path, "row")
        self.drop_path2 = torchvision.ops.StochasticDepth(drop_path, "row")

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ViT(nn.Module):
    """The classifier, and the whole deployed model: no text part lives in it.

    Its initialisation is timm's, which DeiT III and the paper's ViT inherit: truncated normal
    (std 0.02) for linear weights and the position embedding, zero biases, unit norms, and the
    CLS token normal with std 1e-6 (it starts as an almost empty query, not as content). The
    patch convolution keeps PyTorch's default."""

    def __init__(self, num_classes, img_size=224, patch_size=16, width=384, depth=12, heads=6,
                 layer_scale=1e-4, drop_path=0.0):
        super().__init__()
        # a convolution whose stride is its kernel cuts the image into patches and projects
        # each: [B, 3, H, W] -> [B, width, grid ** 2] (with timm's names: patch_embed.proj)
        proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.patch_embed = nn.Sequential(OrderedDict(proj=proj, flatten=nn.Flatten(2)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # a position embedding for the patch tokens only: the CLS token has none (DeiT III)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, width))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.Sequential(*[Block(width, heads, r, layer_scale) for r in rates])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x):
        """Images [B, 3, H, W] -> F, the post-norm CLS feature [B, width] both heads read."""
        x = self.patch_embed(x).transpose(1, 2) + self.pos_embed  # shape = [B, grid ** 2, width]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)  # [B, grid**2 + 1, width]
        return self.norm(self.blocks(x))[:, 0]  # shape = [B, width]

    def forward(self, x):
        return self.head(self.forward_features(x))  # shape = [B, num_classes]


class TextTeacher(nn.Module):
    """The ViT plus the text head of training: x -> (logits, z, F).

    The text head is one Linear(width -> D) with PyTorch's default initialisation, reading the
    same post-norm CLS feature F as the classifier. It exists only for the auxiliary loss and
    is thrown away at export. text_dim = 0 builds none: the baseline. A target source that is
    a module (experiments/: a learned class table) is trained and checkpointed with the model."""

    def __init__(self, vit, text_dim=0, freeze=False, targets=None):
        super().__init__()
        self.vit, width = vit, vit.head.in_features  # width: that of F
        self.targets = targets if isinstance(targets, nn.Module) else None
        self.text_head = nn.Linear(width, text_dim).requires_grad_(not freeze) if text_dim else None

    def forward(self, x):
        return self.heads(self.vit.forward_features(x))

    @torch.compiler.disable
    def heads(self, feat):
        """The two heads, outside torch.compile: adaptive_weight differentiates the losses at F,
        so F must be a node of the autograd graph between the ViT and the heads; compiled with
        the ViT it would be a graph output no loss depends on, and autograd.grad would fail."""
        z = self.text_head(feat) if self.text_head is not None else None  # shape = [B, D]
        return self.vit.head(feat), z, feat


def model_args(cfg, num_classes):
    width, depth, heads = MODEL_SIZES[cfg.model]
    return dict(num_classes=num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size,
                width=width, depth=depth, heads=heads, layer_scale=cfg.layer_scale,
                drop_path=cfg.drop_path)


def build_model(cfg, num_classes, text_dim, targets=None):
    return TextTeacher(ViT(**model_args(cfg, num_classes)), text_dim, cfg.freeze_text_head, targets)


# ----------------------------------------------------------------------------
# The objective: alignment loss, adaptive weight, lambda schedule, CutMix

def clip_loss(z, t):
    """The paper's alignment loss on raw dot products:

        logits = z @ t^T,   L_txt = ( CE(logits, arange(B)) + CE(logits^T, arange(B)) ) / 2

    Row i scores image i against every caption of the batch, column j caption j against every
    image: the first term picks each image's caption, the second each caption's image. No
    normalisation and no temperature: the norm of the head's weights is a learned temperature.
    Images of the same class are negatives too."""
    logits = z @ t.T  # shape = [B, B]
    labels = torch.arange(len(z), device=z.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def adaptive_weight(loss_cls, loss_txt, feat):
    """w = ( ||dL_cls/dF|| + 1e-7 ) / ( ||dL_txt/dF|| + 1e-7 ), Frobenius norms over the batch.

    With lam = 0.5 the two losses then push the backbone equally hard, whatever their scales.
    w is a number, not part of the graph (detached), and stays on the device: reading it
    would make every step wait for the GPU."""
    g_cls, = torch.autograd.grad(loss_cls, feat, retain_graph=True)
    g_txt, = torch.autograd.grad(loss_txt, feat, retain_graph=True)
    return ((g_cls.norm() + 1e-7) / (g_txt.norm() + 1e-7)).detach()


def step_losses(model, images, y, targets, lam, cfg, autocast=None, text_loss=clip_loss):
    """One micro-batch's L = lam_e * w * L_txt + (1 - lam_e) * L_cls, as (L, L_cls, L_txt, w).

    targets None is the baseline: L = L_cls. The benchmark times this very function; text_loss
    is experiments/' seam (a second classifier: cross-entropy on the text head)."""
    with autocast or contextlib.nullcontext():
        logits, z, feat = model(images)
    loss_cls = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)  # fp32
    if targets is None:
        zero = torch.zeros((), device=images.device)
        return loss_cls, loss_cls, zero, zero
    loss_txt = text_loss(z.float(), targets)
    w = (adaptive_weight(loss_cls, loss_txt, feat) if cfg.adaptive_weight and lam > 0
         else torch.ones((), device=images.device))
    # at lam_e = 0 the text term stays in with weight 0, so DDP sees the head's (zero) gradient
    return lam * w * loss_txt + (1 - lam) * loss_cls, loss_cls, loss_txt, w


def lambda_at(cfg, epoch):
    """lam_e of epoch e (0-based) for E epochs and lam = --text-loss-lambda: constant lam |
    linear lam (E - e) / E | cosine lam cos(pi e / 2E) | fullcosine lam / 2 (1 + cos(pi e / E))
    | jump-A-B-R: lam while e <= A (the official code's test, so A = B keeps lam at epoch A),
    then linearly down to R lam at e = B, and R lam after."""
    lam, E, e, name, pi = cfg.text_loss_lambda, cfg.epochs, epoch, cfg.lambda_schedule, math.pi
    schedules = dict(constant=lam, linear=lam * (E - e) / E, cosine=lam * math.cos(e / E * pi / 2),
                     fullcosine=lam / 2 * (1 + math.cos(pi * e / E)))
    if name in schedules:
        return schedules[name]
    jump = re.fullmatch(r"jump-(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)", name)
    need(jump and float(jump[1]) <= float(jump[2]), f"--lambda-schedule {name!r} is not constant,"
         " linear, cosine, fullcosine or jump-A-B-R with A <= B (e.g. jump-30-50-0)")
    a, b, r = (float(x) for x in jump.groups())
    return lam if e <= a else r * lam if e >= b else lam * (1 - (1 - r) * (e - a) / (b - a))


def cutmix(images, alpha):
    """CutMix with one lambda per batch and the flipped batch as partner (timm's rule): a box of
    the partner is pasted in and lambda corrected to the pasted area. Returns (images, lam).
    It draws from torch's RNG, which train() seeds for every micro-batch from its place in the
    run: a resumed run draws the same boxes, and a checkpoint needs no state for them."""
    lam, (H, W) = torch.distributions.Beta(alpha, alpha).sample().item(), images.shape[-2:]
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    images = images.clone()
    images[:, :, y1:y2, x1:x2] = images.flip(0)[:, :, y1:y2, x1:x2]
    return images, 1 - (y2 - y1) * (x2 - x1) / (H * W)


def mix(x, lam):
    """x_i <- lam x_i + (1 - lam) x_partner(i): CutMix's mix of the labels, and of the text
    targets with the same lambda and partner, so the positive pair stays on the diagonal."""
    return x if lam == 1 else lam * x + (1 - lam) * x.flip(0)


# ----------------------------------------------------------------------------
# Optimiser and learning-rate schedule

def build_optimizer(cfg, model, device):
    """Weight decay on weight matrices only: biases, norms, LayerScale, pos_embed and cls_token
    are exempt (decay would pull the learned tokens and residual scales toward zero)."""
    groups = [dict(params=[], weight_decay=cfg.weight_decay), dict(params=[], weight_decay=0.0)]
    for name, p in model.named_parameters():
        if p.requires_grad:  # a frozen text head is not trained: in neither group
            groups[p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))]["params"].append(p)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, eps=cfg.opt_eps)
    # fused: one pass over all tensors, not a dozen small operations per tensor
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.opt_eps, fused=device.type != "mps")


def lr_at(cfg, epoch):
    """The learning rate of epoch e, exactly as DeiT III and the official code apply it: timm's
    CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
    lr_min=min_lr), no warm-up prefix (the cosine spans all epochs; the warm-up replaces its
    start), stepped once, with step(e), at the END of epoch e.

    That stepping lags one epoch: the scheduler sets warmup_lr when it is built, so epoch 0 runs
    at it; step(0) sets the value for t = 0, warmup_lr again, for epoch 1; and every epoch
    e >= 1 runs at the schedule's value for t = e - 1. Reproducing the lag reproduces the
    paper's learning rates epoch for epoch (a per-step schedule gives about 5% more in all)."""
    if epoch == 0 and cfg.warmup_epochs > 0:
        return cfg.warmup_lr
    t = max(epoch - 1, 0)
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / cfg.warmup_epochs
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.epochs))


# ----------------------------------------------------------------------------
# Checkpoints and export

def save_run(run_dir, state, texts):
    """The checkpoint, then the files derived from it, among them metrics.jsonl from the
    checkpoint's history: a resumed run never logs an epoch twice."""
    os.makedirs(run_dir, exist_ok=True)
    save_atomic(lambda f: torch.save(state, f), os.path.join(run_dir, "checkpoint.pt"))
    texts["metrics.jsonl"] = "".join(json.dumps(r) + "\n" for r in state["history"])
    for name, text in texts.items():
        save_atomic(lambda f: f.write(text.encode()), os.path.join(run_dir, name))


def load_checkpoint(path):
    """(checkpoint, its path) from a checkpoint file or the run folder holding checkpoint.pt."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    need(os.path.exists(path) or not os.path.exists(path + ".tmp"), f"{os.path.dirname(path)} "
         "stopped while writing its first checkpoint: start it again, without --resume")
    need(os.path.isfile(path), f"{path} does not exist: pass a checkpoint file or a run folder")
    try:  # checkpoints are written whole or not at all: a torn one was copied or cut outside
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is truncated or damaged, or no checkpoint ({type(e).__name__}):"
                        " copy it again from where it came, or start the run again") from None
    need(isinstance(ckpt, dict) and ckpt.get("format") == "textteacher-checkpoint-v2", f"{path} "
         "is not a checkpoint of this textteacher.py; pass a checkpoint file or a run folder")
    return ckpt, path


def read_source(path):
    """(model_args, the ViT's weights, classes) of a trained model: an export/ folder
    (config.json and model.safetensors) or what load_checkpoint reads."""
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        ckpt = load_checkpoint(path)[0]  # the text head stays behind: only "vit." is the ViT
        need(ckpt["epoch"] >= ckpt["config"]["epochs"], f"{path} is an unfinished run: finish "
             "it with --resume, or export it as it is (experiments/export.py --unfinished)")
        vit = {k[4:]: v for k, v in ckpt["model"].items() if k.startswith("vit.")}
        return ckpt["model_args"], vit, ckpt["classes"]
    from safetensors.torch import load_file
    config = cli.json_or(os.path.join(path, "config.json"), {})
    ours = config.get("textteacher", config)  # an export from before timm's format: ours
    classes = config.get("label_names", config.get("classes"))
    need(isinstance(ours, dict) and "model_args" in ours and classes and len(classes) == ours[
        "model_args"].get("num_classes"), f"{path}/config.json is missing, truncated, no export's "
         "config or names not one class per output: export the run again (experiments/export.py)")
    try:  # safetensors keeps no checksum, but damaged bytes read as NaN or inf somewhere
        state = load_file(f"{path}/model.safetensors")
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise ValueError("NaN or inf")
    except Exception as e:
        raise UserError(f"{path}/model.safetensors is truncated or damaged ({type(e).__name__})"
                        ": export the run again (experiments/export.py)") from None
    return ours["model_args"], state, classes


def resize_pos_embed(pos, grid):
    """The position embedding [1, g ** 2, C] of a g x g patch grid, resized bicubically to
    grid x grid as the official code does it (half-pixel centres, no antialiasing): timm's
    resample_abs_pos_embed with antialias=False (its default antialiases, also upwards)."""
    g, width = int(pos.shape[1] ** 0.5), pos.shape[2]
    if g == grid:
        return pos
    x = pos.reshape(1, g, g, width).permute(0, 3, 1, 2).float()  # shape = [1, C, g, g]
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, width)  # shape = [1, grid ** 2, C]


def load_source(vit, path, classes):
    """Transfer: start vit from the weights of --init, its position embedding resized to this
    run's grid, its class head kept only for the same classes; for others the head keeps its
    fresh initialisation (truncated normal, std 0.02, bias 0, as the official code's)."""
    _, state, source_classes = read_source(path)
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], int(vit.pos_embed.shape[1] ** .5))
    if list(source_classes) != list(classes):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        vit.load_state_dict({**vit.state_dict(), **state})
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit its own settings ("
                        f"{str(e).splitlines()[1].strip()[:120]})") from None


def timm_kwargs(a):
    """The arguments of timm's VisionTransformer that build the same network, names included."""
    return dict(img_size=a["img_size"], patch_size=a["patch_size"], num_classes=a["num_classes"],
                embed_dim=a["width"], depth=a["depth"], num_heads=a["heads"], qkv_bias=True,
                mlp_ratio=4.0, init_values=a["layer_scale"], no_embed_class=True,
                global_pool="token")


def export(vit, args, classes, out_dir):
    """The deployable ViT: model.safetensors and config.json, in timm's own format, the one the
    Hugging Face Hub serves: timm.create_model("local-dir:EXPORT", pretrained=True) builds and
    loads it with no code of this project, class names (label_names) included. The text head
    lives outside the ViT, so it is not in vit.state_dict(): nothing textual is exported.

    pretrained_cfg is this project's evaluation: the short side resized to S (bicubic), then a
    centre crop of S (crop_pct 1), ImageNet's mean and std; from it timm's resolve_data_config
    and create_transform build the same transform. The architecture name only picks timm's
    VisionTransformer entry point: model_args say which network it is."""
    from safetensors.torch import save
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    save_atomic(lambda f: f.write(save(state)), os.path.join(out_dir, "model.safetensors"))
    size, n = args["img_size"], args["num_classes"]
    preprocess = dict(input_size=[3, size, size], interpolation="bicubic", crop_pct=1.0,
                      crop_mode="center", mean=IMAGENET[0], std=IMAGENET[1], num_classes=n,
                      first_conv="patch_embed.proj", classifier="head", fixed_input_size=True)
    config = dict(architecture="vit_base_patch16_224", num_classes=n, num_features=args["width"],
                  global_pool="token", label_names=list(classes), model_args=timm_kwargs(args),
                  pretrained_cfg=preprocess, textteacher=dict(model_args=args))
    save_atomic(lambda f: f.write(json.dumps(config, indent=2).encode()), f"{out_dir}/config.json")


# ----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(vit, loader, device, autocast, ddp):
    """Top-1 and top-5 in %, counted over samples (not a mean of batch means, as the official
    code has it) and summed over ranks, each holding a disjoint share of the validation set."""
    vit.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, seen
    for images, labels, _ in loader:
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = vit(normalize(images.to(device, non_blocking=True)))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # [B, 5]
        counts[:2] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        counts[2] += len(labels)  # a number: a tensor made here would be a blocking copy
    if ddp:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# ----------------------------------------------------------------------------
# Training

def compute_setup(cfg, world=1, local_rank=0):
    """(device, autocast, compile?) for training and the benchmark: bf16 autocast on CUDA (no
    loss scaler needed, unlike fp16), fp32 elsewhere; torch.compile on CUDA by default. On a
    CPU, half the cores: a small model gains little from more, and when another process is
    busy beside it every thread waits for the slowest (2 threads fell to a third)."""
    name = cfg.device if cfg.device != "auto" else next(
        d for d in ("cuda", "mps", "cpu") if d == "cpu" or getattr(torch, d).is_available())
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // (2 * world)))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    return device, autocast, cfg.compile == "on" or cfg.compile == "auto" and device.type == "cuda"


def open_run(cfg, given, rank):
    """(checkpoint or None, run folder). --resume: the checkpoint's settings apply, but for the
    flags given that RESUME_FREE lets change, which are printed. Else a new folder name, which
    must be free; the folder itself is made with the first checkpoint, so a run that fails
    before one leaves nothing behind that would block its --name (a folder holding only the
    temporary file of a first checkpoint cut short counts as free). Rank 0 claims the folder
    (cli.lock) for as long as it runs."""
    if not cfg.resume:  # absolute paths in config.json: a run can be resumed from anywhere
        cfg.data = cfg.data if cfg.data in PRESETS else os.path.abspath(cfg.data)
        cfg.data_dir, cfg.text, cfg.init = (p and os.path.abspath(p) for p in (
            cfg.data_dir, cfg.text, cfg.init))
        data = os.path.basename(cfg.data.rstrip("/"))
        box = [cfg.name or f"{data}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if dist.is_initialized():  # rank 0's default name: the ranks' clocks may differ
            dist.broadcast_object_list(box)
        cfg.name, run_dir = box[0], os.path.join(cfg.out_dir, box[0])
        if rank == 0:  # one process per run folder: a second one is refused, naming the first
            cli.lock(run_dir, "--name")
        # a folder with only a torn temporary file: its first checkpoint was never written
        need(not os.path.exists(run_dir) or all(f.endswith(".tmp") for f in os.listdir(run_dir)),
             f"{run_dir} holds a run: continue it with --resume {run_dir}, or choose another "
             "--name")
        return None, run_dir
    ckpt, path = load_checkpoint(cfg.resume)
    if rank == 0:
        cli.lock(cli.writable(os.path.dirname(path)), "run")
    saved = ckpt["config"]
    # config.json shows the checkpoint's settings, and is written again from them (absent or
    # torn, it holds nothing of the user's to keep)
    shown = cli.json_or(os.path.join(os.path.dirname(path), "config.json"), {})
    edited = sorted(k for k in saved.keys() & shown.keys() if shown[k] != saved[k])
    need(not edited, f"{os.path.dirname(path)}/config.json differs from the checkpoint "
         f"({', '.join(edited)}): a run continues with the checkpoint's settings; put it back (or "
         "delete it if the run stopped while saving) and give a change resuming allows as a flag")
    changed = {k: (saved[k], getattr(cfg, k)) for k in sorted(set(given) - {"resume"})
               if getattr(cfg, k) != saved[k]}
    clash = [f"{k}={saved[k]!r}" for k in changed if k not in RESUME_FREE]
    need(not clash, f"--resume {path} is a run with {', '.join(clash)}: drop those flags")
    for k in saved.keys() - given:
        setattr(cfg, k, saved[k])
    if changed and rank == 0:
        print("resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return ckpt, os.path.dirname(path)


@cli.releasing  # the run folder's claim ends with train(), however it ends
def train(cfg, given=(), targets=None, on_epoch=None, objective=None):
    """Train, evaluate every epoch, checkpoint, export; returns the run folder.

    The seams for the tools beside this file: `targets` replaces the text targets by another
    source (called like TextTargets, with a `dim`: the text head's width, 0 for none),
    `objective` replaces step_losses (same call and return: the distillation arms), and
    `on_epoch(record, model)` may add entries to each epoch's record before it is logged."""
    # One distributed path: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; else one process.
    rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    ddp = world > 1
    device, autocast, use_compile = compute_setup(cfg, world, int(os.environ.get("LOCAL_RANK", 0)))
    if ddp:  # the device's backend: NCCL for GPUs, gloo for CPUs (--device cpu on a GPU machine)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ckpt, run_dir = open_run(cfg, given, rank)

    # -- data: the samples with their (possibly noisy) labels, and the text targets ----------
    (train_set, keys, classes), (val_set, _, val_classes) = (
        image_split(cfg.data, cfg.data_dir, split, cfg.split) for split in ("train", "val"))
    need(val_classes == classes, f"the class folders of val/ and train/ of {cfg.data} differ")
    n_train, n_val, targets_of = len(train_set), len(val_set), lambda ds: torch.tensor(ds.targets)
    true = targets_of(train_set)  # the clean labels: class-level text is looked up by these
    labels, flipped = noisy_labels(true, len(classes), cfg.label_noise, cfg.seed)
    # the training split's fingerprint: images added, removed or moved between classes since
    # the checkpoint would silently change the run
    split_sha = hashlib.sha256(repr(list(zip(keys, true.tolist()))).encode()).hexdigest()
    if cfg.text and cfg.text_loss_lambda > 0 and targets is None:
        targets = TextTargets(cfg.text, keys, classes, cfg.data)
    sha256, target_dim = getattr(targets, "sha256", None), targets.dim if targets else 0
    saved = ckpt and [ckpt.get("split_sha256", split_sha), ckpt["classes"], ckpt["text_sha256"],
                      ckpt["text_dim"]]
    need(not ckpt or saved == [split_sha, classes, sha256, target_dim], f"{run_dir} was trained "
         f"on other images, classes or text targets (text sha256 {saved and saved[2]}): resume "
         "it with those of its config.json")
    micro, steps_per_epoch = cfg.batch_size // (world * cfg.accum), n_train // cfg.batch_size
    need(steps_per_epoch > 0, f"--batch-size {cfg.batch_size} is more than the {n_train} images")
    sampler = EpochSampler(n_train, cfg.batch_size, cfg.accum, rank, world, cfg.seed)
    workers = cfg.workers if cfg.workers >= 0 else min(8, (os.cpu_count() or 2) // world)
    # the workers' own RNG seeds do not matter: augmentation is seeded per sample, by the sampler
    loader = dict(num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    train_loader = DataLoader(Samples(train_set, labels, cfg.img_size, augmentation(cfg, device)),
                              batch_size=micro, sampler=sampler, **loader)
    val_loader = DataLoader(Samples(val_set, targets_of(val_set), cfg.img_size),
                            batch_size=max(micro, 64), sampler=range(rank, n_val, world), **loader)

    # -- model, optimiser, and where a checkpoint left them ------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and in both arms
    model = build_model(cfg, len(classes), target_dim, targets).to(device)
    optimizer = build_optimizer(cfg, model, device)
    epoch, step, history, sums = 0, 0, [], torch.zeros(3)  # sums of L_cls, L_txt, w
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, history, sums = (ckpt[k] for k in ("epoch", "step", "history", "sums"))
    elif cfg.init:  # transfer: the trained ViT of --init, everything else a new run
        load_source(model.vit, cfg.init, classes)
    sums = sums.to(device)
    ddp_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    train_model = torch.compile(ddp_model) if use_compile else ddp_model
    if rank == 0:
        print(f"run {run_dir}: {n_train} images, {target_dim}-d targets (0: the baseline), {world}"
              f" process(es) x {cfg.accum} accum x {micro} = batch {cfg.batch_size}, {device}")

    def checkpoint(epoch, step):
        """All that decides the rest of the run (no RNG state: every draw is a function of seed
        and position), once check_finite passed (no NaN step's weights). Every rank calls it."""
        check_finite(bad, run_dir)
        if ddp:  # the loss sums so far, of all ranks' images: every rank restores them on resume
            dist.all_reduce(sums.div_(world))
        if rank == 0:
            state = dict(format="textteacher-checkpoint-v2", model=model.state_dict(), step=step,
                         optimizer=optimizer.state_dict(), epoch=epoch, sums=sums.cpu(),
                         history=history, config=dataclasses.asdict(cfg), text_dim=target_dim,
                         model_args=model_args(cfg, len(classes)), classes=classes,
                         text_sha256=sha256, split_sha256=split_sha)
            encoder = getattr(targets, "encoder", None)
            config = json.dumps(dict(state["config"], text_sha256=sha256, encoder=encoder))
            log = "".join(epoch_line(r, cfg) + "\n" for r in history)
            noise = {"label_noise.json": json.dumps(flipped.tolist())} if cfg.label_noise else {}
            save_run(run_dir, state, {"config.json": config, "log.txt": log, **noise})

    # -- the loop ---------------------------------------------------------------------------
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss or gradient yet?
    while epoch < cfg.epochs:
        lam = lambda_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        sampler.epoch, sampler.start = epoch, step
        model.train()
        batches, t0 = iter(train_loader), time.time()
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}", leave=False,
                   disable=rank != 0 or not sys.stderr.isatty())
        while step < steps_per_epoch:
            for a in range(cfg.accum):
                # the micro-batch's place in the global batch seeds torch's RNG, which CutMix and
                # stochastic depth draw from: one process with --accum 2 draws what two draw, and
                # a resumed run the same boxes and masks, without any RNG state to save
                part = a * world + rank
                torch.manual_seed(((cfg.seed * 1_000_003 + epoch) * 100_003 + step) * 1009 + part)
                images, y, index = next(batches)
                images = normalize(imagesets.on_device(images, device))  # 3-Augment's colour
                images, lam_mix = cutmix(images, cfg.cutmix) if cfg.cutmix > 0 else (images, 1.0)
                y = mix(F.one_hot(y.to(device, non_blocking=True), len(classes)).float(), lam_mix)
                t = targets(index, true[index], images, lam_mix) if targets else None
                # DDP averages the gradients on the last micro-batch of a step only
                with ddp_model.no_sync() if ddp and a < cfg.accum - 1 else contextlib.nullcontext():
                    loss, loss_cls, loss_txt, w = (objective or step_losses)(
                        train_model, images, y, t, lam, cfg, autocast)
                    (loss / cfg.accum).backward()
                sums += torch.stack([loss_cls.detach(), loss_txt.detach(), w]) / cfg.accum
            # the gradient norm before clipping (max inf when off: measured, not clipped)
            norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
            bad |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == steps_per_epoch:  # reading waits for the GPU
                check_finite(bad, run_dir)
                bar.update(step - bar.n)  # then a redraw with the losses (tqdm may skip one)
                bar.set_postfix(loss_cls=loss_cls.item(), loss_txt=loss_txt.item())
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < steps_per_epoch:
                checkpoint(epoch, step)
        bar.close()

        # -- end of epoch: evaluate, log, checkpoint --------------------------------------------
        elapsed = time.time() - t0
        top1, top5 = evaluate(model.vit, val_loader, device, autocast, ddp)
        if ddp:  # the logged losses of all ranks' images, not of rank 0's alone
            dist.all_reduce(sums.div_(world))
        loss_cls, loss_txt, w = (sums / steps_per_epoch).tolist()
        record = dict(epoch=epoch + 1, loss_cls=loss_cls, loss_txt=loss_txt if targets else None,
                      w=w if targets else None, lr=lr_at(cfg, epoch), top1=top1, top5=top5,
                      best_top1=max([top1] + [r["top1"] for r in history]), epoch_time=elapsed,
                      images_per_s=n_train / elapsed, **{"lambda": lam if targets else 0.0})
        if on_epoch is not None:
            on_epoch(record, model)
        history.append(record)
        if rank == 0:
            print(epoch_line(record, cfg), flush=True)
        epoch, step, sums = epoch + 1, 0, torch.zeros(3, device=device)
        checkpoint(epoch, step)

    if rank == 0:  # the deployed model: the plain ViT, no text head
        export(model.vit, model_args(cfg, len(classes)), classes, f"{run_dir}/export")
        print(f"final top1 {history[-1]['top1']:.2f}, best {history[-1]['best_top1']:.2f}; the ViT "
              f"without its text head is in {run_dir}/export", flush=True)
    if ddp:
        dist.destroy_process_group()
    return run_dir


def epoch_line(r, cfg):
    """One labelled line per epoch, on stdout and in RUN/log.txt: every entry of the record."""
    return f"epoch {r['epoch']}/{cfg.epochs}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in r.items() if v is not None and k != "epoch")


def check_finite(bad, run_dir):
    """Stop at the first boundary after a step whose loss or gradient norm was not finite: its
    update was applied, so the weights are spoilt. Every checkpoint is written after this check
    passed, so the last one is from before the bad step. The flag covers every applied update:
    a step with a finite gradient norm moves finite weights by a bounded amount (AdamW each
    weight by a few times lr at most, LAMB each tensor by lr times its norm), so they stay
    finite. Under DDP every rank sees the same flag: the gradients, and so their norm, are
    all-reduced."""
    if bad:
        saved = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
        raise cli.Diverged("the loss or the gradient became NaN or infinite; " + (
            f"the last checkpoint is from before it: --resume {run_dir} --lr LOWER (or "
            "--clip-grad LOWER)" if saved else "no checkpoint was saved before it: start again "
            "with a lower --lr"))


def main(argv=None):
    cfg = None

    def run(argv):
        nonlocal cfg
        cfg, given = parse_config(argv)
        check_config(cfg)
        train(cfg, given)
    def advice():  # Ctrl-C: checkpoints are written atomically, so the last one is whole
        run_dir = cfg and (cfg.resume or cfg.name and os.path.join(cfg.out_dir, cfg.name))
        saved = run_dir and os.path.exists(os.path.join(run_dir, "checkpoint.pt")
                                           if os.path.isdir(run_dir) else run_dir)
        return (f"continue from the last checkpoint: --resume {run_dir}" if saved else
                "no checkpoint was written yet: run the same command again")
    cli.run(run, argv, advice)


if __name__ == "__main__":
    main()
