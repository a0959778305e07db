"""
The paper's analysis of how TextTeacher works, as the paper defines it: the Fréchet feature
distance (FFD) of each epoch's model to the final model, and the cross-seed linear CKA of every
block's attention and MLP outputs.

    # FFD: train with the per-class statistics recorded every epoch (experiments/photos.py does)
    python experiments/analysis.py ffd runs/photos/baseline-n0.0/seed0
    # CKA of two trained runs (or exports) over the validation images of --data
    python experiments/analysis.py cka runs/photos/class-n0.0/seed0 runs/photos/class-n0.0/seed1 \\
        --data data/cifar10-1k

FFD. The official code's evaluate.py saves, for one checkpoint, a Gaussian of the ViT's
embedding per class on the validation set (per_class_emdedding_distribution: the mean and the
covariance of the post-norm CLS features of that class's images). The script that turns two
such sets into a distance is not published; our reading, as in the paper's text: the Fréchet
distance of the two Gaussians of each class,

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),

averaged over the classes. `record_stats` is the on_epoch callback that saves each epoch's
Gaussians beside the run folder (RUN.ffd/epochE.pt: not inside, a run folder is the trainer's),
and `ffd_curve` reads them back as the distance of every epoch to the last.

CKA. The official cka.py compares two models with the torch_cka package over every module whose
name ends in `attn` or `mlp`, on validation images in one fixed shuffled order, in minibatches of
16 (its default), each image's output tokens flattened ([n, tokens * width]). torch_cka sums,
over the minibatches, the unbiased estimate of HSIC (Song et al., 2012) of the linear kernels
K = X X^T and L = Y Y^T, each with its diagonal set to 0:

    HSIC_1(K, L) = ( tr(K L) + 1'K1 1'L1 / ((m-1)(m-2)) - 2/(m-2) 1'K L1 ) / (m (m-3)),

and reads CKA = sum HSIC_1(K, L) / sqrt( sum HSIC_1(K, K) sum HSIC_1(L, L) ) (Nguyen et al.,
2021). `minibatch_cka` is that estimator, the default here. The textbook form (Kornblith et al.,
2019), `linear_cka`, on the whole centred matrices,

    CKA(X, Y) = ||Y^T X||_F^2 / ( ||X^T X||_F ||Y^T Y||_F ),

is biased upwards when the width is not far below n: two independent Gaussian matrices of
1000 x 2176 (the photo runs' 17 tokens x 128) read 0.69 there, and about 0 by the unbiased
estimate. Neither is 0 for two unrelated *trained* models (their features share the input's
structure), so every table beside it shows a floor: a trained model against an untrained one
of the same size, and against a model of another arm.

Where FFD here differs from the official code: its per-class statistics are taken with the
model in training mode (stochastic depth on; the official evaluate.py never calls eval()) and
each class's buffer holds one all-zero row that is never filled; here the model is in eval
mode and the statistics are those of the class's images alone.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
import scipy.linalg
import torch

import textteacher as tt  # noqa: E402
import transfer  # noqa: E402
from cli import need  # noqa: E402


# ----------------------------------------------------------------------------
# Fréchet feature distance

def class_gaussians(feats, labels, num_classes):
    """(means [C, D], covariances [C, D, D]) in float64 of the features of each class; the
    covariance with 1 / (n - 1), as numpy.cov (and the official code) computes it."""
    x, means, covs = feats.double(), [], []
    for c in range(num_classes):
        xc = x[labels == c]  # shape = [n_c, D]
        need(len(xc) > 1, f"class {c} has {len(xc)} validation image(s): a covariance needs 2")
        means.append(xc.mean(0))
        covs.append(torch.cov(xc.T))
    return torch.stack(means), torch.stack(covs)


def frechet(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet (2-Wasserstein) distance of
    two Gaussians. scipy's sqrtm of the product, as FID computes it: S1 S2 is not symmetric,
    but its square root has real eigenvalues for covariances, so the imaginary part is round-off;
    a singular product (fewer images than dimensions) gets a small ridge, as FID's code does."""
    mu1, s1, mu2, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, s1, mu2, s2))
    root = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        ridge = np.eye(len(s1)) * 1e-6
        root = scipy.linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(root.real))


def ffd(a, b):
    """The mean over classes of the Fréchet distance of two sets of class Gaussians."""
    return float(np.mean([frechet(a[0][c], a[1][c], b[0][c], b[1][c])
                          for c in range(len(a[0]))]))


