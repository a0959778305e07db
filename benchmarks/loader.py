"""
The input pipeline per CPU core: images per second of decode alone, of DeiT III's 3-Augment
pipeline, of this project's previous one and of its current one (imagesets.ThreeAugment), as a
DataLoader worker runs it for training on a GPU and on the CPU, taking turns in one process on
one thread; and each stage's milliseconds per image before and after.

    python benchmarks/loader.py                 # 224 px from 500 x 375 photo-like JPEGs
    python benchmarks/loader.py --size 32 --width 32 --height 32     # CIFAR-sized

An 8-GPU node training ViT-S/16 needs on the order of 20 000 images per second, so a core's
rate decides how many cores feed it. Run it on a quiet machine: a second busy process halves
every number here. The JPEGs are drawn in memory (smooth waves and grain, quality 90), so the
disk is not measured.

The pipelines, each from the JPEG's bytes to the tensor the model's device receives:
  decode     PIL's decode to RGB, nothing else: the floor.
  deit3      DeiT III's own 3-Augment (its augment.py, which the paper's code uses): torchvision's
             PIL transforms Resize(S, bicubic), RandomCrop(S, padding 4, reflect),
             RandomHorizontalFlip, RandomChoice(Grayscale, PIL solarize, PIL Gaussian blur of
             radius 0.1-2), ColorJitter(0.3, 0.3, 0.3), then ToTensor and Normalize.
  timm-3a    where timm is installed, timm's build of it: create_transform(auto_augment="3a",
             color_jitter=0.3), the same one-of and jitter after timm's RandomResizedCrop (timm
             has no padded crop: it resizes the crop, not the whole image), ToTensor, Normalize.
  before     this project before imagesets.ThreeAugment: PIL's resize, then torchvision's v2
             transforms on uint8 (3-Augment as textteacher.py had it); normalised on the device.
  ours       imagesets.ThreeAugment(on_device=True), a worker's share when training on a GPU:
             decode, resize, crop, and the colour steps' random draws; imagesets.colour applies
             them to the batch on the GPU, normalize() the mean and std. The same draws and
             pixels as `before` but for the resize and the blur (tests/test_loader.py).
  ours-cpu   imagesets.ThreeAugment(), a worker's share when training on the CPU: the colour
             steps too, one image at a time (the same function as on the GPU, the same pixels).
The colour steps of `ours` are timed too, on all the --images at once on this CPU: not what
they cost a GPU, which runs them on its own cores (gpu_check.py --paths speed,input times them
there, against the step). Rates are the median over rounds, and each ratio the median of
per-round ratios.
"""
import io
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
import PIL.Image
import torch
import torchvision.transforms as V1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import ImageFilter, ImageOps

import imagesets  # noqa: E402
import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402


def jpegs(n, width, height):
    """n photo-like JPEGs (bytes): waves of random period and phase per channel, and grain."""
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width]
        channels = [np.sin(x / rng.uniform(8, 60) + rng.uniform(0, 6)) * 80
                    + np.cos(y / rng.uniform(8, 60) + rng.uniform(0, 6)) * 60 + 128
                    for _ in range(3)]
        pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                       quality=90)
        out.append(buffer.getvalue())
    return out


def decode(data):
    return PIL.Image.open(io.BytesIO(data)).convert("RGB")


def deit3(size):
    """DeiT III's 3-Augment as its code builds it, on PIL images."""
    def blur(image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    return V1.Compose([
        V1.Resize(size, interpolation=V1.InterpolationMode.BICUBIC),
        V1.RandomCrop(size, padding=4, padding_mode="reflect"), V1.RandomHorizontalFlip(),
        V1.RandomChoice([V1.Grayscale(3), ImageOps.solarize, blur]),
        V1.ColorJitter(0.3, 0.3, 0.3), V1.ToTensor(), V1.Normalize(*tt.IMAGENET)])


def timm_3a(size):
    """timm's 3-Augment, or None where timm is not installed."""
    try:
        import timm.data
    except ImportError:
        return None
    return timm.data.create_transform(size, is_training=True, auto_augment="3a", color_jitter=0.3,
                                      interpolation="bicubic", re_prob=0.0)


def before(size):
    """The project's previous pipeline: PIL's resize, torchvision's v2 transforms on uint8."""
    three = T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"),
                       T.RandomHorizontalFlip(),
                       T.RandomChoice([T.Grayscale(3), T.RandomSolarize(128, 1.0),
                                       T.GaussianBlur(7, (0.2, 2))]),
                       T.ColorJitter(0.3, 0.3, 0.3)])
    return lambda image: three(TF.pil_to_tensor(TF.resize(image, size,
                                                          T.InterpolationMode.BICUBIC)))


def stages(size):
    """Each stage of `before` and of `ours` (in a worker for training on the CPU, and for
    training on a GPU) as a function of the decoded image (timed alone: the later stages
    start from the earlier stages' output, computed once)."""
    old_rest = T.Compose([T.RandomHorizontalFlip(), T.RandomChoice([
        T.Grayscale(3), T.RandomSolarize(128, 1.0), T.GaussianBlur(7, (0.2, 2))]),
        T.ColorJitter(0.3, 0.3, 0.3)])
    old_crop = T.RandomCrop(size, padding=4, padding_mode="reflect")
    new = imagesets.ThreeAugment(size)

    def resize(image):
        return imagesets.resize_short_side(image, size)

    def worker_colour(x):  # the colour steps on one image, in the worker
        return imagesets.colour(x[None], new.draws()[None])[0]
    return {
        "resize": (lambda im: TF.pil_to_tensor(TF.resize(im, size, T.InterpolationMode.BICUBIC)),
                   resize, resize),
        "crop (pad 4, reflect)": (old_crop, new.crop, new.crop),
        "flip, one of 3, jitter": (old_rest, worker_colour, lambda x: new.draws())}


