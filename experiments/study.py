"""
When does the text help? A planned study on the shapes set, with paired seeds.

    python experiments/study.py          # about an hour on 2 CPU cores; two workers, 1 thread each

It draws the shapes set if data/shapes is missing, writes and embeds the caption variants, runs
every cell below for seeds 0, 1, 2 (each TextTeacher run paired with a baseline of the same
seed: same initial weights, data order and label noise), and writes docs/study.md (the table)
and docs/study.png (the paired differences). A stopped study continues where it stopped.

The grid and the rule below were written down before any cell was run.

Fixed in every cell: the shapes preset (ViT-micro, 32 px, AdamW lr 1e-3, batch 64, no
augmentation, no CutMix, label smoothing 0.1, the per-epoch DeiT III learning-rate schedule),
3000 training and 1000 validation images, lam 0.5 with the adaptive weight, MiniLM-L6 targets,
one CPU thread per run. The measure is the final-epoch validation top-1; a cell reports the
mean and std over the 3 seeds of the paired difference TextTeacher - baseline.

Factors, each grounded in the paper or the issue's evidence, varied one at a time around the
base cell (patch 8 = 16 tokens, 15 epochs, constant lambda, "full" captions), each at label
noise 0 and 0.5 where the budget allows:
  captions   full: colour, size, shape, place, background, in one of three templates chosen at
             random (the template is noise the image cannot predict) | one-template: the same
             description, always the first template | word: the shape's name alone (a class
             label in text) | shuffled: the full captions given to other images
  schedule   constant | jump-4-4-0: text on for epochs 1-5, then off (the paper's reading of
             TextTeacher as an early preconditioner)                          (noise 0.5 only)
  tokens     patch 8 (16 tokens) | patch 4 (64 tokens, 4x the cost)           (noise 0.5 only)
Cost per run, measured before the study on this machine: patch 8 about 6.5 s per epoch, patch 4
about 26 s; the grid is 60 runs, about 6700 run-seconds, an hour on two cores.

Amended once, for cost alone, 10 minutes into the run and before any cell had finished: with
other work on the machine the runs took twice the planned time, so the grid lost the 30-epoch
cell (length is not studied here) and the one-template, word and shuffled cells at noise 0; the
patch 4 pairs of seeds 1 and 2 run last. 30 runs remain.

The rule that picks the demo (README quick start and Measured), fixed in advance: the demo is
the cell closest to the paper's headline claim that a laptop runs in a few minutes: label noise
0.5, full per-image captions, constant lambda, patch 8, 15 epochs. It is the demo whatever its
sign. If another cell shows a positive mean difference larger than its std, the README names
it as the second command; if no cell does, the README says so.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402
import compare  # noqa: E402
import shapes  # noqa: E402
import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402

SEEDS = (0, 1, 2)
BASE = dict(patch_size=8, epochs=15, lambda_schedule="constant", captions="full")
CELLS = {  # name: (changes to BASE, label noises)
    "full": ({}, (0.0, 0.5)),
    "one-template": (dict(captions="one-template"), (0.5,)),
    "word": (dict(captions="word"), (0.5,)),
    "shuffled": (dict(captions="shuffled"), (0.5,)),
    "jump-4-4-0": (dict(lambda_schedule="jump-4-4-0"), (0.5,)),
    "patch 4": (dict(patch_size=4), (0.5,)),
}


def runs(root):
    """Every run of the grid as (folder, config changes, caption variant, control), baselines
    shared by the cells with the same patch, length, noise and seed; costliest first."""
    out = {}
    for name, (changes, noises) in CELLS.items():
        cell = {**BASE, **changes}
        for noise in noises:
            for seed in SEEDS:
                base = f"base-p{cell['patch_size']}-e{cell['epochs']}-n{noise}/seed{seed}"
                flags = dict(
                    patch_size=cell["patch_size"],
                    epochs=cell["epochs"],
                    label_noise=noise,
                    seed=seed,
                )
                out[base] = (dict(flags, text_loss_lambda=0.0), None)
                out[f"{name}-n{noise}/seed{seed}"] = (
                    dict(flags, lambda_schedule=cell["lambda_schedule"]),
                    cell["captions"],
                )
    # the patch 4 pair of seed 0 first, then every patch 8 run, then the other patch 4 pairs
    def order(item):
        changes = item[1][0]
        return (changes["patch_size"] == 4) * (1 + 2 * (changes["seed"] > 0))
    return sorted(out.items(), key=lambda item: -order(item) if order(item) == 1 else order(item))


def prepare(root, data):
    """The shapes set and one embeddings file per caption variant (train and val captions)."""
    if not os.path.isdir(os.path.join(data, "train")):
        shapes.main(["--out", data])
    attrs = {split: shapes.draw(n, seed)[2] for split, (n, seed) in shapes.SPLITS.items()}
    for variant in ("full", "one-template", "word"):
        out = os.path.join(root, f"text-{variant}.pt")
        if not os.path.exists(out):
            paths = {s: os.path.join(root, f"captions-{variant}-{s}.txt") for s in attrs}
            shapes.embed(attrs, paths, out, variant)


def work(root, data, worker, workers):
    """This worker's share of the runs (every workers-th, costliest first)."""
    cfg, _ = tt.parse_config(["--data", "shapes", "--data-dir", data, "--threads", "1"])
    for folder, (changes, captions) in runs(root)[worker::workers]:
        run = dataclasses.replace(cfg, **changes)
        targets, on_epoch = None, None
        if captions:
            variant = "full" if captions == "shuffled" else captions
            run = dataclasses.replace(run, text=os.path.join(root, f"text-{variant}.pt"))
            if captions == "shuffled":
                keys, classes = tt.image_split("shapes", data, "train")[1:]
                targets = compare.Shuffled(tt.TextTargets(run.text, keys, classes), run.seed)
            on_epoch = compare.alignment(run, os.path.join(root, "text-full.pt"))
        compare.run_arm(run, os.path.join(root, folder), targets, on_epoch)


