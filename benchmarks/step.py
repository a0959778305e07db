"""
What the text objective costs: the training step of the configured model without and with the
text objective, the text objective on its own, and inference, on synthetic batches (no data
read, no run folder written). Flags are textteacher.py's model and recipe flags.

    python benchmarks/step.py --data cifar100 --model tiny --img-size 32 --patch-size 4 \
        --batch-size 128 --optimizer adamw [--compile on]

It prints the parameters, FLOPs per image (FlopCounterMode), training img/s of both arms and the
median of their per-repeat step-time ratios with its middle half, the text objective's own ms
per step and share of the step, inference img/s, peak memory, the measured matmul peak and the
model-FLOPs utilisation. Both arms run the training loop's own step_losses, backward, clipping
and optimiser on the loop's device, precision and compilation (textteacher.compute_setup).
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
from torch.utils.flop_counter import FlopCounterMode

import textteacher as tt  # noqa: E402
from textteacher import UserError, build_model, build_optimizer, compute_setup, step_losses  # noqa

BENCH_TEXT_DIM = 768  # the width of the benchmark's random targets: a BERT-base text encoder's


def synchronize(device):
    """Wait for the device's queued work: a timer must stop when the work is done, not queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_flops(cfg, num_classes):
    """FLOPs per image of the ViT's forward pass and of a training step (forward and backward),
    as FlopCounterMode counts them: 2 * M * N * K per matmul and per patch convolution;
    element-wise work (norms, GELU, softmax, the optimiser) is not counted.

    I build the model on the meta device: shapes only, no memory and no arithmetic. There
    SDPA takes its reference path of two batched matmuls, which the counter sees; the fused
    CPU kernel that runs for real is not in its table and would count as zero.
    """
    with torch.device("meta"):
        vit = build_model(cfg, num_classes, 0).vit
        images = torch.empty(1, 3, cfg.img_size, cfg.img_size)
        with FlopCounterMode(display=False) as forward:
            vit(images)
        with FlopCounterMode(display=False) as step:
            vit(images).sum().backward()
    return forward.get_total_flops(), step.get_total_flops()


