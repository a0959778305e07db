"""
The paired comparison: the baseline (lambda 0) and TextTeacher, and optionally an online vision
teacher or a control, from the same seed: the same initial ViT, data order, augmentation,
CutMix and label noise, so the difference between the arms is the objective's alone.

    python experiments/compare.py --data shapes --text data/shapes/text.pt --label-noise 0.5 \\
        --seeds 3 --name demo
    python experiments/compare.py ... --control shuffle     # the targets given to other images
    python experiments/compare.py ... --control random      # Gaussian targets, same mean and std
    python experiments/compare.py ... --teacher facebook/dinov2-small   # the paper's vision arm

Every other flag is textteacher.py's. Each arm is an ordinary run folder, runs/NAME/seedS-ARM;
a finished arm is reused and an interrupted one continued. It prints validation top-1 per epoch
(mean over seeds), the final and best differences to the baseline (mean and std over seeds),
the training time per epoch of each arm, and, where the embeddings file holds validation
captions, the alignment of the last epoch: image-to-caption retrieval top-1 through the text
head and the mean cosine of matching and of non-matching pairs. All of it goes to
runs/NAME/compare.json.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textteacher as tt  # noqa: E402


class Shuffled:
    """Control: the real targets, each given to another image (one permutation for the run).
    Does the per-image pairing matter, or only that the targets look like captions?"""

    def __init__(self, targets, seed):
        self.__dict__.update(targets.__dict__)
        self.rows = targets.rows[
            torch.randperm(len(targets.rows), generator=torch.Generator().manual_seed(seed))
        ]
        self.sha256 = f"{targets.sha256}:shuffled:{seed}"

    __call__ = tt.TextTargets.__call__


class Gaussian:
    """Control: a fixed Gaussian vector per image with the per-dimension std of the real targets
    (centred, as they are). Does the text content matter?"""

    def __init__(self, targets, seed):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.encoder, self.sha256 = targets.dim, "random", f"random:{seed}"
        self.vectors = torch.randn(
            len(targets.rows), targets.dim, generator=g
        ) * targets.vectors.float().std(0)

    def __call__(self, index, labels, images, lam):
        return tt.mix(self.vectors[index].to(images.device), lam)


class VisionTeacher:
    """The paper's comparison arm: a frozen vision model's pooled feature of the very batch the
    student sees (after CutMix) replaces the caption target; same text head, same loss. As the
    official code feeds it: the student's ImageNet-normalised images, unchanged (no resize to
    the teacher's own resolution, no re-normalisation), so its cost is what the paper compares.
    Any Hugging Face vision model: projected image features where it has them (CLIP), else its
    pooler output (DINOv2: the final-norm CLS token). Not centred: an online target has no
    dataset statistics."""

    def __init__(self, name, device, img_size):
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(name).eval().requires_grad_(False).to(device)
        except OSError:
            raise tt.UserError(
                f"vision model {name!r} is not available offline; pass a saved "
                "folder (save_pretrained)"
            ) from None
        self.encoder = self.sha256 = name
        self.dim = self.features(torch.zeros(1, 3, img_size, img_size, device=device)).shape[1]

    @torch.no_grad()
    def features(self, images):
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=images)
            return getattr(out, "pooler_output", out).float()
        out = self.model(pixel_values=images)
        return (
            out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        ).float()

    def __call__(self, index, labels, images, lam):
        return self.features(images)  # the mixed batch itself: nothing to mix


def alignment(cfg, text_path, limit=500):
    """An on_epoch callback: at the last epoch, how well the text head's image embeddings match
    the captions of the first `limit` validation images that have one in the embeddings file:
    image-to-caption retrieval top-1 among them (scored as the loss scores them: dot products),
    and the mean cosine of matching and of non-matching pairs."""
    emb = torch.load(text_path, mmap=True, weights_only=True)
    if "val_keys" not in emb or emb["level"] != "image":
        return None
    dataset, keys, _ = tt.image_split(cfg.data, cfg.data_dir, "val")
    row_of = {k: r for r, k in enumerate(emb["val_keys"])}
    pairs = [(i, row_of[k]) for i, k in enumerate(keys) if k in row_of][:limit]
    samples = tt.Samples(dataset, torch.tensor(dataset.targets), cfg.img_size)
    t = emb["val_embeddings"][[r for _, r in pairs]].float() - emb["mean"].float()

    @torch.no_grad()
    def on_epoch(record, model):
        if record["epoch"] != cfg.epochs or model.text_head is None:
            return
        model.eval()
        device = next(model.parameters()).device
        images = torch.stack([samples[i][0] for i, _ in pairs])
        z = torch.cat(
            [
                model(tt.normalize(images[s : s + 256].to(device)))[1]
                for s in range(0, len(images), 256)
            ]
        ).float()
        targets = t.to(device)
        cos = F.normalize(z, dim=-1) @ F.normalize(targets, dim=-1).T  # shape = [M, M]
        scores = z @ targets.T
        M = len(z)
        record.update(
            retrieval_top1=100
            * (scores.argmax(1) == torch.arange(M, device=device)).float().mean().item(),
            cos_match=cos.diag().mean().item(),
            cos_other=((cos.sum() - cos.trace()) / (M * (M - 1))).item(),
        )

    return on_epoch


def run_arm(cfg, folder, targets=None, on_epoch=None):
    """One arm in its run folder: reused when finished, continued when interrupted."""
    if os.path.exists(os.path.join(folder, "export", "config.json")):
        return read_metrics(folder)
    cfg = dataclasses.replace(
        cfg,
        out_dir=os.path.dirname(folder),
        name=os.path.basename(folder),
        resume=folder if os.path.exists(os.path.join(folder, "checkpoint.pt")) else "",
    )
    tt.train(cfg, targets=targets, on_epoch=on_epoch)
    return read_metrics(folder)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def arms_of(cfg, control="", teacher=""):
    """{arm: (config, target source maker or None)}: the baseline, TextTeacher (or its control),
    and the vision teacher."""
    base = dataclasses.replace(cfg, text="", text_loss_lambda=0.0)
    arms = {"baseline": (base, None)}
    if cfg.text:
        _, keys, classes = tt.image_split(cfg.data, cfg.data_dir, "train")

        def text(seed, device):
            targets = tt.TextTargets(cfg.text, keys, classes)
            return (
                {"": targets, "shuffle": Shuffled, "random": Gaussian}[control](targets, seed)
                if control
                else targets
            )

        arms["textteacher" + (f"-{control}" if control else "")] = (cfg, text if control else None)
    if teacher:
        arms["teacher"] = (
            dataclasses.replace(cfg, text=""),
            lambda seed, device: VisionTeacher(teacher, device, cfg.img_size),
        )
    return arms


def compare(cfg, root, seeds, arms):
    """Every arm for every seed (in order seed by seed, so a stopped study has whole pairs),
    then the summary, printed and written to root/compare.json."""
    runs = {}
    for seed in seeds:
        for arm, (arm_cfg, make) in arms.items():
            arm_cfg = dataclasses.replace(arm_cfg, seed=seed)
            device = tt.compute_setup(arm_cfg)[0]
            targets = make(seed, device) if make else None
            on_epoch = (
                alignment(arm_cfg, arm_cfg.text)
                if arm_cfg.text and arm_cfg.text_loss_lambda > 0
                else None
            )
            runs[(seed, arm)] = run_arm(
                arm_cfg, os.path.join(root, f"seed{seed}-{arm}"), targets, on_epoch
            )
    summary = summarize(runs, list(arms), seeds)
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs, arms, seeds):
    """Top-1 per epoch (mean over seeds), and per arm the final and best differences to the
    baseline (mean and std over seeds of the paired differences), seconds per epoch and the
    last epoch's alignment."""
    epochs = len(runs[(seeds[0], arms[0])])
    per_epoch = {
        a: [float(np.mean([runs[(s, a)][e]["top1"] for s in seeds])) for e in range(epochs)]
        for a in arms
    }
    out = dict(arms=arms, seeds=seeds, top1_per_epoch=per_epoch)
    lines = [f"{'epoch':>6}" + "".join(f"{a:>22}" for a in arms)]
    lines += [
        f"{e + 1:>6}" + "".join(f"{per_epoch[a][e]:>22.2f}" for a in arms) for e in range(epochs)
    ]
    base_time = np.mean([r["epoch_time"] for s in seeds for r in runs[(s, arms[0])]])
    for arm in arms:
        last = [runs[(s, arm)][-1] for s in seeds]
        entry = dict(
            final=mean_std([r["top1"] for r in last]),
            seconds_per_epoch=float(
                np.mean([r["epoch_time"] for s in seeds for r in runs[(s, arm)]])
            ),
        )
        for key in ("retrieval_top1", "cos_match", "cos_other"):
            if key in last[0]:
                entry[key] = mean_std([r[key] for r in last])
        if arm != arms[0]:
            entry["final_diff"] = mean_std(
                [runs[(s, arm)][-1]["top1"] - runs[(s, arms[0])][-1]["top1"] for s in seeds]
            )
            entry["best_diff"] = mean_std(
                [
                    runs[(s, arm)][-1]["best_top1"] - runs[(s, arms[0])][-1]["best_top1"]
                    for s in seeds
                ]
            )
            d, b = entry["final_diff"], entry["best_diff"]
            lines.append(
                f"{arm} - baseline: final top1 {d[0]:+.2f} +- {d[1]:.2f}, best {b[0]:+.2f} +- "
                f"{b[1]:.2f} "
                f"(std over {len(seeds)} seeds); {entry['seconds_per_epoch']:.1f} s/epoch vs "
                f"{base_time:.1f} s"
                + (
                    f"; retrieval {entry['retrieval_top1'][0]:.1f}%, cos "
                    f"{entry['cos_match'][0]:.3f} matching / {entry['cos_other'][0]:.3f} other"
                    if "retrieval_top1" in entry
                    else ""
                )
            )
        out[arm] = entry
    out["table"] = "\n".join(lines)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--control", choices=("shuffle", "random"), default="")
    p.add_argument("--teacher", default="")
    args, rest = p.parse_known_args(argv)
    try:
        cfg, _ = tt.parse_config(rest)
        tt.check_config(cfg)
        if args.seeds < 1:
            raise tt.UserError(f"--seeds must be 1 or more, got {args.seeds}")
        if not (cfg.text or args.teacher) or cfg.text_loss_lambda == 0:
            raise tt.UserError(
                "compare needs --text or --teacher, and a --text-loss-lambda above 0"
            )
        root = os.path.join(cfg.out_dir, cfg.name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(root, exist_ok=True)
        summary = compare(
            cfg,
            root,
            list(range(cfg.seed, cfg.seed + args.seeds)),
            arms_of(cfg, args.control, args.teacher),
        )
        print(summary["table"])
    except tt.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
