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
a finished arm is reused and an interrupted one continued, each only if it was started with the
settings asked for now (else one line names the settings that differ). It prints validation
top-1 per epoch (mean over seeds), the final and best differences to the baseline (mean and std
over seeds), the training time per epoch of each arm, and, where the embeddings file holds
validation captions, the alignment of the last epoch: image-to-caption retrieval top-1 through
the text head and the mean cosine of matching and of non-matching pairs. All of it goes to
runs/NAME/compare.json. One comparison at a time per NAME: a second is refused in one line.
"""

import dataclasses
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import numpy as np
import torch
import torch.nn.functional as F

import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402


class Shuffled:
    """Control: the real targets, each given to another image (one permutation for the run).
    Does the per-image pairing matter, or only that the targets look like captions?"""

    def __init__(self, targets, seed):
        self.__dict__.update(targets.__dict__)
        g = torch.Generator().manual_seed(seed)
        self.rows = targets.rows[torch.randperm(len(targets.rows), generator=g)]
        self.sha256 = f"{targets.sha256}:shuffled:{seed}"

    __call__ = tt.TextTargets.__call__


class Gaussian:
    """Control: a fixed Gaussian vector per image with the per-dimension std of the real targets
    (centred, as they are). Does the text content matter?"""

    def __init__(self, targets, seed):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.encoder, self.sha256 = targets.dim, "random", f"random:{seed}"
        self.vectors = (torch.randn(len(targets.rows), targets.dim, generator=g)
                        * targets.vectors.float().std(0))

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
            raise tt.UserError(f"vision model {name!r} is not available offline; pass a saved "
                               "folder (save_pretrained)") from None
        self.encoder = self.sha256 = name
        self.dim = self.features(torch.zeros(1, 3, img_size, img_size, device=device)).shape[1]

    @torch.no_grad()
    def features(self, images):
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=images)
            return getattr(out, "pooler_output", out).float()
        out = self.model(pixel_values=images)
        pooled = out.pooler_output
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()

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
    if len(pairs) < 2:  # retrieval needs a wrong caption to choose; training does not need this
        print(f"note: {len(pairs)} validation images of {cfg.data} have a caption in {text_path} "
              "(another data set's captions?): the alignment metrics are left out",
              file=sys.stderr)
        return None
    samples = tt.Samples(dataset, torch.tensor(dataset.targets), cfg.img_size)
    t = emb["val_embeddings"][[r for _, r in pairs]].float() - emb["mean"].float()

    @torch.no_grad()
    def on_epoch(record, model):
        if record["epoch"] != cfg.epochs or model.text_head is None:
            return
        model.eval()
        device = next(model.parameters()).device
        images = torch.stack([samples[i][0] for i, _ in pairs])
        z = torch.cat([model(tt.normalize(images[s:s + 256].to(device)))[1]
                       for s in range(0, len(images), 256)]).float()
        targets = t.to(device)
        cos = F.normalize(z, dim=-1) @ F.normalize(targets, dim=-1).T  # shape = [M, M]
        scores = z @ targets.T
        M = len(z)
        hits = scores.argmax(1) == torch.arange(M, device=device)
        record.update(retrieval_top1=100 * hits.float().mean().item(),
                      cos_match=cos.diag().mean().item(),
                      cos_other=((cos.sum() - cos.trace()) / (M * (M - 1))).item())

    return on_epoch


# Config fields that say how a run computes, not what it computes: an arm is the same arm
# whatever they were. Every other field must equal the one asked for, paths once absolute.
HOW = {"preset", "out_dir", "name", "resume", "workers", "threads", "device", "compile",
       "log_every", "ckpt_every"}
PATHS = ("data", "data_dir", "text", "init")


def run_arm(cfg, folder, targets=None, on_epoch=None, objective=None, settings=None):
    """One arm in its run folder: reused when finished, continued when interrupted, and either
    only if it was started with these settings (else a one-line UserError naming those that
    differ). objective: train()'s seam (the distillation arms); settings: what else defines
    the arm beyond cfg (a teacher, a temperature), JSON values, kept beside the folder in
    FOLDER.arm.json (not inside: a folder is the trainer's to make, and it refuses to start
    in one that holds a file). Returns the arm's epoch records."""
    settings = json.loads(json.dumps(settings or {}))  # as it reads back: tuples are lists
    started = os.path.exists(os.path.join(folder, "checkpoint.pt"))
    if started:
        check_arm(cfg, folder, targets, settings)
        if finished(folder, cfg.epochs):
            return read_metrics(folder)
    else:  # a new arm (or one stopped while writing its first checkpoint)
        os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
        cli.save_atomic(lambda f: f.write(json.dumps(settings).encode()), f"{folder}.arm.json")
    cfg = dataclasses.replace(cfg, out_dir=os.path.dirname(folder), name=os.path.basename(folder),
                              resume=folder if started else "")
    tt.train(cfg, targets=targets, on_epoch=on_epoch, objective=objective)
    return read_metrics(folder)


