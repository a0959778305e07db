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
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
import torch

import analysis  # noqa: E402
import caption_embed  # noqa: E402
import compare  # noqa: E402
import shapes  # noqa: E402
import study  # noqa: E402
import textteacher as tt  # noqa: E402
import transfer  # noqa: E402
from cli import need  # noqa: E402

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


def prepare(root, data):
    """The class text of the data set and of the transfer's source half, the halves, and the
    shapes set with its full captions (study.py's)."""
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


def jobs(root, data):
    """Every run as (folder, config, target maker or None, record the FFD statistics?, the
    folder it starts from or None), in the order they run: the clean photo cells seed by seed,
    the noisy ones, the shapes cells, the transfer's pretraining, then its fine-tunes."""
    out, text = [], f"{root}/text-class.pt"
    for seed in CLEAN_SEEDS:
        for cell in CELLS:
            cfg = photo_config(data, "--seed", str(seed))
            if cell == "baseline":
                cfg = dataclasses.replace(cfg, text_loss_lambda=0.0)
            else:
                cfg = dataclasses.replace(cfg, text=text)
            make = dict(permuted=Permuted, random=RandomClass).get(cell)
            stats = cell in ("baseline", "class")  # the FFD of the analysis: these two arms
            out.append((f"{root}/{cell}-n0.0/seed{seed}", cfg, make, stats, None))
    for seed in NOISY_SEEDS:
        for cell in ("baseline", "class"):
            cfg = photo_config(data, "--seed", str(seed), "--label-noise", "0.5")
            cfg = dataclasses.replace(cfg, text_loss_lambda=0.0) if cell == "baseline" else (
                dataclasses.replace(cfg, text=text))
            out.append((f"{root}/{cell}-n0.5/seed{seed}", cfg, None, False, None))
    shapes_data = os.path.join(os.path.dirname(data), "shapes")
    for noise in (0.0, 0.5):
        for seed in study.SEEDS:
            cfg, _ = tt.parse_config(["--data", "shapes", "--data-dir", shapes_data, "--threads",
                                      "1", "--patch-size", "8", "--epochs", "15", "--seed",
                                      str(seed), "--label-noise", str(noise)])
            out.append((f"{root}/shapes/base-p8-e15-n{noise}/seed{seed}",
                        dataclasses.replace(cfg, text_loss_lambda=0.0), None, True, None))
            out.append((f"{root}/shapes/full-n{noise}/seed{seed}", dataclasses.replace(
                cfg, text=f"{root}/shapes/text-full.pt"), None, True, None))
    for seed in NOISY_SEEDS:
        cfg = photo_config(f"{root}/data-source", "--seed", str(seed))
        out.append((f"{root}/pretrain/baseline/seed{seed}",
                    dataclasses.replace(cfg, text_loss_lambda=0.0), None, False, None))
        out.append((f"{root}/pretrain/class/seed{seed}", dataclasses.replace(
            cfg, text=f"{root}/text-source-class.pt"), None, False, None))
    for seed in NOISY_SEEDS:
        for arm in ("scratch", "baseline", "class"):
            source = None if arm == "scratch" else f"{root}/pretrain/{arm}/seed{seed}"
            out.append((f"{root}/finetune/{arm}/seed{seed}", None, None, False, source))
    return out


def finetune_config(root, seed, source):
    """The same recipe on the target half: from the source run's weights, or from scratch."""
    return photo_config(f"{root}/data-target", "--seed", str(seed), "--text-loss-lambda", "0",
                        *(["--init", source] if source else []))


def work(root, data):
    """Claim and run every job not yet claimed by another worker (a lock per job, which the
    operating system drops if a worker dies), in order; a fine-tune waits for its source."""
    for folder, cfg, make, stats, source in jobs(root, data):
        try:
            cli.lock(folder + ".job", "job")
        except cli.UserError:  # the other worker runs it
            continue
        if cfg is None:  # a fine-tune: --init reads its source, which must be finished
            while source and not os.path.exists(os.path.join(source, "export", "config.json")):
                time.sleep(5)
            cfg = finetune_config(root, int(folder.rsplit("seed", 1)[1]), source)
        targets = None
        if make:
            keys, classes = tt.image_split(cfg.data, cfg.data_dir, "train")[1:]
            targets = make(tt.TextTargets(cfg.text, keys, classes, cfg.data))
        on_epoch = analysis.record_stats(cfg, folder) if stats else None
        compare.run_arm(cfg, folder, targets, on_epoch)
        cli.release(folder + ".job")


# ----------------------------------------------------------------------------
# The report

def final(folder, key="top1"):
    return compare.read_metrics(folder)[-1][key]


