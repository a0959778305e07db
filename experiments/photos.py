"""
The study on real photos: the paper's claims, its controls and its analysis on CIFAR-10 photos,
beside the shapes set. A planned experiment with paired seeds.

    tar -xzf cifar10-1k.tar.gz -C data/      # CIFAR-10 as 32 px JPEGs, 1000 + 500 per class
    python experiments/photos.py --data data/cifar10-1k     # 2 workers, 1 CPU thread each

It embeds the class-level text (caption_embed.py --classes), trains every run below, records
each epoch's per-class feature statistics (experiments/analysis.py), and writes docs/photos.md,
docs/photos.json, docs/photos.png, docs/analysis.md and docs/analysis.png. A stopped study
continues where it stopped: finished runs are reused, interrupted ones continued. Any image
folder of the same layout works in place of the CIFAR-10 copy (the transfer part takes its
first five classes as the source task and the other five as the target).

Everything below was written down before any of it ran.

Why. On the drawn shapes set, with clean labels, TextTeacher costs 9.5 +- 3.6 p.p., and the
features study's transfer task was not learned by any arm in its budget. A reader cannot tell
which findings are the method and which the toy. The paper's effect with clean labels is small
(up to +2.7 p.p. on ImageNet); here, at 32 px and 10 epochs, expect around +1 p.p. at most,
hence 5 paired seeds for the clean cells.

Fixed in every photo run: `--preset small` (ViT-micro, patch 8 = 16 tokens, AdamW lr 1e-3,
weight decay 0.05, batch 128, no warm-up, padded random crops, no CutMix, label smoothing 0.1),
10 epochs (the preset's 30 cost too much for 36 runs on 2 cores: about 4.5 minutes per run
here), lam 0.5 with the adaptive weight, one CPU thread per run. There is no captioner offline,
so the text is class-level: the prompt ensemble of caption_embed.py --classes (5 templates per
class name), embedded with all-MiniLM-L6-v2, looked up by the image's TRUE class.

Cells (final validation top-1; paired difference to the baseline of the same seed and noise):
  clean labels, seeds 0-4:
    baseline       lam 0
    class          the class-level text
    permuted       the same class embeddings given to the wrong classes (class c gets the
                   text of class c + 1 mod C: every class has another's)
    random         one random direction per class, scaled to the mean norm of the centred
                   class embeddings (a fixed per-class target with no language in it)
  label noise 0.5, seeds 0-2 (budget):
    baseline, class. Class-level text follows the true class, so under noise it is a
    clean-label channel, not the method: reported as that control. The method under noise
    (per-image captions) is the shapes study's, whose numbers docs/study.md has.
  transfer, seeds 0-2: pretrain on the first 5 classes (airplane, automobile, bird, cat, deer;
    5000 images), baseline and class; then, on the other 5 (dog, frog, horse, ship, truck), a
    linear probe of the frozen features (experiments/transfer.py's) and a fine-tune with the same
    recipe, and a from-scratch run of the same budget as the reference. The budget: 10 epochs,
    chosen because the pilot of the recipe (a from-scratch baseline on all 10 classes, before
    this plan) learned from the first epoch (31% after 1 epoch, 10% is chance): the
    from-scratch reference learns in it. If it does not (below 40% at the end), the table
    says so.
  analysis, both data sets:
    FFD to the final model (analysis.py; per class Gaussians of the post-norm CLS features of
    the validation images, Fréchet distance averaged over classes) every epoch, for the clean
    baseline and class cells here, and for the shapes study's baseline and full-caption cells
    at noise 0 and 0.5 (its recipe: 15 epochs, seeds 0-2; run here again with the statistics).
    Cross-seed CKA per attention and MLP module: seed pairs (0,1), (0,2), (1,2) of each arm, on
    1000 validation images.

Hypotheses:
  H1  Language teaches: class > baseline, and class > permuted and class > random (paired).
  H2  Any fixed per-class target helps as much (the alternative to H1): class = permuted =
      random within their stds.
  H3  Under 50% noise the clean class channel helps by much more than with clean labels.
  H4  Transfer: class-pretrained features probe and fine-tune better on the other 5 classes
      than baseline-pretrained ones; both beat from-scratch.
  H5  The paper's analysis: with text, FFD to the final model falls faster early (a smaller
      FFD at epoch 3 of 10, at epoch 5 of 15 on shapes), and cross-seed CKA of the deeper
      layers is higher than the baseline's.
A hypothesis holds where the mean paired difference has the predicted sign and exceeds its std;
every cell is reported whatever its sign.
"""
import dataclasses
import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402,F401  (first: Ctrl-C while the rest imports is one line)