def report(root, docs):
    """docs/study.md and docs/study.png from the finished runs."""
    rows = []
    for name, (changes, noises) in CELLS.items():
        cell = {**BASE, **changes}
        for noise in noises:
            base = [
                compare.read_metrics(
                    os.path.join(
                        root, f"base-p{cell['patch_size']}-e{cell['epochs']}-n{noise}", f"seed{s}"
                    )
                )
                for s in SEEDS
            ]
            text = [
                compare.read_metrics(os.path.join(root, f"{name}-n{noise}", f"seed{s}"))
                for s in SEEDS
            ]
            diff = compare.mean_std([t[-1]["top1"] - b[-1]["top1"] for t, b in zip(text, base)])
            rows.append(
                dict(
                    cell=name,
                    noise=noise,
                    baseline=compare.mean_std([b[-1]["top1"] for b in base]),
                    textteacher=compare.mean_std([t[-1]["top1"] for t in text]),
                    diff=diff,
                    early=compare.mean_std(
                        [t[4]["top1"] - b[4]["top1"] for t, b in zip(text, base)]
                    ),
                    **{
                        k: compare.mean_std([t[-1][k] for t in text])
                        for k in ("retrieval_top1", "cos_match", "cos_other", "loss_txt")
                    },
                )
            )
    lines = [
        "| cell | noise | baseline | TextTeacher | difference (final) | difference (epoch 5) | "
        "retrieval top-1 | cos matching | cos other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['noise']} | {r['baseline'][0]:.1f} | {r['textteacher'][0]:.1f} | "
            f"**{r['diff'][0]:+.1f} ± {r['diff'][1]:.1f}** | {r['early'][0]:+.1f} ± "
            f"{r['early'][1]:.1f} | "
            f"{r['retrieval_top1'][0]:.1f} | {r['cos_match'][0]:.3f} | {r['cos_other'][0]:.3f} |"
        )
    text = (
        "Validation top-1 (%) at the last epoch, mean over seeds 0, 1, 2; differences are "
        "paired (TextTeacher - baseline of the same seed), mean ± std over the seeds. "
        "Alignment of the TextTeacher arm at its last epoch, against the full validation "
        "captions (500 images). Written by `python experiments/study.py`.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    # whole files or none, and a full disk in one line naming the file
    cli.save_atomic(lambda f: f.write(text.encode()), os.path.join(docs, "study.md"))
    table = json.dumps(rows, indent=1)
    cli.save_atomic(lambda f: f.write(table.encode()), os.path.join(docs, "study.json"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['cell']}\nnoise {r['noise']}" for r in rows]
    ax.bar(
        range(len(rows)),
        [r["diff"][0] for r in rows],
        yerr=[r["diff"][1] for r in rows],
        capsize=3,
        color=["C0" if r["diff"][0] > 0 else "C3" for r in rows],
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("TextTeacher - baseline, top-1 (p.p.)")
    ax.set_title("paired difference at the last epoch, mean ± std over 3 seeds")
    fig.tight_layout()
    cli.save_atomic(lambda f: fig.savefig(f, format="png", dpi=110),
                    os.path.join(docs, "study.png"))
    print("\n".join(lines))


@cli.releasing  # the claim on --root ends with main
def main(argv=None):
    p = cli.Parser(description="The planned study of when the text helps.")
    p.add_argument("--root", default="runs/study", type=cli.path("new folder"))
    p.add_argument("--data", default="data/shapes", type=cli.path("new folder"),
                   help="the shapes set (drawn there if absent)")
    p.add_argument("--docs", default="docs", type=cli.path("new folder"))
    # processes of one CPU thread each: more than the 30 runs gains nothing
    p.add_argument("--workers", type=cli.number(int, "[1, 64]"), default=2,
                   help="processes, one run each at a time")
    p.add_argument("--worker", type=cli.number(int, "[-1, 63]"), default=-1,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    need(args.worker < args.workers, f"--worker {args.worker} is not one of the {args.workers} "
         "--workers")
    if args.worker >= 0:  # a worker of the study below, which holds the claim on --root
        return work(args.root, args.data, args.worker, args.workers)
    # One study per root: a second one would start the same runs, refused by the trainer one
    # by one in the middle of its work; its workers claim each run folder as they train it.
    cli.lock(cli.writable(args.root), "--root")
    # where the results go, and what draws them, checked before an hour of runs
    cli.writable(args.docs)
    need(importlib.util.find_spec("matplotlib"), "the study draws docs/study.png with "
         "matplotlib, which is optional: pip install matplotlib")
    prepare(args.root, args.data)
    run_workers(args)
    report(args.root, args.docs)


def run_workers(args):
    """The workers as processes of their own, one CPU thread each. A worker that fails ends
    the study in one line: its own (a worker's input error), else its whole output (a bug)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = ["--root", args.root, "--data", args.data, "--workers", str(args.workers)]
    logs = [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in range(args.workers)]
    procs = [
        subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i)], env=env,
                         stderr=log)
        for i, log in enumerate(logs)
    ]
    codes = [p.wait() for p in procs]
    for i, (code, log) in enumerate(zip(codes, logs)):
        log.seek(0)
        text = log.read().strip()
        last = text.splitlines()[-1] if text else ""
        if code and last.startswith("error: "):
            e = tt.UserError(f"{last[len('error: '):]} (study worker {i}; the finished runs are "
                             "kept: run the same command again to continue)")
            e.code = code
            raise e
        if text:  # notes, warnings, or a bug's traceback: as the worker wrote them
            print(text, file=sys.stderr)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    cli.run(main, interrupted="every run keeps its last checkpoint: run the same command again "
            "to continue")