def row(cells, name, base):
    """A table row: mean top-1 and the paired difference to base, per seed list."""
    values, bases = cells[name], cells[base]
    diff = compare.mean_std(np.subtract(values, bases)) if name != base else None
    mean = compare.mean_std(values)
    return mean, diff


def report(root, data, docs):
    """docs/photos.{md,json,png} and docs/analysis.{md,png} from the finished runs."""
    results, lines = {}, ["| cell | labels | seeds | top-1 | - baseline (paired) |",
                          "|---|---|---|---|---|"]
    for noise, seeds, cells in ((0.0, CLEAN_SEEDS, CELLS), (0.5, NOISY_SEEDS, ("baseline",
                                                                                "class"))):
        top1 = {c: [final(f"{root}/{c}-n{noise}/seed{s}") for s in seeds] for c in cells}
        for c in cells:
            mean, diff = row(top1, c, "baseline")
            results[f"{c}-n{noise}"] = dict(top1=top1[c], mean=mean, diff=diff)
            lines.append(f"| {c} | {'clean' if not noise else f'{noise:.0%} noisy'} | "
                         f"{len(seeds)} | {mean[0]:.2f} ± {mean[1]:.2f} | " + (
                             f"**{diff[0]:+.2f} ± {diff[1]:.2f}**" if diff else "") + " |")
    for c in ("permuted", "random"):  # the controls against the language, paired too
        d = compare.mean_std(np.subtract(results["class-n0.0"]["top1"],
                                         results[f"{c}-n0.0"]["top1"]))
        results[f"class-minus-{c}"] = d
        lines.append(f"| class - {c} | clean | 5 | | **{d[0]:+.2f} ± {d[1]:.2f}** |")
    tf = {arm: dict(final=[final(f"{root}/finetune/{arm}/seed{s}") for s in NOISY_SEEDS],
                    best=[final(f"{root}/finetune/{arm}/seed{s}", "best_top1")
                          for s in NOISY_SEEDS])
          for arm in ("scratch", "baseline", "class")}
    splits = {s: tt.image_split(f"{root}/data-target", "", s)[0] for s in ("train", "val")}
    for arm in ("baseline", "class"):
        tf[arm]["probe"] = [transfer.probe(f"{root}/pretrain/{arm}/seed{s}", splits, 32)
                            for s in NOISY_SEEDS]
    tlines = ["| start | probe | fine-tune final | fine-tune best |", "|---|---|---|---|"]
    for arm, m in tf.items():
        tlines.append(f"| {arm} | " + " | ".join(
            "{:.2f} ± {:.2f}".format(*compare.mean_std(m[k])) if k in m else "-"
            for k in ("probe", "final", "best")) + " |")
    d = {k: compare.mean_std(np.subtract(tf["class"][k], tf["baseline"][k]))
         for k in ("probe", "final", "best")}
    tlines.append("| class - baseline (paired) | " + " | ".join(
        f"**{m:+.2f} ± {s:.2f}**" for m, s in d.values()) + " |")
    results["transfer"] = dict(tf, diff=d)
    analysis_report(root, data, docs, results)
    text = ("Validation top-1 (%) at the last epoch (10 epochs), CIFAR-10, 1000 training "
            "images per class (JPEG copy), mean ± std over the seeds; differences paired by "
            "seed. Written by `python experiments/photos.py --data data/cifar10-1k`.\n\n"
            + "\n".join(lines) + "\n\nTransfer: pretrained on the first five classes, probed "
            "and fine-tuned on the other five (seeds 0-2):\n\n" + "\n".join(tlines) + "\n")
    cli.save_atomic(lambda f: f.write(text.encode()), f"{docs}/photos.md")
    cli.save_atomic(lambda f: f.write(json.dumps(results, indent=1).encode()),
                    f"{docs}/photos.json")
    plot_photos(docs, results)
    print(text)


