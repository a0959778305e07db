"""
Text against distillation at equal compute: logit distillation from a trained teacher (KD),
RichKD's fusion of that teacher with CLIP's zero-shot logits, and a control, each beside the
baseline and TextTeacher from the same seed (same initial ViT, data order, augmentation, CutMix).

    # a teacher first: a longer run of this project (or any run, export, or a Hugging Face
    # image classifier by name or folder with the student's classes and image size)
    python textteacher.py --data shapes --model tiny --epochs 30 --name shapes-teacher
    # the arms over 3 seeds, offline (RichKD needs a CLIP, so it is left out here)
    python experiments/distill.py --data shapes --text data/shapes/text.pt \\
        --teacher runs/shapes-teacher --arms kd,scaled-teacher --seeds 3 --name distill-shapes
    # results: docs/distillation.md
    # with CLIP ViT-L/14, as RichKD runs it (downloads once)
    python experiments/distill.py ... --arms kd,richkd,scaled-teacher \\
        --clip openai/clip-vit-large-patch14

The offline demo, planned before it ran: the shapes set with clean labels, the shapes preset
(ViT-micro, 15 epochs), seeds 0, 1, 2; the teacher a ViT-tiny trained here for 30 epochs with
the shapes preset (one run, seed 0); arms baseline, textteacher (full captions, lam 0.5),
kd and scaled-teacher (T = 3, beta = 3, a = 0.7). Expected: kd above the baseline (a teacher
that is better than the student, fed the same images, is the classic case where distillation
helps); scaled-teacher close to kd (the same teacher at an effective temperature of 4.3);
textteacher below the baseline with clean labels (the study measured -9.5 +- 3.6 p.p.); kd and
scaled-teacher slower per epoch than textteacher (a forward pass of a 5.5M-parameter teacher
in every step, against a linear head). The table reports every arm whatever its sign.

A follow-up, planned after the demo (where kd fell short of the baseline, -2.0 +- 1.9 p.p.) and
before it ran: is it RichKD's weighting, a KD term of beta T^2 = 27 against a CE of weight 1,
that holds the student back? The same demo's kd arm with T = 1 and beta = 1 (the plain match of
the teacher's probabilities at the weight of the labels), seeds 0, 1, 2, paired with the
baseline: if the weighting is the cause, this kd reaches the baseline or passes it; if it still
falls short, the weighting is not the cause (the 15 epochs or the teacher are left, untested).

    python experiments/distill.py --data shapes --teacher runs/shapes-teacher --arms kd \
        --temperature 1 --beta 1 --seeds 3 --name distill-shapes-t1

The arms (T the temperature, beta the KD weight, a the fusion weight; RichKD's released
configuration: T = 3, beta = 3, a = 0.7, CE weight 1):
  baseline        L = CE(z_S, y)                                      (lambda 0)
  textteacher     L = lam w L_txt + (1 - lam) CE(z_S, y)              (with --text)
  kd              L = CE(z_S, y) + beta T^2 KL(softmax(z_T / T) || softmax(z_S / T))
  richkd          the same on z_F = a z_T + (1 - a) z_CLIP
  scaled-teacher  the same on z_F = a z_T: RichKD's released cache holds raw cosines in [-1, 1]
                  (no logit scale of about 100), so its z_F is nearly 0.7 z_T, which is KD at
                  an effective temperature T / a (about 4.3); this arm separates the fusion from
                  that temperature. --clip-raw runs RichKD's unscaled cosines.
The teacher is frozen, in eval mode, and fed the student's own batch after CutMix, as the online
vision teacher of experiments/compare.py is: its forward pass is inside every step, so it counts
in the seconds per epoch. CLIP's logits are computed once per training image on the
un-augmented image (as RichKD's cache.py does), cached in runs/NAME/clip-*.pt, and mixed with
CutMix's lambda and partner like the labels; their one-off cost is printed apart, as the
captioning of TextTeacher is. RichKD's feature branch (128-d fused projections trained with a
CRD memory bank) is left out: its logit branch is what the paper's comparison needs.

Each arm is an ordinary run folder, runs/NAME/seedS-ARM (the baseline and TextTeacher folders
are compare.py's), reused when finished and continued when interrupted. It prints compare.py's
table (top-1 per epoch, paired differences to the baseline) and then, per arm, final and best
top-1 (mean +- std over seeds), seconds per epoch, the cost against the baseline, and top-1 at
the baseline's wall-clock; all of it goes to runs/NAME/distill.json. Every other flag is
textteacher.py's.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import compare  # noqa: E402
import textteacher as tt  # noqa: E402
from cli import UserError, need  # noqa: E402

ARMS = ("kd", "richkd", "scaled-teacher")


# ----------------------------------------------------------------------------
# The teacher: a run or export of this project, or a Hugging Face image classifier

def ours(source):
    """Is source a checkpoint, run folder or export/ of this project (else a Hugging Face
    name or folder)?"""
    if os.path.isfile(source) or os.path.isfile(os.path.join(source, "checkpoint.pt")):
        return True
    try:
        with open(os.path.join(source, "config.json")) as f:
            return "model_args" in json.load(f)
    except (OSError, ValueError):
        return False


class Logits(nn.Module):
    """A Hugging Face classifier as images -> logits [B, C]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def few(names):
    return ", ".join(map(str, list(names)[:4])) + (", ..." if len(names) > 4 else "")


