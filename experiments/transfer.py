"""
Transfer, the paper's second claim, paired: the arms of experiments/compare.py (the baseline and
TextTeacher, per seed) carried to another data set, by fine-tuning and by a linear probe.

    python experiments/compare.py --data imagenet ... --seeds 3 --name in1k
    python experiments/transfer.py runs/in1k --data flowers102 --data-dir data --finetune --probe
    python experiments/transfer.py runs/demo --data pets --probe --img-size 224

Fine-tuning: each arm's final weights start an ordinary textteacher.py run (`--init`) with the
same seed, so the fine-tunes of one seed share data order, augmentation and the new class head's
initial weights; every other flag is textteacher.py's (the target set's preset applies: see
transfer_sets.py). The runs go to ROOT/transfer-DATA/seedS-ARM, are reused when finished with
the same settings and continued when interrupted. Lambda is 0 there (no text) unless --text is
given, as in the official code.

Linear probe: the frozen ViT (position embedding resized to --img-size) turns the un-augmented
training and validation images (short side resized, centre crop) into post-norm CLS features
F; a multinomial logistic regression on the standardised features, fitted by full-batch L-BFGS
from zero weights in float64, is deterministic and takes seconds to minutes on a CPU for the
small sets. Its weight decay is fixed (1e-3 on the mean cross-entropy), not tuned per arm.

It prints, per arm, final and best top-1 of the fine-tunes and the probe's top-1, mean +- std
over the seeds, and the paired differences to the baseline (TextTeacher - baseline of the same
seed), as the paper's transfer table has it; everything goes to ROOT/transfer-DATA.json.
"""
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch
import torch.nn.functional as F

import compare  # noqa: E402
import textteacher as tt  # noqa: E402


# ----------------------------------------------------------------------------
# The linear probe

@torch.no_grad()
def features(vit, dataset, labels, img_size, batch=256):
    """(F [N, width], labels [N]) of a split's un-augmented images through a frozen ViT."""
    vit.eval()
    samples = tt.Samples(dataset, labels, img_size)  # resize, centre crop: no augmentation
    loader = torch.utils.data.DataLoader(samples, batch_size=batch,
                                         sampler=range(len(dataset)), num_workers=0)
    feats, ys = [], []
    for images, y, _ in loader:
        feats.append(vit.forward_features(tt.normalize(images)))  # shape = [B, width]
        ys.append(y)
    return torch.cat(feats), torch.cat(ys)


def linear_probe(x, y, x_val, y_val, weight_decay=1e-3, max_iter=500):
    """Top-1 (%) on (x_val, y_val) of a multinomial logistic regression fitted on (x, y):

        min_W,b  CE(x W + b, y) + weight_decay ||W||^2,   x standardised with the training stats

    by full-batch L-BFGS from zero in float64: the same features always give the same result
    (no minibatches, no random init), which a paired comparison over seeds needs."""
    mean, std = x.double().mean(0), x.double().std(0) + 1e-6
    x, x_val = ((v.double() - mean) / std for v in (x, x_val))
    classes = int(max(y.max(), y_val.max())) + 1
    W = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100 * (x_val @ W + b).argmax(1).eq(y_val).double().mean().item()


def frozen_vit(source, img_size):
    """The ViT of a run or export at img_size, its position embedding resized as --init
    resizes it, read once; its class head is kept but not used."""
    args, state, _ = tt.read_source(source)
    vit = tt.ViT(**dict(args, img_size=img_size))
    state["pos_embed"] = tt.resize_pos_embed(state["pos_embed"], img_size // args["patch_size"])
    vit.load_state_dict(state)
    return vit


def probe(source, splits, img_size):
    """The probe's top-1 on splits["val"] (fitted on splits["train"], datasets of image_split)
    for the ViT of a run or export."""
    vit = frozen_vit(source, img_size)
    train, val = (features(vit, splits[s], torch.tensor(splits[s].targets), img_size)
                  for s in ("train", "val"))
    return linear_probe(*train, *val)


# ----------------------------------------------------------------------------
# The paired comparison

def arms_in(root):
    """{(seed, arm): run folder} of a compare.py root: its finished seedS-ARM folders."""
    found = {}
    for name in sorted(os.listdir(root)):
        m, path = re.fullmatch(r"seed(\d+)-(.+)", name), os.path.join(root, name)
        if m and os.path.isdir(path):
            # config.json repeats the checkpoint's settings: torn, the checkpoint has them
            epochs = cli.json_or(os.path.join(path, "config.json"), {}).get("epochs") or (
                tt.load_checkpoint(path)[0]["config"]["epochs"])
            cli.need(compare.finished(path, epochs), f"{path} is not finished: run its "
                     "experiments/compare.py command again first")
            found[int(m[1]), m[2]] = path
    cli.need(found, f"{root} holds no arm (seedS-ARM): run experiments/compare.py first")
    return found


@cli.releasing  # the claim on ROOT/transfer-DATA ends with it
def transfer(root, argv, finetune, do_probe):
    """Every arm of root carried to the target set; returns the summary (see the docstring)."""
    cfg, _ = tt.parse_config(argv)
    tt.check_config(cfg)
    out = os.path.join(root, f"transfer-{os.path.basename(cfg.data.rstrip('/'))}")
    cli.lock(cli.writable(out), "transfer")
    results, splits = {}, {}
    if do_probe:  # the target set's images, listed once for every arm
        splits = {s: tt.image_split(cfg.data, cfg.data_dir, s, cfg.split)[0]
                  for s in ("train", "val")}
    for (seed, arm), source in sorted(arms_in(root).items()):
        entry = results.setdefault(arm, {})
        if finetune:
            run, _ = tt.parse_config(argv + ["--init", source, "--seed", str(seed)])
            tt.check_config(run)
            history = compare.run_arm(run, os.path.join(out, f"seed{seed}-{arm}"))
            entry.setdefault("final", []).append(history[-1]["top1"])
            entry.setdefault("best", []).append(history[-1]["best_top1"])
        if do_probe:
            top1 = probe(source, splits, cfg.img_size)
            entry.setdefault("probe", []).append(top1)
        print(f"seed {seed} {arm}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in entry.items()),
              flush=True)
    return summarize(results, out)


def summarize(results, out):
    """Mean +- std over seeds per arm and measure, and the paired differences to the baseline."""
    lines, summary = [], {}
    for arm, entry in results.items():
        summary[arm] = {k: compare.mean_std(v) for k, v in entry.items()}
        if arm != "baseline" and "baseline" in results:
            base = results["baseline"]
            summary[arm].update({f"{k}_diff": compare.mean_std(
                [a - b for a, b in zip(v, base[k])]) for k, v in entry.items()})
        lines.append(f"{arm:>22}: " + ", ".join(
            f"{k} {m:.2f} +- {s:.2f}" for k, (m, s) in summary[arm].items()))
    with open(out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))
    return summary


def main(argv=None):
    # no abbreviations: a flag of the trainer's must not be taken for one of these
    p = cli.Parser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    p.add_argument("root", type=cli.path("folder"),
                   help="a folder of experiments/compare.py (seedS-ARM run folders)")
    p.add_argument("--finetune", action="store_true", help="fine-tune every arm (--init)")
    p.add_argument("--probe", action="store_true", help="a linear probe on frozen features")
    args, rest = p.parse_known_args(argv)
    compare.need_inputs(rest)
    cli.need(args.finetune or args.probe, "say what to run: --finetune, --probe, or both")
    transfer(args.root, rest, args.finetune, args.probe)


if __name__ == "__main__":
    cli.run(main)
