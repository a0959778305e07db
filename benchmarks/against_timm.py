"""The training step of textteacher's ViT against timm's VisionTransformer, side by side.

    pip install timm    # for this script only; the project does not depend on it
    python benchmarks/against_timm.py              # ViT-Ti/4, 32 px, batch 128, AdamW, eager
    python benchmarks/against_timm.py --compile             # also both models under torch.compile

Both models have the same configuration (textteacher.timm_kwargs) and the same weights: ours are
loaded into timm's by name, strictly, and the two must give the same logits before anything is
timed. Each step is the classification step of the training loop: label-smoothed cross-entropy,
gradient clipping at 1, AdamW from textteacher.build_optimizer (fused, decay on weight matrices).
The models take turns step by step, in a rotating order, so that a slow phase of the machine hits
all of them; the speed ratio to timm eager is the median of per-round ratios.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch
import torch.nn as nn
import torch.nn.functional as F

import textteacher as tt  # noqa: E402


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])  # a bad flag: one line
    p.add_argument("--model", default="tiny", choices=list(tt.MODEL_SIZES))
    # the upper ends: what any machine can time (a one-hot target per image and class: 16384
    # images of ImageNet-21k's 21 841 classes are 1.4 GB)
    p.add_argument("--img-size", type=cli.number(int, "[1, 1024]"), default=32)
    p.add_argument("--patch-size", type=cli.number(int, "[1, 1024]"), default=4)
    p.add_argument("--batch-size", type=cli.number(int, "[1, 16384]"), default=128)
    p.add_argument("--classes", type=cli.number(int, "[1, 22000]"), default=100)
    p.add_argument("--steps", type=cli.number(int, "[1, 100000]"), default=15,
                   help="timed steps per model")
    p.add_argument("--warmup", type=cli.number(int, "[0, 100000]"), default=3,
                   help="untimed steps per model first (they also compile)")
    p.add_argument("--compile", action="store_true", help="also time both models torch.compile'd")
    args = p.parse_args(argv)
    # the trainer's own checks of these flags: patches that tile the image, and a step that
    # this machine's memory holds (refused before anything is allocated)
    tt.check_config(tt.Config(model=args.model, img_size=args.img_size, device="cpu",
                              patch_size=args.patch_size, batch_size=args.batch_size))
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise tt.UserError("this comparison needs timm: pip install timm") from None

    width, depth, heads = tt.MODEL_SIZES[args.model]
    model_args = dict(
        num_classes=args.classes,
        img_size=args.img_size,
        patch_size=args.patch_size,
        width=width,
        depth=depth,
        heads=heads,
        layer_scale=1e-4,
    )
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = F.one_hot(torch.randint(args.classes, (args.batch_size,)), args.classes).float()
    cfg = tt.Config(optimizer="adamw", lr=1e-3, weight_decay=0.05)

    def pair():
        """Our ViT and timm's, with the same weights."""
        ours = tt.ViT(**model_args)
        theirs = VisionTransformer(**tt.timm_kwargs(model_args))
        theirs.load_state_dict(ours.state_dict(), strict=True)
        return ours, theirs

    ours, theirs = pair()
    with torch.no_grad():
        gap = (ours.eval()(x[:8]) - theirs.eval()(x[:8])).abs().max().item()
    if gap > 1e-4:
        sys.exit(
            f"error: the two models disagree by {gap:.2e} with the same weights; not comparing "
            "their speed"
        )
    models = {"timm": theirs, "textteacher": ours}
    if args.compile:
        ours_c, theirs_c = pair()
        models.update(
            {
                "timm compiled": torch.compile(theirs_c),
                "textteacher compiled": torch.compile(ours_c),
            }
        )

    def make_step(model):
        optimizer = tt.build_optimizer(cfg, model, torch.device("cpu"))

        def step():
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {}
    for name, model in models.items():
        steps[name] = make_step(model.train())
        for _ in range(args.warmup):
            steps[name]()
    names = list(models)
    times = {name: [] for name in names}
    for r in range(args.steps):
        for name in (
            names[r % len(names) :] + names[: r % len(names)]
        ):  # each model goes first as often
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)

    print(
        f"ViT-{args.model}/{args.patch_size} at {args.img_size}px, batch {args.batch_size}, "
        "AdamW, cpu, "
        f"{torch.get_num_threads()} threads, fp32; {args.steps} steps per model after "
        f"{args.warmup} warm-up steps; "
        f"same weights: logits agree to {gap:.1e}"
    )
    result = {"logit_gap": gap}
    for name in names:
        ratios = [b / t for b, t in zip(times["timm"], times[name])]
        low, high = (
            statistics.quantiles(ratios, n=4, method="inclusive")[::2]
            if len(ratios) > 1
            else (ratios[0],) * 2
        )
        result[name] = dict(
            images_per_s=args.batch_size / statistics.median(times[name]),
            speed_vs_timm=statistics.median(ratios),
        )
        print(
            f"  {name:22s} {result[name]['images_per_s']:6.1f} img/s   speed vs timm eager "
            f"{result[name]['speed_vs_timm']:.3f}x (middle half of the rounds "
            f"{low:.3f}-{high:.3f}x)"
        )
    return result


if __name__ == "__main__":
    cli.run(main, interrupted="nothing was written")