def timed(function, inputs):
    """Milliseconds per input of function over inputs."""
    start = time.perf_counter()
    for x in inputs:
        function(x)
    return 1000 * (time.perf_counter() - start) / len(inputs)


def main(argv=None):
    p = cli.Parser(description="The input pipeline per CPU core, against DeiT III's.")
    pixels = cli.number(int, "[1, 4096]")  # a side in pixels: a 4096 px photo is 50 MB decoded
    # 5 px at least: the crop reflects 4 px of padding, which needs a side of 5 or more
    p.add_argument("--size", type=cli.number(int, "[5, 4096]"), default=224,
                   help="the training resolution S")
    p.add_argument("--width", type=pixels, default=500, help="the JPEGs' width")
    p.add_argument("--height", type=pixels, default=375, help="the JPEGs' height")
    p.add_argument("--images", type=cli.number(int, "[1, 4096]"), default=40,
                   help="JPEGs per round")
    p.add_argument("--rounds", type=cli.number(int, "[1, 4096]"), default=7,
                   help="rounds (each pipeline once a round)")
    args = p.parse_args(argv)
    need(args.size <= min(args.width, args.height) * 8, "--size more than 8 times the images' "
         "short side is not a benchmark of anything")
    # every image is held decoded, resized and cropped (uint8): refused before it is drawn
    held = args.images * 3 * (args.width * args.height + 2 * args.size ** 2)
    need(held <= cli.memory("cpu"), f"--images {args.images} of {args.width} x {args.height} px "
         f"at --size {args.size} would hold {held / 2**30:.0f} GiB, and this machine has "
         f"{cli.memory('cpu') / 2**30:.0f} GiB")
    torch.set_num_threads(1)  # per core
    data = jpegs(args.images, args.width, args.height)
    images = [decode(d) for d in data]
    S = args.size
    # each pipeline built once, as a DataLoader worker holds it: only the images are timed
    transforms = {"deit3": deit3(S), "timm-3a": timm_3a(S), "before": before(S),
                  "ours": imagesets.ThreeAugment(S, on_device=True),
                  "ours-cpu": imagesets.ThreeAugment(S)}
    pipelines = {"decode": decode, **{name: lambda d, t=t: t(decode(d))
                                      for name, t in transforms.items() if t is not None}}
    parts = stages(S)
    resized = [parts["resize"][0](im) for im in images]
    cropped = [parts["crop (pad 4, reflect)"][1](x) for x in resized]
    stage_inputs = {"resize": images, "crop (pad 4, reflect)": resized,
                    "flip, one of 3, jitter": cropped}
    # what the device does for "ours": the colour steps of a whole batch at once
    batch = torch.stack(cropped)
    draws = torch.stack([imagesets.ThreeAugment.draws() for _ in cropped])
    times = {name: [] for name in [*pipelines, "device"]}
    # each distinct function once: resize and crop are the same code in both of ours' workers
    stage_times = {(k, i): [] for k, fns in parts.items() for i in range(3)
                   if i < 2 or fns[2] != fns[1]}
    torch.manual_seed(0)
    random.seed(0)
    for r in range(args.rounds + 1):  # round 0 warms up, and is not counted
        n = len(pipelines)
        order = list(pipelines)[r % n:] + list(pipelines)[:r % n]  # a slow phase hits all
        for name in order:
            ms = timed(pipelines[name], data)
            if r:
                times[name].append(ms)
        start = time.perf_counter()
        imagesets.colour(batch, draws)
        if r:
            times["device"].append(1000 * (time.perf_counter() - start) / len(batch))
        for (k, i), v in stage_times.items():
            ms = timed(parts[k][i], stage_inputs[k])
            if r:
                v.append(ms)
    median = {k: statistics.median(v) for k, v in {**times, **stage_times}.items()}
    print(f"{args.images} JPEGs of {args.width} x {args.height} to {S} px, one thread, "
          f"{args.rounds} rounds (torch {torch.__version__})")
    against = [k for k in ("deit3", "timm-3a") if k in pipelines]
    print(f"{'pipeline':>10} {'ms/img':>8} {'img/s/core':>11}" + "".join(
        f" {'vs ' + k:>11}" for k in against))
    for name in pipelines:
        ratios = [statistics.median(d / o for d, o in zip(times[k], times[name])) for k in against]
        print(f"{name:>10} {median[name]:8.2f} {1000 / median[name]:11.0f}" + "".join(
            f" {r:10.2f}x" for r in ratios))
    print(f"and for `ours`, the colour steps on the device, a batch of {len(batch)} on this CPU: "
          f"{median['device']:.2f} ms/img")
    print(f"\n{'stage (ms/img)':>24} {'before':>8} {'ours-cpu':>9} {'ours':>8}")
    d = median["decode"]
    print(f"{'decode':>24} {d:8.2f} {d:9.2f} {d:8.2f}")
    for k in parts:
        gpu = median.get((k, 2), median[(k, 1)])
        print(f"{k:>24} {median[(k, 0)]:8.2f} {median[(k, 1)]:9.2f} {gpu:8.2f}")
    print(f"{'':>24} {'':>8} {'':>9} (+ {median['device']:.2f} on the device)")


if __name__ == "__main__":
    cli.run(main)