def record_stats(cfg, folder):
    """An on_epoch callback for train(): the class Gaussians of the post-norm CLS features of
    the un-augmented validation images, saved as folder.ffd/epochE.pt (E from 1)."""
    dataset = tt.image_split(cfg.data, cfg.data_dir, "val", cfg.split)[0]
    labels, out = torch.tensor(dataset.targets), folder + ".ffd"

    def on_epoch(record, model):
        feats, _ = transfer.features(model.vit, dataset, labels, cfg.img_size)
        stats = class_gaussians(feats, labels, int(labels.max()) + 1)
        os.makedirs(out, exist_ok=True)
        cli.save_atomic(lambda f: torch.save(stats, f), f"{out}/epoch{record['epoch']}.pt")
    return on_epoch


def read_stats(path):
    """The class Gaussians (means [C, D], covariances [C, D, D]) of one epoch's file, checked:
    missing, torn, or not record_stats' (another kind, another shape) is one line."""
    try:
        stats = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise cli.UserError(f"{path} is missing: train the run again with "
                            "experiments/analysis.record_stats (the studies do)") from None
    except Exception as e:  # a torn zip, or not torch's format
        raise cli.UserError(f"{path} is damaged ({type(e).__name__}): delete {path} and "
                            "train the run again with analysis.record_stats") from None
    ok = (isinstance(stats, tuple) and len(stats) == 2 and stats[0].ndim == 2
          and stats[1].shape == (*stats[0].shape, stats[0].shape[1]))
    need(ok, f"{path} holds no class statistics of record_stats (or of another model): delete "
         "it and train the run again")
    return stats


def ffd_curve(folder, epochs=None):
    """[FFD(epoch e, epoch E) for e = 1..E] of a run trained with record_stats; E is the run's
    own number of epochs (its config.json), which every statistics file must be there for."""
    path = folder + ".ffd"
    if epochs is None:
        config = cli.json_or(os.path.join(folder, "config.json"), {})
        need(isinstance(config.get("epochs"), int), f"{folder}/config.json is missing or "
             "damaged: the run's number of epochs is unknown")
        epochs = config["epochs"]
    stats = [read_stats(f"{path}/epoch{e}.pt") for e in range(1, epochs + 1)]
    need(all(s[0].shape == stats[-1][0].shape for s in stats), f"{path} holds statistics of "
         "models of different widths or class counts: delete it and train the run again")
    return [ffd(s, stats[-1]) for s in stats]


# ----------------------------------------------------------------------------
# Cross-seed CKA

def linear_cka(x, y):
    """Linear CKA of [n, p] and [n, q] feature matrices, centred here, in float64. The feature
    form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) costs n p q; when there are more features than
    images, the same number from the n x n Gram matrices (<Kx, Ky> / (||Kx|| ||Ky||), with
    Kx = X X^T: ||Y^T X||_F^2 = tr(X^T Y Y^T X) = <X X^T, Y Y^T>) costs n^2 (p + q)."""
    x, y = (v.double() - v.double().mean(0) for v in (x, y))
    if max(x.shape[1], y.shape[1]) > len(x):
        x, y = x @ x.T, y @ y.T  # shape = [n, n] each; the formula below is then on Grams
        return float((x * y).sum() / (x.norm() * y.norm()))
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def hsic1(k, l):
    """The unbiased HSIC estimate of Song et al. (2012) of two [m, m] kernel matrices (their
    diagonals are set to 0 here, as torch_cka does), in float64."""
    m = len(k)
    k, l = (v.double() - torch.diag_embed(torch.diagonal(v.double())) for v in (k, l))
    kl = k @ l
    return float((torch.trace(kl) + k.sum() * l.sum() / ((m - 1) * (m - 2))
                  - 2 / (m - 2) * kl.sum()) / (m * (m - 3)))


