"""
The fast input pipeline (imagesets.ThreeAugment) against torchvision's transforms: the same
random draws and the same pixels where the operations are the same (crop, flip, grayscale,
solarize, colour jitter), and within one grey level, with equal pixel statistics over many
draws, where they are not (torch's resize for PIL's, the blur's float sums).
"""
import io
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from common import ROOT, RANDOM, assert_same_weights, base_args, checkpoint, run, untimed
from common import folder  # noqa: F401  (a fixture)
import imagesets
import textteacher as tt


def photo(seed, size=(61, 47)):
    """A photo-like JPEG (smooth waves and grain), decoded: what a loader sees."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    channels = [np.sin(x / rng.uniform(3, 15) + rng.uniform(0, 6)) * 80
                + np.cos(y / rng.uniform(3, 15)) * 60 + 128 for _ in range(3)]
    pixels = (np.stack(channels, -1) + rng.normal(0, 12, (*size[::-1], 3))).clip(0, 255)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class Recorded(T.GaussianBlur):
    """torchvision's blur, noting that it ran (the one branch that is not bit-identical)."""
    calls = 0

    def transform(self, inpt, params):
        Recorded.calls += 1
        return super().transform(inpt, params)


def torchvision_3augment(size):
    return T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"),
                      T.RandomHorizontalFlip(),
                      T.RandomChoice([T.Grayscale(3), T.RandomSolarize(128, 1.0),
                                      Recorded(7, (0.2, 2))]),
                      T.ColorJitter(0.3, 0.3, 0.3)])


def augmented(fast, resized):
    """ThreeAugment's whole pipeline from the resized image: the worker's share, then colour()
    applied to the one image as to a batch on the device."""
    out = fast.of_resized(resized)
    return imagesets.colour(out[0][None], out[1][None])[0] if isinstance(out, tuple) else out


def pil_resized(image, size):
    return TF.pil_to_tensor(TF.resize(image, size, T.InterpolationMode.BICUBIC))


def test_the_crop_through_reflected_indices_is_the_padded_crop():
    """Every window of the reflect-padded image, read in place, equals the padded copy's."""
    x = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x[None].float(), (4, 4, 4, 4), mode="reflect")[0]
    for top in range(9 + 8 - 6 + 1):
        for left in range(13 + 8 - 6 + 1):
            rows = imagesets.reflected_window(x, top - 4, 6, 1)
            got = imagesets.reflected_window(rows, left - 4, 6, 2)
            assert torch.equal(got.float(), padded[:, top:top + 6, left:left + 6])


@pytest.mark.parametrize("augment,on_device", [("3aug", False), ("3aug", True), ("crop", False),
                                               ("none", False)])
def test_the_same_draws_and_pixels_as_torchvisions_transforms(augment, on_device):
    """On the same resized image and seed: torchvision's pipeline, bit for bit, except where
    its blur ran (within 2 grey levels after the jitter, in a few pixels), whether the colour
    steps run in the worker or are drawn there and applied by colour() (on_device). The RNG
    is left in the same state too, so whatever draws next (CutMix in the loop) draws the
    same."""
    size = 24
    reference = {"3aug": torchvision_3augment(size),
                 "crop": T.RandomCrop(size, padding=4, padding_mode="reflect"),
                 "none": T.CenterCrop(size)}[augment]
    fast = imagesets.ThreeAugment(size, augment, on_device)
    exact = blurred = 0
    for seed in range(120):
        resized = pil_resized(photo(seed % 7, (40 + seed % 9, 31 + seed % 5)), size)
        torch.manual_seed(seed)
        before, ours, after = Recorded.calls, augmented(fast, resized), torch.rand(1)
        torch.manual_seed(seed)
        theirs = reference(resized)
        assert torch.equal(after, torch.rand(1))  # the same number of draws
        assert ours.dtype == torch.uint8 and ours.shape == theirs.shape == (3, size, size)
        if Recorded.calls == before:
            assert torch.equal(ours, theirs)
            exact += 1
        else:
            diff = (ours.int() - theirs.int()).abs()
            assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02
            blurred += 1
    assert exact > 60 and (blurred > 20 or augment != "3aug")