import torch

import analysis  # noqa: E402
import caption_embed  # noqa: E402
import runner  # noqa: E402
import shapes  # noqa: E402
import study  # noqa: E402
import textteacher as tt  # noqa: E402
import transfer  # noqa: E402
from cli import need  # noqa: E402
from runner import Run  # noqa: E402

ROOT = "runs/photos"
CLEAN_SEEDS, NOISY_SEEDS, PAIRS = (0, 1, 2, 3, 4), (0, 1, 2), ((0, 1), (0, 2), (1, 2))
EPOCHS = 10
CELLS = {"baseline": 0.0, "class": 0.0, "permuted": 0.0, "random": 0.0}  # clean cells


# ----------------------------------------------------------------------------
# The controls: fixed per-class targets without (or with the wrong) language

class Permuted:
    """The class embeddings given to the wrong classes: class c gets the text of c + 1 mod C."""

    def __init__(self, targets):
        self.__dict__.update(targets.__dict__)
        self.rows = targets.rows.roll(-1)
        self.sha256 = f"{targets.sha256}:permuted"

    __call__ = tt.TextTargets.__call__


class RandomClass:
    """One random direction per class (seed 0 for every run: a fixed target, like the text),
    scaled to the mean norm of the centred class embeddings, so only the language differs."""

    def __init__(self, targets):
        real = targets.vectors[targets.rows].float() - targets.mean  # shape = [C, D]
        g = torch.Generator().manual_seed(0)
        v = torch.nn.functional.normalize(torch.randn(real.shape, generator=g), dim=1)
        self.vectors, self.dim = v * real.norm(dim=1).mean(), targets.dim
        self.encoder, self.sha256 = "random", "random-class:0"

    def __call__(self, index, labels, images, lam):
        return tt.mix(self.vectors[labels].to(images.device), lam)


# ----------------------------------------------------------------------------
# Data: the class-level text, and the two halves for the transfer