def analysis_report(root, data, docs, results):
    """FFD curves and cross-seed CKA of both data sets: docs/analysis.md and .png."""
    sets = {"photos": ({"baseline": "baseline-n0.0", "class": "class-n0.0"}, CLEAN_SEEDS,
                       EPOCHS, data, ""),
            "shapes": ({"baseline": "shapes/base-p8-e15-n0.0", "full captions": "shapes/full-n0.0",
                        "baseline, noise 0.5": "shapes/base-p8-e15-n0.5",
                        "full captions, noise 0.5": "shapes/full-n0.5"}, study.SEEDS, 15,
                       "shapes", os.path.join(os.path.dirname(data), "shapes"))}
    out = {}
    for name, (arms, seeds, epochs, d, d_dir) in sets.items():
        images = analysis.validation_images(d, d_dir, 32, 1000)
        for arm, cell in arms.items():
            curves = [analysis.ffd_curve(f"{root}/{cell}/seed{s}", epochs) for s in seeds]
            cka = [analysis.cross_seed_cka(f"{root}/{cell}/seed{a}", f"{root}/{cell}/seed{b}",
                                           images) for a, b in PAIRS]
            out[f"{name}: {arm}"] = dict(
                ffd=np.mean(curves, 0).tolist(), ffd_std=np.std(curves, 0, ddof=1).tolist(),
                cka={k: float(np.mean([c[k] for c in cka])) for k in cka[0]})
    results["analysis"] = out
    lines = ["| arm | FFD epoch 1 | FFD at a third | FFD second to last | CKA first 2 blocks | "
             "CKA last 2 blocks |", "|---|---|---|---|---|---|"]
    for arm, m in out.items():
        f, c = m["ffd"], list(m["cka"].values())
        lines.append(f"| {arm} | {f[0]:.1f} | {f[len(f) // 3 - 1]:.1f} | {f[-2]:.2f} | "
                     f"{np.mean(c[:4]):.3f} | {np.mean(c[-4:]):.3f} |")
    text = ("FFD: Fréchet distance of per-class Gaussians of the post-norm CLS features on the "
            "validation images, each epoch's model to the final one, mean over classes (our "
            "reading of the paper's measure), mean over seeds. CKA: exact linear CKA between "
            "two seeds of the same arm, per attention and MLP module, on 1000 validation "
            "images, mean over seed pairs (0,1), (0,2), (1,2). Written by `python "
            "experiments/photos.py`.\n\n" + "\n".join(lines) + "\n")
    cli.save_atomic(lambda f: f.write(text.encode()), f"{docs}/analysis.md")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, m in out.items():
        ax = axes[0] if arm.startswith("photos") else axes[1]
        ax.plot(range(1, len(m["ffd"]) + 1), m["ffd"], marker="o", ms=3, label=arm)
        axes[2].plot(range(len(m["cka"])), list(m["cka"].values()), marker="o", ms=3, label=arm)
    for ax, title in zip(axes, ("FFD to the final model, photos", "FFD to the final model, "
                                "shapes", "cross-seed linear CKA (attn, mlp per block)")):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_xlabel("epoch"), axes[1].set_xlabel("epoch"), axes[2].set_xlabel("module")
    fig.tight_layout()
    cli.save_atomic(lambda f: fig.savefig(f, format="png", dpi=110), f"{docs}/analysis.png")
    print(text)


def plot_photos(docs, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["class-n0.0", "permuted-n0.0", "random-n0.0", "class-n0.5"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(names)), [results[n]["diff"][0] for n in names],
           yerr=[results[n]["diff"][1] for n in names], capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), ["class text", "permuted", "random", "class text\nnoise 0.5"])
    ax.set_ylabel("minus the baseline of the same seed (p.p.)")
    ax.set_title("CIFAR-10 photos, final top-1, paired differences (mean ± std)", fontsize=9)
    fig.tight_layout()
    cli.save_atomic(lambda f: fig.savefig(f, format="png", dpi=110), f"{docs}/photos.png")


@cli.releasing  # the claim on --root ends with main
def main(argv=None):
    p = cli.Parser(description="The planned study on real photos (CIFAR-10's JPEG copy).")
    p.add_argument("--data", default="data/cifar10-1k", type=cli.path("folder"),
                   help="an image folder of 32 px photos")
    p.add_argument("--root", default="runs/photos", type=cli.path("new folder"))
    p.add_argument("--docs", default="docs", type=cli.path("new folder"))
    p.add_argument("--workers", type=cli.number(int, "[1, 64]"), default=2,
                   help="processes, one run each at a time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    need(os.path.isdir(os.path.join(args.data, "train")), f"--data {args.data} has no train/ "
         "folder: unpack the photos there (see the docstring)")
    if args.worker:
        return work(args.root, args.data)
    cli.lock(cli.writable(args.root), "--root")
    cli.writable(args.docs)
    prepare(args.root, args.data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = ["--data", args.data, "--root", args.root, "--worker"]
    procs = [subprocess.Popen([sys.executable, __file__, *argv], env=env)
             for _ in range(args.workers)]
    need(not any(p.wait() for p in procs), "a worker failed (its message is above); the "
         "finished runs are kept: run the same command again to continue")
    report(args.root, args.data, args.docs)


if __name__ == "__main__":
    cli.run(main, interrupted="every run keeps its last checkpoint: run the same command again "
            "to continue")