def load_teacher(source, classes, img_size, device):
    """The teacher as a frozen module in eval mode, images [B, 3, S, S] -> logits [B, C]. It is
    fed the student's batch as it is (ImageNet-normalised, at the student's size), so it must
    take that size and give the student's classes in the student's order: this project's
    teachers by name, a Hugging Face one by count (and by name where its id2label holds the
    same names in another order)."""
    if ours(source):
        args, state, names = tt.read_source(source)
        need(list(names) == list(classes), f"teacher {source} has the classes {few(names)}, the "
             f"data {few(classes)}: train the teacher on the same data")
        size, model = args["img_size"], tt.ViT(**args)
        model.load_state_dict(state)
    else:
        from transformers import AutoModelForImageClassification, logging
        logging.disable_progress_bar()  # a weight-loading bar is noise
        try:
            hf = AutoModelForImageClassification.from_pretrained(source)
        except (OSError, ValueError) as e:  # what transformers raises for a name it cannot find
            raise UserError(f"teacher {source!r} is not available offline ({type(e).__name__}); "
                            "pass a run or export of textteacher.py, or a Hugging Face image "
                            "classifier's folder (save_pretrained)") from None
        names = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
        need(len(names) == len(classes) and (sorted(names) != sorted(classes)
                                             or names == list(classes)),
             f"teacher {source} has {len(names)} classes ({few(names)}), the data {len(classes)}"
             f" ({few(classes)}) in this order: fine-tune it on the same classes")
        size, model = getattr(hf.config, "image_size", img_size), Logits(hf)
    need(size in (img_size, (img_size, img_size), [img_size, img_size]), f"teacher {source} "
         f"takes {size} px images, the student {img_size}: it is fed the student's batch; pass "
         f"--img-size {size} or a teacher of {img_size} px")
    return model.eval().requires_grad_(False).to(device)