def split_folder(data, out, classes):
    """out/{train,val}/<class>: links to those class folders of data (nothing is copied)."""
    for split in ("train", "val"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for c in classes:
            link = os.path.join(out, split, c)
            if not os.path.exists(link):
                os.symlink(os.path.abspath(os.path.join(data, split, c)), link)


def prepare(args):
    """The class text of the data set and of the transfer's source half, the halves, and the
    shapes set with its full captions (study.py's)."""
    root, data = args.root, args.data
    runner.need_matplotlib()
    need(os.path.isdir(os.path.join(data, "train")), f"--data {data} has no train/ folder: "
         "unpack the photos there (see the docstring)")
    classes = sorted(os.listdir(os.path.join(data, "train")))
    need(len(classes) >= 4, f"{data} has {len(classes)} classes; the study needs 4 or more")
    half = len(classes) // 2
    split_folder(data, f"{root}/data-source", classes[:half])
    split_folder(data, f"{root}/data-target", classes[half:])
    for name, folder in (("class", data), ("source-class", f"{root}/data-source")):
        if not os.path.exists(f"{root}/text-{name}.pt"):
            caption_embed.main(["--classes", "--data", folder, "--out", f"{root}/text-{name}.pt"])
    shapes_data, text = os.path.join(os.path.dirname(data), "shapes"), f"{root}/shapes/text-full.pt"
    if not os.path.isdir(os.path.join(shapes_data, "train")):
        shapes.main(["--out", shapes_data])
    if not os.path.exists(text):  # the study's full captions (study.prepare writes three kinds)
        os.makedirs(os.path.dirname(text), exist_ok=True)
        attrs = {s: shapes.draw(n, seed)[2] for s, (n, seed) in shapes.SPLITS.items()}
        shapes.embed(attrs, {s: f"{root}/shapes/captions-full-{s}.txt" for s in attrs}, text)


# ----------------------------------------------------------------------------
# The runs, in order of priority, shared by the workers

def photo_config(data, *more):
    cfg, _ = tt.parse_config(["--data", data, "--preset", "small", "--epochs", str(EPOCHS),
                              "--threads", "1", "--workers", "0", *more])
    return cfg


def control(make):
    """A function cfg -> the control make(targets) of the class text in cfg.text."""
    return lambda cfg: make(runner.text_targets(cfg)[0])


def runs(args):
    """Every run, in the order they run: the clean photo cells seed by seed, the noisy ones,
    the shapes cells, the transfer's pretraining, then its fine-tunes (each after its source)."""
    root, data, text = args.root, args.data, f"{args.root}/text-class.pt"
    out = [clean_run(root, data, cell, seed) for seed in CLEAN_SEEDS for cell in CELLS]
    stats = analysis.record_stats  # the FFD of the analysis: baseline and full captions
    for seed in NOISY_SEEDS:
        for cell in ("baseline", "class"):
            cfg = photo_config(data, "--seed", str(seed), "--label-noise", "0.5")
            cfg = dataclasses.replace(cfg, text_loss_lambda=0.0) if cell == "baseline" else (
                dataclasses.replace(cfg, text=text))
            out.append(Run(f"{root}/{cell}-n0.5/seed{seed}", cfg))
    shapes_data = os.path.join(os.path.dirname(data), "shapes")
    for noise in (0.0, 0.5):
        for seed in study.SEEDS:
            cfg, _ = tt.parse_config(["--data", "shapes", "--data-dir", shapes_data, "--threads",
                                      "1", "--patch-size", "8", "--epochs", "15", "--seed",
                                      str(seed), "--label-noise", str(noise)])
            out.append(Run(f"{root}/shapes/base-p8-e15-n{noise}/seed{seed}",
                           dataclasses.replace(cfg, text_loss_lambda=0.0), on_epoch=stats))
            out.append(Run(f"{root}/shapes/full-n{noise}/seed{seed}", dataclasses.replace(
                cfg, text=f"{root}/shapes/text-full.pt"), on_epoch=stats))
    for seed in NOISY_SEEDS:
        cfg = photo_config(f"{root}/data-source", "--seed", str(seed))
        out.append(Run(f"{root}/pretrain/baseline/seed{seed}",
                       dataclasses.replace(cfg, text_loss_lambda=0.0)))
        out.append(Run(f"{root}/pretrain/class/seed{seed}", dataclasses.replace(
            cfg, text=f"{root}/text-source-class.pt")))
    for seed in NOISY_SEEDS:
        for arm in ("scratch", "baseline", "class"):
            source = "" if arm == "scratch" else f"{root}/pretrain/{arm}/seed{seed}"
            out.append(Run(f"{root}/finetune/{arm}/seed{seed}", functools.partial(
                finetune_config, root, seed, source), after=source))
    return out


def clean_run(root, data, cell, seed):
    """The run of a clean cell and seed (experiments/fixedtarget.py runs more seeds of them). The
    analysis records the FFD statistics of baseline and class text, seeds 0-4."""
    cfg = photo_config(data, "--seed", str(seed))
    cfg = dataclasses.replace(cfg, text_loss_lambda=0.0) if cell == "baseline" else (
        dataclasses.replace(cfg, text=f"{root}/text-class.pt"))
    make = dict(permuted=Permuted, random=RandomClass).get(cell)
    stats = cell in ("baseline", "class") and seed in CLEAN_SEEDS
    return Run(f"{root}/{cell}-n0.0/seed{seed}", cfg, make and control(make),
               analysis.record_stats if stats else None)


def finetune_config(root, seed, source):
    """The same recipe on the target half: from the source run's weights, or from scratch."""
    return photo_config(f"{root}/data-target", "--seed", str(seed), "--text-loss-lambda", "0",
                        *(["--init", source] if source else []))


# ----------------------------------------------------------------------------
# The report

def report(args):
    """docs/photos.{md,json,png} and docs/analysis.{md,png} from the finished runs."""
    root, docs = args.root, args.docs
    results, lines = {}, list(runner.TABLE_HEAD)
    top1 = {(c, noise): runner.finals({s: f"{root}/{c}-n{noise}/seed{s}" for s in seeds}, EPOCHS)
            for noise, seeds, cells in ((0.0, CLEAN_SEEDS, CELLS),
                                        (0.5, NOISY_SEEDS, ("baseline", "class")))
            for c in cells}
    for (c, noise), values in top1.items():
        line, results[f"{c}-n{noise}"] = runner.paired_row(
            c, "clean" if not noise else "50% noisy", values,
            None if c == "baseline" else top1[("baseline", noise)])
        lines.append(line)
    for c in ("permuted", "random"):  # the controls against the language, paired too
        line, results[f"class-minus-{c}"] = runner.paired_row(
            f"class - {c}", "clean", top1[("class", 0.0)], top1[(c, 0.0)])
        lines.append(line)
    tf = {arm: {k: runner.finals({s: f"{root}/finetune/{arm}/seed{s}" for s in NOISY_SEEDS},
                                 EPOCHS, key) for k, key in (("final", "top1"),
                                                             ("best", "best_top1"))}
          for arm in ("scratch", "baseline", "class")}
    splits = {s: tt.image_split(f"{root}/data-target", "", s)[0] for s in ("train", "val")}
    for arm in ("baseline", "class"):
        tf[arm]["probe"] = {s: transfer.probe(f"{root}/pretrain/{arm}/seed{s}", splits, 32)
                            for s in NOISY_SEEDS}
    tlines = ["| start | measure | seeds | top-1 | class - baseline (paired) |",
              "|---|---|---|---|---|"]
    for arm, measures in tf.items():
        for k, values in measures.items():
            line, results[f"transfer-{arm}-{k}"] = runner.paired_row(
                arm, k, values, tf["baseline"][k] if arm == "class" else None)
            tlines.append(line)
    analysis_report(args, results)
    text = ("Validation top-1 (%) at the last epoch (10 epochs), CIFAR-10, 1000 training "
            "images per class (JPEG copy), mean ± std over the seeds; differences paired by "
            "seed. Written by `python experiments/photos.py --data data/cifar10-1k`.\n\n"
            + "\n".join(lines) + "\n\nTransfer: pretrained on the first five classes, probed "
            "and fine-tuned on the other five (seeds 0-2):\n\n" + "\n".join(tlines) + "\n")
    runner.plot(f"{docs}/photos.png", [
        (label, results[n]["diff"]) for n, label in (
            ("class-n0.0", "class text"), ("permuted-n0.0", "permuted"),
            ("random-n0.0", "random"), ("class-n0.5", "class text\nnoise 0.5"))],
        "CIFAR-10 photos, final top-1, paired differences (mean ± std)",
        "minus the baseline of the same seed (p.p.)")
    runner.write(docs, "photos", text, results)


def analysis_report(args, results):
    """FFD curves and cross-seed CKA of both data sets, beside their floors: docs/analysis.md
    and .png."""
    root, data = args.root, args.data
    sets = {"photos": ({"baseline": "baseline-n0.0", "class": "class-n0.0"}, CLEAN_SEEDS,
                       EPOCHS, data, ""),
            "shapes": ({"baseline": "shapes/base-p8-e15-n0.0", "full captions": "shapes/full-n0.0",
                        "baseline, noise 0.5": "shapes/base-p8-e15-n0.5",
                        "full captions, noise 0.5": "shapes/full-n0.5"}, study.SEEDS, 15,
                       "shapes", os.path.join(os.path.dirname(data), "shapes"))}
    text, out = "", {}
    for name, (arms, seeds, epochs, d, d_dir) in sets.items():
        images = analysis.validation_images(d, d_dir, 32, 1000)
        out[name] = analysis.arms_analysis(
            {arm: {s: f"{root}/{cell}/seed{s}" for s in seeds} for arm, cell in arms.items()},
            images, epochs)
        base, other = (f"{root}/{cell}/seed0" for cell in list(arms.values())[:2])
        floors = analysis.floors({"trained - untrained": (base, None),
                                  f"{' - '.join(list(arms)[:2])}, seed 0": (base, other)}, images)
        text += f"## {name}\n\n" + analysis.cka_tables(
            out[name], floors, epochs, "python experiments/photos.py") + "\n"
        analysis.plot(f"{args.docs}/analysis-{name}.png", out[name], name)
    results["analysis"] = out
    runner.write(args.docs, "analysis", text)


def main(argv=None):
    return runner.main(sys.modules[__name__], "The planned study on real photos (CIFAR-10's "
                       "JPEG copy).", argv)


if __name__ == "__main__":
    runner.run(main)