def minibatch_cka(x, y, batch=16):
    """Linear CKA of [n, p] and [n, q] features as the official code estimates it (torch_cka):
    the unbiased HSIC of each minibatch of `batch` consecutive rows, summed; a last minibatch
    of fewer than 4 rows is left out (the estimator needs 4)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for s in range(0, len(x) - 3, batch):
        xs, ys = x[s:s + batch].double(), y[s:s + batch].double()
        if len(xs) < 4:
            break
        k, l = xs @ xs.T, ys @ ys.T  # shape = [m, m] each
        sums += torch.tensor([hsic1(k, l), hsic1(k, k), hsic1(l, l)], dtype=torch.float64)
    return float(sums[0] / (sums[1].sqrt() * sums[2].sqrt()))


@torch.no_grad()
def block_outputs(vit, images, batch=250):
    """{module name: [n, tokens * width]} of every module whose name ends in "attn" or "mlp"
    (the official cka.py's choice): the output of each block's attention and MLP branch."""
    vit.eval()
    names = [n for n, _ in vit.named_modules() if n.endswith(("attn", "mlp"))]
    outs, hooks = {n: [] for n in names}, []
    for name, module in vit.named_modules():
        if name in outs:
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: outs[name].append(o.flatten(1).float())))
    try:
        for s in range(0, len(images), batch):
            vit.forward_features(tt.normalize(images[s:s + batch]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def validation_images(data, data_dir, img_size, n, seed=0):
    """n validation images (uint8, resized and centre-cropped) in one fixed shuffled order."""
    dataset = tt.image_split(data, data_dir, "val")[0]
    samples = tt.Samples(dataset, torch.tensor(dataset.targets), img_size)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([samples[int(i)][0] for i in order])


def untrained_like(source, img_size):
    """A ViT of the same size as source, as train() initialises it (seed 0), never trained:
    the floor of CKA."""
    args = tt.read_source(source)[0]
    torch.manual_seed(0)
    return tt.ViT(**dict(args, img_size=img_size)).eval()


def cross_seed_cka(source_a, source_b, images, estimator="unbiased"):
    """{module name: linear CKA} of two models (runs, checkpoints or exports; source_b None:
    an untrained model of source_a's size) on the same images, the attention and MLP outputs
    of every block; estimator "unbiased" (the official code's, minibatches of 16), "biased"
    (the textbook formula on all the images at once), or a tuple of both: then {estimator:
    {module: CKA}}, the features computed once. Models of different depth or width are one
    line: CKA compares the same modules."""
    size = images.shape[-1]
    vits = [transfer.frozen_vit(s, size) if s else untrained_like(source_a, size)
            for s in (source_a, source_b)]
    a, b = (block_outputs(v, images) for v in vits)
    need(a.keys() == b.keys(), f"{source_a} and {source_b} have different blocks ({len(a) // 2} "
         f"and {len(b) // 2}): CKA compares models of one depth")
    ckas = dict(unbiased=minibatch_cka, biased=linear_cka)
    if isinstance(estimator, tuple):
        return {e: {name: ckas[e](a[name], b[name]) for name in a} for e in estimator}
    return {name: ckas[estimator](a[name], b[name]) for name in a}


# ----------------------------------------------------------------------------
# The tables and the plot of a study's analysis

def arms_analysis(arms, images, epochs, pairs=((0, 1), (0, 2), (1, 2))):
    """{arm: dict(ffd, ffd_std, seeds, cka, cka_std)} of arms {arm: {seed: run folder}} trained
    with record_stats: the mean and std over seeds of the FFD curve, and over the seed pairs of
    cross-seed CKA per module, by both estimators ({estimator: {module: value}})."""
    out = {}
    for arm, runs in arms.items():
        curves = [ffd_curve(r, epochs) for r in runs.values()]
        both = [cross_seed_cka(runs[a], runs[b], images, ("unbiased", "biased")) for a, b in pairs]
        cka = {e: [c[e] for c in both] for e in ("unbiased", "biased")}
        out[arm] = dict(ffd=np.mean(curves, 0).tolist(), ffd_std=np.std(curves, 0, ddof=1).tolist(),
                        seeds=list(runs), **{key: {e: {k: float(f([c[k] for c in v]))
                                                       for k in v[0]} for e, v in cka.items()}
                                             for key, f in (("cka", np.mean), ("cka_std", np.std))})
    return out


def floors(pairs, images):
    """{name: {estimator: {module: CKA}}} of pairs {name: (model, model or None)}: CKA between
    models that share nothing learned (None: an untrained model of the first one's size)."""
    return {name: cross_seed_cka(a, b, images, ("unbiased", "biased"))
            for name, (a, b) in pairs.items()}


def ends(cka):
    """(mean CKA of the first two blocks, of the last two) of {module: CKA}, attn and mlp of
    each block in order."""
    values = list(cka.values())
    return float(np.mean(values[:4])), float(np.mean(values[-4:]))


def cka_tables(arms, floors, epochs, command):
    """Markdown: the FFD of each arm at epoch 1, a third of the way and the last but one; and
    cross-seed CKA of the first and last two blocks by both estimators, each beside its
    floors. arms: {arm: dict(ffd, ffd_std, cka={estimator: {module: CKA}}, cka_std=...)};
    floors: {name: {estimator: {module: CKA}}}."""
    third = epochs // 3
    lines = [f"| arm | FFD epoch 1 | FFD epoch {third} | FFD epoch {epochs - 1} |",
             "|---|---|---|---|"]
    for arm, m in arms.items():
        f, sd = m["ffd"], m["ffd_std"]
        lines.append(f"| {arm} | {f[0]:.1f} ± {sd[0]:.1f} | {f[third - 1]:.1f} ± "
                     f"{sd[third - 1]:.1f} | {f[-2]:.2f} ± {sd[-2]:.2f} |")
    lines += ["", "| CKA | unbiased, first 2 blocks | unbiased, last 2 blocks | biased, first 2 "
              "blocks | biased, last 2 blocks |", "|---|---|---|---|---|"]
    for arm, m in arms.items():
        cells = [f"{v:.3f} ± {sd:.3f}" for e in ("unbiased", "biased")
                 for v, sd in zip(ends(m["cka"][e]), ends(m["cka_std"][e]))]
        lines.append(f"| cross-seed, {arm} | " + " | ".join(cells) + " |")
    for name, f in floors.items():
        lines.append(f"| floor: {name} | " + " | ".join(
            f"{v:.3f}" for e in ("unbiased", "biased") for v in ends(f[e])) + " |")
    return ("FFD: the Fréchet distance of per-class Gaussians of the post-norm CLS features of "
            "the validation images, each epoch's model to the final one, mean over classes "
            "(our reading of the paper's measure), mean ± std over the seeds. CKA: cross-seed, "
            "over the seed pairs (0,1), (0,2), (1,2), per attention and MLP module on 1000 "
            "validation images in one fixed shuffled order; unbiased: the official code's "
            "estimator (torch_cka, minibatches of 16), biased: the textbook formula on all 1000 "
            "at once. The floors: the same modules of models that share nothing learned. "
            f"Written by `{command}`.\n\n" + "\n".join(lines) + "\n")


def plot(path, arms, title):
    """FFD curves and the per-module cross-seed CKA (both estimators) of each arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, m in arms.items():
        axes[0].errorbar(range(1, len(m["ffd"]) + 1), m["ffd"], m["ffd_std"], marker="o", ms=3,
                         capsize=2, label=arm)
        for ax, e in zip(axes[1:], ("unbiased", "biased")):
            ax.plot(range(len(m["cka"][e])), list(m["cka"][e].values()), marker="o", ms=3,
                    label=arm)
    for ax, t in zip(axes, ("FFD to the final model", "cross-seed CKA, unbiased (official)",
                            "cross-seed CKA, biased")):
        ax.set_title(f"{title}: {t}", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_xlabel("epoch"), axes[1].set_xlabel("module"), axes[2].set_xlabel("module")
    fig.tight_layout()
    cli.save_atomic(lambda f: fig.savefig(f, format="png", dpi=110), path)


def main(argv=None):
    p = cli.Parser(description="The paper's analysis: FFD over training, cross-seed CKA.")
    p.add_argument("measure", choices=("ffd", "cka"))
    p.add_argument("runs", nargs="+", type=cli.path("file or folder"), help="ffd: run folders "
                   "trained with record_stats; cka: two runs, checkpoints or exports")
    p.add_argument("--data", type=cli.path("folder", names=tuple(tt.PRESETS)),
                   help="cka: the data set whose validation images are compared")
    p.add_argument("--data-dir", default="", type=cli.path("new folder", names=("",)),
                   help="cka: the root of a named --data")
    # every block's outputs for every image are held at once: for 10 000 images of the micro
    # ViT at 32 px about 1 GB
    p.add_argument("--images", type=cli.number(int, "[2, 10000]"), default=1000,
                   help="cka: validation images compared")
    args = p.parse_args(argv)
    if args.measure == "ffd":
        for run in args.runs:
            curve = ffd_curve(run)
            print(f"{run}: " + " ".join(f"{v:.2f}" for v in curve))
        return
    need(len(args.runs) == 2 and args.data, "cka compares two runs on --data's validation "
         "images: analysis.py cka RUN_A RUN_B --data DATA")
    size = tt.read_source(args.runs[0])[0]["img_size"]
    images = validation_images(args.data, args.data_dir, size, args.images)
    for name, value in cross_seed_cka(*args.runs, images).items():
        print(f"{name:>16} {value:.4f}")


if __name__ == "__main__":
    cli.run(main)