def finished(folder, epochs):
    """Whether the run in folder has all its epochs and its export: not export/ alone, which
    an older experiments/export.py wrote of any checkpoint, nor the epochs alone (a crash
    before the export; continuing the run then only exports it)."""
    records = read_metrics(folder) if os.path.exists(os.path.join(folder, "metrics.jsonl")) else []
    return len(records) >= epochs and os.path.exists(os.path.join(folder, "export", "config.json"))


def comparable(config):
    """A run's settings as a dict of the Config fields that matter, paths made absolute (the
    trainer records them so); a field that an older run did not record has its default."""
    out = {f.name: config.get(f.name, f.default) for f in dataclasses.fields(tt.Config)
           if f.name not in HOW}
    for k in PATHS:
        if out[k] and not (k == "data" and out[k] in tt.PRESETS):
            out[k] = os.path.abspath(out[k])
    if out["data"] not in tt.PRESETS:  # a data folder of its own: the root of named sets unused
        del out["data_dir"]
    return out


def text_sha256(cfg, targets):
    """The text_sha256 the trainer records for this arm: its target source's, or that of the
    embeddings file it reads itself, or None without targets. A file replaced under the same
    name gives other targets, and so another arm."""
    if targets is not None:
        return getattr(targets, "sha256", None)
    if not (cfg.text and cfg.text_loss_lambda > 0):
        return None
    try:
        with open(cfg.text, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise tt.UserError(f"cannot read embeddings file {cfg.text}: {e.strerror}") from None


def check_arm(cfg, folder, targets, settings):
    """A one-line UserError unless the run in folder was started with cfg (the fields that
    matter), the same text targets and the same settings (FOLDER.arm.json)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # a crash between the checkpoint and its config: the same
        ckpt = tt.load_checkpoint(folder)[0]
        saved = dict(ckpt["config"], text_sha256=ckpt["text_sha256"])
    try:  # an arm of a comparison from before arm.json, or of the trainer alone: no settings
        with open(f"{folder}.arm.json") as f:
            recorded = json.load(f)
    except FileNotFoundError:
        recorded = {}
    asked = dict(comparable(dataclasses.asdict(cfg)), text_sha256=text_sha256(cfg, targets))
    had = dict(comparable(saved), text_sha256=saved.get("text_sha256"))
    differ = [(k, had[k], asked[k]) for k in asked if had[k] != asked[k]]
    differ += [(k, recorded.get(k), settings.get(k)) for k in sorted(recorded.keys() | settings)
               if recorded.get(k) != settings.get(k)]
    was = ", ".join(f"{k} {short(a)}" for k, a, _ in differ)
    need(not differ, f"{folder} was trained with {was}; asked for "
         f"{', '.join(short(b) for _, _, b in differ)}: choose another --name, or delete {folder}")


def short(value):
    """A value as the refusal shows it: a sha256 by its first 12 digits."""
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and "/" not in text else text


def read_metrics(run_dir):
    """The epoch records of a run (metrics.jsonl), each line checked: one line naming the
    file and the line for a file that is not the trainer's (torn, or not JSON)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise tt.UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:  # garbled bytes: not the trainer's text
        raise tt.UserError(f"{path} is damaged (not UTF-8 text): train the run again, or "
                           "delete it") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        need(isinstance(record, dict) and "epoch" in record, f"{path}, line {n}: not an epoch "
             "record of textteacher.py (a torn copy?)")
        records.append(record)
    return records


def arms_of(cfg, control="", teacher=""):
    """{arm: (config, target source maker or None)}: the baseline, TextTeacher (or its control),
    and the vision teacher."""
    base = dataclasses.replace(cfg, text="", text_loss_lambda=0.0)
    arms = {"baseline": (base, None)}
    if cfg.text:
        _, keys, classes = tt.image_split(cfg.data, cfg.data_dir, "train")

        def text(seed, device):  # a control of the text targets
            targets = tt.TextTargets(cfg.text, keys, classes)
            return {"shuffle": Shuffled, "random": Gaussian}[control](targets, seed)

        arms["textteacher" + (f"-{control}" if control else "")] = (cfg, text if control else None)
    if teacher:
        arms["teacher"] = (dataclasses.replace(cfg, text=""),
                           lambda seed, device: VisionTeacher(teacher, device, cfg.img_size))
    return arms


def compare(cfg, root, seeds, arms):
    """Every arm for every seed (in order seed by seed, so a stopped study has whole pairs),
    then the summary, printed and written to root/compare.json."""
    runs = {}
    # the alignment of the last epoch, where there are validation captions: one callback per
    # arm, the same for every seed (it holds the validation images and their captions)
    aligned = {arm: alignment(c, c.text) if c.text and c.text_loss_lambda > 0 else None
               for arm, (c, _) in arms.items()}
    for seed in seeds:
        for arm, (arm_cfg, make) in arms.items():
            arm_cfg = dataclasses.replace(arm_cfg, seed=seed)
            device = tt.compute_setup(arm_cfg)[0]
            targets = make(seed, device) if make else None
            runs[(seed, arm)] = run_arm(arm_cfg, os.path.join(root, f"seed{seed}-{arm}"),
                                        targets, aligned[arm])
    summary = summarize(runs, list(arms), seeds)
    text = json.dumps(summary, indent=1)
    cli.save_atomic(lambda f: f.write(text.encode()), os.path.join(root, "compare.json"))
    return summary


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs, arms, seeds):
    """Top-1 per epoch (mean over seeds), and per arm the final and best differences to the
    baseline (mean and std over seeds of the paired differences), seconds per epoch and the
    last epoch's alignment."""
    epochs = len(runs[(seeds[0], arms[0])])
    per_epoch = {a: [float(np.mean([runs[(s, a)][e]["top1"] for s in seeds]))
                     for e in range(epochs)] for a in arms}
    out = dict(arms=arms, seeds=seeds, top1_per_epoch=per_epoch)
    lines = [f"{'epoch':>6}" + "".join(f"{a:>22}" for a in arms)]
    lines += [f"{e + 1:>6}" + "".join(f"{per_epoch[a][e]:>22.2f}" for a in arms)
              for e in range(epochs)]
    seconds = {a: float(np.mean([r["epoch_time"] for s in seeds for r in runs[(s, a)]]))
               for a in arms}
    for arm in arms:
        last = [runs[(s, arm)][-1] for s in seeds]
        entry = dict(final=mean_std([r["top1"] for r in last]), seconds_per_epoch=seconds[arm])
        for key in ("retrieval_top1", "cos_match", "cos_other"):
            if key in last[0]:
                entry[key] = mean_std([r[key] for r in last])
        if arm != arms[0]:
            for k, key in (("final", "top1"), ("best", "best_top1")):
                entry[f"{k}_diff"] = mean_std([runs[(s, arm)][-1][key]
                                               - runs[(s, arms[0])][-1][key] for s in seeds])
            d, b = entry["final_diff"], entry["best_diff"]
            lines.append(
                f"{arm} - baseline: final top1 {d[0]:+.2f} +- {d[1]:.2f}, best {b[0]:+.2f} +- "
                f"{b[1]:.2f} (std over {len(seeds)} seeds); {seconds[arm]:.1f} s/epoch vs "
                f"{seconds[arms[0]]:.1f} s" + (
                    f"; retrieval {entry['retrieval_top1'][0]:.1f}%, cos "
                    f"{entry['cos_match'][0]:.3f} matching / {entry['cos_other'][0]:.3f} other"
                    if "retrieval_top1" in entry else ""))
        out[arm] = entry
    out["table"] = "\n".join(lines)
    return out