def matmul_peak(device, dtype):
    """FLOP/s of one large square matmul: the most any model's matmuls can expect of this device."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        synchronize(device)
        t = time.perf_counter()
        a @ a
        synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[1:])  # the first one warms up


def max_rss():
    """The most memory this process has held so far, in bytes (Linux reports KiB, macOS bytes)."""
    import resource  # Unix only, hence imported here

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


def benchmark(cfg, warmup=3, steps=1, repeats=15):
    """--benchmark: time the training step of the configured model without and with the text
    objective, the text objective on its own, and inference, on synthetic batches; print the
    numbers and return them.

    Both arms run the training loop's own code (step_losses, backward, clipping, the
    optimiser) on the loop's device, precision and compilation. The arms alternate repeat
    by repeat, so that a slow phase of a shared machine hits both alike; every number is the
    median over repeats of `steps` steps, after `warmup` untimed steps (which also compile).
    """
    device, autocast, use_compile = compute_setup(
        cfg
    )  # the same device, precision and compilation as train()
    num_classes = {"shapes": 10, "cifar100": 100}.get(cfg.data, 1000)  # as --data would have it
    micro = cfg.batch_size // cfg.accum
    if micro < 2 or micro * cfg.accum != cfg.batch_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} must be a multiple of --accum {cfg.accum} with at "
            "least 2 images per micro-batch"
        )
    torch.manual_seed(cfg.seed)
    images = torch.randn(micro, 3, cfg.img_size, cfg.img_size, device=device)
    y = F.one_hot(torch.randint(num_classes, (micro,), device=device), num_classes).float()
    targets = torch.randn(micro, BENCH_TEXT_DIM, device=device)
    lam = 0.5  # the value does not change the cost, as long as it is above 0
    where = f"{device.type}" + (
        f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    )
    print(
        f"benchmark: ViT-{cfg.model}/{cfg.patch_size} at {cfg.img_size}px, batch {cfg.batch_size}"
        + (f" ({cfg.accum} x {micro})" if cfg.accum > 1 else "")
        + f", {cfg.optimizer}, {where}, "
        + ("bf16 autocast" if device.type == "cuda" else "fp32")
        + (", compiled" if use_compile else ", eager")
        + f"; medians of {repeats} x {steps} steps after {warmup} warm-up steps",
        flush=True,
    )

    def training_step(text_dim):
        """A fresh model and optimiser, and a function doing one step of the loop with them."""
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes, text_dim).to(device)
        optimizer = build_optimizer(cfg, model, device)
        train_model = torch.compile(model) if use_compile else model

        def step():
            for _ in range(cfg.accum):
                loss = step_losses(
                    train_model, images, y, targets if text_dim else None, lam, cfg, autocast
                )[0]
                (loss / cfg.accum).backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, step

    def seconds(step):
        """Seconds per call of step, over `steps` calls."""
        synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return (time.perf_counter() - t) / steps

    # memory first, before anything else has raised the process's high-water mark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = max_rss()
    model, text_step = training_step(BENCH_TEXT_DIM)
    for _ in range(warmup):
        text_step()
    synchronize(device)
    memory = (
        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss()
    ) - before
    base_model, base_step = training_step(0)
    for _ in range(warmup):
        base_step()
    times = {"baseline": [], "textteacher": []}
    arms = [("baseline", base_step), ("textteacher", text_step)]
    for i in range(repeats):
        for name, step in arms if i % 2 == 0 else arms[::-1]:  # either arm goes first as often
            times[name].append(seconds(step))
    base, text = statistics.median(times["baseline"]), statistics.median(times["textteacher"])
    # the cost ratio from the two arms' times of the same repeat: a slow phase cancels out
    ratios = [t / b for b, t in zip(times["baseline"], times["textteacher"])]
    ratio = statistics.median(ratios)
    # the middle half of the per-repeat ratios: how far to trust the median on this machine
    spread = (
        statistics.quantiles(ratios, n=4, method="inclusive")[::2]
        if repeats > 1
        else [ratio, ratio]
    )

    # The text objective alone. Everything TextTeacher adds to the step happens after F (text
    # head, contrastive loss, adaptive weight, and their backward), so time that part of both
    # arms from a leaf F: the whole-step ratio above is only as precise as the machine is steady.
    feat = torch.randn(micro, model.vit.head.in_features, device=device)

    def after_f(m, t):
        def run():
            f = feat.clone().requires_grad_(True)
            step_losses(m.heads, f, y, t, lam, cfg, autocast)[0].backward()

        return run

    after = {"baseline": after_f(base_model, None), "textteacher": after_f(model, targets)}
    extra = []
    for _ in range(warmup):
        after["baseline"](), after["textteacher"]()
    for _ in range(10 * repeats):  # cheap: milliseconds each
        t_base, t_text = seconds(after["baseline"]), seconds(after["textteacher"])
        extra.append(t_text - t_base)
    extra_per_step = statistics.median(extra) * cfg.accum  # seconds per optimiser step

    vit = model.vit.eval()
    infer_model = torch.compile(vit) if use_compile else vit

    @torch.no_grad()
    def infer():
        with autocast:
            infer_model(images)

    for _ in range(warmup):
        infer()
    infer_time = statistics.median(seconds(infer) for _ in range(repeats))

    forward_flops, train_flops = count_flops(cfg, num_classes)
    dtype = (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # what the step's matmuls run in
    peak = matmul_peak(device, dtype)
    r = dict(
        parameters=sum(p.numel() for p in model.vit.parameters()),
        text_head_parameters=sum(p.numel() for p in model.text_head.parameters()),
        forward_flops=forward_flops,
        train_flops=train_flops,
        baseline_images_per_s=cfg.batch_size / base,
        textteacher_images_per_s=cfg.batch_size / text,
        textteacher_step_ratio=ratio,
        textteacher_step_ratio_quartiles=spread,
        text_objective_ms=extra_per_step * 1e3,
        text_objective_share=extra_per_step / text,
        inference_images_per_s=micro / infer_time,
        peak_memory_mb=memory / 2**20,
        matmul_peak_flops=peak,
    )
    r["train_utilisation"] = r["baseline_images_per_s"] * train_flops / peak
    r["inference_utilisation"] = r["inference_images_per_s"] * forward_flops / peak
    print(
        f"  parameters     {r['parameters'] / 1e6:.2f}M in the ViT; the text head adds "
        f"{r['text_head_parameters'] / 1e6:.2f}M "
        f"({BENCH_TEXT_DIM}-d targets) and is dropped at export"
    )
    print(
        f"  FLOPs / image  {forward_flops / 1e9:.3f} G forward, {train_flops / 1e9:.3f} G "
        "training (forward + backward), by FlopCounterMode"
    )
    print(
        f"  training       baseline {r['baseline_images_per_s']:.1f} img/s, TextTeacher "
        f"{r['textteacher_images_per_s']:.1f} img/s: "
        f"per repeat, TextTeacher's step took a median {ratio:.3f}x the baseline's "
        f"({ratio - 1:+.1%}; "
        f"middle half of the repeats {spread[0]:.3f}-{spread[1]:.3f}x)"
    )
    print(
        f"  text objective {r['text_objective_ms']:.2f} ms per step on its own (text head, loss, "
        "adaptive weight and their "
        f"backward, timed from F): {r['text_objective_share']:.2%} of TextTeacher's step"
    )
    print(f"  inference      {r['inference_images_per_s']:.1f} img/s")
    print(
        f"  peak memory    {r['peak_memory_mb']:.0f} MB ("
        + ("max allocated" if device.type == "cuda" else "rise of the max RSS")
        + " while training TextTeacher)"
    )
    print(
        f"  matmul peak    {peak / 1e9:.0f} GFLOP/s measured "
        f"({str(dtype).removeprefix('torch.')}); model FLOPs utilisation: "
        f"training {r['train_utilisation']:.0%}, inference {r['inference_utilisation']:.0%}"
    )
    return r


def main(argv=None):
    cfg, _ = tt.parse_config(argv)
    tt.check_config(cfg)
    return benchmark(cfg)


if __name__ == "__main__":
    cli.run(main, interrupted="nothing was written")
