"""
Language on real photos: per-image captions against controls that separate language from label.
A planned study with paired seeds, on CIFAR-10 photos with a machine-written caption per image.

    tar -xzf cifar10-captioned.tar.gz -C data/   # 32 px JPEGs, 500 + 500 per class, captions.tsv
    python experiments/captions.py --data data/cifar10-captioned     # 2 workers, 1 thread each

It embeds the caption variants below (caption_embed.py, from the table's path and caption
columns), trains every run, records the per-class feature statistics of the analysed arms, and
writes docs/captions.md, docs/captions.json, docs/captions.png and docs/captions-analysis.png.
A stopped study continues where it stopped (experiments/runner.py).

Everything below was written down before any of it ran.

Why. The photo study (docs/photos-study.md) found that class-level text helps (+1.2 p.p.), but as
much as the class vectors given to the wrong classes and random vectors per class: nothing run
on real photos so far shows that *language* teaches. The paper's claims rest on per-image
captions; these are the first real ones here.

Fixed in every run: the photo study's recipe (`--preset small`: ViT-micro, patch 8, 32 px,
AdamW lr 1e-3, weight decay 0.05, batch 128, no warm-up, padded random crops, no CutMix, label
smoothing 0.1), 10 epochs, lam 0.5 with the adaptive weight, all-MiniLM-L6-v2 as the encoder,
one CPU thread per run. 5000 training images (500 per class), 5000 validation images.

Text targets (every one is embedded by the same encoder, centred by its own mean):
  class      the prompt ensemble of caption_embed.py --classes (5 templates per class name),
             looked up by the image's true class
  captions   the image's own caption (the table's `caption` column): the method
  shuffled   the captions shuffled within each class, a new permutation per seed: the class's
             language kept, the image's own pairing broken (about 1 in 500 images keeps its own)
  masked     the captions with every class's words (MASKED_WORDS: the class names, their
             plurals, synonyms and kinds the captions use) replaced by "thing": the appearance
             and the scene without the label
  random     one fixed Gaussian vector per image with the per-dimension std of the captions'
             embeddings (compare.Gaussian, seeded by the run): a per-image target without
             language
  merged     the table's `merged_caption`, a rewrite that inserts the class name: the label
             leaked, a control, not the method

Cells (final validation top-1; each paired with the baseline of its seed and noise):
  clean labels, seeds 0-4: baseline (lam 0), class, captions, shuffled, masked, random, merged
  50% label noise, seeds 0-2: baseline, captions, class, masked. The captions describe the
    image, not its noisy label (the paper's +8.4 p.p. experiment); class text follows the true
    class, so it is the clean-label channel (a control); masked captions say how much of the
    captions' help under noise is the label they name.
  order: clean seeds 0-2, then noisy seeds 0-2, then clean seeds 3-4 (if the study has to stop
    early, every table has three seeds).

Hypotheses, each decided by a paired difference (the same seed's runs):
  H1  Per-image language beats the class's language: captions - shuffled > 0 and
      captions - class > 0 (clean labels).
  H2  Appearance words carry something without the label: masked - baseline > 0 and
      masked - random > 0 (clean labels).
  H3  Under 50% noise captions recover a large part of what the noise costs: recovery
      (captions - baseline, noisy) / (baseline clean - baseline noisy) > 0.5; and most of it
      is the label they name: captions - masked > masked - baseline under noise.
  H4  The leak control: merged - captions > 0 (clean and, through class text, noisy).
  H5  The paper's analysis, baseline against captions against class text (clean, seeds 0-4):
      the FFD to the final model is smaller with captions at epoch 3 of 10; cross-seed CKA of
      the last two blocks is higher with captions than with the baseline by more than the
      pairs' std, and stands above the floor (a trained model against an untrained one, and
      against a model of another arm).
A hypothesis holds where the mean paired difference has the predicted sign and exceeds its
std over seeds; every cell is reported whatever its sign.
"""
import dataclasses
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch

import analysis  # noqa: E402
import caption_embed  # noqa: E402
import compare  # noqa: E402
import runner  # noqa: E402
import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402
from runner import Run  # noqa: E402

ROOT = "runs/captions"
EPOCHS = 10
CLEAN = ("baseline", "class", "captions", "shuffled", "masked", "random", "merged")
NOISY = ("baseline", "captions", "class", "masked")
ANALYSED = ("baseline", "captions", "class")
PAIRS = ((0, 1), (0, 2), (1, 2))