# The trainer's flags that name what it reads. Its parser takes them as text, and the trainer
# reads them when a run starts: a tool that passes them on checks them first, as it checks its
# own flags, before it makes a folder or trains an arm (distill.py trained its baseline arm
# for minutes before a missing --text ended it).
TRAINER_INPUTS = {"--data": cli.path("folder", names=tuple(tt.PRESETS)),
                  "--data-dir": cli.path("new folder"),  # a named set may be downloaded there
                  "--text": cli.path("file", names=("",)),
                  "--init": cli.path("file or folder", names=("",)),
                  "--resume": cli.path("file or folder", names=("",)),
                  "--out-dir": cli.path("new folder")}


def need_inputs(argv):
    """Each flag of TRAINER_INPUTS in argv (what a tool passes on to textteacher.parse_config)
    that names nothing of its kind, refused in one line naming the flag."""
    p = cli.Parser(add_help=False, allow_abbrev=False)
    for flag, kind in TRAINER_INPUTS.items():
        p.add_argument(flag, type=kind)
    p.parse_known_args(argv)


def need_seeds(seed, seeds):
    """The arms' seeds, seed .. seed + seeds - 1, all within the trainer's --seed range."""
    allowed = tt.Config.__dataclass_fields__["seed"].metadata["allowed"]
    need(cli.within(seed + seeds - 1, allowed), f"--seeds {seeds} from --seed {seed} ends at "
         f"seed {seed + seeds - 1}, outside the trainer's {allowed}")