def test_the_resize_is_pils_within_rounding():
    """The same sizes; pixels within 2 grey levels (1 where the scale is the same on both
    axes), and no bias: the mean signed difference below 0.01 levels."""
    for seed, size in enumerate(((64, 48), (48, 64), (33, 90), (100, 100), (30, 24))):
        image = photo(seed, size)
        for target in (24, 32):
            ours, theirs = imagesets.resize_short_side(image, target), pil_resized(image, target)
            assert ours.shape == theirs.shape and min(ours.shape[1:]) == target
            diff = ours.int() - theirs.int()
            assert diff.abs().max() <= (2 if size == (33, 90) else 1)
            assert abs(diff.float().mean()) < 0.01
    same = photo(0, (32, 32))  # already the size: the pixels as decoded
    assert torch.equal(imagesets.resize_short_side(same, 32), TF.pil_to_tensor(same))


def test_the_blur_is_torchvisions_within_one_grey_level():
    x = torch.randint(0, 256, (3, 20, 17), dtype=torch.uint8)
    for sigma in (0.2, 0.7, 1.3, 2.0):
        ours = imagesets.gaussian_blur(x[None].float(), torch.tensor([sigma])).round_()[0]
        assert (ours.int() - TF.gaussian_blur(x, [7, 7], [sigma, sigma]).int()).abs().max() <= 1


def test_pixel_statistics_and_crop_boxes_over_many_draws():
    """End to end from the decoded photo, over 300 draws: per-pixel mean and std of the
    outputs equal torchvision's pipeline (with PIL's resize) within 0.3 grey levels; and the
    crop's box is uniform over every offset of the padded image (chi-square, p ~ 0.001)."""
    size, image = 24, photo(3, (40, 30))
    fast, reference = imagesets.ThreeAugment(size), torchvision_3augment(size)
    ours, theirs = [], []
    for seed in range(300):  # the same draws for both: only the resize and the blur differ
        torch.manual_seed(seed)
        ours.append(augmented(fast, imagesets.resize_short_side(image, size)).float())
        torch.manual_seed(seed)
        theirs.append(reference(pil_resized(image, size)).float())
    ours, theirs = torch.stack(ours), torch.stack(theirs)
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.3
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.3
    # a 24 x 32 image whose pixels are their own positions: the centre of the window, always
    # inside the image, names the box (top 0..8, left 0..16 in the padded image: 153 boxes)
    marked, boxes = torch.arange(24 * 32).view(1, 24, 32).expand(3, -1, -1), []
    for seed in range(2000):
        torch.manual_seed(seed)
        boxes.append(int(fast.crop(marked)[0, 12, 12]))
    counts = np.bincount(boxes, minlength=24 * 32)
    tops, lefts = np.nonzero(counts.reshape(24, 32))
    assert set(tops - 8) == set(range(9)) and set(lefts - 8) == set(range(17))
    counts = counts[counts > 0]
    expected = 2000 / len(counts)
    assert len(counts) == 153 and ((counts - expected) ** 2 / expected).sum() < 213  # chi2 0.999


def test_a_batch_gets_the_colour_steps_each_image_gets_alone():
    """colour() of a batch, each image by its own draws, equals colour() of each image alone,
    bit for bit: what a GPU batch applies is what a worker applies to one image. The batch
    draws every kind and every jitter step at every position, and batches of one kind take
    the whole-batch path."""
    fast = imagesets.ThreeAugment(21)
    x = torch.randint(0, 256, (60, 3, 21, 21), dtype=torch.uint8)
    torch.manual_seed(0)
    draws = torch.stack([fast.draws() for _ in x])
    kind, order = draws[:, 1], draws[:, 3:7]
    assert set(kind.tolist()) == {0, 1, 2} and set(draws[:, 0].tolist()) == {0, 1}
    assert all(set(order[:, j].tolist()) == {0, 1, 2, 3} for j in range(4))
    alone = torch.stack([imagesets.colour(x[i:i + 1], draws[i:i + 1])[0] for i in range(60)])
    assert torch.equal(imagesets.colour(x, draws), alone)
    draws[:, 2] = torch.linspace(0.2, 2, 60)  # each image its own sigma, should it blur
    for k in range(3):  # the whole batch takes one kind, then the jitter's mixed steps
        draws[:, 1] = k
        alone = torch.stack([imagesets.colour(x[i:i + 1], draws[i:i + 1])[0] for i in range(60)])
        assert torch.equal(imagesets.colour(x, draws), alone)