# The words that name a CIFAR-10 class, or a kind of it, in the captions (and their plurals):
# every word the captioner uses for a class at least a few times, read off the caption table.
MASKED_WORDS = {
    "airplane": "airplane aeroplane plane jet aircraft airliner biplane fighter",
    "automobile": "automobile car vehicle sedan suv convertible coupe taxi jeep minivan",
    "bird": "bird ostrich emu parrot chicken duck eagle owl hen rooster pigeon seagull",
    "cat": "cat kitten kitty tabby",
    "deer": "deer elk moose reindeer antelope stag buck fawn doe",
    "dog": "dog puppy pup chihuahua retriever poodle labrador terrier pug",
    "frog": "frog toad",
    "horse": "horse foal pony stallion mare",
    "ship": "ship boat sailboat ferry yacht vessel tanker tugboat steamship",
    "truck": "truck lorry pickup semi firetruck",
}
PLURALS = {"ostrich": "ostriches", "puppy": "puppies", "pony": "ponies", "taxi": "taxis taxies",
           "deer": "deer", "moose": "moose", "elk": "elks", "reindeer": "reindeer"}
WORDS = sorted({p for words in MASKED_WORDS.values() for w in words.split()
                for p in (w, *PLURALS.get(w, w + "s").split())}, key=len, reverse=True)
MASK = re.compile(r"\b(" + "|".join(WORDS) + r")\b", re.IGNORECASE)


def mask(caption):
    """The caption with every class word (MASKED_WORDS, whole words, any case) as "thing"."""
    return MASK.sub("thing", caption)


# ----------------------------------------------------------------------------
# The target sources of the controls

class WithinClass:
    """The captions shuffled within each class: image i gets the caption of another image of
    its own (true) class, one permutation per class and seed."""

    def __init__(self, targets, labels, seed):
        self.__dict__.update(targets.__dict__)
        g, rows = torch.Generator().manual_seed(seed), targets.rows.clone()
        for c in labels.unique():
            i = (labels == c).nonzero().squeeze(1)
            rows[i] = targets.rows[i[torch.randperm(len(i), generator=g)]]
        self.rows, self.sha256 = rows, f"{targets.sha256}:within-class:{seed}"

    __call__ = tt.TextTargets.__call__


def control(kind):
    """A function cfg -> the target source of a control, from cfg.text."""
    def make(cfg):
        targets, labels = runner.text_targets(cfg)
        if kind == "shuffled":
            return WithinClass(targets, labels, cfg.seed)
        return compare.Gaussian(targets, cfg.seed)
    return make


# ----------------------------------------------------------------------------
# Inputs, runs, report

def prepare(args):
    """The embeddings of every text variant: class text, captions, masked captions, merged."""
    runner.need_matplotlib()
    table = os.path.join(args.data, "captions.tsv")
    need(os.path.isfile(table), f"{args.data} has no captions.tsv: unpack the captioned photos "
         "there (see the docstring)")
    masked = os.path.join(args.root, "captions-masked.tsv")
    if not os.path.exists(masked):
        rows = cli.read_table(table, ("path", "caption"))
        text = "path\tcaption\n" + "".join(f"{r['path']}\t{mask(r['caption'])}\n" for _, r in rows)
        cli.save_atomic(lambda f: f.write(text.encode()), masked)
    for name, argv in (("class", ["--classes", "--data", args.data]),
                       ("captions", ["--captions", table, "--columns", "path,caption"]),
                       ("masked", ["--captions", masked, "--columns", "path,caption"]),
                       ("merged", ["--captions", table, "--columns", "path,merged_caption"])):
        out = os.path.join(args.root, f"text-{name}.pt")
        if not os.path.exists(out):
            caption_embed.main(argv + ([] if name == "class" else ["--data", args.data]) +
                               ["--out", out])


def config(data, seed, noise):
    cfg, _ = tt.parse_config(["--data", data, "--preset", "small", "--epochs", str(EPOCHS),
                              "--threads", "1", "--workers", "0", "--seed", str(seed),
                              "--label-noise", str(noise)])
    return cfg


def folder(root, cell, noise, seed):
    return os.path.join(root, f"{cell}-n{noise}", f"seed{seed}")


def runs(args):
    """Every run, in the plan's order."""
    order = [(0.0, s, CLEAN) for s in (0, 1, 2)] + [(0.5, s, NOISY) for s in (0, 1, 2)] + [
        (0.0, s, CLEAN) for s in (3, 4)]
    out = []
    for noise, seed, cells in order:
        for cell in cells:
            cfg = config(args.data, seed, noise)
            text = {"shuffled": "captions", "random": "captions"}.get(cell, cell)
            cfg = (dataclasses.replace(cfg, text_loss_lambda=0.0) if cell == "baseline" else
                   dataclasses.replace(cfg, text=os.path.join(args.root, f"text-{text}.pt")))
            out.append(Run(folder(args.root, cell, noise, seed), cfg,
                           control(cell) if cell in ("shuffled", "random") else None,
                           on_epoch=analysis.record_stats if noise == 0 and cell in ANALYSED
                           else None))
    return out