@cli.releasing  # the claim on the folder ends with main
def main(argv=None):
    # one line for a bad value, as the trainer's flags; no abbreviations: the trainer's --seed
    # would be taken for --seeds
    p = cli.Parser(add_help=False, allow_abbrev=False)
    # every seed is a whole run of each arm: a thousand is already more than a study needs
    p.add_argument("--seeds", type=cli.number(int, "[1, 1000]"), default=1)
    p.add_argument("--control", choices=("shuffle", "random"), default="")
    p.add_argument("--teacher", default="", type=cli.path("folder", names=("",), hub=True))
    args, rest = p.parse_known_args(argv)
    need_inputs(rest)
    cfg, _ = tt.parse_config(rest)
    tt.check_config(cfg)
    need_seeds(cfg.seed, args.seeds)
    need((cfg.text or args.teacher) and cfg.text_loss_lambda > 0,
         "compare needs --text or --teacher, and a --text-loss-lambda above 0")
    root = os.path.join(cli.writable(cfg.out_dir),
                        cfg.name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    # One comparison per folder: a second one would train the same arms beside the first, and
    # the trainer would refuse it only arm by arm, in the middle of its work.
    cli.lock(root, "--name")
    os.makedirs(root, exist_ok=True)
    summary = compare(cfg, root, list(range(cfg.seed, cfg.seed + args.seeds)),
                      arms_of(cfg, args.control, args.teacher))
    print(summary["table"])
    return summary


if __name__ == "__main__":
    cli.run(main, interrupted="every arm keeps its last checkpoint: run the same command again "
            "to continue")