def digest(module):
    """The sha256 of a module's weights: a resumed arm must distil from the same teacher."""
    h = hashlib.sha256()
    for name, v in module.state_dict().items():
        v = v.detach().cpu().contiguous().reshape(-1)  # [n]: a 0-d tensor has no byte view
        h.update(name.encode() + v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------
# CLIP's zero-shot logits, once per training image (RichKD)

# RichKD's cache.py, as released (IPL-sharif/RichKD): its 12 prompts for CIFAR-100
PROMPTS = ("a photo of a {}", "a blurry photo of a {}", "a cropped photo of a {}",
           "a close-up photo of a {}", "a low resolution photo of a {}", "a bright photo of a {}",
           "a picture of a {}", "a detailed image of a {}", "a sketch of a {}",
           "a natural photo of a {} in the wild", "a realistic image of a {}",
           "a high quality photo of a {}")


def features(out):
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is the
    projected embedding (transformers 5)."""
    return getattr(out, "pooler_output", out).float()


@torch.no_grad()
def class_embeddings(model, tokenizer, classes, device):
    """e_c = normalize( mean_p normalize( text(prompt_p.format(c)) ) ), the prompt ensemble of
    CLIP and of RichKD's cache.py: each prompt normalised, then their mean. A class name's "_"
    is read as a space (cache.py passes CIFAR-100's aquarium_fish as it is)."""
    rows = []
    for name in classes:
        tokens = tokenizer([p.format(name.replace("_", " ")) for p in PROMPTS], padding=True,
                           return_tensors="pt").to(device)
        e = F.normalize(features(model.get_text_features(**tokens)), dim=-1)  # [prompts, D]
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)  # shape = [C, D]


@torch.no_grad()
def zero_shot(clip, dataset, classes, cache, device, batch=64):
    """(cos [N, C], CLIP's logit scale): cos_ic = normalize( image(x_i) ) . e_c for every
    training image x_i, un-augmented, through CLIP's own processor (resize, centre crop, its
    normalisation); computed once and kept in `cache`. RichKD's cache stores cos; CLIP's
    zero-shot logits are logit_scale * cos (logit_scale = exp(s), 100 for ViT-L/14)."""
    if os.path.exists(cache):
        saved = torch.load(cache, mmap=True, weights_only=True)  # [N, C]: mapped, not read
        return saved["cosines"], saved["logit_scale"]
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, logging
    logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(clip).eval().to(device)
        tokenizer, processor = (a.from_pretrained(clip) for a in (AutoTokenizer,
                                                                  AutoImageProcessor))
    except (OSError, ValueError) as e:
        raise UserError(f"CLIP {clip!r} is not available offline ({type(e).__name__}); pass a "
                        "folder with its model, tokenizer and image processor (save_pretrained)"
                        ) from None
    e = class_embeddings(model, tokenizer, classes, device)  # shape = [C, D]
    rows = []
    for s in range(0, len(dataset), batch):
        pixels = processor(images=[dataset[i][0] for i in range(s, min(s + batch, len(dataset)))],
                           return_tensors="pt")["pixel_values"].to(device)  # [b, 3, R, R]
        rows.append((F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
                     @ e.T).cpu())  # shape = [b, C]
    cosines, scale = torch.cat(rows), model.logit_scale.exp().float().cpu()  # [N, C], []
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank computes, one writes
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        cli.save_atomic(lambda f: torch.save(dict(cosines=cosines, logit_scale=scale, clip=clip,
                                                  prompts=PROMPTS, classes=list(classes)), f),
                        cache)
    return cosines, scale


def clip_cache(root, clip, keys, labels, classes):
    """The cache file of one CLIP on one training split: keyed by both, and by the prompts."""
    key = json.dumps([clip, list(keys), labels.tolist(), list(classes), PROMPTS])
    return os.path.join(root, f"clip-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")


# ----------------------------------------------------------------------------
# The distillation target and the objective, through train()'s seams

class Distilled:
    """A target source for train(): the logits the student distils from, for its very batch

        kd               z = z_T
        scaled-teacher   z = a z_T
        richkd           z = a z_T + (1 - a) s mix(cos[index], lam)    (s: CLIP's scale, or 1)

    with z_T the frozen teacher's logits of the mixed batch (it sees what the student sees) and
    CLIP's cached logits of the un-augmented images mixed with CutMix's lambda and partner, as
    the labels are. dim 0: no text head is built."""
    dim = 0

    def __init__(self, teacher, settings, clip=None, scale=1.0):
        self.teacher, self.alpha, self.clip, self.scale = teacher, settings["alpha"], clip, scale
        self.encoder = settings["teacher"]
        self.sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        device = next(teacher.parameters()).device
        # the teacher at the student's precision: bf16 on CUDA, as train() runs the student
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def __call__(self, index, labels, images, lam):
        with self.autocast:
            z = self.alpha * self.teacher(images).float()  # shape = [B, C]
        if self.clip is None:
            return z
        c = self.clip[index].float().to(images.device) * self.scale  # shape = [B, C]
        return z + (1 - self.alpha) * tt.mix(c, lam)


def kd_loss(z_s, z_t, T):
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, averaged over the
    batch (Hinton et al.). T^2 keeps its gradient's scale independent of T."""
    return T ** 2 * F.kl_div(F.log_softmax(z_s / T, dim=1), F.log_softmax(z_t / T, dim=1),
                             reduction="batchmean", log_target=True)


def kd_objective(T, beta):
    """train()'s objective for the arms: L = CE(z_S, y) + beta T^2 KL(...), as (L, L_cls, L_kd,
    1), y the mixed labels, CE with the run's label smoothing as the baseline has it, so the
    two arms differ by the KD term alone. L_kd is logged as loss_txt."""
    def objective(model, images, y, t, lam, cfg, autocast):
        with autocast:
            logits = model(images)[0]
        logits = logits.float()  # shape = [B, C]
        loss_cls = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss_kd = kd_loss(logits, t, T)
        return loss_cls + beta * loss_kd, loss_cls, loss_kd, torch.ones((), device=images.device)
    return objective


# ----------------------------------------------------------------------------
# The comparison: every arm for every seed, and the table

def arms_of(cfg, args, root, device):
    """{arm: (config, target source, objective, settings)}: the baseline, TextTeacher (with
    --text), and the chosen distillation arms, which share one loaded teacher."""
    base = dataclasses.replace(cfg, text="", text_loss_lambda=0.0)
    arms = {"baseline": (base, None, None, None)}
    if cfg.text:
        arms["textteacher"] = (cfg, None, None, None)
    if not args.arms:
        return arms
    dataset, keys, classes = tt.image_split(cfg.data, cfg.data_dir, "train", cfg.split)
    source = args.teacher if not os.path.exists(args.teacher) else os.path.abspath(args.teacher)
    teacher = load_teacher(source, classes, cfg.img_size, device)
    common = dict(teacher=source, teacher_sha256=digest(teacher), T=args.temperature,
                  beta=args.beta)
    objective = kd_objective(args.temperature, args.beta)
    for arm in args.arms:
        settings = dict(common, alpha=1.0 if arm == "kd" else args.alpha, clip=None, scaled=None)
        clip, scale = None, 1.0
        if arm == "richkd":
            name = args.clip if not os.path.exists(args.clip) else os.path.abspath(args.clip)
            cache = clip_cache(root, name, keys, torch.tensor(dataset.targets), classes)
            t0 = time.time()
            clip, scale = zero_shot(name, dataset, classes, cache, device)
            print(f"CLIP's zero-shot logits of {len(clip)} images: {cache} "
                  f"({time.time() - t0:.0f} s, once; logit scale {float(scale):.1f})")
            scale = 1.0 if args.clip_raw else float(scale)
            # the cache file's name is its key: this CLIP, these images, labels and prompts
            settings.update(clip=name, scaled=not args.clip_raw, cache=os.path.basename(cache))
        arms[arm] = (base, Distilled(teacher, settings, clip, scale), objective, settings)
    return arms


def table(runs, arms, seeds):
    """Per arm: final and best top-1 (mean +- std over seeds), seconds per epoch, its cost
    against the baseline's, and top-1 at the baseline's wall-clock: the mean over seeds at the
    last epoch it had finished when the baseline ended, k = floor(E t_base / t_arm) (a run cut
    short: its schedule was set for E epochs)."""
    seconds = {a: float(np.mean([r["epoch_time"] for s in seeds for r in runs[(s, a)]]))
               for a in arms}
    epochs, out = len(runs[(seeds[0], arms[0])]), {}
    pm = "{0[0]:.2f} +- {0[1]:.2f}".format
    lines = [f"{'arm':<16}{'final top1':>16}{'best top1':>16}{'s/epoch':>9}{'cost':>7}   "
             "top1 at the baseline's wall-clock"]
    for a in arms:
        final, best = (compare.mean_std([runs[(s, a)][-1][k] for s in seeds])
                       for k in ("top1", "best_top1"))
        k = min(epochs, int(epochs * seconds[arms[0]] / seconds[a] + 1e-9))
        at = compare.mean_std([runs[(s, a)][k - 1]["top1"] for s in seeds]) if k else None
        out[a] = dict(final=final, best=best, seconds_per_epoch=seconds[a],
                      cost=seconds[a] / seconds[arms[0]], top1_at_baseline_time=at, epochs_then=k)
        lines.append(f"{a:<16}{pm(final):>16}{pm(best):>16}{seconds[a]:>9.1f}"
                     f"{out[a]['cost']:>6.2f}x   " + (f"{pm(at)} (epoch {k})" if at else "-"))
    return out, "\n".join(lines)


@cli.releasing  # the claim on runs/NAME ends with main
def main(argv=None):
    # no abbreviations: the trainer's --seed would be taken for --seeds
    p = cli.Parser(add_help=False, allow_abbrev=False,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                  description="Distillation arms beside the baseline and TextTeacher (every "
                  "other flag is textteacher.py's, listed below).")
    p.add_argument("--teacher", default="", help="a run, checkpoint or export/ of textteacher.py,"
                   " or a Hugging Face image classifier (name or folder)",
                   type=cli.path("file or folder", names=("",), hub=True))
    p.add_argument("--arms", default="kd,richkd,scaled-teacher", type=cli.some_of(ARMS),
                   help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--clip", default="", help="CLIP for richkd: a Hugging Face name or folder "
                   "(RichKD: openai/clip-vit-large-patch14)",
                   type=cli.path("folder", names=("",), hub=True))
    p.add_argument("--clip-raw", action="store_true", help="RichKD's released cache: raw cosines"
                   " in [-1, 1], without CLIP's logit scale (else scaled, as CLIP's logits are)")
    # finite, and wide around what the literature runs (T 1 to 20; RichKD: T 3, beta 3)
    p.add_argument("--alpha", type=cli.number(float, "[0, 1]"), default=0.7,
                   help="a, the teacher's weight in z_F")
    p.add_argument("--temperature", type=cli.number(float, "(0, 100]"), default=3.0,
                   help="T of the KD term")
    p.add_argument("--beta", type=cli.number(float, "[0, 1000]"), default=3.0,
                   help="beta, the weight of the KD term")
    p.add_argument("--seeds", type=cli.number(int, "[1, 1000]"), default=1,
                   help="seeds from --seed on (compare.py's)")

    def run(argv):
        if {"-h", "--help"} & set(argv or sys.argv[1:]):
            p.print_help()
        args, rest = p.parse_known_args(argv)
        compare.need_inputs(rest)
        cfg, _ = tt.parse_config(rest)
        tt.check_config(cfg)
        need(args.teacher or not args.arms, "--arms needs --teacher (a run of textteacher.py or "
             "a Hugging Face classifier)")
        need(args.clip or "richkd" not in args.arms, "--arms richkd needs --clip (e.g. openai/"
             "clip-vit-large-patch14); offline, run the others: --arms kd,scaled-teacher")
        compare.need_seeds(cfg.seed, args.seeds)
        need(cfg.text or args.arms, "nothing to compare with the baseline: give --text, --arms "
             "or both")
        need(not cfg.text or cfg.text_loss_lambda > 0, "--text-loss-lambda 0 with --text is the "
             "baseline: give it a value above 0")
        # the folder is made by its first arm (or the CLIP cache): a refused command leaves none
        root = os.path.join(cli.writable(cfg.out_dir), cfg.name or time.strftime(
            "distill-%Y%m%d-%H%M%S"))
        cli.lock(root, "--name")  # one comparison per folder: a second is refused at once
        seeds = list(range(cfg.seed, cfg.seed + args.seeds))
        arms = arms_of(cfg, args, root, tt.compute_setup(cfg)[0])
        runs = {}
        for seed in seeds:  # seed by seed: a stopped study has whole pairs
            for arm, (arm_cfg, targets, objective, settings) in arms.items():
                folder = os.path.join(root, f"seed{seed}-{arm}")
                runs[(seed, arm)] = compare.run_arm(dataclasses.replace(arm_cfg, seed=seed),
                                                    folder, targets, objective=objective,
                                                    settings=settings)
        summary = compare.summarize(runs, list(arms), seeds)
        summary["distill"], text = table(runs, list(arms), seeds)
        summary["settings"] = {a: s for a, (_, _, _, s) in arms.items() if s}
        cli.save_atomic(lambda f: f.write(json.dumps(summary, indent=1).encode()),
                        os.path.join(root, "distill.json"))
        print(summary["table"] + "\n\n" + text)
        return summary
    return cli.run(run, argv)


if __name__ == "__main__":
    main()