def report(args):
    """docs/captions.{md,json,png}, and the analysis: docs/captions-analysis.{md,png}; of the
    runs finished so far (each number says how many seeds it rests on)."""
    top1 = {(c, n): runner.finals({s: folder(args.root, c, n, s) for s in seeds}, EPOCHS)
            for n, cells, seeds in ((0.0, CLEAN, range(5)), (0.5, NOISY, range(3)))
            for c in cells}
    results, lines = {}, list(runner.TABLE_HEAD)
    for (cell, noise), values in top1.items():
        labels = "clean" if not noise else "50% noisy"
        line, results[f"{cell}-n{noise}"] = runner.paired_row(
            cell, labels, values, None if cell == "baseline" else top1[("baseline", noise)])
        lines.append(line)
    lines.append("| **paired with each other** | | | | |")
    for a, b, noise in (("captions", "shuffled", 0.0), ("captions", "class", 0.0),
                        ("masked", "random", 0.0), ("merged", "captions", 0.0),
                        ("captions", "masked", 0.5), ("class", "captions", 0.5)):
        line, results[f"{a}-minus-{b}-n{noise}"] = runner.paired_row(
            f"{a} - {b}", "clean" if not noise else "50% noisy", top1[(a, noise)],
            top1[(b, noise)], mean=False)
        lines.append(line)
    clean, noisy = top1[("baseline", 0.0)], top1[("baseline", 0.5)]
    recovery = {}
    for c in NOISY[1:]:  # (cell - baseline) / (clean baseline - noisy baseline), seed by seed
        seeds = sorted(clean.keys() & noisy.keys() & top1[(c, 0.5)].keys())
        shares = [(top1[(c, 0.5)][s] - noisy[s]) / (clean[s] - noisy[s]) for s in seeds]
        recovery[c] = compare.mean_std(shares) if shares else None
    results["recovery-n0.5"] = recovery
    text = ("Validation top-1 (%) at the last epoch (10 epochs), CIFAR-10 test images with "
            "FoMo-in-Flux captions (JPEG copy), 500 training images per class; mean ± std over "
            "the seeds, differences paired by seed (against the baseline of the same seed and "
            "noise unless two cells are named). Written by `python experiments/captions.py`."
            "\n\n" + "\n".join(lines) + "\n\nUnder 50% noise, the share of the noise's cost "
            "that a cell recovers, (cell - baseline) / (clean baseline - noisy baseline), seed "
            "by seed: " + ", ".join(f"{c} {r[0]:.2f} ± {r[1]:.2f}" if r else f"{c} not run yet"
                                    for c, r in recovery.items()) + "\n")
    results["analysis"] = analysis_report(args)
    bars = [(f"{c}\n{'noise 0.5' if n else 'clean'}", results[f"{c}-n{n}"]["diff"])
            for (c, n) in top1 if c != "baseline" and results[f"{c}-n{n}"]["diff"]]
    runner.plot(os.path.join(args.docs, "captions.png"), bars, "CIFAR-10 photos with captions: "
                "final top-1 minus the baseline of the same seed (mean ± std)")
    runner.write(args.docs, "captions", text, results)


def analysis_report(args):
    """FFD to the final model over training, and cross-seed CKA per module by both estimators,
    beside its floors: docs/captions-analysis.{md,png}."""
    runs_of = {c: {s: folder(args.root, c, 0.0, s) for s in range(5)
                   if compare.finished(folder(args.root, c, 0.0, s), EPOCHS)} for c in ANALYSED}
    if not all({0, 1, 2} <= r.keys() for r in runs_of.values()):
        print("note: the analysis waits for seeds 0-2 of the baseline, captions and class cells")
        return None
    images = analysis.validation_images(args.data, "", 32, 1000)
    out = analysis.arms_analysis(runs_of, images, EPOCHS)
    base = folder(args.root, "baseline", 0.0, 0)
    out["floors"] = analysis.floors({
        "trained - untrained": (base, None),
        "baseline - captions, seed 0": (base, folder(args.root, "captions", 0.0, 0)),
        "baseline - class, seed 0": (base, folder(args.root, "class", 0.0, 0))}, images)
    text = analysis.cka_tables({c: out[c] for c in ANALYSED}, out["floors"], EPOCHS,
                               "python experiments/captions.py")
    analysis.plot(os.path.join(args.docs, "captions-analysis.png"),
                  {c: out[c] for c in ANALYSED}, "CIFAR-10 photos with captions")
    runner.write(args.docs, "captions-analysis", text)
    return out


def main(argv=None):
    return runner.main(sys.modules[__name__], "The planned study of per-image captions on "
                       "real photos.", argv, data="data/cifar10-captioned")


if __name__ == "__main__":
    runner.run(main)