def test_the_colour_steps_on_the_device_train_the_same_run(folder, tmp_path, monkeypatch):
    """A run whose worker only draws the colour steps (as on a GPU: imagesets.on_device applies
    them to the batch) is the run whose images get them in the loading process: the same
    metrics and weights. Every random thing is on: 3-Augment, CutMix, stochastic depth; the
    draws cross from a worker process, as on a GPU machine."""
    assert run(base_args(folder, tmp_path, *RANDOM, "--name", "worker")) == 0
    calls = []

    def deferred(cfg, device=torch.device("cpu")):
        calls.append(cfg.augment)
        return imagesets.ThreeAugment(cfg.img_size, cfg.augment, on_device=True)
    monkeypatch.setattr(tt, "augmentation", deferred)
    assert run(base_args(folder, tmp_path, *RANDOM, "--name", "device", "--workers", "1")) == 0
    assert calls == ["3aug"] and untimed(tmp_path / "worker") == untimed(tmp_path / "device")
    assert_same_weights(checkpoint(tmp_path / "worker")["model"],
                        checkpoint(tmp_path / "device")["model"])


def test_the_trainer_uses_it_and_evaluates_with_pils_resize(tmp_path):
    """augmentation is ThreeAugment; the evaluation view is PIL's bicubic resize and the
    centre crop (what timm's transform of the export computes)."""
    fast = tt.augmentation(tt.Config(img_size=16, augment="crop"))
    assert isinstance(fast, imagesets.ThreeAugment) and (fast.size, fast.augment) == (16, "crop")
    images = [photo(s, (20, 16)) for s in range(3)]
    samples = tt.Samples([(im, 0) for im in images], torch.zeros(3, dtype=torch.long), 12)
    for i, image in enumerate(images):
        x, label, index = samples[i]
        assert torch.equal(x, TF.center_crop(pil_resized(image, 12), [12, 12])) and index == i


def test_the_benchmark_times_the_trainers_pipelines(monkeypatch, capsys):
    """`python benchmarks/loader.py`: it times the augmentation the trainer builds on a GPU
    (on_device) and on the CPU, besides DeiT III's and the previous pipeline, and prints a
    positive rate and a ratio for each, DeiT III's own ratio 1.00x, and every stage's times."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import loader
    built = []

    class Spy(imagesets.ThreeAugment):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append((self.size, self.augment, self.on_device))
    monkeypatch.setattr(imagesets, "ThreeAugment", Spy)
    loader.main(["--size", "24", "--width", "40", "--height", "30", "--images", "3",
                 "--rounds", "1"])
    out = capsys.readouterr().out.splitlines()
    assert (24, "3aug", True) in built and (24, "3aug", False) in built
    end = next(i for i, line in enumerate(out) if line.startswith("and for `ours`"))
    rows = {line.split()[0]: line.split()[1:] for line in out[2:end]}
    names = {"decode", "deit3", "before", "ours", "ours-cpu"} | (
        {"timm-3a"} if loader.timm_3a(24) is not None else set())
    assert set(rows) == names and rows["deit3"][2] == "1.00x"
    assert all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values())
    for stage in ("decode", "resize", "crop (pad 4, reflect)", "flip, one of 3, jitter"):
        assert any(line.strip().startswith(stage) for line in out), stage
