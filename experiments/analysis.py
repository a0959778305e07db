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
name ends in `attn` or `mlp`, on validation images in one fixed order; torch_cka accumulates an
unbiased minibatch estimate of HSIC. We compute linear CKA (Kornblith et al., 2019) exactly, on
the whole feature matrices (each image's output tokens flattened: [n, tokens * width]):

    CKA(X, Y) = ||Y^T X||_F^2 / ( ||X^T X||_F ||Y^T Y||_F ),   X, Y centred over the n images,

which the minibatch estimate approaches for large n.
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


def ffd_curve(folder, epochs):
    """[FFD(epoch e, epoch E) for e = 1..E] of a run trained with record_stats."""
    path = folder + ".ffd"
    need(os.path.exists(f"{path}/epoch{epochs}.pt"), f"{path} has no statistics of epoch "
         f"{epochs}: train the run with experiments/analysis.record_stats (photos.py does)")
    stats = [torch.load(f"{path}/epoch{e}.pt", weights_only=True) for e in range(1, epochs + 1)]
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


def cross_seed_cka(source_a, source_b, images):
    """{module name: linear CKA} of two trained models (runs, checkpoints or exports) on the
    same images: the attention and MLP outputs of every block."""
    a, b = (block_outputs(transfer.frozen_vit(s, images.shape[-1]), images)
            for s in (source_a, source_b))
    return {name: linear_cka(a[name], b[name]) for name in a}


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
            epochs = len(os.listdir(run + ".ffd")) if os.path.isdir(run + ".ffd") else 0
            curve = ffd_curve(run, max(epochs, 1))
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
